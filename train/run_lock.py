"""One folder, one training run: the check of `checkpoints/` before a run starts, and the
lock a training run holds on it.

`claim_folder(folder)` is called before anything is built (program.run() right after the
first question says "train"; train() again, which the same process may do freely). It

  - creates the folder when it is missing;
  - refuses, with one line saying what to do, a file in its place, a folder that cannot
    be written (read-only, not ours) and one on a full disk (less than MIN_FREE_BYTES free);
  - takes an exclusive `fcntl.flock` on `<folder>/train.lock` and writes the holder's pid,
    host and start time into it. The kernel releases the lock when the process ends, however
    it ends (Ctrl-C, a crash, kill -9), so it is never stale; a second training run in the
    folder is refused with the holder named.

The lock is held through a read-only descriptor (flock needs no write access; the pid is
written through a second, short-lived one), so a folder that turns read-only while a run
holds it is not kept from it by the lock. Talk, Evaluate and Export never take it: they only
read the last complete save, which atomic renames keep whole. Under torchrun only rank 0
calls this (only rank 0 writes files); it refuses on behalf of every rank."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from .checkpoint_files import CheckpointError

LOCK_FILE = "train.lock"
MIN_FREE_BYTES = 64 * 2**20  # below this a folder counts as on a full disk: not even a small run's save fits


class FolderError(CheckpointError):
    """checkpoints/ cannot take a training run (a file, read-only, a full disk, or in use);
    the message says which and what to do."""


def free_bytes(folder: Path) -> int:
    """Bytes free for us on the folder's filesystem (a function of its own, so tests can fake a full disk)."""
    return shutil.disk_usage(folder).free


_held: dict[str, list] = {}  # resolved folder -> [descriptor, holds]: the locks this process holds


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _holder(path: Path) -> str:
    """Who holds the lock, from what it wrote into the file ('pid 123 on host x since 02:31')."""
    try:
        fields = dict(part.split("=", 1) for part in path.read_text(encoding="utf-8").split() if "=" in part)
    except (OSError, ValueError):
        fields = {}
    if not fields.get("pid"):
        return "another process (it has not written its pid yet)"
    where = f" on {fields['host']}" if fields.get("host") and fields["host"] != socket.gethostname() else ""
    since = f", started {fields['started'].replace('T', ' ')}" if fields.get("started") else ""
    return f"pid {fields['pid']}{where}{since}"


def check_folder(folder: Path) -> None:
    """Create the folder if missing; FolderError for a file in its place, an unwritable folder or a full disk."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{folder} is a file, not a folder: training keeps its checkpoints in a folder of that "
                          "name; move or rename the file, then start again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderError(f"cannot create the folder {folder} ({e.strerror or e}): create it yourself or make "
                          f"{folder.parent} writable, then start again") from None
    free = free_bytes(folder)
    if free < MIN_FREE_BYTES:
        raise FolderError(f"{folder} is on a full disk ({_human_bytes(free)} free): free some space (a run's saves "
                          "need room), then start again")


def claim_folder(folder: Path) -> Path:
    """check_folder, then the run lock on it (held until release_folder or the end of the
    process; the same process may claim a folder it holds again). FolderError when another
    run holds it. Returns the lock file."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        _held[key][1] += 1
        return folder / LOCK_FILE
    check_folder(folder)
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _unwritable(folder, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FolderError(f"{folder} is in use by another training run ({_holder(path)}): one folder trains one "
                              "run at a time; wait for it to finish or stop it (Ctrl-C in its terminal), or train in "
                              "another project folder. Talk, Evaluate and Export may run beside it") from None
        raise FolderError(f"cannot lock {path} ({e.strerror or e}): this filesystem may not support locks; "
                          "train in a folder on a local disk") from None
    try:  # the holder's name, for a second run's message (the lock itself is the flock, not this text)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"pid={os.getpid()} host={socket.gethostname()} started={time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        os.close(fd)
        raise _unwritable(folder, e) from None
    _held[key] = [fd, 1]
    return path


def _unwritable(folder: Path, e: OSError) -> FolderError:
    if e.errno == errno.ENOSPC:
        return FolderError(f"{folder} is on a full disk (no space left on device): free some space, then start again")
    return FolderError(f"{folder} cannot be written ({e.strerror or e}): make it writable (a read-only disk or "
                       "mount, or a folder that is not yours), then start again")


def release_folder(folder: Path) -> None:
    """Give back one claim; the lock goes when the last one does (and at the end of the process anyway)."""
    key = str(Path(folder).resolve())
    held = _held.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _held[key]
        os.close(held[0])  # closing the descriptor releases the flock
