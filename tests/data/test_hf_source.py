"""The `hf` source over local files (the offline path through `datasets`): jsonl and
parquet, a local folder, multi-field Q/A records, skipped records, sharding, and a hub
dataset id that fails at once, with the hub's reason, when the hub is unreachable."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import AllSourcesFailed, DataConfig, HFSourceSpec, SourceError, open_sources
from data.sources.hf import HFSource
from data.sources.text import split_paragraphs

from .conftest import corpus_path


def hf(**kwargs) -> HFSource:
    return HFSource(HFSourceSpec(type="hf", **kwargs))


@pytest.fixture(scope="module")
def paragraphs():
    """Real paragraphs of War and Peace (a slice, to keep the files small)."""
    text = corpus_path("books", "war_and_peace.txt").read_text(encoding="utf-8")[100_000:400_000]
    return [p.strip() for p in split_paragraphs(text, 2000) if p.strip()]


@pytest.fixture
def parquet_dir(tmp_path, paragraphs):
    """The paragraphs as 4 parquet files (a `text` column plus an unused one)."""
    folder = tmp_path / "pq"
    folder.mkdir()
    quarter = (len(paragraphs) + 3) // 4
    for f in range(4):
        part = paragraphs[f * quarter:(f + 1) * quarter]
        pq.write_table(pa.table({"text": part, "n": list(range(len(part)))}), folder / f"train-{f:05d}-of-00004.parquet")
    return folder


def test_jsonl_qa_records_are_formatted():
    path = corpus_path("qa", "reading_qa.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    source = hf(dataset="json", data_files=str(path), fields=["title", "question", "answer"],
                format="Title: {title}\nQ: {question}\nA: {answer}")
    source.check()
    docs = list(source.documents())
    assert len(docs) == len(records) == 158 and source.skipped == 0
    first = records[0]
    assert docs[0].text == f"Title: {first['title'].strip()}\nQ: {first['question'].strip()}\nA: {first['answer'].strip()}"
    assert [d.doc_id for d in docs[:3]] == ["0:0", "0:1", "0:2"]
    assert source.name == str(path)


def test_a_jsonl_path_as_dataset_reads_the_text_field():
    path = corpus_path("qa", "reading_qa.jsonl")
    source = hf(dataset=str(path), text_field="answer", name="answers")
    source.check()
    docs = list(source.documents())
    assert len(docs) == 158 and docs[0].text == "Bureau of Labor Statistics" and docs[0].source == "answers"


def test_parquet_files_and_folder_stream_every_record_in_order(parquet_dir, paragraphs):
    by_files = hf(dataset="parquet", data_files=str(parquet_dir / "*.parquet"))
    by_folder = hf(dataset=str(parquet_dir))
    for source in (by_files, by_folder):
        source.check()
        assert [d.text for d in source.documents()] == paragraphs


def test_records_missing_a_field_are_skipped_and_counted(tmp_path):
    rows = [{"question": f"question {i}?", "answer": f"answer {i}"} for i in range(10)]
    rows[2].pop("answer")
    rows[5]["answer"] = None
    rows[7]["answer"] = "   "
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    source = hf(dataset="json", data_files=str(path), fields=["question", "answer"], format="Q: {question}\nA: {answer}")
    source.check()
    docs = list(source.documents())
    assert source.skipped == 3
    assert [d.doc_id for d in docs] == [f"0:{i}" for i in range(10) if i not in (2, 5, 7)]
    assert docs[0].text == "Q: question 0?\nA: answer 0"


@pytest.mark.parametrize("fmt", ["{question.__class__}", "{question[0]}", "{question!r}", "{nope}"])
def test_an_unsafe_format_fails_check(fmt):
    path = corpus_path("qa", "reading_qa.jsonl")
    source = hf(dataset="json", data_files=str(path), fields=["question", "answer"], format=fmt)
    with pytest.raises(SourceError):
        source.check()


def test_a_missing_text_field_fails_check_naming_the_columns(parquet_dir):
    with pytest.raises(SourceError, match=r"content.*columns: text, n"):
        hf(dataset=str(parquet_dir), text_field="content").check()


def test_missing_local_files_fail_check():
    for source in (hf(dataset="json", data_files="/nonexistent/qa.jsonl"), hf(dataset="./nonexistent/qa.jsonl")):
        with pytest.raises(SourceError, match="does not exist"):
            source.check()


def test_position_shards_are_disjoint_and_cover_everything():
    source = hf(dataset=str(corpus_path("qa", "reading_qa.jsonl")), text_field="question")
    everything = [d.doc_id for d in source.documents(0, 1)]
    shares = [[d.doc_id for d in source.documents(k, 3)] for k in range(3)]
    assert sorted(sum(shares, []), key=everything.index) == everything
    assert len(set(sum(shares, []))) == len(everything)
    assert all(int(i.split(":")[1]) % 3 == k for k, share in enumerate(shares) for i in share)


def test_file_shards_give_each_reader_whole_files(parquet_dir):
    source = hf(dataset=str(parquet_dir))
    everything = {d.doc_id for d in source.documents(0, 1)}
    shares = [[d.doc_id for d in source.documents(k, 2)] for k in range(2)]
    assert {i.split(":")[0] for i in shares[0]} == {"0", "2"} and {i.split(":")[0] for i in shares[1]} == {"1", "3"}
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == everything


def test_hub_dataset_fails_fast_with_the_hub_reason(monkeypatch):
    import datasets

    monkeypatch.setattr("data.sources.hf.hub_status", lambda: (False, "Hugging Face hub (test) unreachable"))

    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset must not be called when the hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    source = hf(dataset="HuggingFaceFW/fineweb-edu", config="sample-10BT")
    with pytest.raises(SourceError, match=r"HuggingFaceFW/fineweb-edu: Hugging Face hub \(test\) unreachable"):
        source.check()
    with pytest.raises(AllSourcesFailed) as failed:
        open_sources(DataConfig(sources=[source.spec]), log=lambda _: None)
    assert failed.value.failures[0][0] == "HuggingFaceFW/fineweb-edu"
    assert "unreachable" in failed.value.failures[0][1]


def test_local_sources_never_ask_the_hub(monkeypatch, parquet_dir):
    def boom():
        raise AssertionError("hub_status must not be consulted for local data")

    monkeypatch.setattr("data.sources.hf.hub_status", boom)
    hf(dataset="parquet", data_files=str(parquet_dir / "*.parquet")).check()
    hf(dataset=str(parquet_dir)).check()


def test_dataset_scripts_are_never_trusted(monkeypatch, parquet_dir):
    import datasets

    seen = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: seen.append(k) or real(*a, **k))
    next(iter(hf(dataset=str(parquet_dir)).documents()))
    assert seen and all(not k.get("trust_remote_code") and k["streaming"] for k in seen)


def test_bare_strings_pick_the_hf_source_for_tables_and_hub_ids(tmp_path):
    from data.registry import make_source
    from data.sources.text import TextSource

    qa = corpus_path("qa", "reading_qa.jsonl")
    assert isinstance(make_source(str(qa)), HFSource)
    hub = make_source("someone/some-dataset")
    assert isinstance(hub, HFSource) and hub.spec.dataset == "someone/some-dataset" and not hub.is_local()
    (tmp_path / "notes").mkdir()
    assert isinstance(make_source(str(tmp_path / "notes")), TextSource)
