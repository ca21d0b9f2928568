"""The fast paths against their specifications: the LIF's parallel backward (leaky scan
over chunks, with resets), the compiled CPU loops, the KDA's factored and pairwise
sub-chunk scores, and the blocked unit-triangular solve. Never timed."""
import contextlib
import ctypes
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model.ops.reference.kda as kda_mod
from model import ops
from model.ops import cpu as cpu_kernels, dispatch
from model.ops.cpu import build as native
from model.ops.reference.kda import _unit_lower_inverse, _unit_lower_solve, kda_chunk, kda_recurrent
from model.ops.reference.layer import gated_rmsnorm_reference, lif_modulate_reference
from model.ops.reference.lif import _leaky_scan, lif_scan, lif_scan_reference, lif_scan_sequential

from .helpers import forget_dispatch
from .test_kda import assert_same, make_inputs, run_and_grad


def assert_chunk_matches_recurrent(inputs, reset, fn=kda_chunk, **chunk_kw):
    """fn (kda_chunk's contract) with **chunk_kw against kda_recurrent: outputs, final state
    and every gradient."""
    o1, s1, g1 = run_and_grad(lambda *a: fn(*a, reset=reset, **chunk_kw), inputs)
    o2, s2, g2 = run_and_grad(lambda *a: kda_recurrent(*a, reset=reset), inputs)
    assert_same(o1, o2)
    assert_same(s1, s2)
    for a, b in zip(g1, g2):
        assert_same(a, b)


@pytest.mark.parametrize("T", [1, 31, 32, 33, 100])
@pytest.mark.parametrize("with_reset", [False, True])
def test_leaky_scan_matches_loop(T, with_reset):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(3, T, 5, generator=g, dtype=torch.float64)
    keep = (torch.rand(3, T, generator=g) > 0.1).double() if with_reset else None
    y, ref = torch.zeros(3, 5, dtype=torch.float64), []
    for t in range(T):
        y = 0.9 * (keep[:, t, None] if keep is not None else 1.0) * y + x[:, t]
        ref.append(y)
    torch.testing.assert_close(_leaky_scan(x, 0.9, keep), torch.stack(ref, 1))


@pytest.mark.parametrize("fn", [lif_scan, lif_scan_sequential])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lif_forms_match_reference_over_many_chunks(fn, dtype):
    """lif_scan (the matmul leaky-scan backward) and lif_scan_sequential against the
    autograd reference."""
    g = torch.Generator().manual_seed(0)
    drive = (torch.randn(2, 150, 3, 4, generator=g, dtype=dtype) * 0.5 + 0.3).requires_grad_()
    m0 = torch.randn(2, 3, 4, generator=g, dtype=dtype).requires_grad_()
    reset = torch.rand(2, 150, generator=g) < 0.05
    s1, m1 = fn(drive, 0.9, 1.0, m0, reset)
    s2, m2 = lif_scan_reference(drive, 0.9, 1.0, m0, reset)
    assert torch.equal(s1, s2)
    assert_same(m1, m2)
    w_s, w_m = torch.randn(s1.shape, generator=g, dtype=dtype), torch.randn(m1.shape, generator=g, dtype=dtype)
    g1 = torch.autograd.grad((s1 * w_s).sum() + (m1 * w_m).sum(), [drive, m0])
    g2 = torch.autograd.grad((s2 * w_s).sum() + (m2 * w_m).sum(), [drive, m0])
    for a, b in zip(g1, g2):
        assert_same(a, b)


@pytest.mark.parametrize("factor_max", [0.0, float("inf"), 80.0])
def test_kda_chunk_score_paths_match_recurrent(monkeypatch, factor_max, kda_path):
    """0 forces the pairwise exponents, inf the factored form (inputs whose decay it can hold)."""
    monkeypatch.setattr(kda_mod, "_FACTOR_MAX", factor_max)
    inputs = make_inputs(T=70)
    reset = torch.zeros(2, 70, dtype=torch.bool)
    reset[0, 20] = reset[1, 45] = True
    assert_chunk_matches_recurrent(inputs, reset, kda_path, chunk_size=32)


