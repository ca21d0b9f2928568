"""Fused kernels (model/kernels).

- Dispatch, on any machine: importing builds nothing, the CPU falls back to the reference
  with one log line, `mode="reference"` never touches the build, a failed build falls back.
- The kernels against float64 references (forward and every input gradient, outputs
  poisoned with NaN first so an unwritten element fails), on two backends:
  * "emu": the same CUDA source compiled for the host and run by the fiber emulator in
    csrc/cuda_emu.h (needs a C++ compiler; tiny shapes, it is slow);
  * "cuda": the build the ladder picks (nvcc extension, or NVRTC without a toolkit;
    SPIKE_KERNELS_BUILD=nvcc|nvrtc forces one, as bench/gpu_check.py does per build;
    larger and ragged shapes). Skipped with the reason where there is no device.
Tolerances (relative error in norm): 1e-5 for float32, 1e-2 for bf16.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.kernels import build, ops
from model.kernels.emu import EmuBackend, EmuUnavailable
from model.kernels.reference import lif_modulate_reference
from tests.model.helpers import kda_inputs

ROOT = Path(__file__).resolve().parents[2]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------ dispatch


def test_import_builds_nothing_and_cpu_forward_runs_without_a_build():
    """A fresh interpreter: importing the model and running a Spike-KDA layer on the CPU
    never calls torch.utils.cpp_extension.load."""
    code = (
        "import torch, torch.utils.cpp_extension as ce\n"
        "def boom(*a, **k): raise SystemExit('cpp_extension.load called')\n"
        "ce.load = boom\n"
        "import model, model.kernels as K, model.spike_kda\n"
        "from model.kernels import build\n"
        "assert not build.attempted()\n"
        "q = torch.randn(1, 2, 5, 8); v = torch.randn(1, 2, 5, 8)\n"
        "o, s = K.kda(q, q, v, -torch.rand(1, 2, 5, 8), torch.rand(1, 2, 5))\n"
        "assert not build.attempted()  # CPU tensors never start a build\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cpu_falls_back_to_reference_with_one_line(caplog):
    build._reset_for_tests()
    q, k, v, la, beta, s0 = kda_inputs()
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        for _ in range(3):
            o, s = kernels.kda(q, k, v, la, beta, s0)
        spikes, m, la2, b2 = kernels.lif_modulate(torch.randn(1, 4, 2, 8), torch.rand(1, 4, 2, 8),
                                                  torch.randn(1, 4, 2), 0.9, 1.0)
        kernels.kda_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], la[:, :, 0], beta[:, :, 0], s0)
    o_ref, s_ref = kernels.kda_reference(q, k, v, la, beta, s0)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    records = [r for r in caplog.records if r.name == "model.kernels"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "fused CUDA kernels not used (no CUDA device)" in records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert not build.attempted()  # no device: nothing tried to build
    assert "not tried" in kernels.status()


def test_reference_mode_never_touches_the_build(monkeypatch, caplog):
    build._reset_for_tests()

    def forbidden(*a, **k):
        raise AssertionError("build touched in reference mode")

    monkeypatch.setattr(build, "extension", forbidden)
    monkeypatch.setattr(build, "backend", forbidden)
    q, k, v, la, beta, s0 = kda_inputs()
    with caplog.at_level(logging.WARNING, logger="model.kernels"):
        o, s = kernels.kda(q, k, v, la, beta, s0, mode="reference", impl="recurrent")
        kernels.gated_rmsnorm(v, v, torch.ones(8), 1e-6, mode="reference")
    o_ref, s_ref = kernels.kda_reference(q, k, v, la, beta, s0, impl="recurrent")
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_fused_mode_raises_when_unavailable_and_bad_mode_is_rejected():
    q, k, v, la, beta, s0 = kda_inputs()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="fused kernel requested but unavailable"):
            kernels.kda(q, k, v, la, beta, mode="fused")
    with pytest.raises(ValueError, match="kernels mode"):
        kernels.kda(q, k, v, la, beta, mode="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA requirement message")
def test_missing_requirement_names_the_device():
    assert build.missing_requirement() == "no CUDA device"


def test_source_hash_names_the_build():
    h = build.sources_hash()
    assert len(h) == 12 and h == build.sources_hash()


# ------------------------------------------------------------------------------ backends


_BACKENDS: dict = {}


def get_backend(kind: str):
    """(backend, device) for "emu" or "cuda", or skip with the reason (fail if a CUDA build breaks)."""
    if kind not in _BACKENDS:
        if kind == "emu":
            try:
                _BACKENDS[kind] = (EmuBackend.load(), torch.device("cpu"))
            except EmuUnavailable as e:
                _BACKENDS[kind] = f"host emulation of the kernels unavailable: {e}"
        elif not torch.cuda.is_available():
            _BACKENDS[kind] = "no CUDA device: the GPU kernel tests need one"
        elif build.missing_requirement():
            _BACKENDS[kind] = f"cannot build the CUDA extension here: {build.missing_requirement()}"
        else:
            be = build.backend()
            _BACKENDS[kind] = (be, torch.device("cuda")) if be is not None else ("fail", build.reason())
    got = _BACKENDS[kind]
    if isinstance(got, str):
        pytest.skip(got)
    if got[0] == "fail":
        pytest.fail(f"the CUDA extension failed to build: {got[1]}")
    return got


def cases(table: dict, *extra):
    """pytest params (kind, shape, *extra) for every backend kind and its shapes."""
    out = []
    for kind, shapes in table.items():
        for shape in shapes:
            out.append(pytest.param(kind, shape, *extra, id=f"{kind}-" + "x".join(map(str, shape))))
    return out


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(ops, "POISON", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "NaN/inf (an unwritten output element?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, got, ref, dtype):
    err = rel_err(got, ref)
    assert err < TOL[dtype], f"{name}: relative error {err:.3g} >= {TOL[dtype]}"


def weights_like(outs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def loss_of(outs, ws):
    return sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, ws))


# ------------------------------------------------------------------------------ KDA


def kda64(q, k, v, la, beta, S, scale, reset):
    """The stated recurrence in float64 with autograd (model/kda.py's kda_step casts to
    float32, so it cannot serve as the high-precision reference)."""
    B, H, T, dk = q.shape
    if reset is not None and reset.dim() == 2:
        reset = reset[:, None, :].expand(B, H, T)
    outs = []
    for t in range(T):
        if reset is not None:
            S = S * (~reset[:, :, t])[..., None, None].to(S.dtype)
        S = S * la[:, :, t].exp()[..., None]
        r = torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)
        S = S + (beta[:, :, t, None] * k[:, :, t])[..., :, None] * (v[:, :, t] - r)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, S))
    return torch.stack(outs, dim=2), S


# (B, H, T, dk, dv): ragged T (not a multiple of the 16-token chunk), dk padded to 32/64/128/256,
# dv not a multiple of the column tile (32/16/8/4 columns for those dk)
KDA_SHAPES = {
    "emu": [(1, 2, 21, 16, 8), (2, 1, 35, 32, 40), (1, 1, 17, 64, 20), (1, 1, 18, 100, 24), (1, 1, 9, 256, 6)],
    "cuda": [(2, 4, 1000, 64, 64), (3, 2, 257, 128, 128), (1, 3, 130, 48, 80), (2, 2, 64, 256, 256),
             (1, 2, 33, 16, 8), (4, 8, 2048, 64, 64)],
}
KDA_DTYPES = [  # (q/k/log_alpha/beta dtype, v dtype): all float32, the model's mix, all bf16
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


def make_kda(shape, device, gate_dtype, v_dtype, seed, strong_decay=False, with_reset=True):
    B, H, T, dk, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    v = torch.randn(B, H, T, dv, generator=g)
    la = -F.softplus(torch.randn(B, H, T, dk, generator=g) * (8 if strong_decay else 1) - 2)
    beta = torch.rand(B, H, T, generator=g)
    s0 = torch.randn(B, H, dk, dv, generator=g)
    reset = (torch.rand(B, T, generator=g) < 0.05) if with_reset else None
    ins = [q.to(gate_dtype), k.to(gate_dtype), v.to(v_dtype), la.to(gate_dtype), beta.to(gate_dtype), s0]
    ins = [x.to(device).requires_grad_() for x in ins]
    return ins, None if reset is None else reset.to(device)


def kda_cases():
    out = []
    for kind, shapes in KDA_SHAPES.items():
        for i, shape in enumerate(shapes):
            for name, dtypes in zip(["f32", "f32-bf16v", "bf16"], KDA_DTYPES):
                if kind == "emu" and name != "f32" and i > 1:
                    continue  # the emulator is slow: bf16 on its two smallest shapes only
                out.append(pytest.param(kind, shape, dtypes, id=f"{kind}-" + "x".join(map(str, shape)) + f"-{name}"))
    return out


@pytest.mark.parametrize("kind,shape,dtypes", kda_cases())
def test_kda_forward_and_grads_match_float64(kind, shape, dtypes):
    be, device = get_backend(kind)
    gate_dtype, v_dtype = dtypes
    ins, reset = make_kda(shape, device, gate_dtype, v_dtype, seed=100 + sum(shape))
    scale = shape[3] ** -0.5
    o, s = ops.kda_fused(*ins[:5], ins[5], scale, reset)
    assert o.dtype == v_dtype and s.dtype == torch.float32 and o.shape == ins[2].shape
    ref_in = [x.detach().double().cpu().requires_grad_() for x in ins]
    o_ref, s_ref = kda64(*ref_in[:5], ref_in[5], scale, None if reset is None else reset.cpu())
    low = torch.bfloat16 if v_dtype == torch.bfloat16 or gate_dtype == torch.bfloat16 else torch.float32
    check("o", o, o_ref, low)
    check("final state", s, s_ref, low)
    ws = weights_like((o_ref, s_ref), seed=7)
    grads = torch.autograd.grad(loss_of((o, s), ws), ins)
    grads_ref = torch.autograd.grad(loss_of((o_ref, s_ref), ws), ref_in)
    for name, a, b, x in zip(["q", "k", "v", "log_alpha", "beta", "initial_state"], grads, grads_ref, ins):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        check(f"d{name}", a, b, low)


@pytest.mark.parametrize("kind", ["emu", "cuda"])
def test_kda_strong_decay_and_no_initial_state(kind):
    be, device = get_backend(kind)
    shape = (1, 2, 40, 32, 16) if kind == "emu" else (2, 4, 300, 64, 64)
    ins, reset = make_kda(shape, device, torch.float32, torch.float32, seed=5, strong_decay=True, with_reset=False)
    o, s = ops.kda_fused(*ins[:5])
    ref_in = [x.detach().double().cpu().requires_grad_() for x in ins[:5]]
    zeros = torch.zeros(shape[0], shape[1], shape[3], shape[4], dtype=torch.float64)
    o_ref, s_ref = kda64(*ref_in, zeros, shape[3] ** -0.5, None)
    check("o", o, o_ref, torch.float32)
    check("state", s, s_ref, torch.float32)
    ws = weights_like((o_ref,), seed=3)  # the output only: the final state gets no gradient
    grads = torch.autograd.grad(loss_of((o,), ws), ins[:5])
    grads_ref = torch.autograd.grad(loss_of((o_ref,), ws), ref_in)
    for name, a, b in zip(["q", "k", "v", "log_alpha", "beta"], grads, grads_ref):
        check(f"d{name}", a, b, torch.float32)


@pytest.mark.parametrize("kind", ["emu", "cuda"])
def test_kda_matches_project_reference_and_step(kind):
    """Against model/kda.py itself (float32 chunked form), split calls carry the state,
    and the fused one-token step equals kda_step."""
    be, device = get_backend(kind)
    shape = (2, 2, 24, 16, 8) if kind == "emu" else (2, 4, 200, 64, 64)
    ins, reset = make_kda(shape, device, torch.float32, torch.float32, seed=11)
    x = [t.detach() for t in ins]
    o_ref, s_ref = kernels.kda_reference(*x[:5], x[5], reset=reset, chunk_size=16)
    o, s = ops.kda_fused(*x[:5], x[5], reset=reset)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    half = shape[2] // 2
    parts = [[t[:, :, :half] for t in x[:5]], [t[:, :, half:] for t in x[:5]]]
    o1, s1 = ops.kda_fused(*parts[0], x[5], reset=reset[:, :half])
    o2, s2 = ops.kda_fused(*parts[1], s1, reset=reset[:, half:])
    assert rel_err(torch.cat([o1, o2], 2), o) < 1e-6 and rel_err(s2, s) < 1e-6
    step = [t[:, :, 0] for t in x[:5]]
    for r in (None, torch.tensor([True, False], device=device), torch.ones(shape[0], shape[1], dtype=torch.bool,
                                                                          device=device)):
        o_s, s_s = ops.kda_step_fused(*step, x[5], reset=r)
        o_sr, s_sr = kernels.kda_step_reference(*step, x[5], reset=r)
        assert rel_err(o_s, o_sr) < 1e-5 and rel_err(s_s, s_sr) < 1e-5


@pytest.mark.parametrize("kind", ["emu", "cuda"])
def test_kda_is_deterministic(kind):
    be, device = get_backend(kind)
    shape = (1, 2, 20, 32, 40) if kind == "emu" else (2, 4, 500, 64, 64)
    ins, reset = make_kda(shape, device, torch.float32, torch.float32, seed=21)
    runs = []
    for _ in range(2):
        o, s = ops.kda_fused(*ins[:5], ins[5], reset=reset)
        grads = torch.autograd.grad(o.sum() + s.square().sum(), ins)
        runs.append([o, s, *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ LIF + modulation


def lif_v64(drive, decay, thr, membrane, reset):
    """Membrane potentials before the spike decision, float64."""
    B, T = drive.shape[:2]
    m = torch.zeros_like(drive[:, 0]) if membrane is None else membrane.clone()
    vs = []
    for t in range(T):
        if reset is not None:
            m = m * (~reset[:, t]).to(m.dtype).view(B, *([1] * (m.dim() - 1)))
        v = decay * m + drive[:, t]
        vs.append(v)
        m = torch.where(v >= thr, v - thr, v)
    return torch.stack(vs, 1)


def safe_drive(drive, decay, thr, membrane, reset, dtype, margin=1e-3):
    """Nudge the drive so that no membrane lands within `margin` of the threshold: a
    spike decision there could flip on float32 rounding, and the test would compare two
    different (both correct) spike trains."""
    step = 4 * margin if dtype == torch.float32 else 0.03
    d = drive.double()
    m0 = None if membrane is None else membrane.double()
    for _ in range(200):
        d = d.to(dtype).double()
        v = lif_v64(d, decay, thr, m0, reset)
        close = (v - thr).abs() < margin
        if not close.any():
            return d.to(dtype)
        d = d + torch.where(close, torch.where(v >= thr, step, -step), 0.0)
    raise AssertionError("could not keep the membrane away from the threshold")


LIF_SHAPES = {  # (B, T, H, N): N below, at and above a multiple of 32, T not a multiple of the 8-step tile
    "emu": [(2, 19, 3, 16), (1, 33, 2, 40)],
    "cuda": [(4, 1000, 8, 64), (2, 257, 3, 100), (1, 64, 2, 1024), (3, 31, 5, 32)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind,shape", cases(LIF_SHAPES))
def test_lif_modulate_forward_and_grads_match_float64(kind, shape, dtype):
    be, device = get_backend(kind)
    B, T, H, N = shape
    decay, thr, slope = 0.9, 1.0, 5.0
    g = torch.Generator().manual_seed(200 + sum(shape))
    membrane = torch.rand(B, H, N, generator=g)
    reset = torch.rand(B, T, generator=g) < 0.1
    drive = safe_drive(torch.randn(B, T, H, N, generator=g) * 0.6 + 0.3, decay, thr, membrane, reset, dtype)
    a = torch.rand(B, T, H, N, generator=g).to(dtype)
    bl = torch.randn(B, T, H, generator=g).to(dtype)
    ins = [x.to(device).requires_grad_() for x in (drive, a, bl, membrane)]
    out = ops.lif_modulate_fused(*ins[:3], decay, thr, ins[3], reset.to(device), slope)
    ref_in = [x.detach().double().requires_grad_() for x in (drive, a, bl, membrane)]
    ref = lif_modulate_reference(*ref_in[:3], decay, thr, ref_in[3], reset, slope)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32 and out[3].dtype == torch.float32
    assert torch.equal(out[0].double().cpu(), ref[0]), "spike trains differ"
    assert 0.05 < out[0].float().mean().item() < 0.95  # both regimes exercised
    for name, x, r in zip(["spikes", "membrane", "log_alpha", "beta"], out, ref):
        check(name, x, r, torch.float32)  # float32 arithmetic on the given values, whatever their dtype
    ws = weights_like(ref, seed=9)
    grads = torch.autograd.grad(loss_of(out, ws), ins)
    grads_ref = torch.autograd.grad(loss_of(ref, ws), ref_in)
    for name, x, a_, b_ in zip(["drive", "a", "beta_logit", "membrane"], ins, grads, grads_ref):
        assert a_.dtype == x.dtype, name
        check(f"d{name}", a_, b_, dtype)


@pytest.mark.parametrize("kind", ["emu", "cuda"])
def test_lif_modulate_unused_outputs_get_no_gradient(kind):
    """Only log_alpha used downstream: the other outputs' gradients arrive as None."""
    be, device = get_backend(kind)
    B, T, H, N = (1, 12, 2, 8) if kind == "emu" else (2, 300, 4, 64)
    g = torch.Generator().manual_seed(4)
    drive = safe_drive(torch.randn(B, T, H, N, generator=g) + 0.3, 0.9, 1.0, None, None, torch.float32)
    a = torch.rand(B, T, H, N, generator=g)
    bl = torch.randn(B, T, H, generator=g)
    ins = [x.to(device).requires_grad_() for x in (drive, a, bl)]
    out = ops.lif_modulate_fused(*ins, 0.9, 1.0)
    ref_in = [x.detach().double().requires_grad_() for x in (drive, a, bl)]
    ref = lif_modulate_reference(*ref_in, 0.9, 1.0)
    w = weights_like(ref[2:3], seed=1)
    grads = torch.autograd.grad(loss_of(out[2:3], w), ins)
    grads_ref = torch.autograd.grad(loss_of(ref[2:3], w), ref_in, allow_unused=True)
    for name, a_, b_ in zip(["drive", "a", "beta_logit"], grads, grads_ref):
        b_ = torch.zeros_like(a_, dtype=torch.float64).cpu() if b_ is None else b_
        if b_.abs().max() == 0:
            assert a_.abs().max() == 0, name
        else:
            check(f"d{name}", a_, b_, torch.float32)


