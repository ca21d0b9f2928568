"""Resuming a run's data on another number of readers (a run of N processes resumed on M).

Each reader of the old run (a rank, or a rank's background worker) read its own share of
every source, and its saved mixer state says how far: the epoch and how many filtered
documents of that epoch it took. Re-sharding turns those into one starting state that
every new reader shares:

- for each source, the epoch E the slowest old reader was in, and the ids of the
  documents any old reader had taken in epoch E (found by replaying each old share: the
  same filtered order the reader read). New readers start epoch E over their new shares
  and pass over those ids, so no document of the epoch is skipped and none of it is read
  twice;
- documents an old reader had already taken in a later epoch (it ran ahead, a small
  source) will be read again when the new readers reach that epoch: they are counted
  and reported as repeated.

The token streams' buffers (documents partly trained, tokenised documents not yet
placed) are handed on as they are, spread over the new streams, so nothing read is lost.
"""
from __future__ import annotations

from typing import Iterator, Optional

from .config import DataConfig
from .registry import DocumentMixer
from .sources.base import Source


def reader_states(stream_states: list[dict]) -> Iterator[tuple[int, int, Optional[dict]]]:
    """(shard, num_shards, mixer state or None) of every reader of a saved run, from its
    ranks' PackedStreams states (rank order): one reader per rank, or per background
    worker (worker w of rank r read shard r*W + w of N*W)."""
    n = len(stream_states)
    for rank, state in enumerate(stream_states):
        docs = state["documents"]
        if "num_workers" in docs:
            w_count = int(docs["num_workers"])
            for w, mixer in enumerate(docs["workers"]):
                yield rank * w_count + w, n * w_count, mixer
        else:
            yield rank, n, docs


def _taken(sources: list[Source], cfg: DataConfig, shard: int, num_shards: int, state: dict, i: int,
           epoch: int) -> list[str]:
    """Ids of the documents the reader with `state` took from source i in `epoch`: its first
    `consumed` documents when it is still in that epoch, its whole share when it is past it."""
    mixer = DocumentMixer(sources, cfg, shard, num_shards, log=lambda m: None)
    mixer.load_state_dict(state)
    ahead = state["epoch"][i] > epoch
    mixer.epoch[i] = epoch  # replay that epoch (with the reader's own skip list when it was that epoch's)
    ids = []
    for doc in mixer._filtered(i):
        if not ahead and len(ids) >= state["consumed"][i]:
            break
        ids.append(doc.doc_id)
    return ids


def reshard_documents(sources: list[Source], cfg: DataConfig,
                      readers: list[tuple[int, int, Optional[dict]]]) -> tuple[dict, int]:
    """(the mixer state every new reader starts from, documents that will be read twice)."""
    n_src = len(sources)
    states = [(shard, num, st) for shard, num, st in readers if st is not None]
    if not states:  # no reader had started: a fresh start
        return DocumentMixer(sources, cfg).state_dict() | {"rng": None}, 0
    first = states[0][2]
    epoch, skip, repeated = [0] * n_src, [set() for _ in range(n_src)], 0
    for i in range(n_src):
        epoch[i] = min(st["epoch"][i] for _, _, st in states)
        for shard, num, st in states:
            taken = _taken(sources, cfg, shard, num, st, i, epoch[i])
            skip[i].update(taken)
            ahead = st["epoch"][i] - epoch[i]
            if ahead > 0:  # taken again when the new readers reach the reader's epoch (its whole share was taken)
                repeated += st["consumed"][i] + (ahead - 1) * len(taken)
    state = {"epoch": epoch, "consumed": [0] * n_src, "turn": first["turn"], "weights": list(first["weights"]),
             "rng": None, "strategy": first.get("strategy", cfg.mix_strategy), "dead": first.get("dead", []),
             "skip": [sorted(s) for s in skip], "skip_epoch": list(epoch)}
    return state, repeated


def reshard_streams(stream_states: list[dict], rank: int, world_size: int, batch_size: int) -> dict:
    """This rank's PackedStreams state (without "documents") in a run of `world_size`
    ranks, from every old rank's: old stream k (rank-major) goes to new global stream
    k mod (world_size * batch_size), several old streams joined one after the other
    (each buffer ends at a document's end), and the tokenised documents not yet placed
    are dealt out over the new ranks in turn."""
    old = [(buf, src, first) for st in stream_states
           for buf, src, first in zip(st["buffers"], st["buffer_sources"], st["starts_doc"])]
    n_new = world_size * batch_size
    buffers, sources, starts = [], [], []
    for b in range(batch_size):
        parts = old[rank * batch_size + b::n_new]
        buffers.append([t for buf, _, _ in parts for t in buf])
        sources.append([s for _, src, _ in parts for s in src])
        starts.append(parts[0][2] if parts else True)
    pending = [p for st in stream_states for p in st["pending"]]
    return {"buffers": buffers, "buffer_sources": sources, "starts_doc": starts,
            "pending": [p for k, p in enumerate(pending) if k % world_size == rank]}
