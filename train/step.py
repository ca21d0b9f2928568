"""One optimizer step: forward and backward over the step's micro-batches, the global
gradient-norm clip, then the optimizer and schedule step. Out of memory cuts the
micro-batches into more row groups and redoes the step; a non-finite gradient skips it
(train/bad_steps.py has both rules)."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from model import detach_state

from .bad_steps import Faults
from .distributed import Dist
from .state import CarriedState, join_rows, take_rows


def tokens_allowed(remaining: int, micro: int, rank: int, world: int, per_micro: int) -> int:
    """Tokens rank `rank` may train on in micro-step `micro` so the run ends at exactly the
    budget: the last step's remainder is handed out micro-step by micro-step, rank by rank."""
    before = (micro * world + rank) * per_micro
    return max(0, min(per_micro, remaining - before))


class TrainStep:
    """The step of one run: `step(batches, remaining, index)` trains on the batches (one
    per micro-step, [B, T+1] each) and returns the step's sums: "loss_sum" (this rank's
    cross-entropy summed over its counted tokens), "src_loss" / "src_count" per source,
    "aux" (the weighted auxiliary loss terms), "metrics" (the model's), "n" (tokens
    trained, all ranks), "grad_norm", "skipped" (a non-finite gradient: nothing changed)
    and "roll_back" (the faults' verdict after a skipped step)."""

    def __init__(self, model, train_model, optimizer, scheduler, faults: Faults, carried: CarriedState,
                 autocast: Callable, cfg, ddp: Dist, device: torch.device, eot_id: int, n_sources: int):
        self.model, self.train_model, self.optimizer, self.scheduler = model, train_model, optimizer, scheduler
        self.faults, self.carried, self.autocast, self.cfg, self.ddp, self.device = faults, carried, autocast, cfg, ddp, device
        self.eot_id, self.n_sources = eot_id, n_sources
        self.tokens_per_micro = cfg.batch_size * cfg.seq_length
        self.tokens_per_step = self.tokens_per_micro * cfg.grad_accum_steps * ddp.world_size

    def __call__(self, batches, remaining: int, index: int) -> dict:
        out = self.faults.retry_out_of_memory(lambda: self._forward_backward(batches, remaining), self._clean_up)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if not torch.isfinite(grad_norm):  # identical on every rank: gradients are all-reduced
            self.optimizer.zero_grad(set_to_none=True)
            roll_back = self.faults.bad_step(index)
            return {**out, "n": 0, "skipped": True, "roll_back": roll_back, "grad_norm": grad_norm}
        self.faults.good_step()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.carried.value = out["state"]
        return {**out, "skipped": False, "roll_back": False, "grad_norm": grad_norm}

    def _clean_up(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward_backward(self, batches, remaining: int) -> dict:
        """Forward and backward over the micro-batches, each cut into `faults.splits` row
        groups (streams); gradients accumulate, and the carried state is cut and joined
        again, so splitting changes the memory a forward needs, not the result."""
        ddp, B, T, dev = self.ddp, self.cfg.batch_size, self.cfg.seq_length, self.device
        n_step = min(remaining, self.tokens_per_step)
        acc = {"loss_sum": torch.zeros((), device=dev), "src_loss": torch.zeros(self.n_sources, device=dev),
               "src_count": torch.zeros(self.n_sources, device=dev), "aux": {}, "metrics": {}}
        state = self.carried.value
        rows_per = math.ceil(B / self.faults.splits)
        groups = [slice(r, min(B, r + rows_per)) for r in range(0, B, rows_per)]
        n_passes = len(batches) * len(groups)
        for micro, batch in enumerate(batches):
            tokens = batch.tokens.to(dev, non_blocking=True)
            reset = batch.reset.to(dev, non_blocking=True)
            srcs = batch.sources[:, 1:].to(dev, non_blocking=True)
            allowed = tokens_allowed(remaining, micro, ddp.rank, ddp.world_size, self.tokens_per_micro)
            mask = (torch.arange(self.tokens_per_micro, device=dev) < allowed).view(B, T)
            new_states = []
            for g, rows in enumerate(groups):
                x, y = tokens[rows, :-1], tokens[rows, 1:]
                last = micro == len(batches) - 1 and g == len(groups) - 1
                with (self.train_model.no_sync() if ddp.enabled and not last else nullcontext()):
                    with self.autocast():
                        out = self.train_model(x, state=take_rows(state, rows), reset_mask=reset[rows])
                    ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
                    keep = mask[rows]
                    if self.model.carries_state:  # the state resets at a boundary: no loss across it
                        keep = keep & (x != self.eot_id)
                    ce = ce * keep
                    # DDP averages gradients over ranks: scale by world size for a mean over all tokens
                    loss = ce.sum() * (ddp.world_size / n_step)
                    for key, value in out.aux.items():
                        if key.startswith("loss/"):
                            loss = loss + value / n_passes
                            acc["aux"][key] = acc["aux"].get(key, 0.0) + value.detach() / n_passes
                    loss.backward()
                new_states.append(out.state)
                acc["loss_sum"] += ce.detach().sum()
                acc["src_loss"].index_add_(0, srcs[rows].flatten(), ce.detach().flatten())
                acc["src_count"].index_add_(0, srcs[rows].flatten(), mask[rows].flatten().float())
                acc["metrics"] = {k: v for k, v in out.aux.items() if k.startswith("metric/")}
            if self.model.carries_state:
                state = detach_state(join_rows(new_states))
        return {**acc, "state": state, "n": n_step}
