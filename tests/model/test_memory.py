"""Procedural and episodic memories (model/procedural.py, model/episodic.py) in HatchlingLM:
state layout, rails, resets (hard and lifelong), commits that change reads, the episodic
read against a naive reference, gradients into the neuromodulators, exact save/load, the
phase-A model when off, split-call equivalence."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, build_model, detach_state
from model.episodic import COMMITTED as EM_COMMITTED, EpisodicMemory
from model.memory import SpanGrid
from model.procedural import COMMITTED as PM_COMMITTED, ProceduralMemory
from tests.model.helpers import tensors

V = 61
P = 8
ATOL = RTOL = 1e-4


def mem_cfg(**kw):
    base = dict(arch="hatchling", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, global_every=2, wm_window=16,
                chunk_size=8, conv_size=3, decay_rank=8, pm_enabled=True, em_enabled=True, plasticity_span=P,
                pm_slots=4, em_slots=6, em_topk=2, pm_commit_threshold=0.0)
    base.update(kw)
    return ModelConfig(**base)


def mem_model(seed=0, live=True, **kw):
    """A tiny memory model (layer 0 Spike-KDA, layer 1 WM attention with the episodic
    memory). A fresh PM starts silent (zero output projection); live=True gives it a random
    one, as training would, so that what it holds shows in the logits."""
    torch.manual_seed(seed)
    model = build_model(mem_cfg(**kw), V).eval()
    if live:
        with torch.no_grad():
            for block in model.blocks:
                if block.pm is not None:
                    block.pm.out_proj.weight.normal_(0.0, 0.1)
    return model


def em_layers(state):
    return [layer["em"] for layer in state["layers"] if "em" in layer]


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def memories(state):
    return [{k: v for k, v in layer.items() if k in ("pm", "em")} for layer in state["layers"]]


def assert_same(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def assert_states_same(a, b):
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        if x.dtype in (torch.bool, torch.long):
            assert torch.equal(x, y)
        else:
            assert_same(x, y)


def test_state_layout_shapes_and_float32():
    model = mem_model()
    B, r, M, d, c, m = 3, 4, 6, 32, 2, 16  # m: the WM layer's keys, 1 kv head x 16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the memories stay float32 under autocast
        out = model(tokens(B, 21))
    assert out.state["clock"].dtype == torch.long and out.state["clock"].tolist() == [21] * B
    assert ["em" in layer for layer in out.state["layers"]] == [False, True]  # EM lives in WM blocks
    for layer in out.state["layers"]:
        pm, em = layer["pm"], layer.get("em", {})
        shapes = {"keys": (B, r, d), "values": (B, r, d), "strength": (B, r), "elig_k": (B, r, d),
                  "elig_v": (B, r, d), "prev": (B, d), "err_sum": (B,), "count": (B,)}
        assert {k: tuple(v.shape) for k, v in pm.items()} == shapes
        assert all(t.dtype == torch.float32 for t in tensors([pm, em]))
    assert {k: tuple(v.shape) for k, v in em_layers(out.state)[0].items()} == {
        "keys": (B, M, m), "values": (B, M, m), "strength": (B, M), "age": (B, M), "cand_keys": (B, c, m),
        "cand_values": (B, c, m), "cand_salience": (B, c), "cand_score": (B, c), "cand_age": (B, c),
        "cand_live": (B, c), "doc_age": (B,)}
    metrics = [k for k in out.aux if k.startswith("metric/pm_") or k.startswith("metric/em_")]
    assert "metric/pm_commit_rate/layer0" in metrics and "metric/em_write_rate/layer1" in metrics
    assert "metric/em_read_share/layer1" in metrics and "metric/em_write_rate/layer0" not in metrics
    assert all(out.aux[k].dim() == 0 and not out.aux[k].requires_grad for k in metrics)
    assert all(t.shape[0] == B for t in tensors(out.state))  # batch first
    assert out.aux["metric/pm_commit_rate/layer0"] > 0 and out.aux["metric/em_write_rate/layer1"] > 0


def test_disabled_memories_are_exactly_the_phase_a_model():
    on = mem_model()
    off = mem_model(pm_enabled=False, em_enabled=False, lifelong=True)
    assert not any(".pm." in k or ".em." in k for k in off.state_dict())
    backbone = {k: v for k, v in on.state_dict().items() if ".pm." not in k and ".em." not in k}
    off.load_state_dict(backbone, strict=True)  # nothing more, nothing less
    out = off(tokens(2, 20))
    assert set(out.state) == {"layers"} and all(set(s) <= {"S", "membrane", "conv", "k", "v", "valid"}
                                                for s in out.state["layers"])
    assert not any("pm_" in k or "em_" in k for k in out.aux)
    plain = mem_model(pm_enabled=False, em_enabled=False)
    plain.load_state_dict(backbone)
    assert_same(out.logits, plain(tokens(2, 20)).logits)



def test_memories_switched_off_is_the_backbone_and_is_undone_on_exit():
    on = mem_model()
    plain = mem_model(pm_enabled=False, em_enabled=False)
    plain.load_state_dict({k: v for k, v in on.state_dict().items() if ".pm." not in k and ".em." not in k})
    x = tokens(2, 40)
    with_memories = on(x).logits
    with on.memories_switched_off() as off:
        out = off(x)
        assert_same(out.logits, plain(x).logits)
        assert not any("pm_" in k or "em_" in k for k in out.aux)
    assert_same(on(x).logits, with_memories)  # the memories are back
    assert not torch.allclose(with_memories, plain(x).logits, atol=1e-4)  # and they mattered

def test_fresh_memories_change_nothing_before_a_token_leaves_the_window():
    """Same seed, memories on or off: the same backbone weights. A fresh PM reads through a
    zero projection and EM reads only tokens that have left the WM window, so with a
    window longer than the stream the logits are the phase-A logits (while PM commits and
    EM writes). With a shorter window, EM extends it: the first tokens that could see a
    remembered token beyond their window are where the logits start to differ."""
    x = tokens(2, 3 * P + 5)
    off = mem_model(pm_enabled=False, em_enabled=False, wm_window=64)
    on = mem_model(live=False, wm_window=64)
    on_backbone = {k: v for k, v in on.state_dict().items() if ".pm." not in k and ".em." not in k}
    assert all(torch.equal(on_backbone[k], v) for k, v in off.state_dict().items())
    out = on(x)
    assert_same(out.logits, off(x).logits)  # (not bitwise: with EM the attention runs as a wider SDPA)
    assert out.aux["metric/pm_commit_rate/layer0"] > 0 and out.aux["metric/em_write_rate/layer1"] > 0
    assert out.aux["metric/em_read_share/layer1"] == 0
    short_off, short_on = mem_model(pm_enabled=False, em_enabled=False), mem_model(live=False)
    a, b = short_off(x).logits, short_on(x).logits
    # the first token (position 0) leaves the window (16) of query 17 at the earliest
    assert_same(a[:, :17], b[:, :17])
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("em_keys, first_read", [("own", P), ("attention", None)])
def test_own_memory_reads_its_entries_inside_the_window_too(em_keys, first_read):
    """With em_keys "own" the memory's read is not the window's, so an entry is readable
    as soon as the memory holds it (from the span after its token), in the window or not;
    with the attention's keys, only once its token has left the window."""
    x = tokens(2, 3 * P + 5)
    model = mem_model(pm_enabled=False, wm_window=64, em_keys=em_keys)
    block, seen = model.blocks[1], {}
    read_mask = block.em.read_mask
    block.em.read_mask = lambda *a, **kw: seen.setdefault("mask", read_mask(*a, **kw))
    model(x)
    reads = seen["mask"].any(-1).any(1)  # [B, T]: queries that read an entry
    if first_read is None:  # the window (64) is longer than the stream
        assert not reads.any()
    else:
        assert not reads[:, :first_read].any() and reads[:, first_read:].all()


