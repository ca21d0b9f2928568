"""Tokenizers: the offline byte-level BPE round-trips real text; serialisation is exact;
a hub tokenizer on an offline machine fails at once with a clear way out."""
import pytest

from data import (
    DataConfig,
    TextSourceSpec,
    TokenizerConfig,
    TokenizerError,
    build_tokenizer,
    open_sources,
    sample_texts,
)
from data.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def bpe():
    from tests.conftest import CORPUS

    if not (CORPUS / "books").is_dir():
        pytest.skip(f"real-text corpus not found at {CORPUS}")
    cfg = DataConfig(sources=[TextSourceSpec(type="text", path=str(CORPUS / "books"))])
    sources = open_sources(cfg)
    return build_tokenizer(TokenizerConfig(vocab_size=1024, train_chars=500_000), sample_texts(sources, cfg, 500_000))


def test_bpe_round_trips_and_compresses_real_text(bpe, corpus):
    text = (corpus / "books" / "war_and_peace.txt").read_text(encoding="utf-8")[200_000:210_000]
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges learned: under half a token per character (bytes would be 1)
    assert bpe.vocab_size == 1024 and bpe.decode([bpe.eot_id]) == ""


def test_bpe_handles_any_bytes(bpe):
    text = "naïve café — 日本語 \x01 emoji 🙂"
    assert bpe.decode(bpe.encode(text)) == text


def test_serialised_tokenizer_gives_identical_ids(bpe, corpus):
    again = TextTokenizer.from_json(bpe.to_json(), bpe.spec)
    text = (corpus / "books" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:5000]
    assert again.encode(text) == bpe.encode(text) and again.eot_id == bpe.eot_id


def test_hub_tokenizer_offline_fails_fast_with_hint(monkeypatch, tmp_path):
    import data.tokenizer as tk

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tk, "hub_status", lambda: (False, "Hugging Face hub (huggingface.co) unreachable: test"))
    with pytest.raises(TokenizerError, match='not cached and Hugging Face hub .* unreachable.*"bpe"'):
        build_tokenizer(TokenizerConfig(type="hf", name="gpt2"))


def test_local_tokenizer_file(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.to_json())
    tok = build_tokenizer(TokenizerConfig(type="file", path=str(path)))
    assert tok.encode("hello world") == bpe.encode("hello world")
    with pytest.raises(TokenizerError, match="could not read tokenizer file"):
        build_tokenizer(TokenizerConfig(type="file", path=str(tmp_path / "missing.json")))
