"""The dispatcher (model/ops/dispatch.py): the preset's mode, what runs per op and the
report of it, the first-call check turning a faulty fast form off (injected here by
monkeypatching the compiled loop's functions), the custom ops' registrations (fakes,
autograd: torch.library.opcheck) and their boundary checks, and torch.compile tracing
through them without a graph break."""
import logging

import pytest
import torch
import torch.nn.functional as F

from model import ops
from model.ops import cpu, dispatch, library
from model.ops.cpu import loops
from model.ops.reference.layer import (
    depthwise_conv_reference,
    gated_rmsnorm_reference,
    lif_modulate_reference,
    split_heads_reference,
)
from tests.model.helpers import forget_dispatch

needs_cc = pytest.mark.skipif(not cpu.available(), reason="no C compiler here: no compiled loops")


@pytest.fixture(autouse=True)
def fresh_dispatcher():
    forget_dispatch()
    yield
    forget_dispatch()


def lif_inputs(seed=0, D=16):
    g = torch.Generator().manual_seed(seed)
    drive = (torch.randn(2, 20, 2, D, generator=g) * 0.6 + 0.3).requires_grad_()
    a = torch.rand(2, 20, 2, D, generator=g).requires_grad_()
    beta_logit = torch.randn(2, 20, 2, generator=g).requires_grad_()
    reset = torch.zeros(2, 20, dtype=torch.bool)
    reset[0, 7] = True
    return drive, a, beta_logit, reset


def grads_of(outs, inputs, seed=3):
    g = torch.Generator().manual_seed(seed)
    outs = [o for o in outs if o is not None]
    return torch.autograd.grad(sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs), inputs)


def test_importing_model_builds_nothing_and_imports_no_kernel():
    import subprocess
    import sys

    code = ("import sys, model, model.ops, program, train; from model.ops import cpu; "
            "assert not cpu._state['tried'], 'built'; "
            "assert not any(m.startswith(('model.ops.triton.', 'fla')) for m in sys.modules), 'imported'; "
            "assert 'torch._dynamo' not in sys.modules, 'dynamo'; print('ok')")  # ~1.5 s of every start
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_reference_mode_runs_the_references_and_says_so():
    drive, a, beta_logit, reset = lif_inputs()
    got = ops.lif_modulate(drive, a, beta_logit, 0.9, 1.0, reset=reset, mode="reference")
    for x, y in zip(got, lif_modulate_reference(drive, a, beta_logit, 0.9, 1.0, reset=reset)):
        assert torch.equal(x, y)
    assert ops.report() == {"lif_modulate": 'PyTorch reference (cpu, float32; model.kernels = "reference")'}
    with pytest.raises(ValueError, match="model.kernels must be one of"):
        ops.gated_rmsnorm(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.ones(4), 1e-6, mode="fused")


@needs_cc
def test_auto_runs_the_compiled_loops_and_reports_one_line_per_op(caplog):
    drive, a, beta_logit, reset = lif_inputs()
    with caplog.at_level(logging.INFO, logger="model.ops"):
        for _ in range(2):
            got = ops.lif_modulate(drive, a, beta_logit, 0.9, 1.0, reset=reset)
    assert ops.report() == {"lif_modulate": "compiled C loop (cpu, float32)"}
    assert ops.report_lines() == ["[kernels] lif_modulate: compiled C loop (cpu, float32)"]
    assert [r.getMessage() for r in caplog.records] == ["model.ops: lif_modulate runs the compiled C loop (cpu, float32)"]
    want = lif_modulate_reference(drive, a, beta_logit, 0.9, 1.0, reset=reset)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def _wrong_forward(real):
    def lif_fwd(*args):
        spikes, m, log_alpha, beta, v_all = real(*args)
        return spikes, m, log_alpha, beta * 1.01, v_all  # a kernel that is off by 1% in one output
    return lif_fwd


def _wrong_backward(real):
    def conv_bwd(*args):
        gxx, gw = real(*args)
        return gxx, gw.flip(-1)  # the weight's gradient with its taps reversed
    return conv_bwd