def test_memories_are_causal():
    """A commit or write at a span end only ever serves later tokens: changing the tokens
    from t on leaves every logit before t unchanged, at and around span ends."""
    model = mem_model()
    x = tokens(2, 4 * P + 3)
    base = model(x).logits
    for t in (P - 1, P, P + 1, 3 * P + 1):
        y = x.clone()
        y[:, t:] = (y[:, t:] + 7) % V
        assert torch.equal(model(y).logits[:, :t], base[:, :t]), t


@pytest.mark.parametrize("em_keys", ["attention", "own"])
@pytest.mark.parametrize("lifelong", [False, True])
def test_split_calls_equal_one_call(lifelong, em_keys):
    """Any cut of the stream into calls (spans straddling calls, T = 1 decoding, resets)
    gives the same logits and state as one call (with em_keys "own", a call's first token
    is keyed by the previous call's last; with it, as the presets ship it, a full memory's
    choice of the slot to replace discounted by age)."""
    own = dict(em_age_decay=0.7, em_slots=2) if em_keys == "own" else {}  # 2 slots: full, and replacing
    model = mem_model(lifelong=lifelong, em_keys=em_keys, **own)
    x = tokens(2, 45)
    reset = torch.zeros(2, 45, dtype=torch.bool)
    reset[0, 13], reset[1, 30] = True, True
    full = model(x, reset_mask=reset)
    logits, state = [], None
    for lo, hi in ((0, 5), (5, 19), (19, 20), (20, 21), (21, 45)):
        out = model(x[:, lo:hi], state=detach_state(state), reset_mask=reset[:, lo:hi])
        logits.append(out.logits)
        state = out.state
    assert_same(torch.cat(logits, 1), full.logits)
    assert_states_same(state, full.state)


