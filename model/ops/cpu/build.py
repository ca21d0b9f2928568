"""Small C/C++ libraries compiled on the user's machine and loaded with ctypes.

`shared_library(source, compilers, flags)` compiles `source` once per (source, flags,
machine) hash into a cache folder (`$SPIKE_NATIVE_DIR`, else `hatchling_native` in the
system temp folder; a build is written to a temporary name and renamed, so concurrent
processes never load half a file) and returns the loaded `ctypes.CDLL`. It raises
`NativeUnavailable` with the reason when no compiler is on PATH or the build fails, so
callers can fall back to their PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class NativeUnavailable(RuntimeError):
    pass


def source_hash(files: Sequence[Path], extra: str = "", length: int = 16) -> str:
    """`length` hex digits of sha256 over `extra`, then each file's name and bytes."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:length]


def cache_root(env: str, default_name: str) -> Path:
    return Path(os.environ.get(env) or Path(tempfile.gettempdir()) / default_name)


def shared_library(source: Path, compilers: Sequence[str], flags: Sequence[str], root: Path | None = None,
                   depends: Sequence[Path] = (), on_build: Callable[[], None] | None = None) -> ctypes.CDLL:
    """Compile `source` with the first of `compilers` found (None entries skipped, so a
    caller can put `$CC` first) into `root/<hash>/<stem>.so`, once, and load it. The hash
    covers `source`, the headers it includes (`depends`), the flags and the machine.
    `on_build` is called when a build is about to start (to say so: builds take a while)."""
    try:
        key = source_hash([source, *depends], " ".join(flags) + platform.machine())
    except OSError as exc:
        raise NativeUnavailable(f"cannot read the source: {exc}") from exc
    with _lock:
        if key in _loaded:
            return _loaded[key]
        cc = next((c for c in (shutil.which(n) for n in compilers if n) if c), None)
        if cc is None:
            raise NativeUnavailable(f"no compiler ({' or '.join(n for n in compilers if n)}) on PATH")
        out = (root or cache_root("SPIKE_NATIVE_DIR", "hatchling_native")) / key / f"{source.stem}.so"
        if not out.exists():
            if on_build is not None:
                on_build()
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cc, *flags, "-fPIC", "-shared", "-o", str(tmp), str(source)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NativeUnavailable(f"build failed ({' '.join(cmd)}): {exc}") from exc
            if res.returncode != 0:
                raise NativeUnavailable(f"build failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
            os.replace(tmp, out)
        _loaded[key] = ctypes.CDLL(str(out))
        return _loaded[key]
