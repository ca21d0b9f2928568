"""Building the kernels just in time, and deciding whether the fused path runs.

The build ladder, tried once per process on the first fused op called on a CUDA tensor
(`extension()`; nothing here runs at import), one log line saying what came of it:

1. nvcc, where the CUDA toolkit and ninja exist: below.
2. NVRTC (nvrtc.py), where nvcc is absent or its build failed: pip's CUDA torch ships it.
3. the PyTorch reference, with the reasons the two builds were not possible.

`SPIKE_KERNELS_BUILD` = nvcc | nvrtc | reference forces one rung (tests, benchmarks).

The nvcc rung builds csrc/ (binding.cpp, kda_fwd.cu, kda_bwd.cu, lif_rms.cu) with `torch.utils.cpp_extension.load`
(ninja; cached by torch under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions,
under a name that carries a hash of the sources, so an edit rebuilds and a rerun loads
the cached build in a second). It is tried once per process: if the device, `nvcc`,
ninja or the build is missing, `extension()` returns None and `reason()` says why, and
the callers run the PyTorch reference after one log line (`notice`).

The build targets the visible GPU's architecture (sm_90 on H100/H200) unless
TORCH_CUDA_ARCH_LIST says otherwise; set SPIKE_KERNELS_VERBOSE=1 to see the compiler.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from ..native import source_hash
from . import abi

CSRC = Path(__file__).resolve().parent / "csrc"
# the host-only binding and three CUDA translation units, so that ninja compiles them in parallel
SOURCES = [CSRC / n for n in ("binding.cpp", "kda_fwd.cu", "kda_bwd.cu", "lif_rms.cu")]
_log = logging.getLogger("model.kernels")
_lock = threading.Lock()
_state: dict = {"tried": False, "ext": None, "backend": None, "reason": None, "build": None, "line": None}
_noted: set[str] = set()


def notice(reason: str, level: int = logging.WARNING) -> None:
    """One line per distinct reason per process: why the reference runs instead."""
    if reason in _noted:
        return
    _noted.add(reason)
    _log.log(level, "model.kernels: fused CUDA kernels not used (%s); running the PyTorch reference", reason)


def say(line: str, level: int = logging.WARNING) -> None:
    """One free-text line per distinct message per process (which kernel path is in use)."""
    if line in _noted:
        return
    _noted.add(line)
    _log.log(level, "model.kernels: %s", line)


def sources_hash() -> str:
    """12 hex digits naming the extension build: every CUDA source and header but the emulator's."""
    files = [f for f in sorted(CSRC.iterdir())
             if f.suffix in (".cu", ".cuh", ".h", ".cpp") and f.name not in ("cuda_emu.h", "emu.cpp")]
    return source_hash(files, length=12)


BUILDS = ("auto", "nvcc", "nvrtc", "reference")


def requested() -> str:
    """$SPIKE_KERNELS_BUILD: auto (default: nvcc where it exists, else NVRTC), nvcc, nvrtc, reference."""
    want = os.environ.get("SPIKE_KERNELS_BUILD", "auto").strip().lower() or "auto"
    if want not in BUILDS:
        raise ValueError(f"SPIKE_KERNELS_BUILD must be one of {BUILDS}, got {want!r}")
    return want


def missing_device() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    return None


def missing_nvcc() -> Optional[str]:
    """Why torch.utils.cpp_extension cannot build here, or None. Cheap; builds nothing."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no nvcc (CUDA toolkit)"
    if not cpp_extension.is_ninja_available():
        return "no ninja (pip install ninja)"
    return None


def missing_nvrtc() -> Optional[str]:
    from . import nvrtc

    try:
        nvrtc.library()
    except nvrtc.NvrtcUnavailable as e:
        return str(e)
    return None


def missing_requirement() -> Optional[str]:
    """Why no fused build can be tried here (device, toolchain), or None."""
    dev = missing_device()
    if dev:
        return dev
    want = requested()
    if want == "reference":
        return "SPIKE_KERNELS_BUILD=reference"
    nvcc = missing_nvcc() if want in ("auto", "nvcc") else "not requested"
    rtc = missing_nvrtc() if want in ("auto", "nvrtc") else "not requested"
    if want == "nvcc" and nvcc:
        return f"SPIKE_KERNELS_BUILD=nvcc but {nvcc}"
    if want == "nvrtc" and rtc:
        return f"SPIKE_KERNELS_BUILD=nvrtc but {rtc}"
    if nvcc and rtc:
        return f"{nvcc}, and NVRTC unavailable: {rtc}"
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


def _build_nvcc() -> "CudaBackend":
    ext = _build()
    sizes = list(ext.struct_sizes())
    if sizes != abi.STRUCT_SIZES:
        raise RuntimeError(f"parameter struct sizes {sizes} != ctypes {abi.STRUCT_SIZES}")
    return CudaBackend(ext)


def _build_nvrtc():
    from . import nvrtc

    be = nvrtc.NvrtcBackend()
    be.load(torch.cuda.current_device())  # compile (or read the cache) and load now, so a failure falls back here
    return be


def _first_line(e: Exception) -> str:
    return next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]


def _describe(be) -> str:
    cuda = f"CUDA {torch.version.cuda}"
    try:
        major, minor = torch.cuda.get_device_capability()
        cuda += f", sm_{major}{minor}"
    except Exception:  # noqa: BLE001
        pass
    if be.name == "nvrtc":
        return f"fused CUDA kernels on: built at run time with NVRTC {be.nvrtc_version} ({cuda}; no CUDA toolkit needed)"
    return f"fused CUDA kernels on: built with nvcc via torch.utils.cpp_extension ({cuda})"


def extension():
    """The kernel backend (nvcc extension or NVRTC module), or None (see `reason()`).
    Tries once per process: nvcc where it exists (SPIKE_KERNELS_BUILD=auto), NVRTC where
    nvcc is absent or its build fails, else the reference; one line says which."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            reason = missing_requirement()
            failures = []
            if reason is None:
                want = requested()
                steps = [s for s in ("nvcc", "nvrtc") if want in ("auto", s)]
                if want == "auto" and missing_nvcc():
                    failures.append(missing_nvcc())
                    steps = ["nvrtc"]
                elif want == "auto" and missing_nvrtc():
                    steps = ["nvcc"]
                for step in steps:
                    try:
                        be = _build_nvcc() if step == "nvcc" else _build_nvrtc()
                    except Exception as e:  # a failed build must never stop training: fall back
                        failures.append(f"{step} build failed: {_first_line(e)}")
                        continue
                    _state["ext"] = getattr(be, "ext", be)
                    _state["backend"] = be
                    _state["build"] = step
                    _state["line"] = _describe(be)
                    _log.warning("model.kernels: %s", _state["line"])
                    break
                else:
                    reason = "; ".join(failures)
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


def build_in_use() -> Optional[str]:
    """"nvcc" or "nvrtc" once a build succeeded, else None."""
    return _state["build"]


def line() -> Optional[str]:
    """The one line that said which build is in use (None before or without one)."""
    return _state["line"]


def force(be, name: str) -> None:
    """Use backend `be` (built by the caller, e.g. nvrtc.NvrtcBackend()) from now on, as if the
    ladder had chosen it: for benchmarks and device checks that compare the builds."""
    with _lock:
        _state.update(tried=True, ext=getattr(be, "ext", be), backend=be, reason=None, build=name, line=_describe(be))


def _reset_for_tests() -> None:
    with _lock:
        _state.update(tried=False, ext=None, backend=None, reason=None, build=None, line=None)
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
