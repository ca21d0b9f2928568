"""Auxiliary heads (model/aux_heads.py): losses, where their gradients go, detached
teachers and targets, no parameters for an off head, a span really hidden from its
predictor, tolerant loading of checkpoints without heads, and DDP without unused
parameters."""
from __future__ import annotations

import inspect
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.aux_heads import AuxHeads, value_targets
from model.config import AuxHeadsConfig, ModelConfig
from model.transformer import TransformerLM

V = 53
D = 32
WEIGHTS = {"policy": "policy_kl_weight", "value": "value_weight", "dynamics": "dynamics_weight",
           "span": "span_contrastive_weight"}
LOSS_KEY = {"policy": "policy_kl", "value": "value", "dynamics": "dynamics", "span": "span_contrastive"}
ALL_ON = {w: 0.05 for w in WEIGHTS.values()}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy shared CPU they cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_cfg(arch: str) -> ModelConfig:
    if arch == "hatchling":
        return ModelConfig(arch="hatchling", d_model=D, n_layers=4, n_heads=2, n_kv_heads=1, global_every=2,
                           wm_window=64, chunk_size=8, conv_size=3, decay_rank=8)
    return ModelConfig(arch="transformer", d_model=D, n_layers=4, n_heads=4)


def make(arch: str = "transformer", seed: int = 0, **aux):
    """A tiny model with the given auxiliary settings (None: no aux_cfg at all)."""
    cfg = model_cfg(arch)
    aux_cfg = AuxHeadsConfig(**aux) if aux else None
    torch.manual_seed(seed)
    if arch == "hatchling":
        from model.hatchling import HatchlingLM
        if "aux_cfg" not in inspect.signature(HatchlingLM.__init__).parameters:
            pytest.skip("HatchlingLM does not take aux_cfg yet (the integration snippet is not pasted)")
        return HatchlingLM(cfg, V, aux_cfg=aux_cfg).train()
    return TransformerLM(cfg, V, aux_cfg=aux_cfg).train()


def only(head: str, **extra) -> dict:
    return {WEIGHTS[head]: 0.5, **extra}


