"""What every source plugin is: a named, re-openable, deterministic stream of documents."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


class SourceError(Exception):
    """A source cannot be opened; the message is the one-line reason shown to the user."""


@dataclass
class Document:
    text: str
    source: str  # the source's name
    doc_id: str  # stable across runs: decides the held-out split and shard membership


class Source:
    """A plugin yields Documents. Subclasses set `name` and implement the two methods.

    `check()` fails fast (SourceError with a reason) when the source cannot be opened:
    a missing folder, an unreachable hub. `documents(shard, num_shards)` yields, in a
    fixed order, every document whose position p satisfies p % num_shards == shard, so
    that (rank, worker) pairs read disjoint shares and a restart can replay the order.
    """

    name: str = "source"

    def check(self) -> None:
        raise NotImplementedError

    def documents(self, shard: int = 0, num_shards: int = 1) -> Iterator[Document]:
        raise NotImplementedError
