"""Helpers shared by the model tests."""
import torch
import torch.nn.functional as F

from model import map_state


def tensors(state) -> list[torch.Tensor]:
    """Every tensor in a nested state, in the order model.map_state walks it."""
    found: list[torch.Tensor] = []
    map_state(state, lambda t: found.append(t) or t)
    return found


def kda_inputs(B=1, H=2, T=7, dk=8, dv=8, device="cpu", dtype=torch.float32, seed=0):
    """Random KDA inputs [B, H, T, .]: unit q/k, log-decays below 0, betas in (0, 1), an fp32 initial state."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    v = torch.randn(B, H, T, dv, generator=g)
    la = -F.softplus(torch.randn(B, H, T, dk, generator=g) - 2)
    beta = torch.rand(B, H, T, generator=g)
    s0 = torch.randn(B, H, dk, dv, generator=g)
    return [x.to(device=device, dtype=dtype if i < 5 else torch.float32) for i, x in enumerate((q, k, v, la, beta, s0))]


def forget_dispatch() -> None:
    """The dispatcher as a new process finds it: no verdicts, nothing turned off, nothing
    reported or said (model/ops/dispatch.py keeps these per process)."""
    from model.ops import dispatch

    with dispatch._lock:
        for kept in (dispatch._verdicts, dispatch._off, dispatch._ran, dispatch._said):
            kept.clear()
