"""The chunked KDA as one compiled loop per stream-head on CPU (csrc/kda_chunk.c): the same
function as model/ops/reference/kda.py's `_KDAChunkFn`, with its state and each chunk
kept in cache instead of dozens of whole-batch tensor passes, and only the state each
chunk started from kept for the backward (which recomputes each chunk's forward).
Plain functions on tensors (the CPU kernels of `spike_ops::kda_chunk_fwd/bwd`,
model/ops/library.py); the PyTorch form stays the specification, and tests compare them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import available, compiled, library, row_pointer, run_rows, threads_for


def max_dim() -> int:
    """The largest head size (dk or dv) the compiled loop takes (0 when it is unavailable)."""
    return int(library("kda_chunk").kda_chunk_max_dim()) if available() else 0


def _work(chunk: int, dk: int, dv: int, rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Scratch for the compiled loops: one slice per thread that may run at once."""
    size = library("kda_chunk").kda_chunk_work_size(chunk, dk, dv)
    return torch.empty(threads_for(rows) * size, dtype=dtype), size


def kda_fwd(q, k, v, g, beta, S0, seg: Optional[torch.Tensor], chunk: int):
    """q (already scaled), k, g [B, H, T, dk]; v [B, H, T, dv]; beta [B, H, T]; S0 [B, H, dk, dv];
    seg [B, H, T] int64 (resets so far within each chunk) or None; T a multiple of `chunk`,
    and no chunk decaying by more than e^-80 in any channel. Float32 or float64.
    Returns (O [B, H, T, dv], S_end [B, H, dk, dv], starts [B, H, T / chunk, dk, dv])."""
    q, k, v, g, beta, S0 = (x.contiguous() for x in (q, k, v, g, beta, S0))
    seg = None if seg is None else seg.to(torch.int64).contiguous()
    B, H, T, dk = q.shape
    dv, N, BH, dtype = v.shape[-1], T // chunk, B * H, q.dtype
    O = torch.empty(B, H, T, dv, dtype=dtype)
    S_end = torch.empty(B, H, dk, dv, dtype=dtype)
    starts = torch.empty(B, H, N, dk, dv, dtype=dtype)
    work, size = _work(chunk, dk, dv, BH, dtype)
    fn = compiled("kda_chunk", "kda_chunk_forward", dtype)
    at = row_pointer(q.element_size())
    run_rows(BH, lambda part, r0, r1, th: fn(
        at(q, r0, T * dk), at(k, r0, T * dk), at(v, r0, T * dv), at(g, r0, T * dk), at(beta, r0, T),
        None if seg is None else seg.data_ptr() + r0 * T * 8, at(S0, r0, dk * dv), at(O, r0, T * dv),
        at(S_end, r0, dk * dv), at(starts, r0, N * dk * dv), at(work, part, size),
        r1 - r0, N, chunk, dk, dv, th))
    return O, S_end, starts


def kda_bwd(q, k, v, g, beta, seg, starts, dO, dS_end, chunk: int):
    """-> (dq, dk, dv, dg, dbeta, dS0), given what kda_fwd took and returned (starts)."""
    q, k, v, g, beta, starts = (x.contiguous() for x in (q, k, v, g, beta, starts))
    seg = None if seg is None else seg.to(torch.int64).contiguous()
    B, H, T, dk = q.shape
    dv, N, BH, dtype = v.shape[-1], T // chunk, B * H, q.dtype
    dO = torch.zeros_like(v) if dO is None else dO.to(dtype).contiguous()
    dS_end = None if dS_end is None else dS_end.to(dtype).contiguous()
    dq, dk_, dg = (torch.empty_like(q) for _ in range(3))
    dv_, dbeta = torch.empty_like(v), torch.empty_like(beta)
    dS0 = torch.empty(B, H, dk, dv, dtype=dtype)
    work, size = _work(chunk, dk, dv, BH, dtype)
    fn = compiled("kda_chunk", "kda_chunk_backward", dtype)
    at = row_pointer(q.element_size())
    run_rows(BH, lambda part, r0, r1, th: fn(
        at(q, r0, T * dk), at(k, r0, T * dk), at(v, r0, T * dv), at(g, r0, T * dk), at(beta, r0, T),
        None if seg is None else seg.data_ptr() + r0 * T * 8, at(starts, r0, N * dk * dv),
        at(dO, r0, T * dv), at(dS_end, r0, dk * dv), at(dq, r0, T * dk), at(dk_, r0, T * dk),
        at(dv_, r0, T * dv), at(dg, r0, T * dk), at(dbeta, r0, T), at(dS0, r0, dk * dv), at(work, part, size),
        r1 - r0, N, chunk, dk, dv, th))
    return dq, dk_, dv_, dg, dbeta, dS0
