"""Resuming an interrupted run on another number of processes (4 GPUs, now 2; two nodes,
now one).

What carries over exactly is everything shared by the ranks: weights, optimizer state,
schedule position, token count. What belonged to each rank is rebuilt for the new ranks:
the data streams are re-sharded (data/reshard.py: no document skipped, repeats counted),
each rank's recurrent state starts afresh (the streams it belonged to were re-dealt), and
the random generators are seeded as at a fresh start. The global batch is kept by
scaling `grad_accum_steps` where the old global batch divides; otherwise the per-process
batch stays and the schedule is followed by tokens, not steps (optim.build_scheduler).
"""
from __future__ import annotations

from data import DataConfig
from data.reshard import reader_states, reshard_documents, reshard_streams


def kept_accumulation(grad_accum_steps: int, old_world: int, new_world: int) -> int | None:
    """The grad_accum_steps that keeps the global batch on `new_world` processes, or None
    when the old global batch does not divide."""
    micro_steps = grad_accum_steps * old_world  # per-process micro-batches in one global batch
    return micro_steps // new_world if micro_steps % new_world == 0 else None


def resized_ranks(stored_ranks: list[dict], sources, data_cfg: DataConfig, new_world: int, batch_size: int
                  ) -> tuple[list[dict], int]:
    """(every new rank's per-rank pieces, documents that will be read twice) for a run
    saved by len(stored_ranks) processes and resumed on `new_world`."""
    streams = [r["streams"] for r in stored_ranks]
    template, repeated = reshard_documents(sources, data_cfg, list(reader_states(streams)))
    ranks = []
    for rank in range(new_world):
        state = reshard_streams(streams, rank, new_world, batch_size)
        if data_cfg.num_workers > 0:
            w_count = data_cfg.num_workers
            state["documents"] = {"num_workers": w_count, "rank": rank, "world_size": new_world, "turn": 0,
                                  "consumed": [0] * w_count, "workers": [dict(template) for _ in range(w_count)],
                                  "pending": [[] for _ in range(w_count)]}
        else:
            state["documents"] = dict(template)
        ranks.append({"streams": state, "carried": {"value": None}, "rng": None})
    return ranks, repeated
