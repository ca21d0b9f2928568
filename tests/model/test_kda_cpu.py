"""The compiled chunked KDA (model/ops/cpu/kda.py, csrc/kda_chunk.c) against its
specification, the PyTorch form `_KDAChunkFn`: outputs, final state and every gradient,
with resets and a carried state, for each variant the C file builds (any head size and
head size 64; float with and without AVX2 + FMA; double), however the stream-heads are
shared among threads. Never timed."""
import pytest
import torch
import torch.nn.functional as F

from model.ops import cpu as cpu_kernels, dispatch
from model.ops.cpu import kda as kda_cpu
from model.ops.reference.kda import _KDAChunkFn, _sub_chunk

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler here: no compiled loops")


class _KDAChunkCPU(torch.autograd.Function):
    """The compiled loop's two functions (model/ops/cpu/kda.py) as one differentiable op."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, seg, chunk):
        o, s, starts = kda_cpu.kda_fwd(q, k, v, g, beta, s0, seg, chunk)
        ctx.save_for_backward(q, k, v, g, beta, starts)
        ctx.seg, ctx.chunk = seg, chunk
        return o, s

    @staticmethod
    def backward(ctx, dO, dS):
        q, k, v, g, beta, starts = ctx.saved_tensors
        return (*kda_cpu.kda_bwd(q, k, v, g, beta, ctx.seg, starts, dO, dS, ctx.chunk), None, None)


def kda_chunk_cpu(q, k, v, g, beta, s0, seg, chunk):
    """The compiled loop, differentiable: (O, S_end)."""
    return _KDAChunkCPU.apply(q, k, v, g, beta, s0, seg, chunk)


def chunk_inputs(B, H, N, C, dk, dv, dtype, seed=0, resets=True):
    """Scaled q, normalised k, v, log-decays (at most 1.5 nats a token), beta, a state,
    and per-chunk segment ids for a few resets (one at a chunk's first token)."""
    g = torch.Generator().manual_seed(seed)
    T = N * C
    q = F.normalize(torch.randn(B, H, T, dk, generator=g, dtype=dtype), dim=-1) * dk ** -0.5
    k = F.normalize(torch.randn(B, H, T, dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, dv, generator=g, dtype=dtype)
    log_alpha = -torch.rand(B, H, T, dk, generator=g, dtype=dtype) * 1.5
    beta = torch.rand(B, H, T, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, dk, dv, generator=g, dtype=dtype)
    seg = None
    if resets:
        reset = torch.rand(B, T, generator=g) < 0.05
        reset[0, 3] = True
        reset[-1, C] = True  # the first token of a chunk: the chunk never sees the state
        seg = reset[:, None].expand(B, H, T).unflatten(2, (N, C)).long().cumsum(-1).flatten(2)
    return [q, k, v, log_alpha, beta, s0], seg


def outputs_and_grads(fn, inputs, seed=1):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    o, s = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    w_o, w_s = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (o, s))
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs)
    return [o.detach(), s.detach(), *grads]


def pytorch_form(C):
    """_KDAChunkFn over [B, H, T, d] inputs (it takes them chunked: [B, H, N, C, d])."""
    def run(q, k, v, g, beta, s0, seg):
        B, H, T, _ = q.shape
        chunked = [x.unflatten(2, (T // C, C)) for x in (q, k, v, g, beta)]
        o, s = _KDAChunkFn.apply(*chunked, s0, None if seg is None else seg.unflatten(2, (T // C, C)), _sub_chunk(C))
        return o.flatten(2, 3), s
    return run


def compare(got, want, rtol, atol):
    names = ["o", "S", "dq", "dk", "dv", "dlog_alpha", "dbeta", "dS0"]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dk,dv", [(16, 8), (64, 64)])
@pytest.mark.parametrize("resets", [True, False])
def test_double_matches_the_pytorch_form(dk, dv, resets):
    """In float64 the two agree to rounding: same algebra, other order of operations."""
    C = 16
    inputs, seg = chunk_inputs(2, 3, 4, C, dk, dv, torch.float64, resets=resets)
    want = outputs_and_grads(lambda *x: pytorch_form(C)(*x, seg), inputs)
    got = outputs_and_grads(lambda *x: kda_chunk_cpu(*x, seg, C), inputs)
    compare(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("avx2", [True, False])
@pytest.mark.parametrize("dk,dv,C", [(16, 8, 8), (64, 64, 32), (64, 64, 64)])
def test_float_variants_match_the_pytorch_form_in_double(avx2, dk, dv, C):
    """Each float variant (head size 64 or any; AVX2 + FMA or portable) against the PyTorch
    form computed in float64, to float32 rounding."""
    inputs, seg = chunk_inputs(2, 2, 3, C, dk, dv, torch.float64, seed=dk + C)
    want = outputs_and_grads(lambda *x: pytorch_form(C)(*x, seg), inputs)
    lib = cpu_kernels.library("kda_chunk")
    lib.kda_chunk_allow_avx2(int(avx2))
    try:
        got = outputs_and_grads(lambda *x: kda_chunk_cpu(*x, seg, C), [x.float() for x in inputs])
    finally:
        lib.kda_chunk_allow_avx2(1)
    compare(got, want, rtol=2e-4, atol=2e-5)


def test_the_same_bits_however_the_stream_heads_are_shared_among_threads(monkeypatch):
    """One thread, three (OpenMP, or split among Python threads): each stream-head is
    computed whole by one thread, so every output and gradient is bitwise the same."""
    inputs, seg = chunk_inputs(3, 2, 3, 16, 64, 64, torch.float32, seed=4)
    run = lambda: outputs_and_grads(lambda *x: kda_chunk_cpu(*x, seg, 16), inputs)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(3)
        shared = run()
        monkeypatch.setitem(cpu_kernels._state, "openmp", False)
        pooled = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, shared, pooled):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_head_sizes_above_the_loops_limit_are_left_to_the_pytorch_form():
    """Head sizes above the loop's limit get the PyTorch form from the dispatcher."""
    limit = kda_cpu.max_dim()
    assert dispatch._why_not("cpu", "kda", torch.device("cpu"), torch.float32, limit) is None
    assert "above the loop's limit" in dispatch._why_not("cpu", "kda", torch.device("cpu"), torch.float32, limit + 1)
    assert dispatch._why_not("cpu", "kda", torch.device("cpu"), torch.bfloat16, 8) == "no bfloat16 loop"
