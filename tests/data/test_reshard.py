"""Re-sharding a run's data for another number of readers: every document of the epoch
not yet taken is read by exactly one new reader, none already taken is read again in
that epoch, a reader that ran into a later epoch has its repeats counted, and every
token in the streams' buffers is handed on."""
from data.config import DataConfig, TextSourceSpec
from data.registry import DocumentMixer, open_sources
from data.reshard import reader_states, reshard_documents, reshard_streams


def folder_source(tmp_path, n_docs=23):
    folder = tmp_path / "docs"
    folder.mkdir()
    for k in range(n_docs):
        (folder / f"{k:03d}.txt").write_text(f"document number {k} " + "words " * 20)
    cfg = DataConfig(sources=[TextSourceSpec(type="text", path=str(folder), name="docs")], eval_fraction=0.0,
                     min_text_length=10)
    return open_sources(cfg, log=lambda m: None), cfg, n_docs


def take(mixer: DocumentMixer, n: int) -> list[str]:
    return [mixer.next_document()[1].doc_id for _ in range(n)]


def epoch_of(mixer: DocumentMixer) -> list[str]:
    """The documents a reader takes until its epoch ends."""
    ids, epoch = [], mixer.epoch[0]
    while True:
        doc = mixer._next_from(0)
        if doc is None or mixer.epoch[0] != epoch:
            return ids
        ids.append(doc.doc_id)


def test_two_readers_become_three_with_nothing_skipped_or_repeated(tmp_path):
    sources, cfg, n_docs = folder_source(tmp_path)
    old = [DocumentMixer(sources, cfg, shard, 2) for shard in range(2)]
    taken = take(old[0], 3) + take(old[1], 5)
    streams = [{"documents": m.state_dict()} for m in old]
    template, repeated = reshard_documents(sources, cfg, list(reader_states(streams)))
    assert repeated == 0
    new = []
    for shard in range(3):
        mixer = DocumentMixer(sources, cfg, shard, 3)
        mixer.load_state_dict(template)
        new.append(epoch_of(mixer))
    read = [d for ids in new for d in ids]
    assert len(read) == len(set(read)), "a document read by two new readers"
    assert not set(read) & set(taken), "a document taken before the resize read again"
    assert len(set(read) | set(taken)) == n_docs, "a document skipped"


def test_a_reader_in_a_later_epoch_counts_its_repeats(tmp_path):
    sources, cfg, n_docs = folder_source(tmp_path, n_docs=10)
    slow, fast = DocumentMixer(sources, cfg, 0, 2), DocumentMixer(sources, cfg, 1, 2)
    take(slow, 2)
    take(fast, 5 + 3)  # its whole share of 5, then 3 of the next epoch
    assert fast.epoch[0] == 1 and fast.consumed[0] == 3
    streams = [{"documents": slow.state_dict()}, {"documents": fast.state_dict()}]
    template, repeated = reshard_documents(sources, cfg, list(reader_states(streams)))
    assert repeated == 3
    mixer = DocumentMixer(sources, cfg, 0, 1)
    mixer.load_state_dict(template)
    assert len(epoch_of(mixer)) == 3  # the slow reader's 3 untaken documents; the fast one's share was all taken


def test_a_saved_resize_replays_to_the_same_place(tmp_path):
    """A re-sharded reader stopped and restarted (at the same world size) goes on where it was."""
    sources, cfg, _ = folder_source(tmp_path)
    old = [DocumentMixer(sources, cfg, shard, 2) for shard in range(2)]
    take(old[0], 4)
    template, _ = reshard_documents(sources, cfg, list(reader_states([{"documents": m.state_dict()} for m in old])))
    a = DocumentMixer(sources, cfg, 0, 1)
    a.load_state_dict(template)
    take(a, 3)
    b = DocumentMixer(sources, cfg, 0, 1)
    b.load_state_dict(a.state_dict())
    assert take(a, 5) == take(b, 5)


def test_stream_buffers_and_pending_documents_are_handed_on_whole():
    def rank_state(r):
        return {"buffers": [[r * 100 + b, 7, 0] for b in range(2)], "buffer_sources": [[0, 0, 0]] * 2,
                "starts_doc": [False, True], "pending": [(0, [r, r, 0])]}

    old = [rank_state(r) for r in range(2)]
    new = [reshard_streams(old, rank, 1, 2) for rank in range(1)]
    tokens = sorted(t for st in new for buf in st["buffers"] for t in buf)
    assert tokens == sorted(t for st in old for buf in st["buffers"] for t in buf)
    assert len(new[0]["pending"]) == 2
    three = [reshard_streams(old, rank, 3, 2) for rank in range(3)]
    assert sum(len(st["pending"]) for st in three) == 2
    assert sorted(t for st in three for buf in st["buffers"] for t in buf) == tokens
