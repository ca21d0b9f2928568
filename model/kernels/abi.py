"""The kernels' C ABI: launch constants and the parameter structs, which must match the
CUDA sources in csrc/ (common.cuh, kda.cuh). ops.py, build.py, nvrtc.py and emu.py all
read them from here."""
from __future__ import annotations

import ctypes

import torch

# must match csrc/common.cuh and csrc/kda.cuh
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
KDA_ROWS, KDA_THREADS, KDA_CHUNK = 8, 128, 16
KDA_MAX_DK = 256
LIF_MAX_CHANNELS = 1024
RMS_WARPS = 8

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_S3 = ctypes.c_int64 * 3


class LifParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in (
        "drive", "a", "beta_logit", "membrane", "reset", "spikes", "log_alpha", "beta", "v_save", "membrane_out",
        "v", "g_spikes", "g_log_alpha", "g_beta", "g_membrane", "d_drive", "d_a", "d_beta_logit", "d_membrane")]
    _fields_ += [(n, _I) for n in ("B", "T", "H", "N")] + [(n, _D) for n in ("decay", "threshold", "slope")]


class KdaParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in (
        "q", "k", "v", "g", "beta", "reset", "s0", "o", "s_final", "ckpt",
        "d_o", "d_sfinal", "dq", "dk", "dg", "dbeta", "dv", "ds0")]
    _fields_ += [(n, _S3) for n in ("q_s", "k_s", "v_s", "g_s", "beta_s", "reset_s", "o_s", "do_s")]
    _fields_ += [(n, _I) for n in ("B", "H", "T", "DK", "DV", "nv", "nc", "ti", "tv")] + [("scale", _D)]


class RmsParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("o", "gate", "weight", "y", "dy", "d_o", "d_gate", "d_weight")]
    _fields_ += [(n, _I) for n in ("rows", "d", "n_blocks", "to", "tg")] + [("eps", _D)]


STRUCT_SIZES = [ctypes.sizeof(LifParams), ctypes.sizeof(KdaParams), ctypes.sizeof(RmsParams)]