def tokens(B=4, T=24, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def capture(model):
    """Retain the gradients of the final hidden state and of the LM logits on the next forward."""
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            seen[name] = output
        return hook
    model.norm.register_forward_hook(keep("hidden"))
    model.lm_head.register_forward_hook(keep("logits"))
    return seen


def nonzero_grad(p) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


# -- every loss: finite, non-negative, weighted, gradients where intended ------------------
@pytest.mark.parametrize("arch", ["transformer", "hatchling"])
@pytest.mark.parametrize("head", list(WEIGHTS))
def test_loss_finite_weighted_and_reaches_head_and_backbone(arch, head):
    model = make(arch, **only(head))
    out = model(tokens())
    key = LOSS_KEY[head]
    loss, raw = out.aux[f"loss/{key}"], out.aux[f"metric/aux/{key}"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert raw.item() >= -1e-6  # KL, Huber, 1 - cos, InfoNCE are all >= 0
    assert not raw.requires_grad
    torch.testing.assert_close(loss.detach(), 0.5 * raw)  # "loss/" is already weighted
    assert not [k for k in out.aux if k.startswith("loss/") and k != f"loss/{key}"]
    loss.backward()
    head_module = getattr(model.aux_heads, head)
    for name, p in head_module.named_parameters():
        assert nonzero_grad(p), f"aux head parameter {head}.{name} gets no gradient"
    # intended: every head shapes the backbone (the first block at least)
    assert any(nonzero_grad(p) for p in model.blocks[0].parameters())


@pytest.mark.parametrize("arch", ["transformer", "hatchling"])
def test_policy_kl_teacher_detached_and_tap_is_internal(arch):
    model = make(arch, **only("policy"))
    assert model.aux_heads.tap_layer == 1  # n_layers // 2 blocks feed the policy head
    seen = capture(model)
    out = model(tokens())
    out.aux["loss/policy_kl"].backward()
    assert seen["logits"].grad is None, "the LM head's logits (the teacher) received gradient from the policy KL"
    assert seen["hidden"].grad is None
    for i, block in enumerate(model.blocks):  # blocks 0..tap get gradient, the ones above do not
        got = any(nonzero_grad(p) for p in block.parameters())
        assert got == (i <= 1), f"block {i}: gradient {got}"
    # the policy head reads the tied unembedding only detached: the embedding's gradient is
    # exactly the one through the input lookup, i.e. zero for token ids absent from the input
    x = tokens()
    absent = torch.ones(V, dtype=torch.bool)
    absent[x.unique()] = False
    model.zero_grad()
    model(x).aux["loss/policy_kl"].backward()
    assert absent.any() and model.embed.weight.grad[absent].abs().sum() == 0


@pytest.mark.parametrize("policy_layer", [2, 4])
def test_policy_layer_is_configurable(policy_layer):
    model = make(**only("policy", policy_layer=policy_layer))
    assert model.aux_heads.tap_layer == policy_layer - 1
    model(tokens()).aux["loss/policy_kl"].backward()
    got = [any(nonzero_grad(p) for p in b.parameters()) for b in model.blocks]
    assert got == [i < policy_layer for i in range(4)]


def test_policy_kl_is_the_kl_to_the_lm_distribution():
    model = make(**only("policy", policy_token_fraction=1.0))
    x = tokens()
    seen = capture(model)
    mids = []
    model.blocks[1].register_forward_hook(lambda m, i, o: mids.append(o))
    out = model(x)
    p_log = seen["logits"].detach().log_softmax(-1)
    q_log = model.aux_heads.policy(mids[0], model.embed.weight).log_softmax(-1)
    expected = (p_log.exp() * (p_log - q_log)).sum(-1).mean()
    torch.testing.assert_close(out.aux["metric/aux/policy_kl"], expected.detach(), atol=1e-5, rtol=1e-4)


def test_value_targets_are_the_mean_future_nll():
    B, T, H = 2, 11, 3
    logits = torch.randn(B, T, V)
    x = torch.randint(0, V, (B, T))
    tgt = value_targets(logits, x, H)
    assert tgt.shape == (B, T - H) and not tgt.requires_grad
    logp = logits.log_softmax(-1)
    for b in range(B):
        for t in range(T - H):
            want = -sum(logp[b, s, x[b, s + 1]] for s in range(t, t + H)) / H
            assert abs(tgt[b, t].item() - want.item()) < 1e-4


@pytest.mark.parametrize("arch", ["transformer", "hatchling"])
def test_value_targets_detached_and_out_of_window_positions_masked(arch):
    H = 5
    model = make(arch, **only("value", value_horizon=H))
    seen = capture(model)
    out = model(tokens(T=24))
    out.aux["loss/value"].backward()
    assert seen["logits"].grad is None, "the value target is not detached from the LM logits"
    g = seen["hidden"].grad.abs().sum((0, 2))
    assert (g[:24 - H] > 0).all() and (g[24 - H:] == 0).all()


@pytest.mark.parametrize("loss", ["cosine", "mse"])
@pytest.mark.parametrize("steps", [1, 3])
def test_dynamics_targets_detached_and_surprise_signal(loss, steps):
    B, T = 3, 20
    model = make(**only("dynamics", dynamics_steps=steps, dynamics_loss=loss))
    seen = capture(model)
    out = model(tokens(B, T))
    out.aux["loss/dynamics"].backward()
    g = seen["hidden"].grad.abs().sum((0, 2))
    # inputs are h_0..h_{T-2}; h_{T-1} is only ever a target, so it must get no gradient
    assert (g[:T - 1] > 0).all() and g[T - 1] == 0, "dynamics target not detached"
    assert seen["logits"].grad is None
    s = out.aux["signal/surprise"]
    assert s.shape == (B, T) and not s.requires_grad and (s[:, 0] == 0).all() and (s[:, 1:] > 0).all()
    # the surprise at token t is the one-step error of predicting h_t from h_{t-1} and token t
    h = seen["hidden"].detach()
    dyn = model.aux_heads.dynamics
    pred = dyn(h[:, :-1], model.embed.weight[tokens(B, T)[:, 1:]])
    err = (1 - F.cosine_similarity(pred, h[:, 1:], dim=-1)) if loss == "cosine" else (pred - h[:, 1:]).pow(2).mean(-1)
    torch.testing.assert_close(s[:, 1:], err.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.aux["metric/aux/surprise"], err.mean().detach(), atol=1e-5, rtol=1e-4)
    if steps == 1:
        torch.testing.assert_close(out.aux["metric/aux/dynamics"], err.mean().detach(), atol=1e-5, rtol=1e-4)


# -- span contrastive: the span is hidden from the predictor --------------------------------
@pytest.mark.parametrize("right_context", [False, True])
def test_masked_span_is_hidden_from_the_predictor(right_context):
    model = make(**only("span", span_right_context=right_context))
    span = model.aux_heads.span
    B, T, L = 3, 30, 6
    h = torch.randn(B, T, D)
    starts = torch.tensor([1, 10, T - L])
    base = span.predict(h, starts, L)
    inside, before, after = h.clone(), h.clone(), h.clone()
    for b, s in enumerate(starts.tolist()):
        inside[b, s:s + L] = torch.randn(L, D) * 100
        before[b, :s] += torch.randn(s, D)
        after[b, s + L:] += torch.randn(T - s - L, D)
    assert torch.equal(span.predict(inside, starts, L), base), "hidden states inside the span leak into the prediction"
    assert not torch.allclose(span.predict(before, starts, L), base)  # the context is really used
    changed = span.predict(after, starts, L)
    if right_context:
        assert not torch.allclose(changed[:2], base[:2])  # rows whose span ends before T
    else:
        assert torch.equal(changed, base)
    # the true representation is read from inside the span only
    assert not torch.allclose(span.true_repr(inside, starts, L), span.true_repr(h, starts, L))
    assert torch.equal(span.true_repr(before, starts, L), span.true_repr(h, starts, L))
    assert torch.equal(span.true_repr(after, starts, L), span.true_repr(h, starts, L))


def test_span_loss_is_infonce_with_temperature_and_l2():
    model = make(**only("span", span_temperature=0.5, span_l2_normalize=True))
    heads = model.aux_heads
    h = torch.randn(4, 20, D)
    starts = torch.tensor([1, 3, 5, 7])
    L = heads.span_length(20)
    assert L == 3  # round(0.15 * 20)
    loss, acc = heads.span_loss(h, starts)
    p = F.normalize(heads.span.predict(h, starts, L), dim=-1)
    t = F.normalize(heads.span.true_repr(h, starts, L), dim=-1)
    torch.testing.assert_close(loss, F.cross_entropy(p @ t.t() / 0.5, torch.arange(4)))
    assert 0 <= acc.item() <= 1
    assert loss.item() <= math.log(4) * 1.5  # bounded by the cosine range / temperature


# -- off heads have no parameters; eval mode computes nothing ---------------------------------
@pytest.mark.parametrize("head", list(WEIGHTS))
def test_head_that_is_off_has_no_parameters(head):
    others = {w: 0.05 for h, w in WEIGHTS.items() if h != head}
    model = make(**others)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith(f"aux_heads.{head}.")]
    assert getattr(model.aux_heads, head) is None
    for other in WEIGHTS:
        if other != head:
            assert any(n.startswith(f"aux_heads.{other}.") for n in names)
    assert LOSS_KEY[head] not in {k.split("/")[-1] for k in model(tokens()).aux}


def test_all_off_is_the_plain_model():
    plain, off, explicit_off = make(), make(**{w: 0.0 for w in WEIGHTS.values()}), make(value_horizon=3)
    assert off.aux_heads is None and explicit_off.aux_heads is None
    assert [n for n, _ in off.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(off.state_dict()) == list(plain.state_dict())
    assert off(tokens()).aux == {}


def test_heads_only_in_training_and_never_change_the_logits():
    plain, heads = make(), make(**ALL_ON)
    x = tokens()
    for name, p in plain.named_parameters():  # the backbone init does not depend on the heads
        assert torch.equal(p, dict(heads.named_parameters())[name])
    out = heads(x)
    assert {k for k in out.aux if k.startswith("loss/")} == {f"loss/{k}" for k in LOSS_KEY.values()}
    torch.testing.assert_close(out.logits, plain(x).logits)
    heads.eval()
    assert heads(x).aux == {}


def test_parameter_names_do_not_depend_on_other_heads():
    alone = {h: [k for k in make(**only(h)).state_dict() if k.startswith("aux_heads.")] for h in WEIGHTS}
    together = [k for k in make(**ALL_ON).state_dict() if k.startswith("aux_heads.")]
    assert sorted(together) == sorted(k for ks in alone.values() for k in ks)
    for h, ks in alone.items():
        assert ks and all(k.startswith(f"aux_heads.{h}.") for k in ks)


# -- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_without_heads_loads_with_heads_missing():
    old = make(seed=3)
    new = make(seed=4, **ALL_ON)
    result = new.load_state_dict(old.state_dict(), strict=False)
    head_keys = {k for k in new.state_dict() if k.startswith("aux_heads.")}
    assert set(result.missing_keys) == head_keys and head_keys
    assert result.unexpected_keys == []
    for k, v in old.state_dict().items():
        assert torch.equal(new.state_dict()[k], v)
    with pytest.raises(RuntimeError):
        new.load_state_dict(old.state_dict())  # strict loading does notice
    # and back: a checkpoint with heads into a model without them
    back = old.load_state_dict(new.state_dict(), strict=False)
    assert set(back.unexpected_keys) == head_keys and back.missing_keys == []


def test_trainer_tolerant_load_reports_the_head_keys_as_missing():
    from train.assemble import tolerant_load

    class Rep:
        def __init__(self):
            self.warnings = []

        def warn(self, msg):
            self.warnings.append(msg)

    rep = Rep()
    new = make(**only("value"))
    loaded = tolerant_load(new, make().state_dict(), rep)
    assert loaded == len(make().state_dict())
    assert len(rep.warnings) == 1 and "missing (kept fresh)" in rep.warnings[0]
    assert "aux_heads.value.up.weight" in rep.warnings[0]


# -- DDP: no unused parameters whichever heads are on ------------------------------------------
def test_ddp_has_no_unused_parameters(tmp_path, monkeypatch):
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sys.platform == "linux" and "GLOO_SOCKET_IFNAME" not in os.environ:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # a one-process group: loopback (else ~1 s per step here)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for aux in (ALL_ON, {**ALL_ON, "value_horizon": 64}, only("policy")):  # 2nd: no value window this step
            model = DDP(make(**aux))  # find_unused_parameters=False, as in the trainer
            for _ in range(2):  # an unused parameter raises at the second forward
                out = model(tokens(2, 12))
                loss = F.cross_entropy(out.logits.flatten(0, 1), tokens(2, 12).flatten())
                loss = loss + sum(v for k, v in out.aux.items() if k.startswith("loss/"))
                loss.backward()
    finally:
        dist.destroy_process_group()


def test_config_checks():
    assert AuxHeadsConfig().check_heads(4) == []
    bad = AuxHeadsConfig(policy_kl_weight=0.1, policy_layer=9, dynamics_steps=4, span_mask_fraction=1.0,
                         span_temperature=0.0, value_horizon=0, value_weight=-1.0)
    assert {k for k, _ in bad.check_heads(4)} == {"policy_layer"}  # the rest: ranges on the fields
    with pytest.raises(ValueError, match="policy_layer"):
        AuxHeads(bad, model_cfg("transformer"), V)