@pytest.mark.parametrize("per_token,expect_sub_chunks", [(0.5, False), (3.5, False), (6.0, True)])
def test_kda_chunk_takes_the_whole_chunk_or_sub_chunk_factoring_by_decay(monkeypatch, per_token, expect_sub_chunks,
                                                                         kda_path):
    """A chunk whose decay stays within e^-80 is two matmuls; so is one that does once
    halved (3.5 x 32 = 112 nats, 56 over 16 tokens); one that decays further even over
    16 tokens (6 x 16 = 96 nats) goes through the sub-chunk scores. All agree with the
    recurrence, forward and gradients."""
    calls = []
    real = kda_mod._decayed_scores
    monkeypatch.setattr(kda_mod, "_decayed_scores", lambda *a: calls.append(1) or real(*a))
    q, k, v, _, beta, s0 = make_inputs(T=70)
    g = torch.Generator().manual_seed(3)
    log_alpha = (-per_token * torch.rand(q.shape[:3] + (k.shape[-1],), generator=g) * 2).clamp(max=0)
    log_alpha = log_alpha.clamp(min=-per_token * 1.0).requires_grad_()  # at most per_token nats a token
    inputs = [q, k, v, log_alpha, beta, s0]
    reset = torch.zeros(2, 70, dtype=torch.bool)
    reset[1, 40] = True
    assert_chunk_matches_recurrent(inputs, reset, kda_path, chunk_size=32)
    assert bool(calls) == expect_sub_chunks


@pytest.mark.parametrize("per_token,chunk_size,expected", [(1.0, 64, 64), (2.0, 64, 32), (4.0, 64, 16), (6.0, 64, None),
                                                             (2.0, 48, 24), (2.5, 40, 20), (4.5, 40, None), (0.5, 8, 8)])
def test_factorable_chunk_halves_the_chunk_until_its_decay_fits(per_token, chunk_size, expected):
    """The longest chunk (the preset's, halved while even and >= 16) whose every chunk
    decays by at most 80 nats; T = 100 is no multiple of any of them (the tail is padded
    with no decay)."""
    g = torch.full((2, 3, 100, 4), -per_token)
    g[1, 2, :, 1] = -0.1  # a slow channel does not change the answer
    assert kda_mod._factorable_chunk(g, chunk_size, 80.0) == expected


@pytest.mark.parametrize("with_state", [True, False])
def test_kda_chunk_in_groups_of_streams_matches_recurrent(monkeypatch, with_state):
    """On CPU without the compiled loops a large batch runs a few streams at a time (here
    one: the threshold set to one element), with each stream's resets and initial state;
    the same function."""
    monkeypatch.setattr(kda_mod, "_CPU_GROUP_ELEMENTS", 1)
    q, k, v, log_alpha, beta, s0 = make_inputs(B=3, T=40, seed=7)
    reset = torch.zeros(3, 40, dtype=torch.bool)
    reset[0, 9] = reset[2, 33] = True
    inputs = [q, k, v, log_alpha, beta] + ([s0] if with_state else [])
    assert_chunk_matches_recurrent(inputs, reset, chunk_size=16)


@pytest.mark.parametrize("C,blk", [(64, 16), (32, 16), (8, 8), (12, 6)])
def test_unit_lower_solve_matches_solve_triangular(C, blk):
    g = torch.Generator().manual_seed(C)
    L = (torch.randn(2, 3, C, C, generator=g, dtype=torch.float64) * 0.3).tril(-1)
    rhs = torch.randn(2, 3, C, 5, generator=g, dtype=torch.float64)
    eye = torch.eye(C, dtype=torch.float64)
    L.requires_grad_()
    rhs.requires_grad_()
    ref = torch.linalg.solve_triangular(eye + L.tril(-1), rhs, upper=False, unitriangular=True)
    got = _unit_lower_solve(L, rhs, blk)
    torch.testing.assert_close(got, ref)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * w).sum(), [L, rhs]), torch.autograd.grad((ref * w).sum(), [L, rhs])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("C,blk", [(64, 16), (32, 16), (16, 16), (48, 16), (12, 4), (10, 5)])
def test_unit_lower_inverse_matches_linalg_inv(C, blk):
    """Block inverses merged pairwise; a block count that is not a power of two (48 / 16,
    12 / 4, 10 / 5) is extended by identity rows."""
    g = torch.Generator().manual_seed(C)
    L = (torch.randn(2, 3, C, C, generator=g, dtype=torch.float64) * 0.3).tril(-1)
    ref = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + L)
    torch.testing.assert_close(_unit_lower_inverse(L, blk), ref)


