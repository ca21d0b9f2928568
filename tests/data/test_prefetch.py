"""Background workers: every (rank, worker) pair reads a disjoint share of every source,
documents arrive tokenised and in a fixed interleaving, a restart from the saved state
reproduces the same batches (weight changes included), worker failures surface in the
trainer, and workers shut down cleanly."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data import (
    AllSourcesDied,
    DataConfig,
    DocumentMixer,
    HFSourceSpec,
    PackedStreams,
    PrefetchingStream,
    TextSourceSpec,
    TokenizerConfig,
    build_tokenizer,
    make_document_stream,
    open_sources,
)

from .conftest import FlakySource, corpus_path

ROOT = Path(__file__).resolve().parents[2]


def config(**kwargs) -> DataConfig:
    base = dict(eval_fraction=0.0, min_text_length=1, dedup=False, retry_backoff_s=0.0, prefetch_docs=4)
    base.update(kwargs)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def qa_spec():
    return HFSourceSpec(type="hf", dataset="json", data_files=str(corpus_path("qa", "reading_qa.jsonl")),
                        fields=["question", "answer"], format="Q: {question}\nA: {answer}", name="qa")


@pytest.fixture(scope="module")
def tokenizer(qa_spec):
    cfg = config(sources=[qa_spec])
    texts = [d.text for d in open_sources(cfg)[0].documents()]
    return build_tokenizer(TokenizerConfig(vocab_size=400), texts)


def test_two_ranks_by_two_workers_read_disjoint_shares(qa_spec, tokenizer):
    cfg = config(sources=[qa_spec], mix_strategy="sequential")
    sources = open_sources(cfg)
    everything = {d.doc_id: d.text for d in sources[0].documents()}  # 158 records
    seen = {}
    for rank in range(2):
        with PrefetchingStream(sources, cfg, rank=rank, world_size=2, num_workers=2, tokenizer=tokenizer) as stream:
            for k in range(2 * 39):  # the smallest share has 39 documents: one epoch of each
                _, doc = stream.next_document()
                worker = k % 2  # strict interleaving: worker 0, 1, 0, 1, ...
                assert int(doc.doc_id.split(":")[1]) % 4 == rank * 2 + worker
                assert doc.ids == tokenizer.encode(doc.text)  # tokenised in the worker
                assert doc.doc_id not in seen, "a document was read twice"
                seen[doc.doc_id] = doc.text
    assert set(seen) == set(everything) - {"0:156", "0:157"}  # the two 40th documents of shards 0 and 1
    assert all(everything[i] == t for i, t in seen.items())


def test_a_restart_reproduces_the_same_batches(qa_spec, tokenizer):
    books = TextSourceSpec(type="text", path=str(corpus_path("books", "tinyshakespeare.txt")), chunk_chars=1500)
    cfg = config(sources=[books, qa_spec])
    sources = open_sources(cfg)

    def packed():
        stream = PrefetchingStream(sources, cfg, rank=1, world_size=2, num_workers=2, tokenizer=tokenizer)
        return stream, PackedStreams(stream, tokenizer.encode_batch, tokenizer.eot_id, batch_size=3, seq_length=64)

    stream, a = packed()
    for _ in range(3):
        a.next_batch()
    stream.set_weights([1.0, 4.0])  # an adaptive update before the save ...
    saved = a.state_dict()
    expected = []
    for step in range(6):
        if step == 2:
            stream.set_weights([3.0, 1.0])  # ... and one after it, at the same step in both runs
        expected.append(a.next_batch())
    stream.close()

    stream, b = packed()
    b.load_state_dict(saved)
    for step, e in enumerate(expected):
        if step == 2:
            stream.set_weights([3.0, 1.0])
        got = b.next_batch()
        assert (got.tokens == e.tokens).all() and (got.sources == e.sources).all() and (got.reset == e.reset).all()
    stream.close()
    with pytest.raises(ValueError, match="same data.num_workers"):
        PrefetchingStream(sources, cfg, num_workers=3).load_state_dict(saved["documents"])


def test_no_workers_means_the_in_process_mixer(qa_spec):
    cfg = config(sources=[qa_spec], num_workers=0)
    stream = make_document_stream(open_sources(cfg), cfg, rank=1, world_size=3)
    assert isinstance(stream, DocumentMixer) and (stream.shard, stream.num_shards) == (1, 3)
    cfg = config(sources=[qa_spec], num_workers=2)
    stream = make_document_stream(open_sources(cfg), cfg, rank=1, world_size=3)
    assert isinstance(stream, PrefetchingStream) and [stream.shard_of(w) for w in range(2)] == [2, 3]


def test_a_worker_whose_sources_all_die_raises_in_the_trainer():
    cfg = config(source_retries=1)
    sources = [FlakySource("f", 50, fail_at=4), FlakySource("g", 50, fail_at=6)]
    stream = PrefetchingStream(sources, cfg, num_workers=1)
    with pytest.raises(AllSourcesDied) as died:
        for _ in range(100):
            stream.next_document()
    assert [name for name, _ in died.value.failures] == ["f", "g"]
    assert stream._procs is None  # the stream shut its workers down


def test_close_stops_the_workers_and_the_stream_can_go_on(qa_spec):
    cfg = config(sources=[qa_spec])
    sources = open_sources(cfg)
    stream = PrefetchingStream(sources, cfg, num_workers=2)
    first = [stream.next_document()[1].doc_id for _ in range(5)]
    procs = list(stream._procs)
    stream.close()
    assert not any(p.is_alive() for p in procs)
    more = [stream.next_document()[1].doc_id for _ in range(5)]  # relaunched from the current state
    stream.close()
    reference = DocumentMixer(sources, cfg, 0, 2), DocumentMixer(sources, cfg, 1, 2)
    assert first + more == [reference[k % 2].next_document()[1].doc_id for k in range(10)]


def test_a_trainer_that_exits_without_close_does_not_hang(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from data import DataConfig, PrefetchingStream
        from tests.data.conftest import ListSource

        if __name__ == "__main__":
            stream = PrefetchingStream([ListSource("a", 1000)], DataConfig(eval_fraction=0.0), num_workers=2)
            print(stream.next_document()[1].doc_id, flush=True)
            # no close(): interpreter exit must stop the (daemon) workers
    """)
    (tmp_path / "run.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "a:0"
