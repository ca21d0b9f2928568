"""Triton kernels for CUDA tensors: the LIF scan with its modulation (lif.py), the gated
RMSNorm (norm.py) and the short causal depthwise convolution (conv.py), forward and
backward, with the kernel-form contracts of model/ops/reference/forms.py (the compiled C
loops' too). float32 accumulation; inputs in float32, bfloat16 or float16; the norm returns
float32, the others their input's dtype. Training KDA is flash-linear-attention's
`chunk_kda` (model/ops/fla.py), also Triton.

Written so that Triton's interpreter (`TRITON_INTERPRET=1`) runs them unmodified on CPU
tensors: one launch configuration (no autotune), no `.to` on loop variables, pointer
offsets built from int64 program ids. That is how CPU CI tests them
(tests/model/test_triton_*.py); bench/kernel_report.py compiles them for sm_80-sm_90.
"""
from __future__ import annotations

from typing import Optional

_state: dict = {}


def unavailable() -> Optional[str]:
    """None when Triton imports here, else why not (cached)."""
    if "why" not in _state:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # noqa: BLE001 - not installed, or a broken install
            _state["why"] = f"triton not importable ({type(e).__name__}: {e})"[:300]
        else:
            _state["why"] = None
    return _state["why"]


def block(n: int) -> int:
    """The power of two >= n (>= 16): a block covering n channels."""
    b = 16
    while b < n:
        b *= 2
    return b


def warps(width: int) -> int:
    """Warps for a block of `width` lanes per row: one per 32, between 1 and 8."""
    return max(1, min(8, width // 32))
