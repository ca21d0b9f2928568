"""The tiny test preset, in one place: a seconds-scale run over the books corpus beside
the project (../shared/corpus/books). The suite, the user-path helpers (tests/userpath.py)
and bench/faults.py all train it, each with the section updates it needs."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


def update_sections(raw: dict, sections: dict) -> dict:
    """raw with each section dict updated key by key (a non-dict value replaces the section)."""
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def tiny_preset(name: str = "00_tiny", arch: str = "transformer", books: Path = CORPUS / "books", **sections) -> dict:
    """A seconds-scale preset over the books corpus (a 2-layer model, a 512-token BPE, an
    in-run save every 1024 tokens, no evaluation before the end); `sections` update it."""
    model = {"arch": arch, "d_model": 64, "n_layers": 2, "n_heads": 2}
    if arch == "hatchling":
        model.update(global_every=2, wm_window=32, chunk_size=16, plasticity_span=8, em_slots=8, pm_slots=4)
    raw = {
        "name": name,
        "description": "test preset",
        "model": model,
        "train": {"seq_length": 32, "batch_size": 4, "lr": 3e-3, "warmup_tokens": 1000, "log_every_steps": 1,
                  "eval_every_tokens": 10**9, "checkpoint_every_tokens": 1024, "eval_tokens": 2048, "samples": 0},
        "data": {"sources": [{"type": "text", "path": str(books), "name": "books"}], "eval_fraction": 0.02},
        "tokenizer": {"type": "bpe", "vocab_size": 512, "train_chars": 200_000},
    }
    return update_sections(raw, sections)