def _raises(*args):
    raise RuntimeError("CUDA error: too many resources requested for launch")


@needs_cc
@pytest.mark.parametrize("op,fault", [("lif_modulate", "forward"), ("short_conv", "backward"),
                                      ("gated_rmsnorm", "exception")])
def test_first_call_check_turns_a_faulty_fast_form_off_with_one_line(monkeypatch, caplog, op, fault):
    """A compiled loop that is wrong in its forward, wrong only in its backward, or raises:
    the first call checks it against the reference, turns it off with one line naming it
    and why, and the op gives the reference's results; the report says so."""
    if fault == "forward":
        monkeypatch.setattr(loops, "lif_fwd", _wrong_forward(loops.lif_fwd))
    elif fault == "backward":
        monkeypatch.setattr(loops, "conv_bwd", _wrong_backward(loops.conv_bwd))
    else:
        monkeypatch.setattr(loops, "norm_fwd", _raises)
    g = torch.Generator().manual_seed(1)
    if op == "lif_modulate":
        drive, a, beta_logit, reset = lif_inputs()
        inputs = [drive, a, beta_logit]
        run = lambda *x: ops.lif_modulate(*x, 0.9, 1.0, reset=reset)  # noqa: E731
        ref = lambda *x: lif_modulate_reference(*x, 0.9, 1.0, reset=reset)  # noqa: E731
    elif op == "short_conv":
        inputs = [torch.randn(2, 12, 8, generator=g, requires_grad=True), torch.randn(8, 4, generator=g,
                                                                                      requires_grad=True)]
        run, ref = ops.short_conv, depthwise_conv_reference
    else:
        inputs = [torch.randn(2, 5, 2, 8, generator=g, requires_grad=True) for _ in range(2)] + \
            [torch.rand(8, generator=g, requires_grad=True)]
        run = lambda *x: (ops.gated_rmsnorm(*x, 1e-6),)  # noqa: E731
        ref = lambda *x: (gated_rmsnorm_reference(*x, 1e-6),)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="model.ops"):
        got = run(*inputs)
        got_g = grads_of(got, inputs)
        run(*inputs)
    want = ref(*inputs)
    for x, y in zip([*got, *got_g], [*want, *grads_of(want, inputs)]):
        torch.testing.assert_close(x, y)
    off = [r.getMessage() for r in caplog.records if "turned off" in r.getMessage()]
    assert len(off) == 1, off
    assert off[0].startswith(f"model.ops: {op}: compiled C loop turned off for this run (cpu, float32, head size ")
    assert ("RuntimeError: CUDA error" if fault == "exception" else "differs from the reference") in off[0]
    assert ops.report()[op].startswith("PyTorch reference (cpu, float32; compiled C loop: failed its first-call check")


@needs_cc
def test_the_check_runs_once_per_head_size_and_dtype(monkeypatch):
    calls = []
    real = dispatch._first_call_check
    monkeypatch.setattr(dispatch, "_first_call_check", lambda *a: calls.append(a[:5]) or real(*a))
    for D in (8, 8, 16):
        o = torch.randn(1, 3, 2, D)
        ops.gated_rmsnorm(o, o, torch.ones(D), 1e-6)
    assert [c[4] for c in calls] == [8, 16]


@needs_cc
def test_the_ops_check_their_arguments_at_the_boundary():
    drive, a, beta_logit, _ = lif_inputs()
    with pytest.raises(ValueError, match=r"model.ops.lif_modulate: beta_logit has shape \[2, 20, 3\]"):
        ops.lif_modulate(drive, a, torch.zeros(2, 20, 3), 0.9, 1.0)
    with pytest.raises(ValueError, match="model.ops.gated_rmsnorm: weight has shape"):
        ops.gated_rmsnorm(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="model.ops.split_heads: qkv has shape"):
        ops.split_heads(torch.zeros(1, 2, 10), 2)