@pytest.mark.parametrize("chunk_size", [48, 20])
def test_kda_chunk_with_a_chunk_of_three_or_five_sub_blocks_matches_recurrent(chunk_size, kda_path):
    """48 = 3 x 16 and 20 = 5 x 4 tokens: the chunk's inverse is built from a block count
    that is not a power of two."""
    inputs = make_inputs(T=100, seed=5)
    reset = torch.zeros(2, 100, dtype=torch.bool)
    reset[0, 30] = reset[1, 77] = True
    assert_chunk_matches_recurrent(inputs, reset, kda_path, chunk_size=chunk_size)


def test_without_a_compiler_the_references_run_and_say_so(monkeypatch, tmp_path, caplog):
    """No C compiler: one log line says the loops are unavailable, and lif_modulate (what
    Spike-KDA calls) runs the PyTorch form, with the same results as the reference; the
    report says so."""
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": False, "ok": False, "openmp": False})
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    forget_dispatch()
    g = torch.Generator().manual_seed(2)
    drive = torch.randn(2, 40, 2, 3, generator=g) * 0.5 + 0.3
    a, beta_logit = torch.rand(2, 40, 2, 3, generator=g), torch.randn(2, 40, 2, generator=g)
    try:
        with caplog.at_level(logging.WARNING, logger="model.ops"):
            for _ in range(2):
                got = ops.lif_modulate(drive, a, beta_logit, 0.9, 1.0)
        assert not cpu_kernels.available()
        assert sum("CPU loops unavailable" in r.getMessage() for r in caplog.records) == 1
        assert ops.report()["lif_modulate"].startswith("PyTorch reference (cpu, float32; compiled C loop: no C compiler")
    finally:
        forget_dispatch()
    for x, y in zip(got, lif_modulate_reference(drive, a, beta_logit, 0.9, 1.0)):
        torch.testing.assert_close(x, y)


def _compiled_loops_results(seed: int) -> list[torch.Tensor]:
    """Outputs and input gradients of the compiled loops (LIF with modulation and resets,
    ShortConv's conv, the q/k/v split, the gated RMSNorm) on one set of random inputs."""
    g = torch.Generator().manual_seed(seed)
    drive = (torch.randn(5, 33, 3, 8, generator=g) * 0.6 + 0.3).requires_grad_()
    a = torch.rand(5, 33, 3, 8, generator=g).requires_grad_()
    beta_logit = torch.randn(5, 33, 3, generator=g).requires_grad_()
    reset = torch.rand(5, 33, generator=g) < 0.1
    xx = torch.randn(5, 36, 24, generator=g, requires_grad=True)
    w = torch.randn(24, 4, generator=g, requires_grad=True)
    with forced_cpu():
        outs = [*ops.lif_modulate(drive, a, beta_logit, 0.9, 1.0, None, reset, 5.0),
                ops.short_conv(xx, w), *ops.split_heads(xx[:, :, :18], 3),
                ops.gated_rmsnorm(xx[:, :33].unflatten(-1, (3, 8)), drive, w[:8, 0], 1e-6)]
        weights = [torch.randn(t.shape, generator=g) for t in outs]
        grads = torch.autograd.grad(sum((t * u).sum() for t, u in zip(outs, weights)), [drive, a, beta_logit, xx, w])
    assert all(g.abs().sum() > 0 for g in grads)
    return [t.detach() for t in outs] + list(grads)


@contextlib.contextmanager
def forced_cpu(*ops_):
    """The compiled C loops forced for these ops (all by default), unchecked."""
    with contextlib.ExitStack() as stack:
        for op in ops_ or ("lif_modulate", "short_conv", "split_heads", "gated_rmsnorm", "kda"):
            stack.enter_context(dispatch.forcing(op, "cpu"))
        yield


