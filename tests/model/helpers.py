"""Helpers shared by the model tests."""
import torch


def tensors(state) -> list[torch.Tensor]:
    """Every tensor in a nested state (dicts in sorted key order, lists, tuples)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state) for t in tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors(v)]
    return []
