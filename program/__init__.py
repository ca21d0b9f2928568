"""The program a person talks to: `run()` is all main.py calls.

The first question when a finished model exists (first_question.py: Talk, Evaluate,
Export), the preset picker and the resume question (picker.py, with step_times.py's
estimates), then the run (train/). Every problem a user can fix becomes one clear message
and an exit code instead of a traceback: 0 finished, 2 a problem the message names,
130/143 stopped by Ctrl-C / SIGTERM."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

from presets import TOKEN_BUDGET, PresetError
from train import TrainError, train

__all__ = ["run"]


def run(root: str | Path = ".") -> int:
    """The zero-flag program: choose a preset (or resume), train it, exit code out."""
    from rich.console import Console

    from data import OFFLINE_HINT, AllSourcesDied, AllSourcesFailed, TokenizerError
    from train.checkpoint_files import CheckpointError
    from train.distributed import broadcast_object, init_distributed, shutdown
    from train.run_lock import claim_folder, release_folder

    from .picker import choose_run
    from .torchrun import restarted_by_agent, stopped

    console = Console()
    root = Path(root)
    ddp = init_distributed()
    if not ddp.is_main:  # rank 0 says what the kernels are; the other ranks' copies would repeat it
        logging.getLogger("model.ops").setLevel(logging.ERROR)
    old_term = _terminate_as_interrupt()
    try:
        plan = None
        if ddp.is_main:
            try:
                from .first_question import first_question  # talk to / evaluate / export a finished model

                # None = train; an int = exit code. A worker torchrun restarted goes back to training.
                plan = None if restarted_by_agent() else first_question(root, console)
                if plan is None:  # one training run per folder: checked and locked before anything is asked or built
                    claim_folder(root / "checkpoints")
                    plan = choose_run(root / "configs", root / "checkpoints", console)
            except PresetError as e:
                console.print(str(e), style="red", markup=False, highlight=False)
                plan = "error"
            except CheckpointError as e:  # an interrupted run this version cannot resume (kept as it is), a folder in use
                console.print(f"error: {e}", style="red", markup=False, highlight=False)
                plan = "error"
        plan = broadcast_object(plan, ddp)
        if plan is None:
            return 130  # Ctrl-C at a question: quiet exit
        if plan == "error":
            return 2
        if isinstance(plan, int):
            return plan
        result = train(plan.preset, TOKEN_BUDGET, root / "checkpoints", resume=plan.resume, on_speed=record_speed)
        if result.finished:
            return 0
        return stopped(result.stop_signal)  # 128 + the signal, as shells report it (0 under torchrun)
    except AllSourcesFailed as e:
        if ddp.is_main:
            console.print(f"{e}\nstopped before touching any checkpoint.", style="red", markup=False, highlight=False)
            if any("unreachable" in reason or "HF_HUB_OFFLINE" in reason for _, reason in e.failures):
                console.print(f"hint: {OFFLINE_HINT}", style="yellow", markup=False, highlight=False)
        return 2
    except AllSourcesDied as e:
        if ddp.is_main:
            console.print(f"{e}\nthe run stopped; its last save is kept.", style="red", markup=False, highlight=False)
        return 2
    except (PresetError, TokenizerError, CheckpointError, TrainError) as e:
        if ddp.is_main:
            console.print(f"error: {e}", style="red", markup=False, highlight=False)
        return 2
    except RuntimeError as e:  # under torchrun: another process died and a collective failed here
        if not (ddp.enabled and lost_a_peer(e)):
            raise
        first = " ".join(str(e).split())[:200]
        console.print(f"error: rank {ddp.rank}: another process of this run stopped ({first}); this one stops too. "
                      "The last save in checkpoints/ is kept: start the run again to resume it.",
                      style="red", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt as e:
        if ddp.is_main:
            console.print("terminated." if isinstance(e, Terminated) else "interrupted.")
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        release_folder(root / "checkpoints")  # nothing when this process did not claim it
        shutdown()


def lost_a_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run went away."""
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or any(
        k in str(e) for k in ("gloo", "NCCL", "Connection reset", "Connection closed", "connection closed"))


def record_speed(preset, tokens_per_s: float) -> None:
    """A real run's speed, for later pickers' estimates of its preset."""
    from train.memory_check import vocab_size_guess

    from .step_times import record_run_speed

    t = preset.train
    record_run_speed(preset.model, vocab_size_guess(preset.tokenizer), t.seq_length, t.batch_size, tokens_per_s)


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
