"""The GPU path a user gets, checked on the CPU (model/kernels: build.py, nvrtc.py, ops.py, chunked.py).

- The build ladder (nvcc / NVRTC / reference) and its one-line messages, each missing
  piece simulated with monkeypatch.
- NVRTC: the launch plan (the host launchers in Python), and, where an NVRTC library is
  at hand (pip's nvidia-cuda-nvrtc-cu12; no GPU needed to compile), the whole program
  compiled and every kernel name lowered.
- The custom ops: boundary checks raise clear errors; `torch.library.opcheck` (schema,
  fake tensors, autograd registration, AOT dispatch) on the host emulation backend;
  torch.compile traces through them.
- The chunked path's glue (resets and carried state -> cu_seqlens and segment states)
  run with a reference kernel in place of fla's chunk_kda, against model/kda.py,
  forward and gradients.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

import pytest
import torch

from model import kernels
from model.kernels import build, chunked, nvrtc, ops
from model.kernels.emu import EmuBackend, EmuUnavailable
from tests.model.helpers import kda_inputs


@pytest.fixture
def ladder(monkeypatch):
    """A machine with a CUDA device as far as build.py can tell; the test sets the rest."""
    build._reset_for_tests()
    monkeypatch.delenv("SPIKE_KERNELS_BUILD", raising=False)
    monkeypatch.setattr(build, "missing_device", lambda: None)
    monkeypatch.setattr(build, "missing_nvcc", lambda: None)
    monkeypatch.setattr(build, "missing_nvrtc", lambda: None)

    class Fake:
        def __init__(self, name):
            self.name, self.nvrtc_version = name, "12.9"

    calls = []

    def make(name, fail=None):
        def f():
            calls.append(name)
            if fail:
                raise RuntimeError(fail)
            return Fake(name)
        return f

    monkeypatch.setattr(build, "_build_nvcc", make("cuda"))
    monkeypatch.setattr(build, "_build_nvrtc", make("nvrtc"))
    yield monkeypatch, make, calls
    build._reset_for_tests()


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "model.kernels"]


def test_ladder_uses_nvcc_where_it_exists(ladder, caplog):
    mp, make, calls = ladder
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        assert build.backend().name == "cuda"
        build.backend()
    assert calls == ["cuda"] and build.build_in_use() == "nvcc"
    assert _lines(caplog) == ["model.kernels: " + build.line()]
    assert "built with nvcc" in build.line() and kernels.status() == build.line()


def test_ladder_uses_nvrtc_without_nvcc(ladder, caplog):
    mp, make, calls = ladder
    mp.setattr(build, "missing_nvcc", lambda: "no nvcc (CUDA toolkit)")
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        assert build.backend().name == "nvrtc"
    assert calls == ["nvrtc"] and build.build_in_use() == "nvrtc"
    (line,) = _lines(caplog)
    assert "built at run time with NVRTC 12.9" in line and "no CUDA toolkit needed" in line


def test_ladder_falls_to_nvrtc_when_the_nvcc_build_fails(ladder, caplog):
    mp, make, calls = ladder
    mp.setattr(build, "_build_nvcc", make("cuda", "Error building extension 'spike_kda_kernels'\nnvcc fatal: boom"))
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        assert build.backend().name == "nvrtc"
    assert calls == ["cuda", "nvrtc"]
    assert len(_lines(caplog)) == 1 and "NVRTC" in _lines(caplog)[0]


def test_ladder_reference_when_both_builds_fail_tried_once(ladder):
    mp, make, calls = ladder
    mp.setattr(build, "missing_nvcc", lambda: "no nvcc (CUDA toolkit)")
    mp.setattr(build, "_build_nvrtc", make("nvrtc", "NVRTC compile failed: kda.cuh(3): error: boom\nlog"))
    assert build.backend() is None and build.backend() is None
    assert calls == ["nvrtc"]  # once per process
    assert build.reason() == "no nvcc (CUDA toolkit); nvrtc build failed: NVRTC compile failed: kda.cuh(3): error: boom"
    assert kernels.status() == f"fused kernels: off ({build.reason()})"


def test_ladder_reference_when_neither_toolchain_exists(ladder):
    mp, make, calls = ladder
    mp.setattr(build, "missing_nvcc", lambda: "no nvcc (CUDA toolkit)")
    mp.setattr(build, "missing_nvrtc", lambda: "NVRTC library not found (libnvrtc.so.12)")
    assert build.backend() is None and calls == []
    assert build.reason() == "no nvcc (CUDA toolkit), and NVRTC unavailable: NVRTC library not found (libnvrtc.so.12)"


def test_ladder_nvcc_only_when_nvrtc_is_missing(ladder):
    mp, make, calls = ladder
    mp.setattr(build, "missing_nvrtc", lambda: "no NVRTC")
    mp.setattr(build, "_build_nvcc", make("cuda", "boom"))
    assert build.backend() is None and calls == ["cuda"]
    assert build.reason() == "nvcc build failed: boom"


@pytest.mark.parametrize("want,expect", [("nvrtc", "nvrtc"), ("nvcc", "cuda")])
def test_ladder_forced_rung(ladder, want, expect):
    mp, make, calls = ladder
    mp.setenv("SPIKE_KERNELS_BUILD", want)
    assert build.backend().name == expect and calls == [expect]


def test_ladder_forced_rung_missing_and_reference_and_bad_value(ladder):
    mp, make, calls = ladder
    mp.setenv("SPIKE_KERNELS_BUILD", "nvcc")
    mp.setattr(build, "missing_nvcc", lambda: "no nvcc (CUDA toolkit)")
    assert build.missing_requirement() == "SPIKE_KERNELS_BUILD=nvcc but no nvcc (CUDA toolkit)"
    mp.setenv("SPIKE_KERNELS_BUILD", "reference")
    assert build.backend() is None and build.reason() == "SPIKE_KERNELS_BUILD=reference" and calls == []
    mp.setenv("SPIKE_KERNELS_BUILD", "fast")
    with pytest.raises(ValueError, match="SPIKE_KERNELS_BUILD"):
        build.requested()


def test_ladder_real_checks_on_this_machine():
    if not torch.cuda.is_available():
        assert build.missing_device() == "no CUDA device"
        assert build.missing_requirement() == "no CUDA device"
    if torch.version.cuda is None:
        assert build.missing_nvrtc() == "this PyTorch build has no CUDA support"


# ------------------------------------------------------------------------------ NVRTC


def _nvrtc_lib():
    """An NVRTC library to compile with (no GPU needed), or None."""
    cands = [os.environ.get("SPIKE_TEST_NVRTC_LIB", "")]
    for p in sys.path:
        cands += sorted(glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.*")))
    cands += ["libnvrtc.so.12", "libnvrtc.so.13"]
    for c in cands:
        if c and "builtins" not in c and "alt" not in c:
            try:
                return ctypes.CDLL(c)
            except OSError:
                continue
    return None


def test_nvrtc_compiles_every_kernel_without_a_gpu(tmp_path, monkeypatch):
    lib = _nvrtc_lib()
    if lib is None:
        pytest.skip("no NVRTC library here (pip install nvidia-cuda-nvrtc-cu12 to run this on a CPU)")
    monkeypatch.setenv("SPIKE_KERNELS_NVRTC_DIR", str(tmp_path))
    data, lowered = nvrtc.cubin_for(lib, "90")
    assert len(data) > 10000 and set(lowered) == set(nvrtc.kernel_names())
    assert lowered["sk::kda_fwd_kernel<64, float, float>"] == "_ZN2sk14kda_fwd_kernelILi64EffEEvNS_9KdaParamsE"
    assert all(v.startswith("_ZN2sk") for v in lowered.values())
    # the cache answers the second time without compiling
    monkeypatch.setattr(nvrtc, "compile_program", lambda *a: (_ for _ in ()).throw(AssertionError("recompiled")))
    assert nvrtc.cubin_for(lib, "90") == (data, lowered)


def test_nvrtc_sources_hash_covers_the_headers():
    h = nvrtc.sources_hash()
    assert len(h) == 12 and h == nvrtc.sources_hash()


def _kda_params(B, H, T, dk, dv, ti=0, tv=0, ckpt=True):
    nv, nc = -(-dv // max(1, ops.kda_tile_columns(min(dk, 256)))), -(-T // ops.KDA_CHUNK)
    return ops.KdaParams(B=B, H=H, T=T, DK=dk, DV=dv, nv=nv, nc=nc, ti=ti, tv=tv, ckpt=1 if ckpt else None)


def test_nvrtc_launch_plan_matches_the_host_launchers():
    names = set(nvrtc.kernel_names())
    err, (name, grid, block, smem) = nvrtc.plan("kda_fwd", _kda_params(2, 3, 40, 64, 70))
    assert err is None and name == "sk::kda_fwd_kernel<64, float, float>" and name in names
    assert grid == (6, -(-70 // ops.kda_tile_columns(64))) and block == 128
    bv = ops.kda_tile_columns(64)
    assert smem == 4 * (3 * 16 * 64 + 2 * 16 * bv + 2 * 16)
    err, (name, _, _, smem_b) = nvrtc.plan("kda_bwd", _kda_params(1, 1, 5, 100, 8, 1, 1))
    assert name == "sk::kda_bwd_kernel<128, sk::bf16, sk::bf16>" and smem_b > 48 * 1024
    assert nvrtc.plan("kda_fwd", _kda_params(1, 1, 5, 300, 8))[0].startswith("kda: head dim")
    assert "dtype combination" in nvrtc.plan("kda_fwd", _kda_params(1, 1, 5, 32, 8, 1, 0))[0]
    bad = _kda_params(1, 1, 5, 32, 8)
    bad.nv = 9
    assert "nv does not match" in nvrtc.plan("kda_fwd", bad)[0]
    assert "checkpoints" in nvrtc.plan("kda_bwd", _kda_params(1, 1, 5, 32, 8, ckpt=False))[0]
    assert nvrtc.plan("kda_fwd", _kda_params(0, 1, 5, 32, 8)) == (None, None)
    err, (name, grid, block, smem) = nvrtc.plan("lif_fwd", ops.LifParams(B=2, T=3, H=4, N=40))
    assert name == "sk::lif_fwd_kernel" and grid == (8, 1) and block == 64 and smem == 0
    assert "channels" in nvrtc.plan("lif_bwd", ops.LifParams(B=2, T=3, H=4, N=2000))[0]
    err, (name, grid, block, smem) = nvrtc.plan("rms_bwd", ops.RmsParams(rows=10, d=48, n_blocks=2, to=1, tg=0))
    assert name == "sk::rms_bwd_kernel<sk::bf16, float>" and name in names and block == 256 and smem == 48 * 8 * 4


# ------------------------------------------------------------------------------ custom ops


@pytest.fixture(scope="module")
def emu():
    try:
        return EmuBackend.load()
    except EmuUnavailable as e:
        pytest.skip(f"host emulation of the kernels unavailable: {e}")


def _kda_in(B=1, H=2, T=9, dk=8, dv=6, seed=0, grad=True):
    return [x.requires_grad_(grad) for x in kda_inputs(B, H, T, dk, dv, seed=seed)]


def test_ops_are_registered_custom_ops():
    for name in ("lif_fwd", "lif_bwd", "kda_fwd", "kda_bwd", "rms_fwd", "rms_bwd"):
        assert hasattr(torch.ops.spike_kernels, name)


def test_kda_op_boundary_checks_raise_clear_errors():
    q, k, v, la, beta, s0 = (x.detach() for x in _kda_in())
    with pytest.raises(ValueError, match=r"kda_fwd: k has shape \[1, 2, 9, 4\], expected \[1, 2, 9, 8\]"):
        ops.kda_fwd(q, k[..., :4], v, la, beta, s0, None, 1.0, False)
    with pytest.raises(ValueError, match="log_alpha has dtype torch.float64"):
        ops.kda_fwd(q, k, v, la.double(), beta, s0, None, 1.0, False)
    with pytest.raises(ValueError, match=r"initial_state has shape"):
        ops.kda_fwd(q, k, v, la, beta, s0[..., :3], None, 1.0, False)
    with pytest.raises(ValueError, match="reset has dtype torch.bool"):
        ops.kda_fwd(q, k, v, la, beta, s0, torch.zeros(1, 2, 9, dtype=torch.bool), 1.0, False)
    with pytest.raises(ValueError, match="last dim"):
        ops.kda_fwd(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, la, beta, None, None, 1.0, False)
    with pytest.raises(ValueError, match="bf16 q/k/log_alpha/beta with float32 v"):
        ops.kda_fwd(q.bfloat16(), k.bfloat16(), v, la.bfloat16(), beta.bfloat16(), None, None, 1.0, False)
    with pytest.raises(ValueError, match="head dim dk"):
        z = torch.zeros(1, 1, 2, 300)
        ops.kda_fwd(z, z, z, z, torch.zeros(1, 1, 2), None, None, 1.0, False)
    with pytest.raises(ValueError, match="ckpt has shape"):
        ops.kda_bwd(q, k, v, la, beta, None, torch.zeros(3), None, None, 1.0, False)
    with pytest.raises(ValueError, match="k is on meta, expected cpu"):
        ops.kda_fwd(q, k.to("meta"), v, la, beta, None, None, 1.0, False)


def test_lif_and_rms_op_boundary_checks():
    d = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"lif_fwd: beta_logit has shape \[1, 4\], expected \[1, 4, 2\]"):
        ops.lif_fwd(d, d, torch.zeros(1, 4), None, None, 0.9, 1.0, 5.0, False)
    with pytest.raises(ValueError, match="drive must be contiguous"):
        ops.lif_fwd(d.transpose(1, 2).contiguous().transpose(1, 2), d, torch.zeros(1, 4, 2), None, None, 0.9, 1.0,
                    5.0, False)
    with pytest.raises(ValueError, match="reset has shape"):
        ops.lif_fwd(d, d, torch.zeros(1, 4, 2), None, torch.zeros(1, 3, dtype=torch.uint8), 0.9, 1.0, 5.0, False)
    o = torch.randn(6, 16)
    with pytest.raises(ValueError, match=r"rms_fwd: weight has shape \[8\], expected \[16\]"):
        ops.rms_fwd(o, o, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="gate has dtype torch.float16"):
        ops.rms_fwd(o, o.half(), torch.ones(16), 1e-6)


def test_fake_impls_give_the_real_metadata_and_check_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 33, 64)
        v = torch.empty(2, 3, 33, 40)
        b = torch.empty(2, 3, 33)
        o, s, ckpt = ops.kda_fwd(q, q, v, q, b, None, None, 0.1, True)
        assert o.shape == (2, 3, 33, 40) and o.transpose(1, 2).is_contiguous()
        assert s.shape == (2, 3, 64, 40) and ckpt.shape == (2, 3, 3, 64, 40) and ckpt.dtype == torch.float32
        with pytest.raises(ValueError, match="beta has shape"):
            ops.kda_fwd(q, q, v, q, b[..., :5], None, None, 0.1, True)


def test_opcheck_kda(emu):
    q, k, v, la, beta, s0 = (x.detach() for x in _kda_in(T=5, dk=8, dv=4))
    reset = torch.tensor([[0, 0, 1, 0, 0]], dtype=torch.uint8)[:, None].expand(1, 2, 5)
    args = [x.requires_grad_() for x in (q, k, v, la, beta, s0)]
    torch.library.opcheck(torch.ops.spike_kernels.kda_fwd, (*args, reset, 0.35, True))


def test_opcheck_lif_and_rms(emu):
    g = torch.Generator().manual_seed(1)
    drive = (torch.randn(1, 5, 2, 8, generator=g) * 0.6 + 0.3).requires_grad_()
    a = torch.rand(1, 5, 2, 8, generator=g).requires_grad_()
    bl = torch.randn(1, 5, 2, generator=g).requires_grad_()
    m = torch.rand(1, 2, 8, generator=g).requires_grad_()
    torch.library.opcheck(torch.ops.spike_kernels.lif_fwd, (drive, a, bl, m, None, 0.9, 1.0, 5.0, True))
    o, gate = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16, requires_grad=True)
    w = torch.rand(16, requires_grad=True)
    torch.library.opcheck(torch.ops.spike_kernels.rms_fwd, (o, gate, w, 1e-6))


def test_torch_compile_traces_through_the_ops(emu):
    q, k, v, la, beta, s0 = _kda_in(T=7, dk=8, dv=4)
    reset = torch.zeros(1, 7, dtype=torch.bool)
    reset[0, 3] = True

    def f(q, k, v, la, beta, s0):
        o, s = ops.kda_fused(q, k, v, la, beta, s0, 0.3, reset)
        return (o * 1.5).sum() + s.square().sum()

    eager = f(q, k, v, la, beta, s0)
    g_eager = torch.autograd.grad(eager, (q, k, v, la, beta, s0))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, la, beta, s0)
    g_got = torch.autograd.grad(got, (q, k, v, la, beta, s0))
    torch.testing.assert_close(got, eager)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ chunked path glue


def _random_resets(B, T, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, T, generator=g) < p


def test_segments_map_resets_to_cu_seqlens():
    reset = torch.tensor([[False, False, True, False], [True, False, False, True], [False] * 4])
    cu, first, keep0 = chunked.segments(reset, 3, 4, "cpu")
    assert cu.tolist() == [0, 2, 4, 7, 8, 12]  # stream 0: [0,2) [2,4); stream 1: [4,7) [7,8); stream 2: [8,12)
    assert first.tolist() == [0, 2, 4] and keep0.tolist() == [1.0, 0.0, 1.0]
    cu, first, keep0 = chunked.segments(None, 2, 5, "cpu")
    assert cu.tolist() == [0, 5, 10] and first.tolist() == [0, 1] and keep0.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("B,H,T,dk,dv,p,with_s0,seed", [
    (3, 2, 37, 16, 8, 0.08, True, 0),
    (2, 1, 20, 8, 12, 0.3, True, 1),
    (4, 2, 16, 8, 8, 0.0, False, 2),
    (2, 2, 11, 32, 16, 0.5, True, 3),
])
def test_varlen_glue_matches_the_reference_fwd_and_grads(B, H, T, dk, dv, p, with_s0, seed):
    from model.kda import kda_recurrent

    q, k, v, la, beta, s0 = _kda_in(B, H, T, dk, dv, seed=seed)
    s0 = s0 if with_s0 else None
    reset = _random_resets(B, T, p, seed)
    if seed == 1:
        reset[0, 0] = True  # a stream whose first token is a document start: its carried state is dropped
    ins = [x for x in (q, k, v, la, beta, s0) if x is not None]
    o, s = chunked.kda_varlen(q, k, v, la, beta, s0, 0.4, reset, kernel=chunked.reference_chunk_kda)
    o_ref, s_ref = kda_recurrent(q, k, v, la, beta, s0, 0.4, reset)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape and o.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(seed + 10)
    wo, ws = torch.randn(o.shape, generator=g), torch.randn(s.shape, generator=g)
    grads = torch.autograd.grad((o * wo).sum() + (s * ws).sum(), ins)
    grads_ref = torch.autograd.grad((o_ref * wo).sum() + (s_ref * ws).sum(), ins)
    for name, a, b in zip("q k v log_alpha beta s0".split(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_varlen_glue_carries_state_across_calls():
    """Two halves, the second starting from the first's final state, equal one call."""
    from model.kda import kda_recurrent

    q, k, v, la, beta, s0 = (x.detach() for x in _kda_in(2, 2, 24, 8, 8, seed=5))
    reset = _random_resets(2, 24, 0.1, 5)
    o_ref, s_ref = kda_recurrent(q, k, v, la, beta, s0, None, reset)
    ref = chunked.reference_chunk_kda
    o1, s1 = chunked.kda_varlen(*(x[:, :, :12] for x in (q, k, v, la, beta)), s0, None, reset[:, :12], kernel=ref)
    o2, s2 = chunked.kda_varlen(*(x[:, :, 12:] for x in (q, k, v, la, beta)), s1, None, reset[:, 12:], kernel=ref)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_path_is_optional_and_says_why(monkeypatch):
    chunked._fla.clear()
    try:
        if not torch.cuda.is_available():
            assert chunked.available() == "no CUDA device"
        monkeypatch.setenv("SPIKE_KERNELS_FLA", "0")
        assert chunked.available() == "SPIKE_KERNELS_FLA=0"
        with pytest.raises(RuntimeError, match="fla chunk_kda unavailable"):
            chunked.fla_kernel()
    finally:
        chunked._fla.clear()
    q = torch.zeros(1, 2, 4, 8)
    assert "per-head" in chunked.unsupported(q, torch.zeros(1, 2, 4, dtype=torch.bool))
    assert chunked.unsupported(q, torch.zeros(1, 4, dtype=torch.bool)) is None
    q, k, v, la, beta, s0 = (x.detach() for x in _kda_in())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="fla chunk_kda requested but unavailable"):
            kernels.kda(q, k, v, la, beta, mode="fla")
    # CPU tensors in auto mode never try fla
    monkeypatch.delenv("SPIKE_KERNELS_FLA")
    o, s = kernels.kda(q, k, v, la, beta, s0)
    o_ref, s_ref = kernels.kda_reference(q, k, v, la, beta, s0)
    assert torch.equal(o, o_ref)


