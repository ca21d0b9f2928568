"""Persistent parallel streams: windows continue each other, documents are joined by the
end-of-text token, resets mark document starts, and the saved state resumes exactly."""
import torch

from data import DataConfig, DocumentMixer, PackedStreams, TextSourceSpec, eval_windows, open_sources


class ListDocs:
    """A deterministic document stream of the given token lists (text = space-joined ids)."""

    def __init__(self, docs):
        self.docs, self.i = docs, 0

    def next_document(self):
        from data import Document

        doc = self.docs[self.i % len(self.docs)]
        self.i += 1
        return 0, Document(" ".join(map(str, doc)), "list", str(self.i))

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def encode(texts):
    return [[int(t) for t in text.split()] for text in texts]


EOT = 0


def test_windows_overlap_by_one_and_documents_are_joined_by_eot():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    streams = PackedStreams(ListDocs(docs), encode, EOT, batch_size=2, seq_length=4, refill_docs=1)
    b1, b2 = streams.next_batch(), streams.next_batch()
    assert b1.tokens.shape == (2, 5)
    assert b1.tokens[0].tolist() == [1, 2, 3, EOT, 4]  # stream 0 filled first: docs 0 and 1
    assert b1.tokens[1].tolist() == [9, EOT, 1, 2, 3]  # then stream 1: doc 2, doc 0 again
    assert b2.tokens[0, 0] == b1.tokens[0, -1] and b2.tokens[1, 0] == b1.tokens[1, -1]
    # resets: first token of every stream, and every token that follows an end-of-text
    assert b1.reset[0].tolist() == [True, False, False, False]
    assert b1.reset[1].tolist() == [True, False, True, False]
    x2 = b2.tokens[:, :-1]
    assert b2.reset[0, 0].item() == (b1.tokens[0, -2].item() == EOT)
    assert (b2.reset[:, 1:] == (x2[:, :-1] == EOT)).all()


def test_state_dict_resumes_with_the_same_next_batches():
    docs = [list(range(1, n)) for n in range(3, 30, 3)]
    a = PackedStreams(ListDocs(docs), encode, EOT, batch_size=3, seq_length=7, refill_docs=4)
    for _ in range(5):
        a.next_batch()
    saved = a.state_dict()
    expected = [a.next_batch() for _ in range(4)]
    b = PackedStreams(ListDocs(docs), encode, EOT, batch_size=3, seq_length=7, refill_docs=4)
    b.load_state_dict(saved)
    for e in expected:
        got = b.next_batch()
        assert torch.equal(got.tokens, e.tokens) and torch.equal(got.reset, e.reset) and torch.equal(got.sources, e.sources)


def test_real_text_streams_resume_through_the_mixer(corpus):
    from data import TokenizerConfig, build_tokenizer, sample_texts

    cfg = DataConfig(sources=[TextSourceSpec(type="text", path=str(corpus / "books"))], eval_fraction=0.02)
    sources = open_sources(cfg)
    tok = build_tokenizer(TokenizerConfig(vocab_size=512, train_chars=200_000), sample_texts(sources, cfg, 200_000))

    def make():
        return PackedStreams(DocumentMixer(sources, cfg), tok.encode_batch, tok.eot_id, 4, 64)

    a = make()
    for _ in range(30):
        a.next_batch()
    saved = a.state_dict()
    want = a.next_batch()
    b = make()
    b.load_state_dict(saved)
    assert torch.equal(b.next_batch().tokens, want.tokens)
    text = tok.decode(want.tokens[0].tolist())
    assert sum(c.isalpha() for c in text) > len(text) // 2  # real English, not noise


def test_eval_windows_are_consecutive_per_stream():
    ids = [list(range(1, 50)), list(range(100, 180))]
    windows = eval_windows(iter(ids), EOT, batch_size=2, seq_length=8, max_tokens=10_000)
    assert windows and all(w.shape == (2, 9) for w in windows)
    for prev, nxt in zip(windows, windows[1:]):
        assert torch.equal(prev[:, -1], nxt[:, 0])
    assert sum(w[:, 1:].numel() for w in windows) <= 10_000
