"""Building the kernels at run time with NVRTC, so that no CUDA toolkit is needed.

pip's CUDA builds of torch ship NVRTC (libnvrtc, loaded by torch itself) and talk to the
driver (libcuda), so a user with a GPU and a plain `pip install` can compile csrc/*.cuh
here: one NVRTC program that includes kda.cuh, lif.cuh and rmsnorm.cuh and names every
kernel template instance (`nvrtcAddNameExpression`), compiled once for the device's
architecture (about 10 s), its CUBIN cached on disk under
`$SPIKE_KERNELS_NVRTC_DIR` (default ~/.cache/spike_kernels/nvrtc) by source hash,
architecture and NVRTC version, then loaded per device with `cuModuleLoadData`.

`torch.cuda._compile_kernel` (torch 2.13: `(kernel_source, kernel_name,
compute_capability=None, cuda_include_dirs=None, nvcc_options=None)`) does the same for
one kernel, but it asks `torch.utils.cpp_extension.include_paths("cuda")`, which raises
when CUDA_HOME is unset, i.e. exactly on the machines this path is for; so the program is
compiled here with torch's own NVRTC handle (`torch.cuda._utils._get_gpu_rtc_library`),
and loaded with `torch.cuda._utils._cuda_load_module`.

Under NVRTC the headers see `__CUDACC_RTC__`: no system or CUDA headers, the host
launchers compiled out (SK_HOST), bf16 a plain 16-bit struct. The launchers' work (grid,
block, shared memory, template choice, argument checks) is `NvrtcBackend.run` below, and
mirrors kda_run / lif_fwd / lif_bwd / rms_run in the headers.
"""
from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from ..native import source_hash
from . import abi

CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = ("common.cuh", "kda.cuh", "lif.cuh", "rmsnorm.cuh")
SOURCE = '#include "kda.cuh"\n#include "lif.cuh"\n#include "rmsnorm.cuh"\n'

_DT = {0: "float", 1: "sk::bf16"}
KDA_COMBOS = ((0, 0), (0, 1), (1, 1))  # (ti, tv) the kernels instantiate
RMS_COMBOS = ((0, 0), (0, 1), (1, 0), (1, 1))
DKPS = (32, 64, 128, 256)


def kernel_names() -> list[str]:
    """Every kernel template instance, as NVRTC name expressions."""
    names = []
    for pas in ("fwd", "bwd"):
        for dkp in DKPS:
            for ti, tv in KDA_COMBOS:
                names.append(f"sk::kda_{pas}_kernel<{dkp}, {_DT[ti]}, {_DT[tv]}>")
    names += ["sk::lif_fwd_kernel", "sk::lif_bwd_kernel"]
    for pas in ("fwd", "bwd"):
        for to, tg in RMS_COMBOS:
            names.append(f"sk::rms_{pas}_kernel<{_DT[to]}, {_DT[tg]}>")
    return names


def sources_hash() -> str:
    """12 hex digits naming the NVRTC program: its generated source and the headers it includes."""
    return source_hash([CSRC / n for n in HEADERS], extra=SOURCE, length=12)


class NvrtcUnavailable(RuntimeError):
    pass


def library():
    """torch's NVRTC handle, or NvrtcUnavailable saying why."""
    if torch.version.cuda is None or getattr(torch.version, "hip", None):
        raise NvrtcUnavailable("this PyTorch build has no CUDA support")
    try:
        from torch.cuda import _utils
    except Exception as e:  # noqa: BLE001
        raise NvrtcUnavailable(f"torch.cuda._utils missing ({e})") from e
    if not hasattr(_utils, "_cuda_load_module"):
        raise NvrtcUnavailable(f"torch {torch.__version__} has no torch.cuda._utils._cuda_load_module")
    try:
        return _utils._get_gpu_rtc_library()
    except Exception as e:  # noqa: BLE001 - not on the loader's path: look where pip puts it
        for path in _pip_nvrtc_paths():
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
        raise NvrtcUnavailable(f"NVRTC library not found ({e}; pip install nvidia-cuda-nvrtc-cu12)") from e


def _pip_nvrtc_paths() -> list[str]:
    """libnvrtc in pip's nvidia packages (nvidia/cuda_nvrtc/lib for CUDA 12, nvidia/cu13/lib for 13)."""
    import glob
    import sys

    major = (torch.version.cuda or "12").split(".")[0]
    out = []
    for root in sys.path:
        for sub in ("cuda_nvrtc", f"cu{major}"):
            out += sorted(glob.glob(os.path.join(root, "nvidia", sub, "lib", f"libnvrtc.so.{major}*")))
    return [p for p in out if "builtins" not in p and ".alt." not in p]


def version(lib) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
        return "?"
    return f"{major.value}.{minor.value}"


