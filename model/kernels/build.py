"""Building the CUDA extension just in time, and deciding whether the fused path runs.

Nothing here runs at import. The first fused op called on a CUDA tensor calls
`extension()`, which builds csrc/ (binding.cpp, kda_fwd.cu, kda_bwd.cu, lif_rms.cu) with `torch.utils.cpp_extension.load`
(ninja; cached by torch under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions,
under a name that carries a hash of the sources, so an edit rebuilds and a rerun loads
the cached build in a second). It is tried once per process: if the device, `nvcc`,
ninja or the build is missing, `extension()` returns None and `reason()` says why, and
the callers run the PyTorch reference after one log line (`notice`).

The build targets the visible GPU's architecture (sm_90 on H100/H200) unless
TORCH_CUDA_ARCH_LIST says otherwise; set SPIKE_KERNELS_VERBOSE=1 to see the compiler.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from . import ops

CSRC = Path(__file__).resolve().parent / "csrc"
# the host-only binding and three CUDA translation units, so that ninja compiles them in parallel
SOURCES = [CSRC / n for n in ("binding.cpp", "kda_fwd.cu", "kda_bwd.cu", "lif_rms.cu")]
_log = logging.getLogger("model.kernels")
_lock = threading.Lock()
_state: dict = {"tried": False, "ext": None, "backend": None, "reason": None}
_noted: set[str] = set()


def notice(reason: str, level: int = logging.WARNING) -> None:
    """One line per distinct reason per process: why the reference runs instead."""
    if reason in _noted:
        return
    _noted.add(reason)
    _log.log(level, "model.kernels: fused CUDA kernels not used (%s); running the PyTorch reference", reason)


def sources_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".cu", ".cuh", ".h", ".cpp") and f.name not in ("cuda_emu.h", "emu.cpp"):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def missing_requirement() -> Optional[str]:
    """Why the extension cannot be built here, or None. Cheap; builds nothing."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc (the CUDA compiler) not found: install the CUDA toolkit or set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def _build():
    from torch.utils.cpp_extension import load

    verbose = os.environ.get("SPIKE_KERNELS_VERBOSE", "") not in ("", "0")
    return load(
        name=f"spike_kda_kernels_{sources_hash()}",
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],  # the C++ standard is torch's choice (its headers need C++17 or later)
        extra_cuda_cflags=["-O3", "-lineinfo"],
        verbose=verbose,
    )


def extension():
    """The compiled module, or None (see `reason()`). Builds at most once per process."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            reason = missing_requirement()
            if reason is None:
                try:
                    ext = _build()
                    sizes = list(ext.struct_sizes())
                    if sizes != ops.STRUCT_SIZES:
                        raise RuntimeError(f"parameter struct sizes {sizes} != ctypes {ops.STRUCT_SIZES}")
                    _state["ext"], _state["backend"] = ext, CudaBackend(ext)
                except Exception as e:  # a failed build must never stop training: fall back
                    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                    reason = f"build failed: {first[:300]}"
            _state["reason"] = reason
    return _state["ext"]


def backend() -> Optional["CudaBackend"]:
    extension()
    return _state["backend"]


def reason() -> Optional[str]:
    """Why `extension()` returned None (None before the first try or after a success)."""
    return _state["reason"]


def attempted() -> bool:
    return _state["tried"]


def _reset_for_tests() -> None:
    with _lock:
        _state.update(tried=False, ext=None, backend=None, reason=None)
        _noted.clear()


class CudaBackend:
    name = "cuda"

    def __init__(self, ext):
        self.ext = ext

    def run(self, op: str, params, device: torch.device) -> None:
        if device.type != "cuda":
            raise RuntimeError("the CUDA backend needs CUDA tensors")
        index = device.index if device.index is not None else torch.cuda.current_device()
        import ctypes

        getattr(self.ext, op)(ctypes.addressof(params), index)
