"""Tokenizers: a Hugging Face tokenizer by name, a local tokenizer.json, or a byte-level
BPE learned with `tokenizers` from the preset's own sources (the offline path).

Whatever is used is serialised (`to_json`) and stored with every checkpoint, so a resumed
or continued run always gets exactly the same vocabulary."""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import TokenizerConfig
from .hub import hub_status

EOT = "<|endoftext|>"
_EOT_CANDIDATES = (EOT, "</s>", "<eos>", "[SEP]", "<|end_of_text|>")


class TokenizerError(Exception):
    """The tokenizer cannot be built; the message says why and what to do."""


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus its end-of-text id. encode: str -> list[int]."""

    def __init__(self, tokenizer: Tokenizer, spec: dict):
        self.tok, self.spec = tokenizer, spec
        self.eot_id = next((tokenizer.token_to_id(t) for t in _EOT_CANDIDATES
                            if tokenizer.token_to_id(t) is not None), None)
        if self.eot_id is None:
            raise TokenizerError(f"tokenizer has no end-of-text token (looked for {', '.join(_EOT_CANDIDATES)})")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def to_json(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_json(cls, text: str, spec: dict) -> "TextTokenizer":
        return cls(Tokenizer.from_str(text), spec)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, every byte representable)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _hf_tokenizer(name: str) -> Tokenizer:
    """`tokenizer.json` of a hub repo: the local cache first, the hub if reachable."""
    from huggingface_hub import hf_hub_download

    try:
        return Tokenizer.from_file(hf_hub_download(name, "tokenizer.json", local_files_only=True))
    except Exception:
        pass
    ok, reason = hub_status()
    if not ok:
        raise TokenizerError(f"tokenizer {name!r} is not cached and {reason}; use \"tokenizer\": "
                             "{\"type\": \"bpe\"} to learn one from your own data offline")
    try:
        return Tokenizer.from_file(hf_hub_download(name, "tokenizer.json"))
    except Exception as e:
        raise TokenizerError(f"could not fetch tokenizer {name!r} from the hub: {e}") from None


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str] | None = None) -> TextTokenizer:
    """The tokenizer a preset asks for. `texts` (training text) is needed for "bpe"."""
    spec = {"type": cfg.type, "name": cfg.name, "path": cfg.path, "vocab_size": cfg.vocab_size}
    if cfg.type == "hf":
        return TextTokenizer(_hf_tokenizer(cfg.name), spec)
    if cfg.type == "file":
        try:
            return TextTokenizer(Tokenizer.from_file(cfg.path), spec)
        except Exception as e:
            raise TokenizerError(f"could not read tokenizer file {cfg.path}: {e}") from None
    if texts is None:
        raise TokenizerError("a bpe tokenizer needs training text")
    return TextTokenizer(train_bpe(texts, cfg.vocab_size), spec)