@pytest.mark.parametrize("em_keys", ["attention", "own"])
def test_hard_reset_touches_only_the_stream_whose_document_ended(em_keys):
    """History fills the memories; a reset at p in stream 0 makes its outputs from p
    identical to the new document run alone from an empty state; stream 1 is untouched
    (with em_keys "own", the document's first token is keyed by nothing before it)."""
    model = mem_model(em_keys=em_keys)
    history, x = tokens(2, 37, seed=2), tokens(2, 25, seed=3)
    state = model(history).state
    assert all(em["strength"].sum() > 0 for em in em_layers(state))
    plain = model(x, state=state)
    for p in (3, 14, 24):  # at a span start (37 + 3 = 40), inside a span, the last token
        reset = torch.zeros(2, 25, dtype=torch.bool)
        reset[0, p] = True
        out = model(x, state=state, reset_mask=reset)
        fresh = model.generation_state(1, "cpu")
        fresh["clock"] += 37 + p  # same stream position, so the same spans
        first = torch.zeros(1, 25 - p, dtype=torch.bool)
        first[0, 0] = True  # the document's first token
        alone = model(x[:1, p:], state=fresh, reset_mask=first)
        assert_same(out.logits[0, p:], alone.logits[0])
        assert_same(out.logits[0, :p], plain.logits[0, :p])
        assert_same(out.logits[1], plain.logits[1])
        for a, b in zip(tensors(out.state), tensors(plain.state)):
            assert_same(a[1], b[1])  # stream 1's state is exactly the no-reset state
        for a, b in zip(tensors(memories(out.state)), tensors(memories(alone.state))):
            assert_same(a[:1], b)  # stream 0's memories end where the document alone ends
        if p == 14:  # and the next call agrees too
            nxt = tokens(2, 2 * P, seed=4)
            assert_same(model(nxt, state=out.state).logits[0], model(nxt[:1], state=alone.state).logits[0])


def test_soft_reset_keeps_committed_memories_and_resets_the_rest():
    """Lifelong: after a reset, stream 0 behaves like the new document run from a state
    holding only the committed PM/EM contents (mixers, membranes, eligibility, span
    accumulators all reset); the hard reset differs because it forgets the contents."""
    model = mem_model(lifelong=True)
    history, x = tokens(2, 40, seed=2), tokens(2, 20, seed=3)
    state = model(history).state
    p = 5
    reset = torch.zeros(2, 20, dtype=torch.bool)
    reset[0, p] = True
    out = model(x, state=state, reset_mask=reset)
    seeded = model.state_from_memory(model.memory_state(state), 1, "cpu")
    seeded["clock"] += 40 + p
    for em in em_layers(seeded):  # the stored tokens are p tokens older at the reset
        em["age"] += p * (em["strength"] > 0)
    first = torch.zeros(1, 20 - p, dtype=torch.bool)
    first[0, 0] = True
    alone = model(x[:1, p:], state=seeded, reset_mask=first)
    assert_same(out.logits[0, p:], alone.logits[0])
    for a, b in zip(tensors(memories(out.state)), tensors(memories(alone.state))):
        assert_same(a[:1], b)
    # a reset after the call's last span end: the committed contents are exactly as before it
    late = torch.zeros(2, 20, dtype=torch.bool)
    late[0, 17] = True  # stream position 57; the last span ended at 56
    kept, unreset = (model.memory_state(model(x, state=state, reset_mask=m).state) for m in (late, None))
    assert all(torch.equal(a, b) for a, b in zip(tensors(kept), tensors(unreset)))
    assert all(t.abs().sum() > 0 for t in tensors(kept))
    model.lifelong = False
    hard = model(x, state=state, reset_mask=reset)
    assert (hard.logits[0, p:] - out.logits[0, p:]).abs().max() > 1e-4  # the kept memories are read


def test_a_commit_changes_the_next_read():
    """Empty memory reads zero; after the first span end, reads in the next span see what
    was committed/written. With the gate shut (PM) / threshold unreachable (EM), nothing is."""
    torch.manual_seed(0)
    cfg = mem_cfg()
    h = torch.randn(2, 2 * P, 32)
    grid = SpanGrid(2 * P, P, 0, None, "cpu")
    for threshold, expect_read in ((0.0, True), (1e9, False)):
        pm = ProceduralMemory(ModelConfig(**{**cfg.__dict__, "pm_commit_threshold": threshold}))
        y, state, stats, _ = pm(h, None, grid)
        assert y[:, :P].abs().max() == 0  # nothing committed before the first span end
        assert (y[:, P:].abs().max() > 0) == expect_read
        assert stats["pm_commit_rate"] == float(expect_read)
    # EM: with writes impossible the model is exactly the memory-less one; with writes, the
    # logits differ once a remembered token is beyond a query's window
    x = tokens(2, 5 * P)
    off = mem_model(pm_enabled=False, em_enabled=False)
    for threshold, expect_read in ((0.0, True), (1e9, False)):
        on = mem_model(pm_enabled=False, em_novelty_threshold=threshold)
        out = on(x)
        assert (em_layers(out.state)[0]["strength"].sum() > 0) == expect_read
        assert (out.aux["metric/em_read_share/layer1"] > 0) == expect_read
        assert ((out.logits - off(x).logits).abs().max() > 1e-3) == expect_read


