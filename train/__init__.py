"""The training loop and everything around it: presets, checkpoints, DDP, progress.

`run()` is what main.py calls: pick (rank 0), train, and turn every user-fixable problem
into a clear message and an exit code instead of a traceback. `train()` is the Python
API that raises instead (tests use it with a small budget)."""
from __future__ import annotations

import signal
from pathlib import Path

from .config import TOKEN_BUDGET, AuxiliaryConfig, Preset, TrainConfig
from .errors import TrainError
from .loop import RunResult, train
from .preset import PresetError, load_preset, preset_from_dict

__all__ = ["TOKEN_BUDGET", "AuxiliaryConfig", "Preset", "PresetError", "RunResult", "TrainConfig", "TrainError",
           "load_preset", "preset_from_dict", "run", "train"]


def run(root: str | Path = ".") -> int:
    """The zero-flag program: choose a preset (or resume), train it, exit code out."""
    from rich.console import Console

    from data import OFFLINE_HINT, AllSourcesDied, AllSourcesFailed, TokenizerError

    from .checkpoint import CheckpointError
    from .distributed import broadcast_object, init_distributed, shutdown
    from .ui import choose_run

    console = Console()
    root = Path(root)
    d = init_distributed()
    old_term = _terminate_as_interrupt()
    try:
        plan = None
        if d.is_main:
            try:
                from .after import first_question  # talk to / evaluate / export a finished model

                plan = first_question(root, console)  # None = train; an int = exit code
                if plan is None:
                    plan = choose_run(root / "configs", root / "checkpoints", console)
            except PresetError as e:
                console.print(str(e), style="red", markup=False, highlight=False)
                plan = "error"
            except CheckpointError as e:  # an interrupted run this version cannot resume: kept as it is
                console.print(f"error: {e}", style="red", markup=False, highlight=False)
                plan = "error"
        plan = broadcast_object(plan, d)
        if plan is None:
            return 130  # Ctrl-C at a question: quiet exit
        if plan == "error":
            return 2
        if isinstance(plan, int):
            return plan
        result = train(plan.preset, TOKEN_BUDGET, root / "checkpoints", resume=plan.resume)
        if result.finished:
            return 0
        return 143 if result.stop_signal == signal.SIGTERM else 130  # 128 + the signal, as shells report it
    except AllSourcesFailed as e:
        if d.is_main:
            console.print(f"{e}\nstopped before touching any checkpoint.", style="red", markup=False, highlight=False)
            if any("unreachable" in reason or "HF_HUB_OFFLINE" in reason for _, reason in e.failures):
                console.print(f"hint: {OFFLINE_HINT}", style="yellow", markup=False, highlight=False)
        return 2
    except AllSourcesDied as e:
        if d.is_main:
            console.print(f"{e}\nthe run stopped; its last save is kept.", style="red", markup=False, highlight=False)
        return 2
    except (PresetError, TokenizerError, CheckpointError, TrainError) as e:
        if d.is_main:
            console.print(f"error: {e}", style="red", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt as e:
        if d.is_main:
            console.print("terminated." if isinstance(e, Terminated) else "interrupted.")
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        shutdown()


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (which saves on it): stop like Ctrl-C, exit 143."""


def _terminate_as_interrupt():
    """SIGTERM raises Terminated in the main thread; returns the old handler (None off the main thread)."""
    def handler(signum, frame):
        raise Terminated

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None
