"""Checkpoint files: atomic writes, the end-of-run rotation, and safe loading.

Files in the checkpoint folder:
  run_state.pth      the in-run save of an unfinished run (crash recovery, resume)
  lm_current.pth     the newest finished run;  lm_prev.pth, lm_prev2.pth the two before
  lm_next.pth        a finished run's checkpoint, fully written, waiting to be rotated in

Every write goes to a temporary file that is fsync'ed and then renamed over its target,
so a file is always either the old complete version or the new complete version. The
rotation is a fixed sequence of renames keyed on lm_next.pth, so a rotation cut short at
any point is finished by `recover_rotation` on the next start. What the files hold is
train/checkpointer.py's business.

These are the run's primary writes (the in-run save, the stop save, the rotation):
`PrimaryWrites` retries a failing one (on a terminal: Enter = retry, once the user has made
room; with no terminal: for RETRY_SECONDS), and when the folder stays unwritable it writes
the run's state to the first fallback folder that takes it (the user's cache, then the
system's temporary folder: `fallback_folders`) and stops the run with one line saying where
it is and how to move it back. Only when no place at all can be written is anything lost,
and then the line says exactly what."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NoReturn, Optional

import torch

RUN_STATE = "run_state.pth"
CURRENT, PREV, PREV2, NEXT = "lm_current.pth", "lm_prev.pth", "lm_prev2.pth", "lm_next.pth"
ROLLING = (CURRENT, PREV, PREV2)
# with no terminal, how long a failing primary write is retried before the fallback: long
# enough for a passing condition, short enough for a stop's grace period (30 s under
# Kubernetes, 90 s under systemd) to leave time for the fallback write
RETRY_SECONDS = 20.0
RETRY_PAUSES = (1.0, 2.0, 4.0, 8.0)  # seconds between those tries (the last one repeats)


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
            reason = e.strerror or str(e)
            err = CheckpointError(f"could not write {path}: {reason}; the previous checkpoints are intact")
        elif isinstance(e, RuntimeError):  # torch's writer reports a full disk as "... unexpected pos ..."
            reason = f"{str(e).splitlines()[0][:120]}; is the disk full?"
            err = CheckpointError(f"could not write {path} ({reason}); the previous checkpoints are intact")
        else:
            raise
        err.reason = reason
        raise err from None


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


class SavedElsewhere(CheckpointError):
    """checkpoints/ stayed unwritable: the run's state went to a fallback folder (the
    message says where and how to move it back); the run stops with exit code 2."""


class NothingSaved(CheckpointError):
    """No place at all could be written; the message says exactly what was lost."""


def fallback_folders(name: str) -> list[Path]:
    """Where a run's state goes when its checkpoints/ cannot be written, in order: the
    user's cache (kept across reboots, usually another disk than a project's mount) and the
    system's temporary folder (often memory-backed: the last resort)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [cache / "hatchling" / "rescued" / name, Path(tempfile.gettempdir()) / "hatchling-rescued" / name]


def _reason(e: BaseException) -> str:
    if getattr(e, "reason", None):  # atomic_save's CheckpointError: why the write failed
        return e.reason
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).splitlines()[0][:160]


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


class PrimaryWrites:
    """The primary writes of a run into `folder`, retried, with the fallback; `reporter`
    says things (its progress display is paused while a question waits). On a terminal
    (and a single process) the user is asked; otherwise the write is retried for
    RETRY_SECONDS."""

    def __init__(self, folder: Path, reporter, several_processes: bool = False):
        self.folder, self.reporter = Path(folder), reporter
        self.ask = interactive() and not several_processes and getattr(reporter, "enabled", True)

    def run(self, write: Callable[[], None], path: Path) -> Optional[str]:
        """Do `write` (a primary write of `path`) until it succeeds: None. Its last failure's
        reason when it still fails (the user chose the fallback, or RETRY_SECONDS passed)."""
        deadline, pauses = time.monotonic() + RETRY_SECONDS, list(RETRY_PAUSES)
        first = True
        while True:
            try:
                write()
                if not first:
                    self.reporter.log(f"[save] {path} written")
                return None
            except (CheckpointError, OSError) as e:
                if isinstance(e, (SavedElsewhere, NothingSaved)):
                    raise
                reason = _reason(e)
            if self.ask:
                if not self._retry_asked(path, reason):
                    return reason
            else:
                left = deadline - time.monotonic()
                if first:
                    self.reporter.warn(f"could not write {path} ({reason}): retrying for {RETRY_SECONDS:g} s (free "
                                       "some space or make the folder writable)")
                if left <= 0:
                    return reason
                try:
                    time.sleep(min(pauses[0], left))
                except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, the state goes elsewhere at once
                    return reason
                pauses = pauses[1:] or pauses
            first = False

    def _retry_asked(self, path: Path, reason: str) -> bool:
        """On a terminal: True when the user pressed Enter (retry), False for the fallback."""
        progress = getattr(self.reporter, "progress", None)
        if progress is not None:
            progress.stop()  # a live progress bar would draw over the question
        try:
            self.reporter.warn(f"could not write {path} ({reason})")
            answer = input(f"Free some space or make {self.folder} writable, then press Enter to retry "
                           "(or type s and Enter to save the run elsewhere and stop): ")
            return answer.strip().lower() not in ("s", "n", "no", "q")
        except (EOFError, KeyboardInterrupt):
            print()
            return False
        finally:
            if progress is not None:
                progress.start()

    def elsewhere(self, state: Optional[dict], reason: str, what: str = "the run") -> NoReturn:
        """The run's state (rank 0's; None elsewhere) into the first fallback folder that
        takes it; raises SavedElsewhere naming it, or NothingSaved saying what was lost.
        `what` names the state in the message ("the finished run")."""
        if state is None:  # another rank: rank 0 writes and says it
            raise CheckpointError("")
        tokens, budget = state["counters"]["tokens"], state["budget"]
        name = f"{self.folder.resolve().parent.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        tried = []
        for place in fallback_folders(name):
            try:
                atomic_save(state, place / RUN_STATE)
            except CheckpointError as e:
                tried.append(f"{place} ({_reason(e)})")
                continue
            except OSError as e:  # the folder itself could not be made
                tried.append(f"{place} ({_reason(e)})")
                continue
            raise SavedElsewhere(
                f"{self.folder} cannot be written ({reason}): {what}, at {tokens:,}/{budget:,} tokens, is saved in "
                f"{place / RUN_STATE} instead; once the folder is writable, move it back (mv {place / RUN_STATE} "
                f"{self.folder / RUN_STATE}) and start again to resume")
        last = self._last_save(state.get("run_id"))
        if last is None:
            lost = f"lost: all {tokens:,} tokens this run trained (it had no save yet)"
        else:
            lost = (f"lost: the {tokens - last:,} tokens trained since the last save; {self.folder / RUN_STATE} "
                    f"(at {last:,} tokens) is kept, and a start resumes from it")
        raise NothingSaved(f"nothing could be saved: {self.folder} cannot be written ({reason}), nor can "
                           f"{', '.join(tried)}; {lost}")

    def _last_save(self, run_id) -> Optional[int]:
        """Tokens of this run's save in the folder, None when there is none (or it is another run's)."""
        try:
            saved = load_checkpoint(self.folder / RUN_STATE)
        except CheckpointError:
            return None
        if run_id is not None and saved.get("run_id") != run_id:
            return None
        return (saved.get("counters") or {}).get("tokens")
