"""Shared fixtures: the real-text corpus beside the project, and tiny presets over it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
sys.path.insert(0, str(ROOT))

from train.config import Preset  # noqa: E402
from train.preset import preset_from_dict  # noqa: E402


@pytest.fixture
def corpus() -> Path:
    if not (CORPUS / "books").is_dir():
        pytest.skip(f"real-text corpus not found at {CORPUS} (it lives beside the project in ../shared/corpus)")
    return CORPUS


def tiny_preset_dict(books: Path, **overrides) -> dict:
    """A seconds-scale preset over the books corpus: 2-layer model, 512-token BPE."""
    raw = {
        "name": "tiny",
        "model": {"arch": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 2},
        "train": {"seq_length": 32, "batch_size": 4, "lr": 3e-3, "warmup_tokens": 1000, "log_every_steps": 5,
                  "eval_every_tokens": 1_000_000, "checkpoint_every_tokens": 1_000_000, "eval_tokens": 4096,
                  "samples": 1, "sample_tokens": 8},
        "data": {"sources": [{"type": "text", "path": str(books), "name": "books"}], "eval_fraction": 0.02},
        "tokenizer": {"type": "bpe", "vocab_size": 512, "train_chars": 300_000},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


@pytest.fixture
def tiny_preset(corpus):
    def make(**overrides) -> Preset:
        preset, _ = preset_from_dict(tiny_preset_dict(corpus / "books", **overrides), "tiny")
        return preset

    return make
