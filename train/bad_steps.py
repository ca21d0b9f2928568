"""What a run does when a step goes wrong, and the counters that remember it.

Out of memory: the step's micro-batches are cut into twice as many row groups (streams)
and the step is redone: the same effective batch and the same data, so the result does
not change, only the memory a forward needs. A non-finite gradient: the step is skipped
and counted; after MAX_BAD_STEPS in a row the run rolls back to its last in-run save
with half the learning rate, at most MAX_ROLLBACKS times."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import TrainError

MAX_BAD_STEPS = 3  # non-finite steps in a row before rolling back to the last save
MAX_ROLLBACKS = 5  # roll-backs in one run before giving up (the learning rate is then 1/32 of the preset's)


class Faults:
    """The fault counters of one run and the rules that move them.

    splits: row groups each micro-batch is cut into (doubled on out-of-memory);
    lr_scale: multiplies the schedule's learning rate (halved by each roll-back);
    skipped_steps: non-finite steps skipped so far; bad_streak: of them, in a row;
    rollbacks: roll-backs in this process. splits, lr_scale and skipped_steps are saved;
    a roll-back keeps all of them (they describe what went wrong since the save)."""

    def __init__(self, batch_size: int, grad_accum_steps: int, distributed: bool, warn: Callable[[str], None]):
        self.batch_size, self.grad_accum_steps, self.distributed, self.warn = batch_size, grad_accum_steps, distributed, warn
        self.splits, self.lr_scale, self.skipped_steps = 1, 1.0, 0
        self.bad_streak, self.rollbacks, self._oom_said = 0, 0, False

    def retry_out_of_memory(self, attempt: Callable[[], dict], clean_up: Callable[[], None]) -> dict:
        """attempt() until it fits, doubling `splits` after each out-of-memory error."""
        while True:
            try:
                return attempt()
            except torch.OutOfMemoryError:
                clean_up()
                self._split_further()

    def _split_further(self) -> None:
        if self.distributed:  # the ranks would disagree on the number of backward passes
            raise TrainError("out of memory on this rank; lower train.batch_size and raise train.grad_accum_steps")
        if self.splits >= self.batch_size:
            raise TrainError("out of memory even at a micro-batch of one stream; lower train.seq_length or the "
                             "model size")
        self.splits *= 2
        if not self._oom_said:
            self.warn(f"out of memory: micro-batch halved to {math.ceil(self.batch_size / self.splits)} streams, "
                      f"accumulation doubled to {self.grad_accum_steps * self.splits} (same effective batch)")
            self._oom_said = True

    def bad_step(self, step: int) -> bool:
        """Count a skipped non-finite step; True when the streak calls for a roll-back."""
        self.skipped_steps += 1
        self.bad_streak += 1
        self.warn(f"non-finite loss or gradient at step {step}: step skipped ({self.skipped_steps} so far)")
        return self.bad_streak >= MAX_BAD_STEPS

    def good_step(self) -> None:
        self.bad_streak = 0

    def roll_back(self) -> None:
        """Count a roll-back and halve the learning rate; past MAX_ROLLBACKS the run stops."""
        self.bad_streak = 0
        self.rollbacks += 1
        if self.rollbacks > MAX_ROLLBACKS:
            raise TrainError(f"training keeps producing non-finite values after {MAX_ROLLBACKS} roll-backs with "
                             "lower learning rates; lower train.lr or check the data (the last save is kept)")
        self.lr_scale *= 0.5

    def state_dict(self) -> dict:
        return {"splits": self.splits, "lr_scale": self.lr_scale, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.splits, self.lr_scale = int(state["splits"]), float(state["lr_scale"])
        self.skipped_steps = int(state["skipped_steps"])