def kda_inputs(g, T=21, strong=False):
    """prepare_inputs' results for a small problem with a reset (20 nats a token when strong:
    no chunk can be factored, the sub-chunk form runs)."""
    q, k = (F.normalize(torch.randn(2, 2, T, 8, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(2, 2, T, 8, generator=g)
    la = -torch.rand(2, 2, T, 8, generator=g) * (20.0 if strong else 0.5)
    beta, s0 = torch.rand(2, 2, T, generator=g), torch.randn(2, 2, 8, 8, generator=g) * 0.1
    reset = torch.zeros(2, 2, T, dtype=torch.bool)
    reset[0, :, 9] = True
    return [x.requires_grad_() for x in (q * 8 ** -0.5, k, v, la, beta, s0)] + [reset]


@needs_cc
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_custom_op_registrations_pass_opcheck(impl):
    """torch.library.opcheck: schema, fake implementation, autograd registration, for each
    forward op on the compiled loop and on the PyTorch form."""
    g = torch.Generator().manual_seed(0)
    drive, a, beta_logit, _ = lif_inputs(D=8)
    keep = torch.ones(2, 20)
    keep[1, 3] = 0
    cases = {
        "lif_modulate": (library.lif_fwd, (drive, a, beta_logit, torch.zeros(2, 2, 8), keep, 0.9, 1.0, 5.0)),
        "short_conv": (library.conv_fwd, (torch.randn(2, 9, 6, generator=g, requires_grad=True),
                                          torch.randn(6, 3, generator=g, requires_grad=True))),
        "split_heads": (library.split_fwd, (torch.randn(2, 5, 12, generator=g, requires_grad=True), 2)),
        "gated_rmsnorm": (library.norm_fwd, (torch.randn(2, 2, 5, 8, generator=g).transpose(1, 2).requires_grad_(),
                                             torch.randn(2, 5, 2, 8, generator=g, requires_grad=True),
                                             torch.ones(8, requires_grad=True), 1e-6)),
        "kda": (library.kda_fwd, (*kda_inputs(g), 16)),
    }
    for op, (fn, args) in cases.items():
        with dispatch.forcing(op, impl):
            torch.library.opcheck(fn, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                                        "test_aot_dispatch_dynamic"))


@needs_cc
def test_torch_compile_traces_through_the_ops_without_a_graph_break():
    """fullgraph=True fails on any graph break: the LIF, conv, split, norm and KDA ops forward
    and backward in one graph (aot_eager: AOTAutograd traces the backward ops too); the KDA's
    chunk choice (data-dependent) happens inside its op."""
    torch._dynamo.reset()
    drive, a, beta_logit, reset = lif_inputs(D=8)
    xx, w = torch.randn(2, 23, 48, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    norm_w = torch.ones(8, requires_grad=True)

    def layer(drive, a, beta_logit, xx, w, norm_w):
        spikes, m, log_alpha, beta = ops.lif_modulate(drive, a, beta_logit, 0.9, 1.0, reset=reset)
        q, k, v = ops.split_heads(ops.short_conv(xx, w), 2)
        o, S = ops.kda(q, k, v, -torch.sigmoid(v).detach() * 0.3, torch.sigmoid(q[..., 0]), chunk_size=16)
        y = ops.gated_rmsnorm(o.transpose(1, 2), k.transpose(1, 2), norm_w, 1e-6)
        return y.sum() + log_alpha.sum() + beta.sum() + m.sum() + S.sum()

    inputs = [drive, a, beta_logit, xx, w, norm_w]
    eager = torch.autograd.grad(layer(*inputs), inputs)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for x, y in zip(got, eager):
        torch.testing.assert_close(x, y)
    assert set(ops.report()) == {"lif_modulate", "short_conv", "split_heads", "gated_rmsnorm", "kda"}
    assert all(v == "compiled C loop (cpu, float32)" for v in ops.report().values())


@needs_cc
@pytest.mark.parametrize("strong", [False, True])
def test_kda_op_matches_the_recurrence_whichever_chunk_it_takes(strong):
    """The op picks its chunk from the decays at run time; where none can be factored (20
    nats a token) it runs the sub-chunk form, its backward by autograd in a worker thread."""
    from model.ops.reference.kda import kda_recurrent

    g = torch.Generator().manual_seed(4)
    q, k, v, la, beta, s0, reset = kda_inputs(g, T=37, strong=strong)
    o, S, _, chunk = library.kda_fwd(q, k, v, la, beta, s0, reset, 32)
    assert (chunk.item() < 0) == strong
    got = [o, S, *grads_of([o, S], [q, k, v, la, beta, s0])]
    o2, S2 = kda_recurrent(q, k, v, la, beta, s0, 1.0, reset)
    want = [o2, S2, *grads_of([o2, S2], [q, k, v, la, beta, s0])]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_split_heads_form_matches_its_reference():
    x = torch.randn(2, 5, 3 * 2 * 4, requires_grad=True)
    with dispatch.forcing("split_heads", "reference"):
        got = ops.split_heads(x, 2)
        got_g = grads_of(got, [x])
    want = split_heads_reference(x, 2)
    for a, b in zip([*got, *got_g], [*want, *grads_of(want, [x])]):
        torch.testing.assert_close(a, b)


def test_an_op_with_no_fast_form_for_the_device_runs_the_reference_outside_the_custom_ops(monkeypatch):
    """As split_heads on CUDA: no custom op in the way of torch.compile's own fusion."""
    monkeypatch.setitem(dispatch.FAST, "split_heads", {})
    monkeypatch.setattr(library, "split_fwd", None)  # never reached
    x = torch.randn(2, 5, 3 * 2 * 4)
    for a, b in zip(ops.split_heads(x, 2), split_heads_reference(x, 2)):
        assert torch.equal(a, b)
    assert ops.report() == {"split_heads": "PyTorch reference (cpu, float32)"}


def test_a_second_copy_of_the_package_reuses_the_ops(tmp_path, monkeypatch):
    """An exported model's own copy of `model` imported beside this one (transformers'
    trust_remote_code) registers nothing twice: the ops stay this copy's (a second
    registration replaced their kernels, and a later step crashed in the C loops)."""
    import importlib
    import shutil
    import sys
    from pathlib import Path

    from torch._library.custom_ops import OPDEFS

    import model

    before = {name: op for name, op in OPDEFS.items() if name.startswith("spike_ops::")}
    shutil.copytree(Path(model.__file__).parent, tmp_path / "model_copy")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        copy = importlib.import_module("model_copy.ops.library")
        assert {name: op for name, op in OPDEFS.items() if name.startswith("spike_ops::")} == before
        assert copy.conv_fwd.op is before["spike_ops::conv_fwd"]
        drive, a, beta_logit, reset = lif_inputs()
        got = importlib.import_module("model_copy.ops").lif_modulate(drive, a, beta_logit, 0.9, 1.0, reset=reset)
        for x, y in zip(got, lif_modulate_reference(drive, a, beta_logit, 0.9, 1.0, reset=reset)):
            torch.testing.assert_close(x, y)
    finally:
        for name in [m for m in sys.modules if m == "model_copy" or m.startswith("model_copy.")]:
            del sys.modules[name]


def test_outside_compile_runs_plainly_until_armed_then_breaks_the_graph_there():
    """model.ops.boundary: a marked data-dependent choice is the plain function until a
    compile is asked for (dynamo then stops at the .item() inside it); armed, a compiled
    caller breaks its graph at the call itself, and still computes the eager result."""
    from model.ops import boundary
    from model.ops.reference.kda import _span_at_most

    span = torch.tensor([0.5, 2.0])
    assert _span_at_most(span, 1.0) is False and _span_at_most(span, 3.0) is True

    def caller(x):
        y = x.sin()
        return y * 2 if _span_at_most(x, 1.0) else y - 1

    def break_reasons():
        torch._dynamo.reset()
        return " ".join(str(b.reason) for b in torch._dynamo.explain(caller)(span).break_reasons)

    saved = [target[0] for target, _ in boundary._marked]
    try:
        assert not boundary.armed() and "item()" in break_reasons()
        boundary.arm()
        assert boundary.armed() and "torch.compiler.disable" in break_reasons()
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(caller, backend="eager")(span), span.sin() - 1)
    finally:
        for (target, _), fn in zip(boundary._marked, saved):
            target[0] = fn
        torch._dynamo.reset()
