"""Checkpoint files: atomic writes, the end-of-run rotation, and safe loading.

Files in the checkpoint folder:
  run_state.pth      the in-run save of an unfinished run (crash recovery, resume)
  lm_current.pth     the newest finished run;  lm_prev.pth, lm_prev2.pth the two before
  lm_next.pth        a finished run's checkpoint, fully written, waiting to be rotated in

Every write goes to a temporary file that is fsync'ed and then renamed over its target,
so a file is always either the old complete version or the new complete version. The
rotation is a fixed sequence of renames keyed on lm_next.pth, so a rotation cut short at
any point is finished by `recover_rotation` on the next start. What the files hold is
train/checkpointer.py's business."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

RUN_STATE = "run_state.pth"
CURRENT, PREV, PREV2, NEXT = "lm_current.pth", "lm_prev.pth", "lm_prev2.pth", "lm_next.pth"
ROLLING = (CURRENT, PREV, PREV2)


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says which file and why."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem: rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: Path, writer: Optional[Callable] = None) -> None:
    """Write obj to path so that path is never partial: temp file, fsync, rename.
    On failure (disk full, unwritable) the temp file is removed, the old file is
    untouched, and CheckpointError says what happened."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (writer or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write {path}: {e.strerror or e}; the previous checkpoints are intact") from None
        if isinstance(e, RuntimeError):  # torch's writer reports a full disk as "... unexpected pos ..."
            raise CheckpointError(f"could not write {path} ({str(e).splitlines()[0][:120]}; is the disk full?); "
                                  "the previous checkpoints are intact") from None
        raise


def _load_failure(path: Path, e: Exception) -> str:
    """Why torch.load refused a file, in words a user can act on (torch's own message for a
    refused pickle ends in advice to turn the safe loader off, which we never do)."""
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text:
        return f"{path} holds objects a safe load refuses: it is damaged or was not written by this trainer"
    if "PytorchStreamReader" in text or "zip" in text.lower() or "EOF" in text or isinstance(e, EOFError):
        return f"{path} is truncated or damaged"
    first = text.splitlines()[0][:160] if text else ""
    return f"{path} is damaged or not a checkpoint ({e.__class__.__name__}{': ' + first if first else ''})"


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True (a checkpoint can never run code). Raises
    CheckpointError for a missing, truncated, corrupt or unsafe file."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:  # truncated zip, bad pickle, a pickle asking for a global
        raise CheckpointError(_load_failure(Path(path), e)) from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer")
    return obj


def recover_rotation(folder: Path) -> bool:
    """Finish a rotation that was interrupted. Returns True if there was one.

    The rotation is: prev -> prev2, current -> prev, next -> current. Which renames
    already happened is readable from which files exist: with lm_next.pth present,
    (current and prev both there) means none happened; (current there, prev missing)
    means the first did, or there never was a prev, and either way the remaining two
    renames are right; (current missing) means only the last is left."""
    folder = Path(folder)
    nxt, cur, prev, prev2 = (folder / n for n in (NEXT, CURRENT, PREV, PREV2))
    if not nxt.exists():
        return False
    if cur.exists() and prev.exists():
        os.replace(prev, prev2)
    if cur.exists():
        os.replace(cur, prev)
    os.replace(nxt, cur)
    _fsync_dir(folder)
    return True


def rotate_checkpoints(final: dict, folder: Path) -> None:
    """Install a finished run's checkpoint as lm_current.pth, shifting the older ones."""
    folder = Path(folder)
    atomic_save(final, folder / NEXT)
    recover_rotation(folder)


def load_latest(folder: Path, warn: Callable[[str], None] = print) -> Optional[tuple[str, dict]]:
    """(file name, checkpoint) of the newest finished run that loads: lm_current.pth,
    else lm_prev.pth, else lm_prev2.pth, warning about each damaged one. None if none."""
    present = [n for n in ROLLING if (Path(folder) / n).exists()]
    for i, name in enumerate(present):
        try:
            return name, load_checkpoint(Path(folder) / name)
        except CheckpointError as e:
            rest = present[i + 1:]
            warn(f"{e}; " + (f"falling back to {rest[0]}" if rest else
                             "no other finished checkpoint: this run starts from fresh weights (the file is kept)"))
    return None
