"""Shared fixtures: the real-text corpus beside the project, tiny presets over it, a
reporter that interrupts a run in this process, and a test run that never touches the
user's home: every cache (the picker's step times, Hugging Face's) goes to a temporary
folder, for this process and every subprocess it starts. Triton runs under its
interpreter (see below)."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

# before anything imports triton (torch._dynamo does): tests/model/test_triton_*.py run our
# kernels under Triton's interpreter, which is read once, at triton's import; on a CPU the
# rest of the project never runs a Triton kernel, so the setting changes nothing else
os.environ.setdefault("TRITON_INTERPRET", "1")
# before any project module computes a cache path from it
REAL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
TEST_CACHE = Path(tempfile.mkdtemp(prefix="hatchling-test-cache-"))
os.environ["XDG_CACHE_HOME"] = str(TEST_CACHE)
WATCHED = ("hatchling", "huggingface")  # what a test run could write under the real cache

from tests.sample_presets import CORPUS, ROOT, tiny_preset as project_preset, update_sections  # noqa: E402

sys.path.insert(0, str(ROOT))

from presets import preset_from_dict  # noqa: E402
from presets.schema import Preset  # noqa: E402
from train.progress import Reporter  # noqa: E402

# the in-process tests' tiny preset: progress every 5 steps, no in-run save or evaluation
# before the end of their short runs, one generated sample, a larger BPE sample
IN_PROCESS = {"train": {"log_every_steps": 5, "eval_every_tokens": 1_000_000, "checkpoint_every_tokens": 1_000_000,
                        "eval_tokens": 4096, "samples": 1, "sample_tokens": 8},
              "tokenizer": {"train_chars": 300_000}}


def cache_snapshot(root: Path) -> dict:
    """{path: (size, mtime)} of every file under the watched folders of a cache root."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for name in WATCHED if (root / name).exists()
            for p in (root / name).rglob("*") if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def real_cache_untouched():
    """The test run writes nothing under the user's real cache folder."""
    before = cache_snapshot(REAL_CACHE)
    yield
    after = cache_snapshot(REAL_CACHE)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the test run wrote under the user's cache {REAL_CACHE}: {changed[:5]}"


@pytest.fixture
def corpus() -> Path:
    if not (CORPUS / "books").is_dir():
        pytest.skip(f"real-text corpus not found at {CORPUS} (it lives beside the project in ../shared/corpus)")
    return CORPUS


def tiny_preset_dict(books: Path, **overrides) -> dict:
    """The tiny preset (tests/sample_presets.py) as the in-process tests train it; `overrides` update its sections."""
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