def test_compiled_loops_give_the_same_bits_however_they_are_threaded(monkeypatch):
    """The compiled loops share rows among threads (OpenMP in torch's thread team, else a
    Python pool, else one thread): every output and gradient is bitwise the same, the
    ShortConv weight gradient's per-thread partial sums included."""
    if not cpu_kernels.available():
        pytest.skip("no C compiler here")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _compiled_loops_results(0)
        torch.set_num_threads(3)
        as_built = _compiled_loops_results(0)
        monkeypatch.setitem(cpu_kernels._state, "openmp", False)  # rows split among Python threads
        pooled = _compiled_loops_results(0)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, as_built, pooled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_rmsnorm_compiled_matches_its_reference_with_gradients(dtype):
    """The gated RMSNorm in one compiled pass each way equals RMSNorm(o) * weight *
    silu(gate) by PyTorch (float64: the PyTorch kernel form, the loop takes float32), values
    and the gradients of o, gate and weight, with o read
    through a transposed view (the KDA's [B, H, T, D] output) and its gradient returned in
    that layout. Large gates (|g| > 88, where e^-g leaves float range) included."""
    if not cpu_kernels.available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(9)
    o = torch.randn(3, 2, 7, 16, generator=g, dtype=dtype).requires_grad_()  # [B, H, T, D]
    gate = (torch.randn(3, 7, 2, 16, generator=g, dtype=dtype) * 3).requires_grad_()
    with torch.no_grad():
        gate[0, 0, 0, :3] = torch.tensor([-120.0, 95.0, -30.0], dtype=dtype)
    weight = (torch.rand(16, generator=g, dtype=dtype) + 0.5).requires_grad_()
    with forced_cpu("gated_rmsnorm") if dtype == torch.float32 else dispatch.forcing("gated_rmsnorm", "reference"):
        got = ops.gated_rmsnorm(o.transpose(1, 2), gate, weight, 1e-6)
    want = F.rms_norm(o.transpose(1, 2), (16,), weight, 1e-6) * F.silu(gate)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got, want, **tol)
    w = torch.randn(want.shape, generator=g, dtype=dtype)
    with forced_cpu("gated_rmsnorm") if dtype == torch.float32 else dispatch.forcing("gated_rmsnorm", "reference"):
        ga = torch.autograd.grad((got * w).sum(), [o, gate, weight])
    gb = torch.autograd.grad((want * w).sum(), [o, gate, weight])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **tol)


