"""A kernel backend that runs the CUDA kernel source on the CPU (tests only).

csrc/emu.cpp includes the very headers the extension is built from, with KERNELS_EMU
defined, so a plain C++ compiler turns each `__global__` function into host code; the
fiber emulator in csrc/cuda_emu.h runs every thread of a block with real barrier and
warp-shuffle semantics. Slow (tiny shapes only) but it checks the kernels' indexing,
reductions and barrier placement, and the Python glue of ops.py, on machines with no GPU.

`EmuBackend.load()` compiles once per source hash (model/native.py) into a cache folder
(`$SPIKE_KERNELS_EMU_DIR`, else the system temp folder) and raises `EmuUnavailable`
when there is no C++ compiler or the build fails.
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from .. import native
from . import abi

CSRC = Path(__file__).resolve().parent / "csrc"
_lock = threading.Lock()
_loaded: dict[int, "EmuBackend"] = {}


class EmuUnavailable(RuntimeError):
    pass


class EmuBackend:
    name = "emu"

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        for op in ("lif_fwd", "lif_bwd", "kda_fwd", "kda_bwd", "rms_fwd", "rms_bwd"):
            fn = getattr(lib, "emu_" + op)
            fn.restype = ctypes.c_char_p
            fn.argtypes = [ctypes.c_void_p]
        sizes = (ctypes.c_int64 * 3)()
        lib.emu_struct_sizes(sizes)
        if list(sizes) != abi.STRUCT_SIZES:
            raise RuntimeError(f"emu: parameter struct sizes {list(sizes)} != ctypes {abi.STRUCT_SIZES}")
        consts = (ctypes.c_int64 * 3)()
        lib.emu_kda_constants(consts)
        if tuple(consts) != (abi.KDA_ROWS, abi.KDA_THREADS, abi.KDA_CHUNK):
            raise RuntimeError(f"emu: kda constants {tuple(consts)} differ from ops.py")

    def run(self, op: str, params, device: torch.device) -> None:
        if device.type != "cpu":
            raise RuntimeError("emu backend runs on CPU tensors only")
        err = getattr(self.lib, "emu_" + op)(ctypes.addressof(params))
        if err is not None:
            raise RuntimeError(f"model.kernels.{op} (emu): {err.decode()}")

    @classmethod
    def load(cls, verbose: bool = False) -> "EmuBackend":
        headers = [f for f in sorted(CSRC.iterdir()) if f.suffix in (".h", ".cuh")]
        try:
            lib = native.shared_library(CSRC / "emu.cpp", [os.environ.get("CXX"), "g++", "clang++"],
                                        ["-std=c++17", "-O1"], native.cache_root("SPIKE_KERNELS_EMU_DIR",
                                                                                 "spike_kernels_emu"), headers)
        except native.NativeUnavailable as exc:
            raise EmuUnavailable(str(exc)) from exc
        with _lock:
            if id(lib) not in _loaded:
                _loaded[id(lib)] = cls(lib)
            return _loaded[id(lib)]
