"""Data-parallel plumbing: `torchrun --nproc_per_node=N main.py` sets the environment,
this turns it into a process group (gloo on CPU, NCCL on CUDA) and a few helpers.
Without torchrun everything here is a no-op for a single process."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto", timeout_s: int = 600) -> Dist:
    """Join the process group torchrun describes (idempotent); Dist() when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    ddp = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        if use_cuda:
            torch.cuda.set_device(ddp.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return ddp


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, ddp: Dist):
    """rank 0's obj on every rank."""
    if not ddp.enabled:
        return obj
    box = [obj if ddp.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank_0(fn, ddp: Dist):
    """fn() run on global rank 0 only, its result on every rank; an exception it raises
    is raised on every rank (so no rank waits for a result that will not come). With
    node-local disks only rank 0 is sure to hold the run's files."""
    if not ddp.enabled:
        return fn()
    box = None
    if ddp.is_main:
        try:
            box = ("ok", fn())
        except Exception as e:  # sent to the others, then raised here too
            box = ("error", e)
    kind, value = broadcast_object(box, ddp)
    if kind == "error":
        raise value
    return value


def gather_objects(obj, ddp: Dist) -> list | None:
    """Every rank's obj, as a list on rank 0 (None elsewhere)."""
    if not ddp.enabled:
        return [obj]
    out = [None] * ddp.world_size if ddp.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(t: torch.Tensor, ddp: Dist) -> torch.Tensor:
    if ddp.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, ddp: Dist, device) -> bool:
    """True on every rank if it is True on any (e.g. one rank got Ctrl-C)."""
    if not ddp.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ddp: Dist) -> None:
    if ddp.enabled:
        dist.barrier()
