"""The contract every language model in `model/` keeps with the trainer.

    out = model(tokens, state=None, reset_mask=None)
    tokens:     [B, T] int64
    state:      None, or what the previous call returned (recurrent archs carry it
                across training steps; every tensor in it has batch first)
    reset_mask: [B, T] bool or None, True at the first token of a new document;
                recurrent archs reset that stream's state there
    out.logits: [B, T, V] float
    out.state:  the state after the last token (None for archs that keep none)
    out.aux:    dict[str, Tensor] of extras: keys starting with "loss/" are added to the
                training loss (already weighted), keys starting with "metric/" are logged

`carries_state` tells the trainer whether to pass state from one step to the next
(truncated back-propagation through time). `generation_state(batch, device)` returns
the state that turns `forward` into an incremental decoder (a KV cache, a recurrent
state), used by `model.generate`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    state: Optional[Any]
    aux: dict


def detach_state(state):
    """Detach every tensor in a nested state (dicts, lists, tuples) from the graph."""
    return map_state(state, torch.Tensor.detach)


def map_state(state, fn):
    """Apply fn to every tensor in a nested state, e.g. to move it between devices."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(v, fn) for v in state)
    return state