@pytest.mark.skipif(not torch.cuda.is_available() or chunked.available() is not None,
                    reason="needs a CUDA device and flash-linear-attention (fla-core + Triton)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)], ids=["f32", "bf16"])
def test_fla_chunk_kda_through_our_glue_matches_the_reference(dtype, tol):
    """On a GPU: the real chunk_kda behind kda_varlen, against model/kda.py, with resets and carried state."""
    from model.kda import kda_chunk

    B, H, T, dk, dv = 3, 4, 300, 64, 64
    q, k, v, la, beta, s0 = (x.detach().cuda() for x in _kda_in(B, H, T, dk, dv, seed=7))
    reset = _random_resets(B, T, 0.01, 7).cuda()
    reset[1, 0] = True
    ins = [x.to(dtype).requires_grad_() if i < 5 else x.requires_grad_() for i, x in enumerate((q, k, v, la, beta, s0))]
    ref_in = [x.detach().float().requires_grad_() for x in ins]
    o, s = kernels.kda(*ins, reset=reset, mode="fla")
    o_ref, s_ref = kda_chunk(*ref_in, None, reset, 64)
    wo, ws = torch.randn_like(o_ref), torch.randn_like(s_ref)
    grads = torch.autograd.grad((o.float() * wo).sum() + (s * ws).sum(), ins)
    grads_ref = torch.autograd.grad((o_ref * wo).sum() + (s_ref * ws).sum(), ref_in)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    assert rel(o, o_ref) < tol and rel(s, s_ref) < tol
    for name, a, b in zip("q k v log_alpha beta s0".split(), grads, grads_ref):
        assert rel(a, b) < tol, f"d{name}: {rel(a, b):.3g}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA line")
