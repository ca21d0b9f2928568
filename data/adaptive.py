"""Adaptive source reweighting: sources the model finds harder get more turns.

Every `adaptive_interval_tokens` the trainer passes the mean training loss of each source
over the interval (None for a source that contributed no tokens) and gets new weights
for `DocumentMixer.set_weights` (which switches the mixer to weighted drawing).

The rule, per update:
  target_i = loss_i / mean(loss over the sources that reported)  (relative loss, mean 1)
  w_i      = smoothing * w_i + (1 - smoothing) * target_i           (EMA)
  w_i      = clamp(w_i, min_weight, max_weight)
A source with no loss this interval keeps its weight. Weights are relative drawing odds,
on the scale where an average source has weight 1 (the target is already normalised to
mean 1), so no renormalisation follows the clamp: clamping after a renormalisation could
break it again, and the mixer normalises the odds when it draws anyway. With
min_weight > 0 no source is ever starved.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence


class AdaptiveReweighter:
    def __init__(self, n_sources: int, min_weight: float = 0.25, max_weight: float = 4.0,
                 smoothing: float = 0.9, initial: Optional[Sequence[float]] = None):
        if n_sources < 1:
            raise ValueError("need at least one source")
        if not 0 <= min_weight <= max_weight:
            raise ValueError(f"need 0 <= min_weight <= max_weight, got {min_weight}, {max_weight}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.n, self.min_weight, self.max_weight, self.smoothing = n_sources, min_weight, max_weight, smoothing
        start = list(initial) if initial is not None else [1.0] * n_sources
        if len(start) != n_sources:
            raise ValueError(f"{len(start)} initial weights for {n_sources} sources")
        self.weights = [self._clamp(float(w)) for w in start]
        self.updates = 0

    def _clamp(self, w: float) -> float:
        return min(self.max_weight, max(self.min_weight, w))

    def update(self, mean_loss_per_source: Sequence[Optional[float]]) -> list[float]:
        """New weights from this interval's mean loss per source (None: no tokens seen)."""
        if len(mean_loss_per_source) != self.n:
            raise ValueError(f"{len(mean_loss_per_source)} losses for {self.n} sources")
        losses = [float(x) if x is not None and math.isfinite(float(x)) and float(x) >= 0 else None
                  for x in mean_loss_per_source]
        known = [x for x in losses if x is not None]
        mean = sum(known) / len(known) if known else 0.0
        if mean > 0:
            a = self.smoothing
            self.weights = [w if x is None else self._clamp(a * w + (1 - a) * (x / mean))
                            for w, x in zip(self.weights, losses)]
            self.updates += 1
        return list(self.weights)

    def state_dict(self) -> dict:
        return {"weights": list(self.weights), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if len(state["weights"]) != self.n:
            raise ValueError(f"saved state has {len(state['weights'])} weights, this run has {self.n} sources")
        self.weights = [float(w) for w in state["weights"]]
        self.updates = int(state.get("updates", 0))
