"""Fused CUDA kernels for the Spike-KDA layer, each with a PyTorch reference beside it.

Public ops (same arguments and results as their references in `reference.py`):

- `lif_modulate`: the LIF spike scan fused with the alpha/beta modulation
  (spikes, final membrane, log_alpha = -a * spikes, beta = sigmoid(beta_logit) * mean(spikes)).
- `kda`: the KDA recurrence over a sequence, forward and backward (training).
- `kda_step`: one KDA token (generation).
- `gated_rmsnorm`: RMSNorm(o) * weight * silu(gate), float32 out.

Each takes `mode`: "auto" (fused on CUDA tensors when a build succeeds, else the
reference), "reference" (never touches the build: a preset's `model.kernels =
"reference"`), "fused" (our kernel or an error: for tests and benchmarks), or for `kda`
"fla" (flash-linear-attention's chunk_kda or an error). In "auto", `kda` trains with
chunk_kda on CUDA when fla imports (chunked.py).

Builds (build.py): nvcc where the CUDA toolkit exists, else NVRTC (nvrtc.py: pip's CUDA
torch ships it, no toolkit needed), else the reference; one line says which. Each
kernel is a `torch.library` custom op (`spike_kernels::*`, ops.py) with fake
implementations, so `torch.compile` traces through it, and checks at its boundary. When
"auto" falls back it logs one line saying why (once per reason per process). Importing
this package builds nothing; the build happens on the first fused call (build.py).
The fused ops compute in float32 with float32 state whatever the input dtype (bf16 in,
float32 accumulation) and agree with the references to float32 rounding.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import cpu_kernels
from . import build, chunked, ops
from .reference import gated_rmsnorm_reference, kda_reference, kda_step_reference, lif_modulate_reference

MODES = ("auto", "reference", "fused", "fla")


def _backend(mode: str, x: torch.Tensor, unsupported: Optional[str] = None):
    """The CUDA backend to run a fused op on x, or None for the reference (with one notice)."""
    if mode == "reference":
        build.notice('model.kernels = "reference"', logging.INFO)
        return None
    if mode not in MODES:
        raise ValueError(f"kernels mode must be one of {MODES}, got {mode!r}")
    if mode == "fla":
        mode = "fused"
    if not x.is_cuda:
        why = "no CUDA device" if not torch.cuda.is_available() else "tensors are on the CPU"
    elif unsupported:
        why = unsupported
    else:
        be = build.backend()
        if be is not None:
            return be
        why = build.reason() or "extension unavailable"
    if mode == "fused":
        raise RuntimeError(f"model.kernels: fused kernel requested but unavailable: {why}")
    build.notice(why)
    return None


def lif_modulate(drive, a, beta_logit, decay, threshold, membrane=None, reset=None, slope=5.0, mode="auto"):
    """drive, a: [B, T, H, N]; beta_logit: [B, T, H]; membrane: [B, H, N] or None; reset: [B, T]
    bool or None. Returns (spikes, final membrane, log_alpha, beta); see reference.py.
    a = None: no alpha modulation wanted (log_alpha comes back None; the compiled CPU loop
    then neither writes it nor its gradient)."""
    bad = None
    if drive.dim() != 4 or drive.shape[1] == 0:
        bad = "lif: needs [B, T>0, H, N] drive"
    elif drive.shape[-1] > ops.LIF_MAX_CHANNELS:
        bad = f"lif: more than {ops.LIF_MAX_CHANNELS} channels per head"
    if a is None and (bad is not None or not cpu_kernels.serves(drive, beta_logit)):  # only that loop skips it
        spikes, membrane, _, beta = lif_modulate(drive, torch.zeros_like(drive), beta_logit, decay, threshold,
                                                 membrane, reset, slope, mode)
        return spikes, membrane, None, beta
    be = _backend(mode, drive, bad)
    if be is None:
        if bad is None and cpu_kernels.serves(drive, beta_logit, *([] if a is None else [a])):  # one compiled pass
            return cpu_kernels.lif_modulate(drive, a, beta_logit, decay, threshold, membrane, reset, slope)
        return lif_modulate_reference(drive, a, beta_logit, decay, threshold, membrane, reset, slope)
    return ops.lif_modulate_fused(drive, a, beta_logit, decay, threshold, membrane, reset, slope)


def _kda_unsupported(q: torch.Tensor, T: int) -> Optional[str]:
    if q.shape[-1] > ops.KDA_MAX_DK:
        return f"kda: head dim {q.shape[-1]} > {ops.KDA_MAX_DK}"
    if T == 0:
        return "kda: empty sequence"
    return None


def kda(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None, chunk_size: int = 64,
        impl: str = "chunk", mode: str = "auto"):
    """KDA over a sequence: q, k, log_alpha [B, H, T, dk]; v [B, H, T, dv]; beta [B, H, T];
    initial_state [B, H, dk, dv] or None; reset [B, T] / [B, H, T] bool or None.
    Returns (o [B, H, T, dv] in v's dtype, final state float32).

    On CUDA, impl == "chunk" (training) runs flash-linear-attention's chunked `chunk_kda`
    when it imports (chunked.py: resets and carried state mapped to cu_seqlens and
    per-segment initial states), else our fused recurrent kernel; mode "fla" forces the
    former, "fused" the latter. `chunk_size` and `impl` choose the reference form
    otherwise. In the kernel paths o is a [B, H, T, dv] view of a [B, T, H, dv] buffer,
    so o.transpose(1, 2) is contiguous."""
    if mode == "fla" or (mode == "auto" and impl == "chunk" and q.is_cuda and q.shape[2] > 1):
        why = chunked.available() or chunked.unsupported(q, reset)
        if why is None:
            try:
                out = chunked.kda_varlen(q, k, v, log_alpha, beta, initial_state, scale, reset)
                build.say("KDA training kernel: flash-linear-attention's chunk_kda (chunked, tensor cores)")
                _say_chunking_is_the_kernels(chunk_size, 64, "chunk_kda")
                return out
            except Exception as e:  # noqa: BLE001 - a first call that fails (Triton/fla mismatch) must not stop training
                if mode == "fla" or chunked.proven():
                    raise
                why = f"fla chunk_kda failed on its first call: {type(e).__name__}: {str(e).strip()[:200]}"
                chunked.disable(why)
                build.say(f"{why}; using the fused recurrent kernel instead")
        if mode == "fla":
            raise RuntimeError(f"model.kernels: fla chunk_kda requested but unavailable: {why}")
        build.say(f"chunked KDA training kernel unavailable ({why}); using the fused recurrent kernel")
    be = _backend(mode, q, _kda_unsupported(q, q.shape[2]))
    if be is None:
        return kda_reference(q, k, v, log_alpha, beta, initial_state, scale, reset, chunk_size, impl)
    _say_chunking_is_the_kernels(chunk_size, ops.KDA_CHUNK, "the fused KDA kernel")
    return ops.kda_fused(q, k, v, log_alpha, beta, initial_state, scale, reset)


def _say_chunking_is_the_kernels(chunk_size: int, kernel_chunk: int, kernel: str) -> None:
    """model.chunk_size shapes the PyTorch chunked form only: say so (once) when it differs
    from what the kernel in use chunks by, rather than ignore it silently."""
    if chunk_size != kernel_chunk:
        build.say(f"model.chunk_size = {chunk_size} applies to the PyTorch reference; {kernel} uses chunks of "
                  f"{kernel_chunk}", logging.INFO)


def kda_step(q, k, v, log_alpha, beta, state=None, scale=None, reset=None, mode: str = "auto"):
    """One KDA token, as model.kda.kda_step: q, k, log_alpha [B, H, dk]; v [B, H, dv];
    beta [B, H]; state [B, H, dk, dv] or None; reset [B] / [B, H] bool or None."""
    be = _backend(mode, q, _kda_unsupported(q, 1))
    if be is None:
        return kda_step_reference(q, k, v, log_alpha, beta, state, scale, reset)
    return ops.kda_step_fused(q, k, v, log_alpha, beta, state, scale, reset)


def gated_rmsnorm(o, gate, weight, eps: float, mode: str = "auto"):
    """RMSNorm(o) * weight * silu(gate) over the last dim, float32 out. Without a CUDA kernel,
    float32 CPU tensors go through model/cpu_kernels.py's compiled pass, the rest through
    the reference."""
    be = _backend(mode, o)
    if be is None:
        if cpu_kernels.gated_rmsnorm_serves(o, gate):
            return cpu_kernels.gated_rmsnorm(o, gate, weight, eps)
        return gated_rmsnorm_reference(o, gate, weight, eps)
    return ops.gated_rmsnorm_fused(o, gate, weight, eps)


def status() -> str:
    """One line for logs: whether the fused kernels are in use, and if not why."""
    if not build.attempted():
        return "fused kernels: not tried yet (built on the first CUDA call)"
    if build.extension() is not None:
        return build.line()
    return f"fused kernels: off ({build.reason()})"


__all__ = ["MODES", "chunked", "lif_modulate", "kda", "kda_step", "gated_rmsnorm", "status", "lif_modulate_reference",
           "kda_reference", "kda_step_reference", "gated_rmsnorm_reference"]
