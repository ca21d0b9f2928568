"""What the checkpoint files hold: the in-run save of an unfinished run (run_state.pth),
collected from the run's stateful pieces, and the checkpoint of a finished run.

Every stateful piece of a run (anything with `state_dict()` / `load_state_dict()`) is
registered with the Checkpointer under a fixed name; the save is those names next to the
run's identity (what a resume reads before anything is built) and a format number:

    kind "run_state", format 2
    identity    preset, model_config, tokenizer {json, spec}, budget, world_size, run_id
    shared      model (CPU weights), optimizer, scheduler, counters (train/state.py),
                faults (train/bad_steps.py), adaptive (train/source_weights.py, when on)
    ranks       one entry per rank: streams (data/streams.py), carried (the model's
                recurrent state), rng

A save in another format is refused with a message, and the file is left as it is."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Protocol

from .checkpoint_files import CheckpointError, load_checkpoint
from .distributed import Dist, gather_objects

RUN_STATE_KIND = "run_state"
FORMAT = 2  # of run_state.pth; raise it with every change of the layout
FINISHED_FORMAT = 1  # of lm_current.pth and the rest of the rotation

IDENTITY = ("preset", "model_config", "tokenizer", "budget", "world_size", "run_id")
REQUIRED = ("model", "model_config", "optimizer", "scheduler", "counters", "faults", "budget", "world_size", "preset",
            "tokenizer", "ranks")  # what a resume reads


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    """The run's stateful pieces under their names: `shared` ones are the same on every
    rank and saved once (by rank 0); `per_rank` ones are gathered from every rank."""

    def __init__(self, ddp: Dist, identity: dict, shared: dict[str, Stateful], per_rank: dict[str, Stateful]):
        missing = [k for k in IDENTITY if k not in identity]
        if missing:
            raise ValueError(f"the run's identity lacks {', '.join(missing)}")
        self.ddp, self.identity, self.shared, self.per_rank = ddp, identity, shared, per_rank

    def state_dict(self) -> Optional[dict]:
        """The whole save on rank 0, None on the others. Every rank must call it."""
        ranks = gather_objects({name: piece.state_dict() for name, piece in self.per_rank.items()}, self.ddp)
        if not self.ddp.is_main:
            return None
        return {"kind": RUN_STATE_KIND, "format": FORMAT, **self.identity,
                **{name: piece.state_dict() for name, piece in self.shared.items()}, "ranks": ranks}

    def load_state_dict(self, state: dict, keep: tuple[str, ...] = ()) -> None:
        """Every piece from a save (as load_run_state returns it), except those
        named in `keep`. A shared piece the save does not hold (adaptive weights turned
        on after the save was written) keeps its fresh state."""
        for name, piece in self.shared.items():
            if name not in keep and state.get(name) is not None:
                piece.load_state_dict(state[name])
        mine = state["ranks"][self.ddp.rank]
        for name, piece in self.per_rank.items():
            if name not in keep and mine.get(name) is not None:  # None: rebuilt fresh (a resized run's rng)
                piece.load_state_dict(mine[name])


def _check_format(state: dict, path: Path) -> None:
    fmt = state.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{path} is an interrupted run in format {fmt!r}, which this version of the trainer "
                              f"cannot read (it reads format {FORMAT}): finish it with the version that wrote it, "
                              "or move the file away to start a new run")


def load_run_state(path: Path) -> dict:
    """An interrupted run's save, checked to hold everything a resume reads.
    CheckpointError says what is wrong."""
    state = load_checkpoint(path)
    if state.get("kind") != RUN_STATE_KIND:
        raise CheckpointError(f"{path} is not an interrupted run of this trainer")
    _check_format(state, path)
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not an interrupted run of this trainer (it lacks {', '.join(missing)})")
    return state


def run_summary(state: dict, path: Path) -> tuple[str, Optional[int], Optional[int]]:
    """(preset name, tokens done, budget) of a stored run, for the resume question.
    CheckpointError for a run state in a format this version cannot read (a file that is
    no run state at all is refused when the resume reads it)."""
    if state.get("kind") == RUN_STATE_KIND:
        _check_format(state, path)
    counters = state.get("counters") or {}
    return (state.get("preset") or {}).get("name", "?"), counters.get("tokens"), state.get("budget")


def finished_checkpoint(weights: dict, preset, tokenizer, tokens: int, eval_row: dict,
                        memory: Optional[dict]) -> dict:
    """A finished run's checkpoint (lm_current.pth): the weights with everything needed
    to use them (model config, preset, tokenizer), its held-out figures, when it ended,
    and in lifelong mode the memory contents the next run starts from."""
    return {
        "format": FINISHED_FORMAT, "kind": "final", "model": weights, "model_config": asdict(preset.model),
        "preset": preset.to_dict(), "tokenizer": {"json": tokenizer.to_json(), "spec": tokenizer.spec},
        "tokens": tokens, "eval": eval_row, "finished_at": time.time(), "memory": memory,
    }
