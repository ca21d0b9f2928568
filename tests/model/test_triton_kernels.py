"""Our Triton kernels (model/ops/triton/) under Triton's interpreter on CPU tensors, through
their custom ops with the Triton implementation forced: the LIF scan with its modulation,
the gated RMSNorm and the short convolution, forward and every gradient against the
references, float32, ragged shapes (channels not a power of two, rows and tokens not a
multiple of a block), resets and a carried state; bf16 in for the norm. And the
first-call check on them: it passes, and it catches a broken Triton backward."""
from tests.model import triton_interpreter  # noqa: I001 - sets TRITON_INTERPRET before any kernel import

import pytest
import torch
import torch.nn.functional as F

from model import ops
from model.ops import dispatch
from model.ops.reference.layer import gated_rmsnorm_reference, lif_modulate_reference, short_conv_reference
from model.spike_kda import ShortConv

pytestmark = pytest.mark.skipif(triton_interpreter.triton is None, reason="triton is not installed")


def outputs_and_grads(fn, inputs, seed=1):
    outs = [o for o in fn(*inputs) if o is not None]
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(sum((o.float() * u.float()).sum() for o, u in zip(outs, w)), wrt, allow_unused=True)
    return [o.detach() for o in outs] + [torch.zeros_like(x) if d is None else d for x, d in zip(wrt, grads)]


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.to(b.dtype), b, msg=lambda m, i=i: f"output/gradient {i}: {m}", **tol)


@pytest.mark.parametrize("with_alpha,with_resets", [(True, True), (False, False)])
def test_lif_modulate_triton_matches_reference(with_alpha, with_resets):
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 33, 3, 20  # D: a block of 32 lanes, 12 masked
    drive = (torch.randn(B, T, H, D, generator=g) * 0.6 + 0.3).requires_grad_()
    a = torch.rand(B, T, H, D, generator=g).requires_grad_() if with_alpha else None
    beta_logit = torch.randn(B, T, H, generator=g).requires_grad_()
    m0 = (torch.randn(B, H, D, generator=g) * 0.5).requires_grad_()  # a carried membrane
    reset = torch.rand(B, T, generator=g) < 0.1
    reset[0, 0] = reset[1, 17] = True
    reset = reset if with_resets else None
    inputs = [drive, a, beta_logit, m0]

    def fast(d, a_, bl, m):
        with dispatch.forcing("lif_modulate", "triton"):
            return ops.lif_modulate(d, a_, bl, 0.9, 1.0, m, reset, 5.0)

    def ref(d, a_, bl, m):
        out = lif_modulate_reference(d, torch.zeros_like(d) if a_ is None else a_, bl, 0.9, 1.0, m, reset, 5.0)
        return out if a_ is not None else (out[0], out[1], None, out[3])

    with dispatch.forcing("lif_modulate", "triton"):
        got = outputs_and_grads(fast, inputs)
    want = outputs_and_grads(ref, inputs)
    assert torch.equal(got[0], want[0])  # identical spikes
    assert_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rmsnorm_triton_matches_reference(dtype):
    """o read through the KDA output's transposed view; B*T*H = 42 rows, not a multiple of
    the 16-row block; D = 24 of a 32-lane block. bf16 in, float32 out and accumulation."""
    g = torch.Generator().manual_seed(1)
    o = torch.randn(3, 2, 7, 24, generator=g).to(dtype).requires_grad_()  # [B, H, T, D]
    gate = (torch.randn(3, 7, 2, 24, generator=g) * 3).to(dtype).requires_grad_()
    w = (torch.rand(24, generator=g) + 0.5).requires_grad_()
    inputs = [o, gate, w]

    def fast(o_, g_, w_):
        return (ops.gated_rmsnorm(o_.transpose(1, 2), g_, w_, 1e-6),)

    with dispatch.forcing("gated_rmsnorm", "triton"):
        got = outputs_and_grads(fast, inputs)
    want = outputs_and_grads(lambda o_, g_, w_: (gated_rmsnorm_reference(o_.transpose(1, 2), g_, w_, 1e-6),), inputs)
    assert got[0].dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_all_close(got, want, **tol)


@pytest.mark.parametrize("K", [4, 1])
def test_short_conv_triton_matches_reference(K):
    """Through ShortConv (tail prepended, the terms across resets cut out): T = 37 tokens
    (two 32-token blocks, the second ragged), D = 70 channels (two 64-channel blocks),
    resets at t = 0, back to back and none in a stream, a carried tail."""
    g = torch.Generator().manual_seed(K)
    conv = ShortConv(70, K)
    x = torch.randn(3, 37, 70, generator=g, requires_grad=True)
    tail = torch.randn(3, K - 1, 70, generator=g, requires_grad=True)
    reset = torch.zeros(3, 37, dtype=torch.bool)
    reset[0, [0, 5, 6, 30]] = True
    reset[1, 36] = True
    inputs = [x, tail, conv.weight]

    def fast(x_, t_, w_):
        return (conv(x_, t_, reset)[0],)

    with dispatch.forcing("short_conv", "triton"):
        got = outputs_and_grads(fast, inputs)
    want = outputs_and_grads(lambda x_, t_, w_: (F.silu(short_conv_reference(x_, w_, t_, reset)),), inputs)
    assert_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,head", [("lif_modulate", 64), ("gated_rmsnorm", 64), ("short_conv", 4)])
def test_first_call_check_passes_on_the_triton_kernels(op, head):
    dispatch._first_call_check(op, "triton", torch.device("cpu"), torch.float32, head)


def test_first_call_check_catches_a_broken_triton_backward(monkeypatch):
    from model.ops.triton import lif

    real = lif.lif_bwd

    def broken(*args):
        gd, ga, gbl, gm0 = real(*args)
        return gd, ga, gbl * 0, gm0  # the beta logit's gradient lost

    monkeypatch.setattr(lif, "lif_bwd", broken)
    with pytest.raises(AssertionError, match="d beta_logit differs from the reference"):
        dispatch._first_call_check("lif_modulate", "triton", torch.device("cpu"), torch.float32, 16)
