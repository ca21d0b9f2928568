"""Fixtures for the data tests: nothing may reach the network, and small in-memory
sources that follow the Source contract (picklable, so background workers can use them)."""
from __future__ import annotations

from pathlib import Path

import pytest

from data.hub import hub_status
from data.sources.base import Document, Source, SourceError

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every data test runs as if offline: datasets and huggingface_hub must not try the hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_status.cache_clear()
    yield
    hub_status.cache_clear()  # later tests (other packages) must not see our offline answer


def corpus_path(*parts: str) -> Path:
    path = CORPUS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real-text corpus not found at {path} (it lives beside the project in ../shared/corpus)")
    return path


class ListSource(Source):
    """`n` documents "<name> document <p> ..." following the sharding contract."""

    def __init__(self, name: str, n: int, length: int = 60):
        self.name, self.n, self.length = name, n, length

    def check(self) -> None:
        if self.n < 0:
            raise SourceError("negative")

    def text(self, p: int) -> str:
        return f"{self.name} document {p} " + "x" * self.length

    def documents(self, shard: int = 0, num_shards: int = 1):
        for p in range(self.n):
            if p % num_shards == shard:
                yield Document(self.text(p), self.name, f"{self.name}:{p}")


class FlakySource(ListSource):
    """Raises ConnectionError when reaching position `fail_at` (every time if `always`,
    else only the first `times` times it gets there: a transient network drop)."""

    def __init__(self, name: str, n: int, fail_at: int, times: int = 10**9):
        super().__init__(name, n)
        self.fail_at, self.times, self.failed = fail_at, times, 0

    def documents(self, shard: int = 0, num_shards: int = 1):
        for doc in super().documents(shard, num_shards):
            if doc.doc_id == f"{self.name}:{self.fail_at}" and self.failed < self.times:
                self.failed += 1
                raise ConnectionError("connection reset by peer")
            yield doc
