"""The first-call check's problems: for each op, a small random problem at the real head
size and dtype, run through the public op (with the implementation under test forced by
the dispatcher) and through the reference, forward and backward; `compare` raises when
an output or a gradient differs beyond the dtype's tolerance. Imports only references."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .reference.kda import kda_recurrent
from .reference.layer import (
    depthwise_conv_reference,
    gated_rmsnorm_reference,
    lif_modulate_reference,
    split_heads_reference,
)

# max |fast - reference| <= TOL * (1 + max |reference|), per output and gradient
TOL = {torch.float64: 1e-7, torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _rand(g: torch.Generator, device, dtype, *shape, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _outputs_and_grads(fn: Callable, inputs: list, seed: int) -> list:
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = [o for o in fn(*inputs) if o is not None]
    g = torch.Generator().manual_seed(seed)
    total = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    wrt = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    return [o.detach() for o in outs] + [torch.zeros_like(x) if d is None else d for x, d in zip(wrt, grads)]


def compare(fast: Callable, reference: Callable, inputs: list, dtype: torch.dtype, names: list[str]) -> None:
    """Raise AssertionError naming the first output or gradient where fast and reference differ."""
    got, want = _outputs_and_grads(fast, inputs, 1), _outputs_and_grads(reference, inputs, 1)
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} outputs and gradients, the reference has {len(want)}")
    tol = TOL.get(dtype, 2e-4)
    for name, a, b in zip(names, got, want):
        if a.shape != b.shape:
            raise AssertionError(f"{name}: shape {list(a.shape)}, the reference's {list(b.shape)}")
        a, b = a.double(), b.double()
        err = (a - b).abs().max().item() if b.numel() else 0.0
        if not err <= tol * (1 + b.abs().max().item()):  # also catches NaN
            raise AssertionError(f"{name} differs from the reference by {err:.3g}")


def lif_modulate(run: Callable, device, dtype, head: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 12, 2, head
    drive = _rand(g, device, dtype, B, T, H, D, scale=0.6) + 0.35
    a = _rand(g, device, dtype, B, T, H, D).abs()
    bl, m0 = _rand(g, device, dtype, B, T, H), _rand(g, device, dtype, B, H, D, scale=0.3)
    reset = torch.zeros(B, T, dtype=torch.bool, device=device)
    reset[1, 5] = True
    compare(lambda d, a_, b_, m: run(d, a_, b_, 0.9, 1.0, m, reset)[1:],  # spikes are the surrogate's: compare what they feed
            lambda d, a_, b_, m: lif_modulate_reference(d, a_, b_, 0.9, 1.0, m, reset)[1:],
            [drive, a, bl, m0], dtype, ["membrane", "log_alpha", "beta", "d drive", "d a", "d beta_logit", "d membrane"])


def short_conv(run: Callable, device, dtype, head: int) -> None:
    g = torch.Generator().manual_seed(0)
    xx, w = _rand(g, device, dtype, 2, 9 + head - 1, 48), _rand(g, device, torch.float32, 48, head)
    compare(lambda x, w_: (run(x, w_),), lambda x, w_: (depthwise_conv_reference(x, w_),), [xx, w], dtype,
            ["y", "d xx", "d weight"])


def split_heads(run: Callable, device, dtype, head: int) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = _rand(g, device, dtype, 2, 7, 3 * 2 * head)
    compare(lambda x: run(x, 2), lambda x: split_heads_reference(x, 2), [qkv], dtype, ["q", "k", "v", "d qkv"])


def gated_rmsnorm(run: Callable, device, dtype, head: int) -> None:
    g = torch.Generator().manual_seed(0)
    o = _rand(g, device, dtype, 2, 2, 7, head).transpose(1, 2)  # [B, T, H, D] view, as the layer passes it
    gate, w = _rand(g, device, dtype, 2, 7, 2, head), _rand(g, device, torch.float32, head) + 1
    compare(lambda *x: (run(*x, 1e-6),), lambda *x: (gated_rmsnorm_reference(*x, 1e-6),), [o, gate, w], dtype,
            ["y", "d o", "d gate", "d weight"])


def kda(run: Callable, device, dtype, head: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, H, T = 2, 2, 40
    q, k = (F.normalize(_rand(g, device, torch.float32, B, H, T, head), dim=-1).to(dtype) for _ in range(2))
    v = _rand(g, device, dtype, B, H, T, head)
    la = (-torch.rand(B, H, T, head, generator=g) * 0.5).to(device=device, dtype=torch.float32)
    beta = torch.rand(B, H, T, generator=g).to(device=device, dtype=dtype)
    s0 = _rand(g, device, torch.float32, B, H, head, head, scale=0.1)
    reset = torch.zeros(B, T, dtype=torch.bool, device=device)
    reset[0, 17] = True
    compare(lambda *x: run(*x, reset=reset, chunk_size=16), lambda *x: kda_recurrent(*x, reset=reset),
            [q, k, v, la, beta, s0], dtype, ["o", "S", "dq", "dk", "dv", "d log_alpha", "d beta", "d S0"])


PROBLEMS = {"lif_modulate": lif_modulate, "short_conv": short_conv, "split_heads": split_heads,
            "gated_rmsnorm": gated_rmsnorm, "kda": kda}