def test_episodic_writes_keep_the_most_salient_tokens_own_keys_and_values():
    """At a span end the memory stores the span's c most salient tokens, with exactly the
    keys/values the WM attention computed for them and their age; a span cut by a call
    boundary keeps its best candidates in the state and picks the same tokens."""
    torch.manual_seed(0)
    cfg = mem_cfg(em_slots=8, em_writes_per_span=2, em_novelty_threshold=-1.0)  # write every candidate
    em = EpisodicMemory(cfg)
    B, T, G, D = 2, 2 * P, 1, 16
    h, k, v = torch.randn(B, T, 32), torch.randn(B, G, T, D), torch.randn(B, G, T, D)
    with torch.no_grad():
        em.salience.weight.zero_()
        em.salience.weight[0, 0] = 1.0  # salience = h[..., 0]
    chosen = [[1, 6, 9, 14], [3, 4, 10, 15]]  # per stream: two tokens of span 0, two of span 1
    for b, picks in enumerate(chosen):
        h[b, picks, 0] = 50.0 + torch.arange(4.0)  # distinct: the write order is by salience
    _, state, stats = em.write(h, k, v, None, SpanGrid(T, P, 0, None, "cpu"))
    # split at 5 (inside span 0) and 11 (inside span 1): the same memory at the end
    st = None
    for lo, hi in ((0, 5), (5, 11), (11, T)):
        _, st, _ = em.write(h[:, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], st, SpanGrid(hi - lo, P, lo % P, None, "cpu"))
    for b in range(B):
        want = chosen[b]
        filled = state["strength"][b] > 0
        assert filled.sum() == 4 and stats["em_write_rate"] == 1.0
        ages = state["age"][b][filled]
        got = sorted((T - ages).round().long().tolist())
        assert got == want
        for pos in want:
            j = ((T - state["age"][b]) - pos).abs().argmin()
            assert torch.equal(state["keys"][b, j], k[b, :, pos].flatten())
            assert torch.equal(state["values"][b, j], v[b, :, pos].flatten())
        for key in ("keys", "values", "strength", "age"):
            torch.testing.assert_close(st[key][b], state[key][b])



def test_a_full_memory_keeps_its_strong_entries_against_weaker_tokens():
    """Once every slot is filled, a candidate replaces the weakest slot only when it is
    stronger: a stream of ordinary tokens does not wear away what was salient."""
    torch.manual_seed(0)
    em = EpisodicMemory(mem_cfg(em_slots=4, em_writes_per_span=1, em_novelty_threshold=-1.0))
    with torch.no_grad():
        em.salience.weight.zero_()
        em.salience.weight[0, 0] = 1.0  # salience = sigmoid(h[..., 0])
    B, n, D = 1, 12, 16
    T = n * P
    h, k = torch.randn(B, T, 32), torch.randn(B, 1, T, D)
    h[..., 0] = -2.0  # ordinary tokens
    strong = [s * P + 3 for s in range(4)]  # one salient token in each of the first four spans
    h[0, strong, 0] = 6.0
    _, state, stats = em.write(h, k, k.clone(), None, SpanGrid(T, P, 0, None, "cpu"))
    kept = sorted((T - state["age"][0]).round().long().tolist())
    assert kept == strong  # the eight later spans' best tokens were weaker: nothing replaced
    assert stats["em_write_rate"] == 4 / n


@pytest.mark.parametrize("age_decay", [1.0, 0.9])
def test_a_full_memory_gives_way_to_new_entries_of_like_strength_only_with_an_age_discount(age_decay):
    """One salient token a span, each a little less salient than the one before, into 4
    slots: by strength alone (em_age_decay 1) the first four stay for good; discounted by
    age (0.9 a span) old entries give way and the memory holds the last four. The read
    strengths are the entries' own, undiscounted."""
    torch.manual_seed(0)
    em = EpisodicMemory(mem_cfg(em_slots=4, em_writes_per_span=1, em_novelty_threshold=-1.0, em_decay=1.0,
                                em_age_decay=age_decay))
    with torch.no_grad():
        em.salience.weight.zero_()
        em.salience.weight[0, 0] = 1.0  # salience = sigmoid(h[..., 0])
        em.salience.bias.zero_()
        em.neuromod.mlp[-1].weight.zero_()  # a constant neuromodulator strength: salience alone ranks
    B, n, D = 1, 12, 16
    T = n * P
    h, k = torch.randn(B, T, 32), torch.randn(B, 1, T, D)
    h[..., 0] = -4.0  # ordinary tokens
    salient = [s * P + 3 for s in range(n)]
    h[0, salient, 0] = 3.0 - 0.1 * torch.arange(float(n))  # like strength, each a little weaker
    _, state, _ = em.write(h, k, k.clone(), None, SpanGrid(T, P, 0, None, "cpu"))
    kept = sorted((T - state["age"][0]).round().long().tolist())
    assert kept == (salient[:4] if age_decay == 1.0 else salient[-4:])
    strength = em.s_max * em.neuromod(torch.zeros(1, 4))[1] * torch.sigmoid(h[0, kept, 0])
    torch.testing.assert_close(state["strength"][0].sort().values, strength.sort().values)