def compile_program(lib, arch: str, names: list[str]) -> tuple[bytes, dict[str, str]]:
    """(CUBIN, {name expression: lowered name}); RuntimeError with the compiler log on failure."""
    prog = ctypes.c_void_p()

    def check(rc, what):
        if rc != 0:
            msg = ctypes.c_char_p(lib.nvrtcGetErrorString(rc)) if hasattr(lib, "nvrtcGetErrorString") else None
            text = msg.value.decode() if msg is not None and msg.value else f"code {rc}"
            raise RuntimeError(f"NVRTC {what}: {text}")

    lib.nvrtcGetErrorString.restype = ctypes.c_void_p
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.encode(), b"spike_kernels.cu", 0, None, None), "create")
    try:
        for n in names:
            check(lib.nvrtcAddNameExpression(prog, n.encode()), f"name {n}")
        opts = [f"--gpu-architecture=sm_{arch}".encode(), f"-I{CSRC}".encode(), b"-std=c++17", b"-lineinfo"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if rc != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            text = log.value.decode(errors="replace").strip()
            first = next((ln for ln in text.splitlines() if "error" in ln), text[:300])
            raise RuntimeError(f"NVRTC compile failed: {first}\n{text[-4000:]}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = {}
        for n in names:
            out = ctypes.c_char_p()
            check(lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(out)), f"lowered name {n}")
            lowered[n] = out.value.decode()
        return cubin.raw, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cache_dir() -> Path:
    d = os.environ.get("SPIKE_KERNELS_NVRTC_DIR")
    return Path(d) if d else Path.home() / ".cache" / "spike_kernels" / "nvrtc"


def cubin_for(lib, arch: str) -> tuple[bytes, dict[str, str]]:
    """The compiled program for arch, from the disk cache or freshly compiled (and cached)."""
    names = kernel_names()
    key = f"{sources_hash()}_sm{arch}_nvrtc{version(lib)}"
    root = cache_dir()
    cub, meta = root / f"{key}.cubin", root / f"{key}.json"
    try:
        lowered = json.loads(meta.read_text())
        if set(lowered) == set(names):
            return cub.read_bytes(), lowered
    except (OSError, ValueError):
        pass
    data, lowered = compile_program(lib, arch, names)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = f".{os.getpid()}.tmp"
        cub.with_suffix(tmp).write_bytes(data)
        os.replace(cub.with_suffix(tmp), cub)
        meta.with_suffix(tmp).write_text(json.dumps(lowered))
        os.replace(meta.with_suffix(tmp), meta)
    except OSError:
        pass  # a read-only home: compile again next time
    return data, lowered


def _kda_cfg(dkp: int) -> tuple[int, int, int]:
    """(BV, forward smem floats, backward smem floats): KdaCfg in csrc/kda.cuh."""
    C, R, TH, W = abi.KDA_CHUNK, abi.KDA_ROWS, abi.KDA_THREADS, abi.KDA_THREADS // 32
    bv = 32 // (dkp // R) * W
    fwd = 3 * C * dkp + 2 * C * bv + 2 * C
    bwd = 3 * C * dkp + 3 * C * bv + 2 * C + C * R * TH + 2 * W * 3 * dkp + 2 * W
    return bv, fwd, bwd


def _dkp(dk: int) -> int:
    return next((d for d in DKPS if dk <= d), -1)


class NvrtcBackend:
    """Runs the NVRTC-compiled kernels: `run(op, params, device)` like the other backends."""

    name = "nvrtc"

    def __init__(self, lib=None):
        self.lib = lib if lib is not None else library()
        self.nvrtc_version = version(self.lib)
        self._modules: dict[int, dict] = {}  # device index -> {name expression: _CudaKernel}
        self._lock = threading.Lock()
        self._smem_set: set = set()
        self._primary: dict[int, ctypes.c_void_p] = {}

    def _context(self, index: int) -> None:
        """Make device `index`'s primary context (torch's, where the module lives) current in this
        thread: the driver API needs one, and autograd runs backward kernels on its own threads."""
        from torch.cuda import _utils

        libcuda = _utils._get_gpu_runtime_library()
        primary = self._primary.get(index)
        if primary is None:
            torch.cuda.init()
            dev, primary = ctypes.c_int(), ctypes.c_void_p()
            if libcuda.cuDeviceGet(ctypes.byref(dev), index) != 0 or \
                    libcuda.cuDevicePrimaryCtxRetain(ctypes.byref(primary), dev) != 0:
                raise RuntimeError(f"model.kernels (nvrtc): no primary CUDA context for device {index}")
            self._primary[index] = primary
        cur = ctypes.c_void_p()
        libcuda.cuCtxGetCurrent(ctypes.byref(cur))
        if cur.value != primary.value and libcuda.cuCtxSetCurrent(primary) != 0:
            raise RuntimeError(f"model.kernels (nvrtc): cannot make device {index}'s context current")

    def load(self, index: int) -> dict:
        with self._lock:
            mod = self._modules.get(index)
            if mod is None:
                from torch.cuda import _utils

                major, minor = torch.cuda.get_device_capability(index)
                data, lowered = cubin_for(self.lib, f"{major}{minor}")
                with torch.cuda.device(index):
                    self._context(index)
                    kernels = _utils._cuda_load_module(data, list(lowered.values()))
                mod = self._modules[index] = {n: kernels[m] for n, m in lowered.items()}
            return mod

    def _launch(self, index: int, name: str, grid, block, smem: int, params) -> None:
        kern = self.load(index)[name]
        self._context(index)
        from torch.cuda import _utils

        libcuda = _utils._get_gpu_runtime_library()
        if smem >= 48 * 1024 and (index, name, smem) not in self._smem_set:
            # opt in to more than 48 KB of dynamic shared memory (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES);
            # not _CudaKernel.set_shared_memory_config, which reads a device property torch 2.13 lacks
            rc = libcuda.cuFuncSetAttribute(kern.func, 8, ctypes.c_int(smem))
            if rc != 0:
                raise RuntimeError(f"model.kernels.{name} (nvrtc): {smem} bytes of shared memory refused (CUDA error {rc})")
            self._smem_set.add((index, name, smem))
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))  # the struct, passed by value
        stream = torch.cuda.current_stream(index)
        rc = libcuda.cuLaunchKernel(kern.func, ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(1),
                                    ctypes.c_uint(block), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(smem),
                                    ctypes.c_void_p(stream.cuda_stream), args, None)
        if rc != 0:
            raise RuntimeError(f"model.kernels.{name} (nvrtc): cuLaunchKernel failed with CUDA error {rc}")

    def run(self, op: str, p, device: torch.device) -> None:
        if device.type != "cuda":
            raise RuntimeError("the NVRTC backend needs CUDA tensors")
        index = device.index if device.index is not None else torch.cuda.current_device()
        err, launch = plan(op, p)
        if err:
            raise RuntimeError(f"model.kernels.{op} (nvrtc): {err}")
        if launch is not None:
            self._launch(index, *launch, p)


