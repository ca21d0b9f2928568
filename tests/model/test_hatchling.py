"""HatchlingLM: the model contract (shapes, state, resets, generation) and that it learns."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, build_model, detach_state, generate
from model.hatchling import HatchlingLM, is_wm_layer
from model.wm_attention import WorkingMemoryAttention
from tests.model.helpers import tensors

V = 61
ATOL = RTOL = 1e-4
CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "books" / "tinyshakespeare.txt"


def tiny_cfg(**kw):
    base = dict(arch="hatchling", d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, global_every=2,
                wm_window=64, chunk_size=8, conv_size=3, decay_rank=8)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**kw), V).eval()


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_same(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_shapes_layout_and_aux():
    model = tiny_model()
    assert isinstance(model, HatchlingLM) and HatchlingLM.carries_state
    assert model.lm_head.weight is model.embed.weight
    assert [is_wm_layer(model.cfg, i) for i in range(4)] == [False, True, False, True]
    out = model(tokens(3, 20))
    assert out.logits.shape == (3, 20, V)
    assert set(out.aux) == {"metric/spike_rate/layer0", "metric/spike_rate/layer2"}
    for rate in out.aux.values():
        assert rate.dim() == 0 and not rate.requires_grad
        assert 0.1 < rate.item() < 0.6  # spiking, not dead, at init
    states = tensors(out.state)
    assert len(states) == 4 * 3 and all(t.shape[0] == 3 for t in states)  # batch first


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_two_calls_with_carried_state_equal_one_call(impl):
    model = tiny_model(kda_impl=impl, wm_window=16)  # window < sequence: the cache matters
    x = tokens(2, 45)
    full = model(x)
    a = model(x[:, :19])
    b = model(x[:, 19:], state=detach_state(a.state))
    assert_same(torch.cat([a.logits, b.logits], 1), full.logits)
    for s1, s2 in zip(tensors(b.state), tensors(full.state)):
        if s1.dtype == torch.bool:
            assert torch.equal(s1, s2)
        else:
            assert_same(s1, s2)


def test_chunk_and_recurrent_models_agree_with_grads():
    chunk, rec = tiny_model(kda_impl="chunk"), tiny_model(kda_impl="recurrent")
    rec.load_state_dict(chunk.state_dict())
    x = tokens(2, 21)
    reset = torch.zeros(2, 21, dtype=torch.bool)
    reset[1, 9] = True
    for m in (chunk, rec):
        m.train()
        F.cross_entropy(m(x, reset_mask=reset).logits.flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    assert_same(chunk(x, reset_mask=reset).logits, rec(x, reset_mask=reset).logits)
    for (name, p1), p2 in zip(chunk.named_parameters(), rec.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=ATOL, rtol=RTOL, msg=name)


def test_reset_mask_resets_only_that_stream():
    """With history carried in the state, a reset at p in stream 0 makes its outputs from p
    on identical to running the new document alone from a zero state; stream 1 is untouched."""
    model = tiny_model()
    history, x = tokens(2, 30, seed=2), tokens(2, 25, seed=3)
    state = model(history).state
    for p in (0, 11, 24):  # 24: the last token, inside the conv's carried tail
        reset = torch.zeros(2, 25, dtype=torch.bool)
        reset[0, p] = True
        out = model(x, state=state, reset_mask=reset)
        plain = model(x, state=state)
        alone = model(x[:1, p:])
        assert_same(out.logits[0, p:], alone.logits[0])
        assert_same(out.logits[0, :p], plain.logits[0, :p])
        assert_same(out.logits[1], plain.logits[1])
        assert (out.logits[0, p:] - plain.logits[0, p:]).abs().max() > 1e-3  # the reset did something
        # the state it ends with is the new document's state: the next call agrees too
        nxt = tokens(2, 6, seed=4)
        assert_same(model(nxt, state=out.state).logits[0], model(nxt[:1], state=alone.state).logits[0])


def test_incremental_generation_matches_full_forward():
    model = tiny_model(wm_window=12)
    x = tokens(2, 30)
    full = model(x).logits
    out = model(x[:, :9], state=model.generation_state(2, "cpu"))
    steps = [out.logits]
    for t in range(9, 30):
        out = model(x[:, t:t + 1], state=out.state)
        steps.append(out.logits)
    assert_same(torch.cat(steps, 1), full)
    new = generate(model, [1, 2, 3], max_new_tokens=5, temperature=0.0)
    assert len(new) == 5 and all(0 <= t < V for t in new)


@pytest.mark.parametrize("query_block", [None, 3, 14])
def test_wm_attention_is_a_sliding_window_over_the_document(query_block):
    """Each query sees itself and the W tokens before it, none from an earlier document;
    checked against an explicit per-query softmax, with the queries in blocks of W (the
    default once T > 2W, as here), of 3, or all in one call."""
    torch.manual_seed(0)
    cfg = tiny_cfg(wm_window=5, n_heads=2, n_kv_heads=1)
    layer = WorkingMemoryAttention(cfg).eval()
    layer.query_block = query_block
    x = torch.randn(1, 14, 32)
    reset = torch.zeros(1, 14, dtype=torch.bool)
    reset[0, 9] = True
    y, _ = layer(x, reset=reset)
    q, k, v = layer.qkv_proj(x).split([32, 16, 16], dim=-1)
    q = q.view(14, 2, 16)
    for t in range(14):
        lo = max(t - 5, 9 if t >= 9 else 0)
        att = torch.softmax(q[t] @ k[0, lo:t + 1].T / 4, dim=-1)  # [heads, keys]
        ref = layer.out_proj((att @ v[0, lo:t + 1]).reshape(-1))
        assert_same(y[0, t], ref)
    # split across calls, the cache gives the same answer
    a, st = layer(x[:, :7], reset=reset[:, :7])
    b, _ = layer(x[:, 7:], st, reset[:, 7:])
    assert_same(torch.cat([a, b], 1), y)


@pytest.mark.parametrize("query_block", [None, 3, 14])
def test_wm_attention_with_remembered_keys_is_one_softmax_per_query(query_block):
    """With episodic entries (attend(..., memory=...)), each query's softmax covers its
    window and the entries its per-head mask picks, a remembered key scoring
    q.k / sqrt(D) + log strength + bias[h, t]; checked against an explicit per-query
    softmax, in query blocks of W (the default once T > 2W), of 3, or all in one call,
    values and the gradients of q, k, v, the remembered keys/values and log strengths."""
    torch.manual_seed(0)
    B, H, G, D, T, W, E = 2, 2, 1, 16, 14, 5, 6
    layer = WorkingMemoryAttention(tiny_cfg(wm_window=W, n_heads=H, n_kv_heads=G, d_model=H * D)).eval()
    layer.query_block = query_block
    q, k, v = (torch.randn(B, n, T, D, requires_grad=True) for n in (H, G, G))
    mem_k, mem_v = (torch.randn(B, G, E, D, requires_grad=True) for _ in range(2))
    log_s = torch.randn(B, E, requires_grad=True)
    bias = torch.randn(H, T)
    pick = torch.rand(B, H, T, E) < 0.4
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 9] = True
    y, _, share = layer.attend(q, k, v, None, reset, (mem_k, mem_v, log_s, bias, pick))
    outs, shares = [], []
    for b in range(B):
        for t in range(T):
            lo = max(t - W, 9 if (b == 1 and t >= 9) else 0)
            heads = []
            for h in range(H):
                s_win = q[b, h, t] @ k[b, 0, lo:t + 1].T / D ** 0.5
                s_mem = (q[b, h, t] @ mem_k[b, 0].T / D ** 0.5 + log_s[b] + bias[h, t])[pick[b, h, t]]
                p = torch.softmax(torch.cat([s_win, s_mem]), -1)
                n = t + 1 - lo
                heads.append(p[:n] @ v[b, 0, lo:t + 1] + p[n:] @ mem_v[b, 0][pick[b, h, t]])
                shares.append(p[n:].sum())
            outs.append(layer.out_proj(torch.cat(heads)))
    ref = torch.stack(outs).view(B, T, -1)
    assert_same(y, ref)
    assert_same(share, torch.stack(shares).view(B, T, H).transpose(1, 2))
    w = torch.randn_like(y)
    params = [q, k, v, mem_k, mem_v, log_s]
    for a, b in zip(torch.autograd.grad((y * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        assert_same(a, b)


def test_loss_decreases_on_real_text():
    if not CORPUS.exists():
        pytest.skip(f"corpus file not found: {CORPUS}")
    data = torch.tensor(list(CORPUS.read_bytes()[:4 * 65]), dtype=torch.long) % 256
    batch = data.view(4, 65)
    torch.manual_seed(0)
    model = HatchlingLM(tiny_cfg(d_model=64, n_heads=4, n_kv_heads=2), 256).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(256) at init
    assert losses[-1] < losses[0] - 1.5, losses
    assert all(r.item() > 0.01 for r in out.aux.values())  # still spiking after training