def test_gpu_check_says_no_cuda_device_and_exits_0():
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py")], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(ln) for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0]["check"] == "device" and lines[0]["ok"] is False
    assert lines[0]["reason"] == "no CUDA device"


def test_nvrtc_backend_launch_glue_with_a_fake_driver(monkeypatch, tmp_path):
    """NvrtcBackend.run on a simulated driver: the module is loaded once per device, the
    context made current, >48 KB of shared memory opted into, and cuLaunchKernel given the
    plan's grid/block/smem, the current stream and the parameter struct's address."""
    import contextlib

    from torch.cuda import _utils

    calls = []

    class Lib:
        def __getattr__(self, name):
            def f(*args):
                calls.append((name, args))
                if name == "cuCtxGetCurrent":
                    args[0]._obj.value = None  # no context current in this thread (an autograd worker)
                if name == "cuDevicePrimaryCtxRetain":
                    args[0]._obj.value = 1234
                return 0
            return f

    class Kern:
        def __init__(self, name):
            self.func = ctypes.c_void_p(hash(name) & 0xFFFF)

    loads = []

    def load_module(data, names):
        loads.append(names)
        return {n: Kern(n) for n in names}

    class Stream:
        cuda_stream = 777

    lib = Lib()
    monkeypatch.setattr(_utils, "_get_gpu_runtime_library", lambda: lib)
    monkeypatch.setattr(_utils, "_cuda_load_module", load_module)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda i=None: Stream())
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    lowered = {n: f"_mangled_{i}" for i, n in enumerate(nvrtc.kernel_names())}
    monkeypatch.setattr(nvrtc, "cubin_for", lambda lib, arch: (b"cubin-" + arch.encode(), lowered))
    be = nvrtc.NvrtcBackend(lib=lib)
    p = _kda_params(2, 3, 40, 64, 64)
    be.run("kda_bwd", p, torch.device("cuda", 0))
    be.run("kda_bwd", p, torch.device("cuda", 0))
    assert len(loads) == 1  # one module per device
    _, (name, grid, block, smem) = nvrtc.plan("kda_bwd", p)
    launches = [a for n, a in calls if n == "cuLaunchKernel"]
    assert len(launches) == 2
    func, gx, gy, gz, bx, by, bz, sm, stream, args, extra = launches[0]
    assert func.value == Kern(lowered[name]).func.value and (gx.value, gy.value, gz.value) == (*grid, 1)
    assert (bx.value, by.value, bz.value) == (block, 1, 1) and sm.value == smem and stream.value == 777
    assert args[0] == ctypes.addressof(p) and extra is None
    attrs = [a for n, a in calls if n == "cuFuncSetAttribute"]
    assert len(attrs) == 1 and attrs[0][1] == 8 and attrs[0][2].value == smem > 48 * 1024  # opted in once
    assert [n for n, _ in calls].count("cuCtxSetCurrent") >= 2  # made current before each launch
    with pytest.raises(RuntimeError, match="nvrtc.*head dim"):
        be.run("kda_fwd", _kda_params(1, 1, 5, 300, 8), torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        be.run("kda_fwd", p, torch.device("cpu"))


def test_chunk_size_the_kernel_ignores_is_said_not_ignored(monkeypatch, caplog):
    """model.chunk_size shapes only the PyTorch chunked form: with chunk_kda (its glue run
    on CPU with the reference kernel in its place) and a chunk_size other than its 64, one
    line says so; at 64 nothing is said."""
    build._reset_for_tests()
    monkeypatch.setattr(chunked, "available", lambda: None)
    monkeypatch.setattr(chunked, "unsupported", lambda *a: None)
    real = chunked.kda_varlen
    monkeypatch.setattr(chunked, "kda_varlen", lambda *a: real(*a, kernel=chunked.reference_chunk_kda))
    q, k, v, la, beta, s0 = _kda_in(grad=False)
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        kernels.kda(q, k, v, la, beta, s0, chunk_size=64, mode="fla")
        assert not [m for m in _lines(caplog) if "chunk_size" in m]
        for _ in range(2):
            kernels.kda(q, k, v, la, beta, s0, chunk_size=32, mode="fla")
    said = [m for m in _lines(caplog) if "chunk_size" in m]
    assert said == ["model.kernels: model.chunk_size = 32 applies to the PyTorch reference; chunk_kda uses chunks of 64"]
