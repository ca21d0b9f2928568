"""Shared fixtures: the real-text corpus beside the project, tiny presets over it, and a
reporter that interrupts a run in this process."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.presets import CORPUS, ROOT, tiny_preset as project_preset, update_sections

sys.path.insert(0, str(ROOT))

from train.config import Preset  # noqa: E402
from train.preset import preset_from_dict  # noqa: E402
from train.progress import Reporter  # noqa: E402

# the in-process tests' tiny preset: progress every 5 steps, no in-run save or evaluation
# before the end of their short runs, one generated sample, a larger BPE sample
IN_PROCESS = {"train": {"log_every_steps": 5, "eval_every_tokens": 1_000_000, "checkpoint_every_tokens": 1_000_000,
                        "eval_tokens": 4096, "samples": 1, "sample_tokens": 8},
              "tokenizer": {"train_chars": 300_000}}


@pytest.fixture
def corpus() -> Path:
    if not (CORPUS / "books").is_dir():
        pytest.skip(f"real-text corpus not found at {CORPUS} (it lives beside the project in ../shared/corpus)")
    return CORPUS


def tiny_preset_dict(books: Path, **overrides) -> dict:
    """The tiny preset (tests/presets.py) as the in-process tests train it; `overrides` update its sections."""
    return update_sections(project_preset("tiny", books=books, **IN_PROCESS), overrides)


@pytest.fixture
def tiny_preset(corpus):
    def make(**overrides) -> Preset:
        preset, _ = preset_from_dict(tiny_preset_dict(corpus / "books", **overrides), "tiny")
        return preset

    return make


class InterruptAt(Reporter):
    """Delivers a real SIGINT to this process once training passes `tokens`."""

    def __init__(self, tokens):
        super().__init__(enabled=False)
        self.at, self.sent = tokens, False

    def update(self, tokens, *args, **kwargs):
        if tokens >= self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