def test_salience_learns_what_later_queries_look_up():
    """The salience loss's target is the attention a token gets from queries at least
    MIN_LOOKUP tokens on: a token looked up from afar is salient, and the loss trains the
    salience head towards it."""
    from model.episodic import MIN_LOOKUP

    torch.manual_seed(0)
    em = EpisodicMemory(mem_cfg(em_slots=8))
    B, H, T, D = 1, 2, 24, 16
    q, k = torch.zeros(B, H, T, D), torch.zeros(B, 1, T, D)
    k[0, 0, 5, 0] = 30.0  # token 5's key ...
    q[0, 0, 15, 0] = 1.0  # ... is what query 15 looks up (10 tokens on)
    k[0, 0, 8, 1] = 30.0
    q[0, 1, 8 + MIN_LOOKUP - 1, 1] = 1.0  # token 8 is read only from nearby
    h = torch.randn(B, T, 32, requires_grad=True)
    opt = torch.optim.SGD(em.salience.parameters(), lr=0.5)
    first = em.salience_loss(h, q, k, None)
    for _ in range(200):
        opt.zero_grad()
        em.salience_loss(h.detach(), q, k, None).backward()
        opt.step()
    assert em.salience_loss(h, q, k, None) < first
    z = em.salience(h.detach()).squeeze(-1)[0]
    assert z[5] > 2.0 and z[5] == z.max()  # the looked-up token stands out
    assert torch.sigmoid(z[8]) < 0.5  # nearby reads do not count