def plan(op: str, p) -> tuple[Optional[str], Optional[tuple]]:
    """(error, None) | (None, None: nothing to launch) | (None, (kernel name, grid, block, smem bytes)):
    the host launchers of csrc/*.cuh, in Python (tested on the CPU against the emulator's)."""
    if op in ("kda_fwd", "kda_bwd"):
        bwd = op == "kda_bwd"
        dkp = _dkp(p.DK)
        if dkp < 0:
            return "kda: head dim (dk) above 256 is not supported by the fused kernel", None
        bv, fwd_smem, bwd_smem = _kda_cfg(dkp)
        if p.nv != -(-p.DV // bv):
            return "kda: nv does not match the column tiling", None
        if p.nc != -(-p.T // abi.KDA_CHUNK):
            return "kda: nc does not match the chunking", None
        if bwd and not p.ckpt:
            return "kda: the backward needs the forward's checkpoints", None
        if p.B * p.H == 0 or p.DV == 0 or (p.T == 0 and bwd):
            return None, None
        if (p.ti, p.tv) not in KDA_COMBOS:
            return "kda: unsupported dtype combination (q/k/log_alpha/beta bf16 with float32 v)", None
        name = f"sk::kda_{'bwd' if bwd else 'fwd'}_kernel<{dkp}, {_DT[p.ti]}, {_DT[p.tv]}>"
        return None, (name, (p.B * p.H, p.nv), abi.KDA_THREADS, 4 * (bwd_smem if bwd else fwd_smem))
    if op in ("lif_fwd", "lif_bwd"):
        if p.N < 1 or p.N > 1024:
            return "lif: channels per head must be in [1, 1024]", None
        if p.B * p.H == 0 or (op == "lif_fwd" and p.T == 0):
            return None, None
        return None, (f"sk::{op}_kernel", (p.B * p.H, 1), -(-p.N // 32) * 32, 0)
    if op in ("rms_fwd", "rms_bwd"):
        bwd = op == "rms_bwd"
        if p.d < 1:
            return "gated_rmsnorm: empty last dim", None
        if p.n_blocks < 1:
            return "gated_rmsnorm: n_blocks must be at least 1", None
        if bwd and p.d * abi.RMS_WARPS * 4 > 200 * 1024:
            return "gated_rmsnorm: last dim too large", None
        if (p.to, p.tg) not in RMS_COMBOS:
            return "gated_rmsnorm: unsupported dtype", None
        name = f"sk::rms_{'bwd' if bwd else 'fwd'}_kernel<{_DT[p.to]}, {_DT[p.tg]}>"
        return None, (name, (p.n_blocks, 1), abi.RMS_WARPS * 32, p.d * abi.RMS_WARPS * 4 if bwd else 0)
    return f"unknown op {op}", None