def test_spike_kda_norm_takes_the_compiled_pass_for_float32_on_cpu():
    """ops.gated_rmsnorm (what Spike-KDA calls) runs the compiled pass for float32 CPU
    tensors and the PyTorch form for bf16; the report names both."""
    if not cpu_kernels.available():
        pytest.skip("no C compiler here")
    forget_dispatch()
    o, gate, w = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8), torch.rand(8)
    got = ops.gated_rmsnorm(o, gate, w, 1e-6)
    torch.testing.assert_close(got, gated_rmsnorm_reference(o, gate, w, 1e-6))
    ops.gated_rmsnorm(o.bfloat16(), gate.bfloat16(), w, 1e-6)
    assert ops.report()["gated_rmsnorm"] == ("compiled C loop (cpu, float32); PyTorch reference "
                                             "(cpu, bfloat16; compiled C loop: no bfloat16 loop)")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_openmp_loops_join_torchs_runtime():
    """Built with OpenMP, the compiled loops use the OpenMP runtime torch already loaded
    (one libgomp in the process, so one thread team), not a second copy."""
    if not cpu_kernels.available() or not cpu_kernels._state["openmp"]:
        pytest.skip("the compiled loops are built without OpenMP here")
    with forced_cpu("short_conv"):
        ops.short_conv(torch.randn(2, 9, 4), torch.randn(4, 2))
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_heads_is_normalize_and_transpose_with_gradients(dtype):
    """The compiled q/k/v split equals F.normalize on q and k and a head-major transpose,
    values and gradients, a row below F.normalize's eps included."""
    if not cpu_kernels.available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 3 * 2 * 5, generator=g, dtype=dtype)
    x[0, 0, :5] = 1e-14  # a q row below eps: y = x / eps, linear
    x.requires_grad_()
    with forced_cpu("split_heads"):
        got = ops.split_heads(x, 2)
    q, k, v = x.view(3, 7, 3, 2, 5).unbind(2)
    want = [F.normalize(q, dim=-1).transpose(1, 2), F.normalize(k, dim=-1).transpose(1, 2), v.transpose(1, 2)]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, **tol)
    w = [torch.randn(t.shape, generator=g, dtype=dtype) for t in want]
    with forced_cpu("split_heads"):
        ga, = torch.autograd.grad(sum((a * u).sum() for a, u in zip(got, w)), x)
    gb, = torch.autograd.grad(sum((b * u).sum() for b, u in zip(want, w)), x)
    tiny = torch.zeros_like(ga, dtype=torch.bool)
    tiny[0, 0, :5] = True  # its gradient is dy / eps, ~1e12: compared relatively
    torch.testing.assert_close(ga[~tiny], gb[~tiny], **tol)
    torch.testing.assert_close(ga[tiny], gb[tiny], rtol=tol["rtol"], atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lif_modulate_compiled_matches_its_reference_with_gradients(dtype):
    """The LIF scan with the Spike-KDA modulation in one compiled pass each way equals
    lif_modulate_reference: identical spikes, and the other outputs and all gradients
    (drive, a, beta_logit, membrane) to rounding, resets included."""
    if not cpu_kernels.available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(5)
    drive = (torch.randn(3, 40, 2, 6, generator=g, dtype=dtype) * 0.6 + 0.3).requires_grad_()
    a = torch.rand(3, 40, 2, 6, generator=g, dtype=dtype).requires_grad_()
    beta_logit = torch.randn(3, 40, 2, generator=g, dtype=dtype).requires_grad_()
    m0 = torch.randn(3, 2, 6, generator=g, dtype=dtype).requires_grad_()
    reset = torch.rand(3, 40, generator=g) < 0.1
    with forced_cpu("lif_modulate"):
        got = ops.lif_modulate(drive, a, beta_logit, 0.9, 1.0, m0, reset, 5.0)
    want = lif_modulate_reference(drive, a, beta_logit, 0.9, 1.0, m0, reset, 5.0)
    assert torch.equal(got[0], want[0])
    # the reference takes sigmoid(beta_logit) in float32 whatever the dtype
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for x, y in zip(got[1:], want[1:]):
        torch.testing.assert_close(x, y, **tol)
    w = [torch.randn(t.shape, generator=g, dtype=dtype) for t in want]
    inputs = [drive, a, beta_logit, m0]
    with forced_cpu("lif_modulate"):
        g1 = torch.autograd.grad(sum((t * u).sum() for t, u in zip(got, w)), inputs)
    g2 = torch.autograd.grad(sum((t * u).sum() for t, u in zip(want, w)), inputs)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("compiled", [True, False])
def test_lif_modulate_without_alpha_is_the_same_scan(compiled):
    """a = None (Spike-KDA with alpha_spike_floor 1: forgetting not gated by spikes): the
    same spikes, membrane and beta, and the same gradients of drive, beta_logit and the
    membrane, as the modulated scan; log_alpha comes back None. Compiled loop and PyTorch form."""
    if compiled and not cpu_kernels.available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(8)
    drive = (torch.randn(2, 30, 2, 5, generator=g) * 0.6 + 0.3).requires_grad_()
    beta_logit = torch.randn(2, 30, 2, generator=g).requires_grad_()
    m0 = torch.randn(2, 2, 5, generator=g).requires_grad_()
    reset = torch.rand(2, 30, generator=g) < 0.1
    impl = dispatch.forcing("lif_modulate", "cpu" if compiled else "reference")
    with impl:
        spikes, m, log_alpha, beta = ops.lif_modulate(drive, None, beta_logit, 0.9, 1.0, m0, reset, 5.0)
    want = lif_modulate_reference(drive, torch.rand(drive.shape, generator=g), beta_logit, 0.9, 1.0, m0, reset, 5.0)
    assert log_alpha is None
    assert torch.equal(spikes, want[0])
    torch.testing.assert_close(m, want[1])
    torch.testing.assert_close(beta, want[3])
    w = [torch.randn(t.shape, generator=g) for t in (spikes, m, beta)]
    inputs = [drive, beta_logit, m0]
    with dispatch.forcing("lif_modulate", "cpu" if compiled else "reference"):
        got_g = torch.autograd.grad(sum((t * u).sum() for t, u in zip((spikes, m, beta), w)), inputs)
    want_g = torch.autograd.grad(sum((t * u).sum() for t, u in zip((want[0], want[1], want[3]), w)), inputs)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def test_a_compiled_loop_is_built_once_and_says_so_when_it_builds(tmp_path, monkeypatch):
    """build.shared_library compiles a source once per (source, flags, machine), calling
    on_build just before it does (model/ops/cpu prints one line then: a cold build of the
    KDA loop takes about half a minute); a second process would load the cached build."""
    if not cpu_kernels.available():
        pytest.skip("no C compiler here")
    src = tmp_path / "twice.c"
    src.write_text("double twice(double x) { return 2 * x; }\n")
    builds = []
    compilers = ["cc", "gcc", "clang"]
    lib = native.shared_library(src, compilers, ["-O2"], root=tmp_path / "cache", on_build=lambda: builds.append(1))
    lib.twice.restype, lib.twice.argtypes = ctypes.c_double, [ctypes.c_double]
    assert lib.twice(21.0) == 42.0 and builds == [1]
    monkeypatch.setattr(native, "_loaded", {})  # as a fresh process: only the file cache is left
    native.shared_library(src, compilers, ["-O2"], root=tmp_path / "cache", on_build=lambda: builds.append(1))
    assert builds == [1]
