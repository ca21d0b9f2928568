"""The run's small stateful pieces, each with `state_dict()` / `load_state_dict()` for the
checkpointer (train/checkpointer.py): where the run is (its counters), the recurrent
state the model carries from step to step, this process's random number generators, and
the model's weights as a save holds them (on the CPU)."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

from data.registry import as_rng_state
from model import map_state

from .checkpoint_files import CheckpointError


@dataclass
class Counters:
    """Where the run is: optimizer steps and training tokens done (summed over ranks),
    and the token counts at which the next evaluation and the next in-run save fall due."""
    step: int = 0
    tokens: int = 0
    next_eval: int = 0
    next_save: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))


def leaves(state) -> list[torch.Tensor]:
    """The tensors of a nested state, in the order model.map_state visits them."""
    found: list[torch.Tensor] = []
    map_state(state, lambda t: found.append(t) or t)
    return found


def take_rows(state, rows: slice):
    """The carried state of the streams `rows` (every tensor's batch dim is dim 0)."""
    return map_state(state, lambda t: t[rows])


def join_rows(states: list):
    """Row groups' states joined back along the batch dim: the inverse of take_rows."""
    if len(states) == 1:
        return states[0]
    joined = iter([torch.cat(parts, dim=0) for parts in zip(*(leaves(s) for s in states))])
    return map_state(states[0], lambda t: next(joined))


class CarriedState:
    """The recurrent state a stateful model carries from one window of its streams to the
    next (None for a transformer, which carries nothing). Saved per rank, on the CPU."""

    def __init__(self, device: torch.device, value=None):
        self.device, self.value = device, value

    def state_dict(self) -> dict:
        return {"value": map_state(self.value, lambda t: t.cpu())}

    def load_state_dict(self, state: dict) -> None:
        self.value = map_state(state["value"], lambda t: t.to(self.device))


class RngState:
    """This process's random number generators: torch's CPU generator, Python's, and the
    CUDA generator of the run's device when there is one."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "python": list(random.getstate())}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(as_rng_state(state["python"]))
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


class ModelWeights:
    """The model's parameters and buffers as a save holds them: detached CPU copies.
    Loading is strict: a save whose weights do not fit the model it names is refused."""

    def __init__(self, model: torch.nn.Module, refusal: Optional[str] = None):
        self.model = model
        self.refusal = refusal or "the saved weights do not fit this model"

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state)
        except RuntimeError:
            raise CheckpointError(self.refusal) from None
