"""The compiled C loops for CPU tensors, where PyTorch would take many passes or a Python
loop, each with its backward: the LIF membrane recurrence with Spike-KDA's modulation
folded in (csrc/lif_scan.c); ShortConv's causal depthwise convolution (csrc/short_conv.c);
Spike-KDA's split of q/k/v into head-major tensors with q and k L2-normalised
(csrc/split_heads.c); its gated RMSNorm (csrc/gated_norm.c); the chunked KDA itself
(csrc/kda_chunk.c). This module loads them; loops.py and kda.py call them (plain
functions on tensors, no autograd: model/ops/library.py registers them as the CPU kernels
of the `spike_ops` custom ops).

Built once per process with the system C compiler (build.py caches the library by
source hash) and called through ctypes, which releases the GIL. Each call uses
`torch.get_num_threads()` threads: built with OpenMP (csrc/parallel.h), the library
joins torch's own OpenMP runtime and shares its loop among torch's thread team; where the
compiler has no OpenMP, the batch rows are split among a Python thread pool instead.
`available()` is False where no compiler exists; then one log line says so and the
dispatcher (model/ops/dispatch.py) runs the PyTorch references. Those are the
specification; tests compare the two.
"""
from __future__ import annotations

import ctypes
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from . import build as native

CSRC = Path(__file__).resolve().parent / "csrc"
_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_SIGNATURES = {  # every function ends with `threads` (see csrc/parallel.h)
    "lif_modulate_forward": [_P] * 9 + [_I] * 4 + [_D] * 2 + [_I],
    "lif_modulate_backward": [_P] * 12 + [_I] * 4 + [_D] * 3 + [_I],
    "short_conv_forward": [_P] * 3 + [_I] * 5 + [_I],
    "short_conv_backward": [_P] * 5 + [_I] * 5 + [_I],
    "split_heads_forward": [_P] * 5 + [_I] * 4 + [_D] + [_I],
    "split_heads_backward": [_P] * 7 + [_I] * 4 + [_D] + [_I],
    "gated_norm_forward": [_P] + [_I] * 3 + [_P] * 4 + [_I] * 4 + [_D, _I],
    "gated_norm_backward": [_P] + [_I] * 3 + [_P] * 7 + [_I] * 4 + [_I],
    "kda_chunk_forward": [_P] * 11 + [_I] * 6,
    "kda_chunk_backward": [_P] * 16 + [_I] * 6,
}
# -ffp-contract=off: the LIF's membrane arithmetic rounds as the PyTorch reference does, so
# spikes are identical; the KDA and norm loops may fuse multiply-adds (FMA on CPUs that have
# it), and -fno-trapping-math lets their clamps (vec_math.h) vectorise
_FLAGS = {"lif_scan": ["-O3", "-ffp-contract=off"], "short_conv": ["-O3", "-ffp-contract=off"],
          "split_heads": ["-O3", "-ffp-contract=off"], "kda_chunk": ["-O3", "-fno-trapping-math", "-fno-math-errno"],
          "gated_norm": ["-O3", "-fno-trapping-math", "-fno-math-errno"]}
_DEPENDS = {"kda_chunk": ["kda_chunk_body.h", "vec_math.h"], "gated_norm": ["vec_math.h"]}
_libs: dict[str, ctypes.CDLL] = {}
_state = {"tried": False, "ok": False, "openmp": False}
_pool: Optional[ThreadPoolExecutor] = None


def _announce() -> None:
    """One line, the first time this process compiles a loop (the cache was empty or stale)."""
    if not _state.get("announced"):
        _state["announced"] = True
        logging.getLogger("model.ops").warning(
            "model.ops: compiling the CPU loops (model/ops/cpu/csrc) once for this machine, about half a minute")


