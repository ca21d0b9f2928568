"""Making a project's checkpoints/ refuse writes the way a disk does, for the write-fault
tests (tests/train/test_writes.py, tests/program/test_folder.py).

`read_only(folder)`: a read-only bind mount of the folder over itself (even root cannot
write through it), when this machine lets us mount; otherwise the same refusal injected
into the child process (`inject(..., errno.EROFS)`). `inject` writes a sitecustomize.py
that makes the child's writes under a folder fail with an errno: every write ("files"),
only the checkpoint files' temporary files ("checkpoints"), or only metrics.jsonl
("metrics"), optionally only while a flag file exists. The child is started with that
folder first on PYTHONPATH (`main_with`)."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import textwrap
from pathlib import Path

from tests.sample_presets import ROOT
from tests.userpath import env, main_command

SITECUSTOMIZE = textwrap.dedent('''
    import builtins, io, os
    _FOLDER = os.path.realpath({folder!r})
    _FLAG, _ERRNO, _KIND = {flag!r}, {err}, {kind!r}
    _open, _os_open = builtins.open, os.open

    def _under(path):
        try:
            p = os.path.realpath(os.fsdecode(path))
        except TypeError:  # a descriptor
            return False
        return (p == _FOLDER or p.startswith(_FOLDER + os.sep)) and (_FLAG is None or os.path.exists(_FLAG))

    def _refuse(path):
        raise OSError(_ERRNO, os.strerror(_ERRNO), os.fsdecode(path))

    def _hit(path):
        if not _under(path):
            return False
        name = os.path.basename(os.fsdecode(path))
        if _KIND == "metrics":
            return name == "metrics.jsonl"
        if _KIND == "checkpoints":
            return ".pth.tmp" in name
        return True

    def open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and _hit(file):
            _refuse(file)
        return _open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        writes = flags & (os.O_WRONLY | os.O_RDWR) or (flags & os.O_CREAT and not os.path.exists(path))
        if writes and _KIND == "files" and _hit(path):
            _refuse(path)
        return _os_open(path, flags, *a, **k)

    def _guard(fn):
        def guarded(path, *a, **k):
            if _KIND == "files" and _hit(path):
                _refuse(path)
            return fn(path, *a, **k)
        return guarded

    builtins.open = io.open = open
    os.open = os_open
    os.mkdir, os.unlink, os.remove, os.replace, os.rename = (_guard(f) for f in
                                                             (os.mkdir, os.unlink, os.remove, os.replace, os.rename))
    {extra}
''')

# a failing primary write is retried for a second (the product waits RETRY_SECONDS = 60 s)
SHORT_RETRY = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import train.checkpoint_files as _ck; "
               "_ck.RETRY_SECONDS = 1.0; _ck.RETRY_PAUSES = (0.2,)")


def inject(where: Path, folder: Path, err: int, kind: str = "files", flag: Path | None = None, extra: str = "") -> Path:
    """A sitecustomize.py in `where` making writes under `folder` fail with `err` (see the
    module's docstring); `extra`: more code for it (e.g. SHORT_RETRY). Returns `where`."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "sitecustomize.py").write_text(SITECUSTOMIZE.format(folder=str(folder), flag=str(flag) if flag else None,
                                                                 err=err, kind=kind, extra=extra))
    return where


def extra_only(where: Path, extra: str) -> Path:
    """A sitecustomize.py with only `extra` (the short retry bound, a fake full disk)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "sitecustomize.py").write_text(extra + "\n")
    return where


def main_with(project: Path, pythonpath: Path | None, budget: int = 4096, background: bool = False, timeout=300):
    """`python main.py` with no terminal and `pythonpath` first on the import path."""
    extra = {"PYTHONPATH": str(pythonpath)} if pythonpath else {}
    if background:
        return subprocess.Popen(main_command(project, budget), cwd=project, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(**extra))
    return subprocess.run(main_command(project, budget), cwd=project, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env=env(**extra))


def can_mount() -> bool:
    """Whether a read-only bind mount works here (root with CAP_SYS_ADMIN)."""
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"hatchling-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        with _bind_read_only(probe):
            try:
                (probe / "x").write_text("x")
            except OSError as e:
                return e.errno == errno.EROFS
            return False
    except OSError:
        return False
    finally:
        (probe / "x").unlink(missing_ok=True)
        probe.rmdir()


@contextlib.contextmanager
def _bind_read_only(folder: Path):
    """The folder mounted read-only over itself: new opens of paths in it see the read-only
    mount (files a process already holds open stay writable, as with chmod); unmounted after."""
    def mount(*args):
        r = subprocess.run(["mount", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(errno.EPERM, f"mount {' '.join(args)}: {r.stderr.strip()}")

    mount("--bind", str(folder), str(folder))
    try:
        mount("-o", "remount,ro,bind", str(folder))
    except OSError:
        subprocess.run(["umount", str(folder)], capture_output=True)
        raise
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


class ReadOnly:
    """A folder made read-only now (`make`) and writable again (`undo`), by a bind mount or,
    where mounting is not allowed, by a flag file the child's injected writes look at (the
    child must then be started with `pythonpath`)."""

    def __init__(self, folder: Path, work: Path, extra: str = ""):
        self.folder, self.mounted = Path(folder), None
        self.by_mount = can_mount()
        self.flag = work / "read-only.flag"
        self.pythonpath = (extra_only(work / "site", extra) if self.by_mount and extra else
                           None if self.by_mount else inject(work / "site", folder, errno.EROFS, "files", self.flag, extra))

    def make(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.by_mount:
            self.mounted = _bind_read_only(self.folder)
            self.mounted.__enter__()
        else:
            self.flag.write_text("")

    def undo(self) -> None:
        if self.mounted is not None:
            self.mounted.__exit__(None, None, None)
            self.mounted = None
        self.flag.unlink(missing_ok=True)
