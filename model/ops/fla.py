"""The chunked (tensor-core) KDA training kernel: flash-linear-attention's `chunk_kda`.

`fla.ops.kda.chunk_kda` (PyPI `fla-core`, Triton) computes exactly reference/kda.py's
recurrence given our log_alpha and beta: q, k `[B, T, H, K]`, g = log-decay per key
channel `[B, T, H, K]`, beta `[B, T, H]`, float32 initial_state `[N, H, K, V]`, and
`cu_seqlens` (B = 1) for variable-length sequences. This module is the glue between that
API and ours (`[B, H, T, d]`, per-stream document resets, per-stream carried state):

- the B streams are laid end to end as one sequence of B*T tokens, cut into segments at
  every stream start and at every document reset (reset[b, t]: the state is zeroed before
  token t), which gives `cu_seqlens`;
- a segment that starts a stream continues that stream's carried state
  (`initial_state[b]`, or zeros where the stream's first token is itself a reset); a
  segment that starts at a reset starts from zeros;
- each stream's final state is the final state of its last segment.

The kernel is a parameter (`kernel=`) with chunk_kda's signature, so the CPU tests run
this same glue with `reference_chunk_kda` (our PyTorch recurrence, per segment) in its
place and compare against reference/kda.py directly, forward and gradients.

Per-head resets ([B, H, T]) cannot be cut into shared segments; `unsupported()` says so
and the dispatcher (dispatch.py) runs the reference. `fla` is optional: imported on first
use, only for CUDA tensors; `available()` is None when it imports, else why not. Whether
it is used is the dispatcher's choice (after its first-call check, forward and backward).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

_fla: dict = {}


def available() -> Optional[str]:
    """None when fla's chunk_kda can be used here, else the reason (cached)."""
    if "fn" not in _fla:
        if not torch.cuda.is_available():
            _fla["fn"], _fla["why"] = None, "no CUDA device"
        else:
            try:
                from fla.ops.kda import chunk_kda
            except Exception as e:  # noqa: BLE001 - not installed, or no matching Triton
                _fla["fn"], _fla["why"] = None, f"flash-linear-attention not importable ({type(e).__name__}: {e})"[:300]
            else:
                _fla["fn"], _fla["why"] = chunk_kda, None
    return _fla["why"]


def fla_kernel() -> Callable:
    why = available()
    if why:
        raise RuntimeError(f"model.kernels: fla chunk_kda unavailable: {why}")
    return _fla["fn"]


def unsupported(q: torch.Tensor, reset: Optional[torch.Tensor]) -> Optional[str]:
    if reset is not None and reset.dim() != 2:
        return "per-head resets do not map to shared cu_seqlens"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    if q.shape[2] == 0:
        return "empty sequence"
    return None


def segments(reset: Optional[torch.Tensor], B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cu_seqlens int64 [N + 1], first [B]: index of each stream's first segment,
    keep0 [B]: 1.0 where that segment carries the stream's state, 0.0 where it starts at a reset)."""
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if reset is not None:
        starts |= reset.to(device=device, dtype=torch.bool)
    flat = starts.reshape(-1)
    pos = flat.nonzero().squeeze(1)  # segment starts in the flattened B*T sequence (one host sync)
    cu = torch.cat([pos, pos.new_tensor([B * T])])
    first = torch.cumsum(starts.sum(1), 0) - starts.sum(1)  # segments before stream b
    keep0 = torch.ones(B, device=device) if reset is None else (~reset[:, 0].to(device=device, dtype=torch.bool)).float()
    return cu, first, keep0


def kda_varlen(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None, kernel: Optional[Callable] = None):
    """Our contract (q, k, log_alpha [B, H, T, dk]; v [B, H, T, dv]; beta [B, H, T];
    initial_state [B, H, dk, dv] or None; reset [B, T] bool or None) -> (o [B, H, T, dv]
    in v's dtype, a view of a [B, T, H, dv] buffer; final state float32 [B, H, dk, dv]),
    computed by `kernel` (chunk_kda by default) over cu_seqlens segments."""
    kernel = kernel or fla_kernel()
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    dev = q.device
    scale = dk ** -0.5 if scale is None else float(scale)
    dt = v.dtype if v.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32

    def flat(x, dtype):  # [B, H, T, d] -> [1, B*T, H, d]
        return x.transpose(1, 2).reshape(1, B * T, H, x.shape[-1]).to(dtype)

    qf, kf, vf = flat(q, dt), flat(k, dt), flat(v, dt)
    gf = flat(log_alpha, torch.float32)
    bf = beta.transpose(1, 2).reshape(1, B * T, H).to(dt)
    cu, first, keep0 = segments(reset, B, T, dev)
    N = cu.numel() - 1
    h0 = torch.zeros(N, H, dk, dv, device=dev, dtype=torch.float32)
    if initial_state is not None:
        h0 = h0.index_copy(0, first, initial_state.float() * keep0[:, None, None, None])
    o, ht = kernel(qf, kf, vf, gf, bf, scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    last = torch.cat([first[1:], first.new_tensor([N])]) - 1
    o = o.reshape(B, T, H, dv).transpose(1, 2).to(v.dtype)
    return o, ht.float().index_select(0, last)


def reference_chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                        **_):
    """chunk_kda's contract computed by reference/kda.py's recurrence, segment by segment:
    the stand-in that lets the CPU tests check `kda_varlen`'s mapping."""
    from .reference.kda import kda_recurrent

    assert q.shape[0] == 1 and cu_seqlens is not None
    cu = cu_seqlens.tolist()
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        def seg(x, a=a, b=b):
            return x[:, a:b].transpose(1, 2)  # [1, H, t, d] / [1, H, t]

        s0 = None if initial_state is None else initial_state[n:n + 1]
        o, s = kda_recurrent(seg(q), seg(k), seg(v), seg(g), seg(beta), s0, scale)
        outs.append(o.transpose(1, 2))
        finals.append(s)
    return torch.cat(outs, 1).to(v.dtype), (torch.cat(finals, 0) if output_final_state else None)
