"""KDA kernels (sequential, chunked, one-step), LIF neurons and the Spike-KDA layer's
event-driven semantics."""
import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.ops import cpu, dispatch
from model.ops.reference.kda import kda_recurrent, kda_step
from model.ops.reference.layer import short_conv_reference
from model.ops.reference.lif import lif_scan, lif_scan_reference
from model.spike_kda import ShortConv, SpikeKDA

ATOL = RTOL = 1e-4


def make_inputs(B=2, H=3, T=37, dk=16, dv=8, strong_decay=False, seed=0):
    """Realistic KDA inputs: L2-normalised q/k, log-decay <= 0, beta in (0, 1), a state."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    v = torch.randn(B, H, T, dv, generator=g)
    if strong_decay:  # per-step decays down to e^-40: a chunk's cumulative decay underflows
        log_alpha = -F.softplus(torch.randn(B, H, T, dk, generator=g) * 8)
    else:
        log_alpha = -F.softplus(torch.randn(B, H, T, dk, generator=g) - 2)
    beta = torch.rand(B, H, T, generator=g)
    s0 = torch.randn(B, H, dk, dv, generator=g)
    return [x.requires_grad_() for x in (q, k, v, log_alpha, beta, s0)]


def run_and_grad(fn, inputs, seed=1):
    """Outputs and the gradients of a fixed random projection of (o, final state)."""
    o, s = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    return o, s, torch.autograd.grad(loss, inputs)


def assert_same(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------ kernels


def test_recurrent_matches_explicit_matrix_recurrence():
    """The reference is the stated maths: S_t = (I - b k k^T) Diag(alpha) S + b k v^T, o = S^T q / sqrt(dk)."""
    q, k, v, la, beta, s0 = (x.detach().double() for x in make_inputs(B=1, H=1, T=9, dk=4, dv=3))
    o, s = kda_recurrent(q, k, v, la, beta, s0)
    S = s0[0, 0]
    eye = torch.eye(4, dtype=torch.double)
    for t in range(9):
        kt, vt, bt = k[0, 0, t], v[0, 0, t], beta[0, 0, t]
        S = (eye - bt * torch.outer(kt, kt)) @ torch.diag(la[0, 0, t].exp()) @ S + bt * torch.outer(kt, vt)
        torch.testing.assert_close(o[0, 0, t].double(), S.T @ q[0, 0, t] * 4 ** -0.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[0, 0].double(), S, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [16, 8, 5, 64])  # 37 tokens: never a multiple; 64 > T
@pytest.mark.parametrize("strong_decay", [False, True])
def test_chunk_matches_recurrent_forward_and_grads(chunk_size, strong_decay, kda_path):
    inputs = make_inputs(strong_decay=strong_decay)
    o1, s1, g1 = run_and_grad(lambda *x: kda_recurrent(*x[:5], initial_state=x[5]), inputs)
    o2, s2, g2 = run_and_grad(lambda *x: kda_path(*x[:5], initial_state=x[5], chunk_size=chunk_size), inputs)
    assert_same(o2, o1)
    assert_same(s2, s1)
    for name, a, b in zip(["q", "k", "v", "log_alpha", "beta", "initial_state"], g2, g1):
        assert torch.isfinite(a).all(), name
        assert_same(a, b)


def test_chunk_with_long_chunks_and_subchunks(kda_path):
    """chunk 32 > the 16-token explicit sub-block: exercises the cross-sub-chunk factoring."""
    inputs = make_inputs(T=70, strong_decay=True, seed=3)
    o1, s1, g1 = run_and_grad(lambda *x: kda_recurrent(*x[:5], initial_state=x[5]), inputs)
    o2, s2, g2 = run_and_grad(lambda *x: kda_path(*x[:5], initial_state=x[5], chunk_size=32), inputs)
    assert_same(o2, o1)
    assert_same(s2, s1)
    for a, b in zip(g2, g1):
        assert_same(a, b)


def test_step_matches_recurrent():
    q, k, v, la, beta, s0 = (x.detach() for x in make_inputs(T=6))
    o_ref, s_ref = kda_recurrent(q, k, v, la, beta, s0)
    S = s0
    for t in range(6):
        o, S = kda_step(q[:, :, t], k[:, :, t], v[:, :, t], la[:, :, t], beta[:, :, t], S)
        assert_same(o, o_ref[:, :, t])
    assert_same(S, s_ref)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_split_in_two_equals_one_call(form, kda_path):
    q, k, v, la, beta, s0 = (x.detach() for x in make_inputs(T=45))
    fn = (lambda *a, **kw: kda_path(*a, chunk_size=16, **kw)) if form == "chunk" else kda_recurrent
    o, s = fn(q, k, v, la, beta, s0)
    cut = 21
    oa, sa = fn(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], la[:, :, :cut], beta[:, :, :cut], s0)
    ob, sb = fn(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], la[:, :, cut:], beta[:, :, cut:], sa)
    assert_same(torch.cat([oa, ob], dim=2), o)
    assert_same(sb, s)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_reset_starts_stream_from_zero_state(form, kda_path):
    """After a reset at p, stream 0 behaves as if the sequence began at p with no state;
    stream 1 (no reset) is untouched."""
    q, k, v, la, beta, s0 = (x.detach() for x in make_inputs(T=40))
    fn = (lambda *a, **kw: kda_path(*a, chunk_size=16, **kw)) if form == "chunk" else kda_recurrent
    p = 19
    reset = torch.zeros(2, 40, dtype=torch.bool)
    reset[0, p] = True
    o, s = fn(q, k, v, la, beta, s0, reset=reset)
    o_new, s_new = fn(q[:1, :, p:], k[:1, :, p:], v[:1, :, p:], la[:1, :, p:], beta[:1, :, p:], None)
    o_plain, s_plain = fn(q, k, v, la, beta, s0)
    assert_same(o[0, :, p:], o_new[0])
    assert_same(s[0], s_new[0])
    assert_same(o[0, :, :p], o_plain[0, :, :p])  # before the reset nothing changes
    assert_same(o[1], o_plain[1])
    assert_same(s[1], s_plain[1])
    # and the output after the reset really differs from the no-reset run (the test bites)
    assert (o[0, :, p:] - o_plain[0, :, p:]).abs().max() > 1e-2


def test_chunk_reset_grads_match_recurrent(kda_path):
    inputs = make_inputs(T=33)
    reset = torch.rand(2, 33, generator=torch.Generator().manual_seed(5)) < 0.15
    reset[1, 0] = True  # a reset on the very first token drops the initial state
    _, _, g1 = run_and_grad(lambda *x: kda_recurrent(*x[:5], initial_state=x[5], reset=reset), inputs)
    _, _, g2 = run_and_grad(lambda *x: kda_path(*x[:5], initial_state=x[5], reset=reset, chunk_size=8), inputs)
    for a, b in zip(g2, g1):
        assert_same(a, b)
    assert g1[5][1].abs().max() == 0  # stream 1's initial state is never read


# ------------------------------------------------------------------------------ LIF


def test_lif_scan_matches_reference_forward_and_grads():
    g = torch.Generator().manual_seed(0)
    drive = (torch.randn(3, 50, 4, 5, generator=g) * 0.5 + 0.3).requires_grad_()
    m0 = torch.randn(3, 4, 5, generator=g).requires_grad_()
    reset = torch.rand(3, 50, generator=g) < 0.1
    s1, m1 = lif_scan(drive, 0.9, 1.0, m0, reset)
    s2, m2 = lif_scan_reference(drive, 0.9, 1.0, m0, reset)
    assert torch.equal(s1, s2)
    assert_same(m1, m2)
    w_s, w_m = torch.randn(s1.shape, generator=g), torch.randn(m1.shape, generator=g)
    g1 = torch.autograd.grad((s1 * w_s).sum() + (m1 * w_m).sum(), [drive, m0])
    g2 = torch.autograd.grad((s2 * w_s).sum() + (m2 * w_m).sum(), [drive, m0])
    for a, b in zip(g1, g2):
        assert_same(a, b)


def test_lif_dynamics_and_surrogate_gradient():
    # constant drive 0.6, decay 0.5, threshold 1: v = 0.6, 0.9, 1.05 (spike, m = 0.05), 0.625, ...
    drive = torch.full((1, 5, 1), 0.6, requires_grad=True)
    spikes, m = lif_scan(drive, 0.5, 1.0)
    assert spikes.flatten().tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert m.item() == pytest.approx(0.5 * (0.5 * 0.05 + 0.6) + 0.6)
    # a neuron far below threshold never spikes but still gets gradient (not dead)
    quiet = torch.full((2, 20, 3), -0.5, requires_grad=True)
    s, _ = lif_scan(quiet, 0.9, 1.0)
    assert s.sum() == 0
    s.sum().backward()
    assert (quiet.grad > 0).all()


def test_lif_reset_zeroes_membrane():
    drive = torch.full((2, 4, 1), 0.6)
    m0 = torch.full((2, 1), 0.9)
    reset = torch.tensor([[True, False, False, False], [False, False, False, False]])
    s, _ = lif_scan(drive, 1.0, 1.0, m0, reset)
    assert s[0, :, 0].tolist() == [0.0, 1.0, 0.0, 1.0]  # 0.6, 1.2 -> 0.2, 0.8, 1.4
    assert s[1, :, 0].tolist() == [1.0, 1.0, 0.0, 1.0]  # 1.5 -> 0.5, 1.1 -> 0.1, 0.7, 1.3


# ------------------------------------------------------------------------------ layer


def tiny_cfg(**kw):
    base = dict(arch="hatchling", d_model=32, n_heads=2, chunk_size=8, conv_size=4, decay_rank=8)
    base.update(kw)
    return ModelConfig(**base)


def test_silent_head_writes_nothing():
    """A head with no spikes at a step leaves its fast-weight state exactly unchanged
    (beta = 0 and alpha = 1); a head that spikes does change it."""
    torch.manual_seed(0)
    layer = SpikeKDA(tiny_cfg())
    with torch.no_grad():
        layer.drive_proj.bias[:16] = -100.0  # head 0: membrane never reaches threshold
    x = torch.randn(2, 11, 32)
    state = layer.zero_state(2, "cpu")
    state["S"] = torch.randn_like(state["S"])
    for impl in ("chunk", "recurrent"):
        layer.impl = impl
        _, new, spikes = layer(x, {k: v.clone() for k, v in state.items()})
        assert spikes[:, :, 0].sum() == 0 and spikes[:, :, 1].sum() > 0
        assert torch.equal(new["S"][:, 0], state["S"][:, 0]), impl
        assert (new["S"][:, 1] - state["S"][:, 1]).abs().max() > 1e-3
    # the one-token decoding step too
    _, new, _ = layer(x[:, :1], {k: v.clone() for k, v in state.items()})
    assert torch.equal(new["S"][:, 0], state["S"][:, 0])


def test_spike_kda_initial_spike_rate_and_gradient():
    torch.manual_seed(0)
    cfg = tiny_cfg(d_model=64, n_heads=4)
    layer = SpikeKDA(cfg)
    x = F.rms_norm(torch.randn(4, 64, 64), (64,))
    y, _, spikes = layer(x)
    assert 0.15 < spikes.mean().item() < 0.5  # alive at init, near lif_init_rate
    y.square().mean().backward()
    assert layer.drive_proj.weight.grad.abs().sum() > 0  # learning signal reaches the neurons
    assert layer.decay_up.weight.grad.abs().sum() > 0


def test_short_conv_is_causal_and_resets():
    torch.manual_seed(0)
    conv = ShortConv(5, 4)
    x = torch.randn(2, 12, 5)
    y, tail = conv(x)
    ya, ta = conv(x[:, :7])
    yb, _ = conv(x[:, 7:], ta)
    assert_same(torch.cat([ya, yb], 1), y)
    reset = torch.zeros(2, 12, dtype=torch.bool)
    reset[0, 6] = True
    yr, _ = conv(x, reset=reset)
    assert_same(yr[0, 6:], conv(x[:1, 6:])[0][0])
    assert_same(yr[1], y[1])
    assert_same(yr[0, :6], y[0, :6])
    # a reset inside the carried tail: the next call must not see the old document
    reset[0, 6], reset[0, 10] = False, True
    _, tail_r = conv(x, reset=reset)
    nxt = torch.randn(2, 3, 5)
    assert_same(conv(nxt, tail_r)[0][0], conv(torch.cat([x[:1, 10:], nxt[:1]], 1))[0][0, 2:])


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_short_conv_matches_its_reference_with_gradients(K, compiled, monkeypatch):
    """The one-pass conv (the compiled CPU loop, or the PyTorch kernel form) plus the cut-out terms
    at resets equals the per-lag loop, values and gradients (x, weight, tail), with resets
    at t = 0, back to back, and none in a stream."""
    if compiled and not cpu.available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(K)
    conv = ShortConv(6, K).double()
    x = torch.randn(3, 20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(3, K - 1, 6, generator=g, dtype=torch.float64, requires_grad=True)
    reset = torch.zeros(3, 20, dtype=torch.bool)
    reset[0, [0, 5, 6, 13]] = True
    reset[1, 19] = True
    with dispatch.forcing("short_conv", "cpu" if compiled else "reference"):
        y, _ = conv(x, tail, reset)
    ref = F.silu(short_conv_reference(x, conv.weight, tail, reset))
    assert_same(y, ref)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    with dispatch.forcing("short_conv", "cpu" if compiled else "reference"):
        got = torch.autograd.grad((y * w).sum(), [x, conv.weight, tail], allow_unused=True)
    want = torch.autograd.grad((ref * w).sum(), [x, conv.weight, tail], allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            assert_same(a, b)


def test_spiking_off_is_plain_kda():
    """cfg.spiking = False: no drive projection, alpha and beta straight from their
    projections, and the layer equals KDA fed those (the ablation bench/quality.py trains)."""
    torch.manual_seed(0)
    layer = SpikeKDA(tiny_cfg(d_model=32, n_heads=2, spiking=False))
    assert layer.drive_proj is None
    x = torch.randn(2, 20, 32)
    y, state, spikes = layer(x)
    assert spikes is None and not state["membrane"].any()
    H, dk = 2, 16
    qkv, _ = layer.conv(layer.qkv_proj(x))
    q, k, v = (F.normalize(t.float(), dim=-1) if i < 2 else t for i, t in enumerate(qkv.view(2, 20, 3, H, dk).unbind(2)))
    a = layer.A_log.exp()[:, None] * F.softplus(layer.decay_up(layer.decay_down(x)).view(2, 20, H, dk)
                                                + layer.dt_bias.view(H, dk))
    beta = torch.sigmoid(layer.beta_proj(x))
    o, _ = kda_recurrent(*(t.transpose(1, 2) for t in (q, k, v, -a, beta)))
    o = layer.o_norm(o.transpose(1, 2), layer.gate_proj(x).view(2, 20, H, dk))
    assert_same(y, layer.out_proj(o.reshape(2, 20, H * dk)))
    y.square().mean().backward()
    assert layer.A_log.grad.abs().sum() > 0 and layer.beta_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha_floor, floor", [(0.0, 0.5), (0.0, 1.0), (1.0, 0.0), (0.3, 0.5)])
def test_spike_floors_keep_that_share_of_forgetting_and_writing_ungated(alpha_floor, floor):
    """cfg.alpha_spike_floor = g, cfg.beta_spike_floor = f: log alpha = -a (g + (1 - g) s),
    beta = sigmoid(w x) (f + (1 - f) mean(s)), spikes as without floors; the layer equals
    KDA fed those (bench/quality.py's variants)."""
    torch.manual_seed(0)
    layer = SpikeKDA(tiny_cfg(d_model=32, n_heads=2, alpha_spike_floor=alpha_floor, beta_spike_floor=floor))
    x = torch.randn(2, 20, 32)
    y, state, spikes = layer(x)
    H, dk = 2, 16
    qkv, _ = layer.conv(layer.qkv_proj(x))
    q, k, v = (F.normalize(t.float(), dim=-1) if i < 2 else t for i, t in enumerate(qkv.view(2, 20, 3, H, dk).unbind(2)))
    a = layer.A_log.exp()[:, None] * F.softplus(layer.decay_up(layer.decay_down(x)).view(2, 20, H, dk)
                                                + layer.dt_bias.view(H, dk))
    ref_spikes, _ = lif_scan_reference(layer.drive_proj(x).view(2, 20, H, dk), layer.lif_decay, layer.lif_threshold)
    assert torch.equal(spikes, ref_spikes)
    beta = torch.sigmoid(layer.beta_proj(x)) * (floor + (1 - floor) * ref_spikes.mean(-1))
    log_alpha = -a * (alpha_floor + (1 - alpha_floor) * ref_spikes)
    o, _ = kda_recurrent(*(t.transpose(1, 2) for t in (q, k, v, log_alpha, beta)))
    o = layer.o_norm(o.transpose(1, 2), layer.gate_proj(x).view(2, 20, H, dk))
    assert_same(y, layer.out_proj(o.reshape(2, 20, H * dk)))


def test_layer_with_the_compiled_cpu_loops_equals_the_pytorch_paths():
    """A Spike-KDA layer (ShortConv, q/k/v split and normalisation, LIF, the chunked KDA) on
    the compiled CPU loops gives the outputs, state and gradients of the same layer on the PyTorch paths,
    resets and a carried state included."""
    if not cpu.available():
        pytest.skip("no C compiler here: the PyTorch paths are all there is")
    torch.manual_seed(0)
    layer = SpikeKDA(tiny_cfg(d_model=32, n_heads=2))
    x = torch.randn(3, 24, 32)
    reset = torch.zeros(3, 24, dtype=torch.bool)
    reset[0, 5] = reset[2, 0] = True
    state = {k: v.detach() for k, v in layer(torch.randn(3, 9, 32))[1].items()}

    def run():
        layer.zero_grad()
        y, new_state, spikes = layer(x, state, reset)
        (y.square().mean() + new_state["S"].square().mean()).backward()
        return [y, new_state["S"], new_state["membrane"], spikes] + [p.grad.clone() for p in layer.parameters()]

    compiled = run()
    layer.kernels = layer.conv.kernels = layer.o_norm.kernels = "reference"
    for a, b in zip(compiled, run()):
        assert_same(a, b)