def _build(name: str) -> tuple[ctypes.CDLL, bool]:
    """csrc/<name>.c built with OpenMP where the compiler has it, else without; returns
    (library, whether it threads its loops itself)."""
    compilers = [os.environ.get("CC"), "cc", "gcc", "clang"]
    source = CSRC / f"{name}.c"
    depends = [CSRC / "parallel.h", *(CSRC / h for h in _DEPENDS.get(name, ()))]
    try:
        lib = native.shared_library(source, compilers, _FLAGS[name] + ["-fopenmp"], depends=depends, on_build=_announce)
    except native.NativeUnavailable:  # e.g. clang without libomp: threads from Python instead
        lib = native.shared_library(source, compilers, _FLAGS[name], depends=depends, on_build=_announce)
    lib.cpu_kernels_openmp.restype, lib.cpu_kernels_openmp.argtypes = _I, []
    if name == "gated_norm":
        lib.gated_norm_max_dim.restype, lib.gated_norm_max_dim.argtypes = _I, []
    if name == "kda_chunk":
        lib.kda_chunk_work_size.restype, lib.kda_chunk_work_size.argtypes = _I, [_I] * 3
        lib.kda_chunk_max_dim.restype, lib.kda_chunk_max_dim.argtypes = _I, []
        lib.kda_chunk_allow_avx2.restype, lib.kda_chunk_allow_avx2.argtypes = None, [_I]
    return lib, bool(lib.cpu_kernels_openmp())


def row_pointer(element_size: int) -> Callable:
    """at(t, row, per): the address of row `row` of t (rows of `per` elements), None for None."""
    return lambda t, row, per: None if t is None else t.data_ptr() + row * per * element_size


def threads_for(rows: int) -> int:
    """How many parts run_rows(rows, ...) may run at once (per-part scratch is sized by it)."""
    return max(1, torch.get_num_threads() if _state["openmp"] else min(torch.get_num_threads(), rows))


def available() -> bool:
    """Whether the compiled loops serve CPU tensors in this process (built on first call;
    called at run time from inside the custom ops, never traced)."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            openmp = []
            for name in _FLAGS:
                lib, threaded = _build(name)
                openmp.append(threaded)
                for fn_name, argtypes in _SIGNATURES.items():
                    for suffix in ("f32", "f64"):
                        fn = getattr(lib, f"{fn_name}_{suffix}", None)
                        if fn is not None:
                            fn.restype, fn.argtypes = None, argtypes
                _libs[name] = lib
        except native.NativeUnavailable as exc:
            logging.getLogger("model.ops").warning(
                "model.ops: compiled CPU loops unavailable, running the PyTorch references (%s)",
                str(exc).splitlines()[0])
            return False
        _state["ok"], _state["openmp"] = True, all(openmp)
    return _state["ok"]


def library(name: str) -> ctypes.CDLL:
    """The loaded csrc/<name>.c (its int64 helpers, e.g. kda_chunk_work_size, typed)."""
    if not available():
        raise RuntimeError("model.ops.cpu: the compiled CPU loops are unavailable (see the log)")
    return _libs[name]


def compiled(lib: str, name: str, dtype: torch.dtype) -> Callable:
    """The ctypes function `name` of csrc/<lib>.c for `dtype` (float32 or float64)."""
    return getattr(library(lib), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def run_rows(rows: int, work: Callable[[int, int, int, int], None]) -> None:
    """work(part, b0, b1, threads) over `rows` rows (batch rows, or stream-heads). With
    OpenMP, one call over all rows with torch's thread count (the library shares the loop
    itself); else up to that many parts of one thread each, the first on the calling
    thread (which would otherwise only wait), the others on the pool."""
    global _pool
    if _state["openmp"]:
        work(0, 0, rows, torch.get_num_threads())
        return
    parts = threads_for(rows)
    if parts == 1:
        work(0, 0, rows, 1)
        return
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="cpu_kernels")
    bounds = [rows * i // parts for i in range(parts + 1)]
    rest = [_pool.submit(work, i, bounds[i], bounds[i + 1], 1) for i in range(1, parts)]
    work(0, bounds[0], bounds[1], 1)
    for f in rest:
        f.result()