# ------------------------------------------------------------------------------ gated RMSNorm


RMS_SHAPES = {"emu": [(2, 5, 3, 16), (1, 7, 2, 40)], "cuda": [(4, 512, 8, 64), (2, 100, 3, 128), (3, 7, 5, 48)]}


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)], ids=["f32", "bf16", "f32-bf16gate"])
@pytest.mark.parametrize("kind,shape", cases(RMS_SHAPES))
def test_gated_rmsnorm_matches_float64(kind, shape, dtypes):
    be, device = get_backend(kind)
    o_dtype, g_dtype = dtypes
    gen = torch.Generator().manual_seed(300 + sum(shape))
    o = torch.randn(shape, generator=gen).to(o_dtype)
    gate = torch.randn(shape, generator=gen).to(g_dtype)
    w = 1 + 0.1 * torch.randn(shape[-1], generator=gen)
    ins = [x.to(device).requires_grad_() for x in (o, gate, w)]
    y = ops.gated_rmsnorm_fused(*ins, 1e-6)
    r = [x.detach().double().requires_grad_() for x in (o, gate, w)]
    y_ref = r[0] * torch.rsqrt(r[0].square().mean(-1, keepdim=True) + 1e-6) * r[2] * F.silu(r[1])
    low = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32
    assert y.dtype == torch.float32
    check("y", y, y_ref, torch.float32)
    ws = weights_like((y_ref,), seed=2)
    grads = torch.autograd.grad(loss_of((y,), ws), ins)
    grads_ref = torch.autograd.grad(loss_of((y_ref,), ws), r)
    for name, a_, b_, x in zip(["o", "gate", "weight"], grads, grads_ref, ins):
        assert a_.dtype == x.dtype, name
        check(f"d{name}", a_, b_, low)
