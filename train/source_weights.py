"""Adaptive source weights during a run (`auxiliary.enable_adaptive_sources`): every
`adaptive_interval_tokens` the per-source training loss of the interval, summed over
ranks, moves the sources' drawing weights (the rule is data/adaptive.py's)."""
from __future__ import annotations

from typing import Callable

import torch

from data.adaptive import AdaptiveReweighter

from .distributed import Dist, all_reduce_sum
from .progress import human


class AdaptiveSources:
    """The reweighter and its interval: `add` each step's per-source loss and token
    counts (this rank's), and when `due`, `update` returns the new weights and the
    interval's mean loss per source (None for a source without tokens). Saved: the
    reweighter's weights and when the next update falls due (the sums of an unfinished
    interval are not: a resumed run starts the interval afresh)."""

    def __init__(self, aux, source_names: list[str], device: torch.device, ddp: Dist, documents, metrics,
                 log: Callable[[str], None]):
        n_sources = len(source_names)
        self.names, self.ddp, self.documents, self.metrics, self.log = source_names, ddp, documents, metrics, log
        self.reweighter = AdaptiveReweighter(n_sources, aux.adaptive_min_weight, aux.adaptive_max_weight,
                                             aux.adaptive_smoothing)
        self.interval = aux.adaptive_interval_tokens
        self.next_update = self.interval
        self.sums = torch.zeros(2, n_sources, device=device)  # loss sum, token count

    def after_step(self, out: dict, counters) -> None:
        """Count a step; when an interval is complete, new weights for the document
        stream, a `source_weights` metrics row and a log line."""
        if out["skipped"]:
            return
        self.add(out["src_loss"], out["src_count"])
        if not self.due(counters.tokens):
            return
        weights, losses = self.update(self.ddp)
        self.documents.set_weights(weights)
        named = {name: round(w, 3) for name, w in zip(self.names, weights)}
        self.metrics.write({"kind": "source_weights", "step": counters.step, "tokens": counters.tokens,
                            "weights": named, "source_loss": dict(zip(self.names, losses))})
        self.log(f"[data] source weights at {human(counters.tokens)} tokens: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in named.items()))

    def add(self, src_loss: torch.Tensor, src_count: torch.Tensor) -> None:
        self.sums += torch.stack([src_loss, src_count])

    def due(self, tokens: int) -> bool:
        return tokens >= self.next_update

    def update(self, ddp: Dist) -> tuple[list[float], list]:
        sums = all_reduce_sum(self.sums.clone(), ddp)
        losses = [(l / c).item() if c > 0 else None for l, c in zip(sums[0], sums[1])]
        weights = self.reweighter.update(losses)
        self.sums.zero_()
        self.next_update += self.interval
        return weights, losses

    def state_dict(self) -> dict:
        return {"reweighter": self.reweighter.state_dict(), "next_update": self.next_update}

    def load_state_dict(self, state: dict) -> None:
        self.reweighter.load_state_dict(state["reweighter"])
        self.next_update = int(state["next_update"])
