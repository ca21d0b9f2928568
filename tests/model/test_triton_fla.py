"""The glue to flash-linear-attention's chunk_kda (model/ops/fla.py) with the real kernel
under Triton's interpreter, float32, against kda_recurrent: forward, final state and every
gradient, with document resets (segments) and a carried state per stream. The two
interpreter gaps are bridged by tests/model/triton_interpreter.py (autotune's first config;
loop ints with `.to`). bf16 cannot be checked here: the interpreter's bf16 `tl.dot`
multiplies raw bit patterns."""
from tests.model import triton_interpreter  # noqa: I001 - sets TRITON_INTERPRET before any kernel import

import pytest
import torch
import torch.nn.functional as F

from model.ops import fla as glue
from model.ops.reference.kda import kda_recurrent

pytestmark = pytest.mark.skipif(triton_interpreter.triton is None, reason="triton is not installed")


@pytest.fixture
def chunk_kda(monkeypatch):
    try:
        from fla.ops.kda import chunk_kda
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"fla not importable: {e}")
    triton_interpreter.first_config_only(monkeypatch)
    triton_interpreter.loop_ints_with_to(monkeypatch)
    return chunk_kda


def test_kda_varlen_with_chunk_kda_matches_the_recurrence(chunk_kda):
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 40, 16
    q, k = (F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, D, generator=g)
    la = -torch.rand(B, H, T, D, generator=g) * 0.5
    beta = torch.rand(B, H, T, generator=g)
    s0 = torch.randn(B, H, D, D, generator=g) * 0.1
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 17] = True
    reset[1, 0] = True  # this stream's carried state is never read
    inputs = [x.requires_grad_() for x in (q, k, v, la, beta, s0)]

    def run(fn):
        o, s = fn(*inputs)
        w = torch.Generator().manual_seed(1)
        loss = (o * torch.randn(o.shape, generator=w)).sum() + (s * torch.randn(s.shape, generator=w)).sum()
        return [o.detach(), s.detach(), *torch.autograd.grad(loss, inputs)]

    got = run(lambda *x: glue.kda_varlen(*x[:5], x[5], None, reset, kernel=chunk_kda))
    want = run(lambda *x: kda_recurrent(*x[:5], x[5], None, reset))
    for name, a, b in zip(["o", "S", "dq", "dk", "dv", "d log_alpha", "d beta", "d S0"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert got[7][1].abs().max() == 0