@pytest.mark.parametrize("em_keys", ["attention", "own"])
def test_salience_counts_lookups_beyond_the_window_only_with_the_memorys_own_keys(em_keys):
    """A token looked up 20 tokens on, past the window (16): with the attention's keys
    the window never makes that lookup, so the token is not salient; with the memory's
    own keys every later query of the call counts, and it is."""
    torch.manual_seed(0)
    em = EpisodicMemory(mem_cfg(em_slots=8, em_keys=em_keys))
    B, H, T, D = 1, 2, 32, 16
    q, k = torch.zeros(B, H, T, D), torch.zeros(B, 1, T, D)
    k[0, 0, 5, 0] = 30.0
    q[0, 0, 25, 0] = 1.0  # query 25 looks up token 5, 20 tokens back
    h = torch.randn(B, T, 32)
    opt = torch.optim.SGD(em.salience.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        em.salience_loss(h, q, k, None).backward()
        opt.step()
    z = em.salience(h).squeeze(-1)[0]
    if em_keys == "own":
        assert z[5] > 2.0 and z[5] == z.max()
    else:
        assert torch.sigmoid(z[5]) < 0.5


def test_own_salience_counts_a_lookup_only_when_the_remembered_token_comes_next():
    """With the call's token ids, a token is salient for the memory's own keys when a later
    query looks it up and the token after that query is the remembered token (the read
    would have told what came next); a token looked up just as sharply but not followed
    again (MQAR's filler after a value, looked up by the value's second occurrence) is not."""
    torch.manual_seed(0)
    em = EpisodicMemory(mem_cfg(em_slots=8, em_keys="own"))
    B, H, T, D = 1, 2, 32, 16
    q, k = torch.zeros(B, H, T, D), torch.zeros(B, 1, T, D)
    k[0, 0, 5, 0] = 30.0
    q[0, 0, 25, 0] = 1.0  # query 25 looks up token 5 ...
    k[0, 0, 10, 1] = 30.0
    q[0, 1, 20, 1] = 1.0  # ... and query 20 token 10
    tokens = torch.arange(T)[None] + 100
    tokens[0, 26] = tokens[0, 5]  # after query 25 comes token 5 again; after query 20, not token 10
    h = torch.randn(B, T, 32)
    opt = torch.optim.SGD(em.salience.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        em.salience_loss(h, q, k, None, tokens).backward()
        opt.step()
    z = em.salience(h).squeeze(-1)[0]
    assert z[5] > 2.0 and z[5] == z.max()
    assert torch.sigmoid(z[10]) < 0.5


@pytest.mark.parametrize("em_keys", ["attention", "own"])
def test_salience_target_by_query_blocks_equals_the_whole_square(monkeypatch, em_keys):
    """The target is computed a block of queries at a time (memory): any block size gives
    the same loss, documents (reset) and the window included (with own keys, the token ids'
    next-token check too)."""
    import model.episodic as episodic

    torch.manual_seed(1)
    em = EpisodicMemory(mem_cfg(em_slots=8, em_keys=em_keys))
    B, H, T, D = 2, 4, 37, 16
    q, k, h = torch.randn(B, H, T, D) * 2, torch.randn(B, 2, T, D) * 2, torch.randn(B, T, 32)
    ids = torch.randint(0, 4, (B, T)) if em_keys == "own" else None  # few ids: the check often holds
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 11] = reset[1, 30] = True
    whole = em.salience_loss(h, q, k, reset, ids)
    for block in (1, 5, 16):
        monkeypatch.setattr(episodic, "SALIENCE_QUERY_BLOCK", block)
        torch.testing.assert_close(em.salience_loss(h, q, k, reset, ids), whole)


def test_episodic_novelty_sees_past_the_component_all_keys_share():
    """A trained attention's keys share a large component (it shifts all of a query's
    scores alike, so nothing trains it away): raw cosines are all ~1. Novelty is measured
    about the stored keys' mean, so distinct tokens are still written and only a copy of
    a stored key is turned away."""
    torch.manual_seed(0)
    em = EpisodicMemory(mem_cfg(em_slots=16, em_writes_per_span=1))
    with torch.no_grad():
        em.neuromod.mlp[-1].weight[0].zero_()  # the learned novelty term: 0 (its init is the bias, 0)
    n, D = 8, 16
    common = torch.randn(D) * 20.0
    k = (common + torch.randn(1, 1, n * P, D)).contiguous()
    assert F.cosine_similarity(k[0, 0, :, None], k[0, 0, None, :], dim=-1).min() > 0.9
    h = torch.randn(1, n * P, 32)
    _, state, stats = em.write(h, k, k.clone(), None, SpanGrid(n * P, P, 0, None, "cpu"))
    assert stats["em_write_rate"] == 1.0 and stats["em_novelty"] > 0.3
    # tokens whose keys are all copies of stored keys: nothing new to store
    stored = state["keys"][0][state["strength"][0] > 0]
    copies = stored[torch.arange(n * P) % len(stored)].view(1, 1, n * P, D)
    _, _, again = em.write(h, copies, copies.clone(), state, SpanGrid(n * P, P, 0, None, "cpu"))
    assert again["em_write_rate"] == 0.0


def test_episodic_read_is_one_softmax_over_window_and_memory():
    """The WM attention with remembered keys equals a naive per-query softmax over the
    window's keys and the entries read_mask picks, each scored q.k / sqrt(D) + log of its
    strength at the query's span + the head's log weight; the memory's share of attention
    is returned too."""
    torch.manual_seed(0)
    model = mem_model(pm_enabled=False, n_heads=4, n_kv_heads=2, em_writes_per_span=3)
    block = model.blocks[1]
    with torch.no_grad():
        block.em.log_weight.copy_(torch.randn(4))
    state = model(tokens(2, 3 * P + 2)).state
    seen = {}
    attend = block.mixer.attend

    def spy(q, k, v, st, reset, memory):
        seen.update(q=q, k=k, v=v, state=st, memory=memory)
        seen["out"] = attend(q, k, v, st, reset, memory)
        return seen["out"]

    block.mixer.attend = spy
    model(tokens(2, 2 * P + 3, seed=5), state=state)
    q, k, v, st = seen["q"], seen["k"], seen["v"], seen["state"]
    mem_k, mem_v, log_strength, bias, mask = seen["memory"]
    B, H, T, D = q.shape
    G, W = k.shape[1], block.mixer.window
    keys, values = torch.cat([st["k"], k], 2), torch.cat([st["v"], v], 2)
    out, share = torch.zeros(B, H, T, D), torch.zeros(B, H, T)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(T):
                scores, vals, is_mem = [], [], []
                for j in range(W + T):
                    if 0 <= t - (j - W) <= W and (j >= W or st["valid"][b, j]):
                        scores.append(q[b, h, t] @ keys[b, g, j] / math.sqrt(D))
                        vals.append(values[b, g, j])
                        is_mem.append(0.0)
                for e in mask[b, h, t].nonzero().flatten().tolist():
                    scores.append(q[b, h, t] @ mem_k[b, g, e] / math.sqrt(D) + log_strength[b, e] + bias[h, t])
                    vals.append(mem_v[b, g, e])
                    is_mem.append(1.0)
                p = torch.softmax(torch.stack(scores), 0)
                out[b, h, t] = p @ torch.stack(vals)
                share[b, h, t] = p @ torch.tensor(is_mem)
    assert mask.sum() > 0 and (mask.sum(-1) <= block.em.topk).all()
    y, _, got_share = seen["out"]
    torch.testing.assert_close(y, block.mixer.out_proj(out.transpose(1, 2).reshape(B, T, H * D)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_share, share, atol=1e-5, rtol=1e-4)
    assert share.max() > 0.01

def test_own_memory_reads_what_followed_the_querys_token_with_its_own_softmax():
    """em_keys "own": a remembered token is stored under key_proj(u) of the token before it
    (u = h + its normalised embedding) and value_proj(h) of itself; a query picks entries
    with query_proj(u) and reads them in
    a softmax of its own (the picked entries and a null entry scored 0), through the
    memory's out_proj added to the attention's output. Checked against a naive per-query
    softmax; the attention itself reads no entry."""
    torch.manual_seed(0)
    model = mem_model(pm_enabled=False, n_heads=4, n_kv_heads=2, em_writes_per_span=3, em_keys="own")
    block, em = model.blocks[1], model.blocks[1].em
    with torch.no_grad():
        em.log_weight.copy_(torch.randn(4))
        em.out_proj.weight.normal_(0.0, 0.2)  # a trained memory's output, not the silent start
    state = model(tokens(2, 3 * P + 2)).state
    seen = {}
    read, attend = em.read, block.mixer.attend
    em.read = lambda q, entries, mask, bias: seen.update(q=q, entries=entries, mask=mask, bias=bias,
                                                         out=read(q, entries, mask, bias)) or seen["out"]
    block.mixer.attend = lambda *a, **kw: seen.update(memory=a[5:] or kw.get("memory")) or attend(*a, **kw)
    block.norm1.register_forward_hook(lambda module, args, out: seen.update(h=out))
    model.embed.register_forward_hook(lambda module, args, out: seen.update(embedded=out))
    model(tokens(2, 2 * P + 3, seed=5), state=state)
    assert not seen["memory"]  # the attention reads no entry
    h, q, entries, mask, bias = seen["h"], seen["q"], seen["entries"], seen["mask"], seen["bias"]
    B, H, T, D = q.shape
    G = 2
    u = h + F.rms_norm(seen["embedded"], (h.shape[-1],))  # the block's input and its token
    torch.testing.assert_close(q, em.query_proj(u).view(B, T, H, D).transpose(1, 2))
    # the last span's candidates (span 0 may hold ones carried from the previous call): each is
    # key_proj of u of the token before a token of the call, and value_proj of h of that token
    before, own_v = em.key_proj(u[:, :-1]), em.value_proj(h[:, 1:])
    for b in range(B):
        for key, value in zip(entries["keys"][b, -em.per_span:], entries["values"][b, -em.per_span:]):
            j = (before[b] - key).abs().amax(-1).argmin()
            assert (before[b, j] - key).abs().max() < 1e-5 and (own_v[b, j] - value).abs().max() < 1e-5
    keys = entries["keys"].view(B, -1, G, D)
    values = entries["values"].view(B, -1, G, D)
    out = torch.zeros(B, T, H, D)
    for b in range(B):
        for hh in range(H):
            g = hh // (H // G)
            for t in range(T):
                picked = mask[b, hh, t].nonzero().flatten()
                scores = [torch.zeros(())] + [q[b, hh, t] @ keys[b, e, g] / math.sqrt(D) + entries["log_strength"][b, e]
                                               + bias[hh, t] for e in picked.tolist()]
                p = torch.softmax(torch.stack(scores), 0)[1:]
                out[b, t, hh] = p @ values[b, picked, g] if len(picked) else 0.0
    assert mask.sum() > 0 and (mask.sum(-1) <= em.topk).all()
    y, share = seen["out"]
    torch.testing.assert_close(y, em.out_proj(out.flatten(2)), atol=1e-5, rtol=1e-4)
    assert share.max() > 0.01


@pytest.mark.parametrize("em_keys", ["attention", "own"])
def test_gradients_reach_the_neuromodulator_heads(em_keys):
    model = mem_model(em_keys=em_keys).train()
    if em_keys == "own":  # its output starts silent (zero, like PM's): a trained one, as live=True gives PM
        with torch.no_grad():
            model.blocks[1].em.out_proj.weight.normal_(0.0, 0.1)
    x = tokens(2, 5 * P + 3)  # long enough for remembered tokens to leave the window (16)
    out = model(x)
    F.cross_entropy(out.logits.flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    for i, block in enumerate(model.blocks):
        heads = {"pm.mlp": block.pm.neuromod.mlp[-1].weight, "pm.slot": block.pm.neuromod.slot_score.weight,
                 "pm.pre": block.pm.pre.weight, "pm.post": block.pm.post.weight}
        if block.em is not None:
            heads.update({"em.mlp": block.em.neuromod.mlp[-1].weight, "em.salience": block.em.salience.weight,
                          "em.log_weight": block.em.log_weight})
            if em_keys == "own":
                heads.update({f"em.{name}": getattr(block.em, name).weight
                              for name in ("query_proj", "key_proj", "value_proj", "out_proj")})
        for name, p in heads.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i}: no gradient into {name}"


def test_rails_hold_under_adversarial_inputs():
    """Huge activations and a neuromodulator pushed to its extremes: strengths stay within
    their caps and budget, PM keys/values unit (or empty), traces bounded, reads finite.
    (EM stores the WM layer's keys of its RMS-normalised input, bounded by the weights; its
    salience sees the raw huge input here.)"""
    torch.manual_seed(0)
    cfg = mem_cfg(pm_budget=1.5, pm_strength_max=1.0, pm_commit_cap=5.0, em_strength_max=0.7)
    pm, em = ProceduralMemory(cfg), EpisodicMemory(cfg)
    with torch.no_grad():
        pm.neuromod.mlp[-1].bias.copy_(torch.tensor([0.0, -50.0, 50.0]))  # never decay, full strength
        em.neuromod.mlp[-1].bias.copy_(torch.tensor([50.0, 50.0]))  # always write, full strength
    T = 9 * P + 3
    pm_state = em_state = None
    for scale in (1e4, 1e8, 1e30):
        h = torch.randn(2, T, 32) * scale
        h[0, ::7] *= -1e6
        grid = SpanGrid(T, P, 0, None, "cpu")
        y_pm, pm_state, _, _ = pm(h, pm_state, grid)
        k, v = torch.randn(2, 1, T, 16), torch.randn(2, 1, T, 16)
        entries, em_state, em_stats = em.write(h, k, v, em_state, grid)
        mask = em.read_mask(torch.randn(2, 2, T, 16), entries, grid)
        assert torch.isfinite(y_pm).all() and all(torch.isfinite(t.float()).all() for t in tensors([entries, em_stats]))
        assert mask.any() and (mask.sum(-1) <= em.topk).all()
        a = pm_state["strength"]
        assert (a >= 0).all() and (a <= 1.0 + 1e-6).all() and (a.sum(-1) <= 1.5 + 1e-5).all()
        assert a.sum() > 1.0  # the rails bind: commits happened
        for key in ("keys", "values"):
            norms = pm_state[key].norm(dim=-1)
            assert ((norms - 1).abs() < 1e-4).logical_or(norms == 0).all()
        for key in ("elig_k", "elig_v"):
            assert (pm_state[key].norm(dim=-1) <= 1 / (1 - cfg.pm_rho) + 1e-3).all()
        S = em_state["strength"]
        assert (S >= 0).all() and (S <= 0.7 + 1e-6).all() and (S > 0).any()
        # the read itself is bounded by the strength budget (before the output projection)
        read = ProceduralMemory.read(F.normalize(torch.randn(2, 5, 32), dim=-1), pm_state["keys"],
                                     pm_state["values"], a)
        assert (read.norm(dim=-1) <= 1.5 + 1e-4).all()
    model = mem_model()
    with torch.no_grad():
        model.embed.weight.mul_(1e6)
    out = model(tokens(2, 30))
    assert torch.isfinite(out.logits).all() and all(torch.isfinite(t.float()).all() for t in tensors(out.state))


def test_runtime_state_save_load_roundtrip_is_exact():
    model = mem_model()
    x = tokens(2, 30)
    state = detach_state(model(x[:, :19]).state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    ta, tb = tensors(state), tensors(loaded)
    assert len(ta) == len(tb) and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ta, tb))
    assert torch.equal(model(x[:, 19:], state=state).logits, model(x[:, 19:], state=loaded).logits)
    # the committed contents alone (what a lifelong run keeps) round-trip too
    memory = model.memory_state(state)
    buf = io.BytesIO()
    torch.save(memory, buf)
    buf.seek(0)
    memory2 = torch.load(buf, weights_only=True)
    seeded = model.state_from_memory(memory2, 4, "cpu")  # a new run with more streams: b gets b mod 2
    for layer_new, layer_old in zip(seeded["layers"], state["layers"]):
        for name, keys in (("pm", PM_COMMITTED), ("em", EM_COMMITTED)):
            assert set(keys) >= {"keys", "values", "strength"}
            for k in keys if name in layer_old else ():
                assert torch.equal(layer_new[name][k], layer_old[name][k][[0, 1, 0, 1]])
        assert layer_new["pm"]["elig_k"].abs().sum() == 0
    assert em_layers(seeded)[0]["cand_live"].abs().sum() == 0 and em_layers(state)[0]["age"].abs().sum() > 0


def test_episodic_memory_needs_a_wm_block():
    """EM lives in the WM attention blocks: a stack without one is a preset error, not a
    memory that silently does nothing."""
    assert mem_cfg().check() == []
    problems = dict(mem_cfg(global_every=3).check())
    assert "WM attention blocks" in problems["global_every"]
    assert "global_every" not in dict(mem_cfg(global_every=3, em_enabled=False).check())
