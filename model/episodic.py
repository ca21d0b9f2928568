"""Episodic memory (EM): remembered tokens of the stream, read by the WM attention as if
they were still in its window.

A WM attention block sees the last W tokens. Its EM keeps, per stream, M of the tokens
that scrolled out: their attention keys and values exactly as the block computed them
(all kv heads), with a strength. Because WM attention has no positional encoding, a key
remembered from 10k tokens ago is scored exactly like one in the window, so whatever the
block learnt to look up in its window (a name -> the number that followed it) it can look
up in its memory without learning anything new (a pooled summary of each span under
separate projections, the alternative, gives the model nothing it already knows how to
look up).

Per stream: keys, values [B, M, G*D] (the WM layer's keys/values, G kv heads of D),
strength [B, M] in [0, s_max] (0 = empty), age [B, M] (tokens since the slot's token,
counted at the end of the call), float32.

Write, at every span end (P tokens, `memory.py`). Candidates: the `c` tokens of the span
(of the stream's current document) with the highest salience z_t = w . h_t (h the
block's normalised input) plus novelty (below, against the memory as the span found it):
salience alone picks one kind of token over and over, whose copies the gate then refuses,
and a salience that writes nothing gets no gradient. A span cut by a call boundary carries its best c so far in the
state. For each candidate, in order:
  S        <- decay * S                                  (once per span)
  novelty  = 1 - max_j cos(k - mu, K_j - mu) over the filled slots (1 when none), mu
             the filled slots' mean key
  delta, strength = EM neuromodulator(novelty, surprise, usage, sigmoid(z))
  write    = novelty + delta > threshold                 (hard gate: a near-copy of a
                                                          stored key is not stored again)
  the weakest slot j* = argmin S r^age takes (k, v) with S_j* = s_max * strength * sigmoid(z)
  (age: spans since the slot was written; r = em_age_decay, 1 by default).
A candidate replaces the weakest slot only when it is stronger than what that slot holds,
so a full memory of salient tokens is not worn away by the ordinary tokens of every span.
With r < 1 the age discount (which the read does not see) makes old entries give way to
new ones of like strength: a salience that scores every token of a kind alike, up to
noise, would otherwise keep whichever scored highest, for good, and turn the newer away.
Unlike the strength, the salience factor is not floored: the LM loss may silence a
memory whose remembered tokens distract, and forced reads of such a memory would cost the
backbone its in-window copying.

Salience is retrieval-aware: besides the gradient of reads (which reaches only the tokens
that were written), in training the salience head predicts, for every token of the call,
the attention it receives from later queries of its window at least `MIN_LOOKUP` tokens on
(`salience_loss`, binary cross-entropy against the largest such attention weight over the
block's heads; a detached target). A token that the block looks up from further on (a
value after its key, a name) is the kind worth keeping once it scrolls out; a token that
only its neighbours read is not.
The written key/value keep their graph inside the call, so reads later in the same call
train the WM projections, the salience and the neuromodulator's strength; delta only
enters the hard gate (it is left for phase D's reinforcement training, like PM's gate).

Looked up by (cfg.em_keys): "attention", the block's own queries, keys and values, as
above and below; or "own", projections of the memory's own (`lookup`, `read`): a
remembered token t is stored under key_proj(u_{t-1}), the token before it (u = h plus
the token's normalised embedding), with value_proj(h_t), and each query reads the
entries it picks with query_proj(u) in a softmax of its own (the picked entries and a
null entry scored 0), through an output projection of its own added to the attention's
output; entries are readable in the window too. The query and key projections start
tied, so a query finds at once what followed the earlier occurrences of its own token
(the lookup an induction head learns, built in); the output projection starts at zero,
like PM's. It is for a backbone whose lookup is not in its attention: in the MQAR bench
the Spike-KDA state recalls the pairs inside the window and zeroing the attention's
output leaves that recall unchanged, so a memory read through the attention is ignored.

Read, every query of the block: `write` returns the call's entries (the slots it starts
with, then its candidates) with, per span, which of them the memory holds at the span's
start; `read_mask` picks per query head the entries it reads: held at the start of the
query's span, not in its window (scrolled out, or from an earlier document), and among
the top k by q.k / sqrt(D) + log strength. The WM attention (`wm_attention.py`) then
runs one softmax over the window and those entries, each remembered key scored like a
window key plus log strength (a weak memory counts less: exp(q.k / sqrt(D) + log S) =
S exp(q.k / sqrt(D))) plus a learned per-head log weight (0 at init). Before anything has
left the window the memory adds nothing. The softmax is over the entries a query picks,
not over all M: the top-k selection is the detached, hard part of retrieval.

Cost: the memory's M + n c entries join the W + T keys of every WM query (one SDPA call,
2 extra q/k dimensions); on 2 CPU cores the d64 x 2 bench model's step went from 0.29 s
to 0.59 s with EM on (M = 128, c = 4), a third of it the per-span write loop.

Surprise is the block's procedural-memory prediction error over the span
(`procedural.py` explains why not the LM loss); 0 when PM is off.

State (batch first): keys, values [B, M, G*D]; strength, age [B, M]; and the open span's
candidates: cand_keys, cand_values [B, c, G*D], cand_salience, cand_score, cand_age,
cand_live [B, c];
doc_age [B], tokens since the stream's document started (a lifelong stream keeps
memories across documents, and the window never shows an earlier document); with em_keys
"own", last_u [B, d], the call's last u (`lookup`: the key of the next call's first token).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .memory import SpanGrid, keep_streams

COMMITTED = ("keys", "values", "strength", "age")
OPEN = ("cand_keys", "cand_values", "cand_salience", "cand_score", "cand_age", "cand_live")  # the open span
MASKED = -1e9  # a finite "minus infinity": an all-masked row stays NaN-free, forward and backward
MIN_LOOKUP = 4  # the salience target counts attention from queries at least this many tokens on
SALIENCE_QUERY_BLOCK = 256  # queries per block of the salience target's scores


class EMNeuromodulator(nn.Module):
    """feats [B, 4]: novelty, surprise, mean strength / s_max, salience -> (novelty
    adjustment delta [B] in [-0.5, 0.5], strength [B] in (0.5, 1)).

    The strength is floored at half: a memory whose strength the LM loss can drive to 0
    while its reads are still noise goes silent for good, and so does the gradient that
    could have made it useful. The salience and the per-head gate are where the model may
    turn it down."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    @torch.no_grad()
    def init_special(self):
        self.mlp[-1].bias.copy_(torch.tensor([0.0, 1.0]))  # delta ~ 0, strength ~ 0.87

    def forward(self, feats: torch.Tensor):
        delta, strength = self.mlp(feats).unbind(-1)
        return 0.5 * torch.tanh(delta), 0.5 + 0.5 * torch.sigmoid(strength)


class EpisodicMemory(nn.Module):
    """The episodic store of one WM attention block: `write` (span ends), `read_mask`
    and `read_bias` (what the block's queries read); see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kv_heads, self.head_dim = cfg.kv_heads, cfg.head_dim
        self.window = cfg.wm_window
        self.slots, self.topk, self.per_span = cfg.em_slots, cfg.em_topk, cfg.em_writes_per_span
        self.threshold, self.decay, self.s_max = cfg.em_novelty_threshold, cfg.em_decay, cfg.em_strength_max
        self.age_decay, self.span = cfg.em_age_decay, cfg.plasticity_span
        self.salience_weight = cfg.em_salience_weight
        self.salience = nn.Linear(cfg.d_model, 1)  # which tokens of a span are worth remembering
        # em_keys "own": the memory is looked up by projections of its own (see `lookup`)
        self.own_keys, self.d_model = cfg.em_keys == "own", cfg.d_model
        if self.own_keys:
            self.n_heads = cfg.n_heads
            self.query_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
            self.key_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
            self.value_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
            self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.log_weight = nn.Parameter(torch.zeros(cfg.n_heads))  # per head: how much remembered keys count
        self.neuromod = EMNeuromodulator()
        self.init_special()

    @torch.no_grad()
    def init_special(self):
        """Initialise the non-matrix parameters (call again after any blanket re-init)."""
        self.log_weight.zero_()
        self.neuromod.init_special()
        if self.own_keys:  # tied, and scaled so that a token's key matches its own query sharply
            nn.init.normal_(self.key_proj.weight, 0.0, self.d_model ** -0.5)
            G, H = self.kv_heads, self.n_heads
            self.query_proj.weight.copy_(
                self.key_proj.weight.view(G, self.head_dim, -1).repeat_interleave(H // G, 0).flatten(0, 1))
            nn.init.zeros_(self.out_proj.weight)  # silent until its reads are found useful, like PM

    def zero_state(self, batch_size: int, device) -> dict:
        B, M, c, m = batch_size, self.slots, self.per_span, self.kv_heads * self.head_dim
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return {"keys": z(B, M, m), "values": z(B, M, m), "strength": z(B, M), "age": z(B, M),
                "cand_keys": z(B, c, m), "cand_values": z(B, c, m), "cand_salience": z(B, c), "cand_score": z(B, c),
                "cand_age": z(B, c), "cand_live": z(B, c), "doc_age": z(B)} | (
                    {"last_u": z(B, self.d_model)} if self.own_keys else {})

    def lookup(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               state: Optional[dict] = None, reset: Optional[torch.Tensor] = None,
               embedded: Optional[torch.Tensor] = None):
        """h [B, T, d]; q [B, H, T, D], k, v [B, G, T, D] (the WM layer's); state: the
        memory's (for the last token of the previous call); reset [B, T] bool or None;
        embedded [B, T, d], the model's token embeddings -> (queries, keys, values, last):
        what the memory is looked up by and remembers, same shapes as q, k, v, and the
        state's next last_u [B, d] (None without own keys): the attention's
        own (em_keys "attention"), or (em_keys "own") query_proj(u_t), key_proj(u_{t-1})
        and value_proj(h_t), with u = h + rmsnorm(embedded): a token is remembered under the
        token before it (zero for a document's first token), so a later query of that token
        finds what followed it. The embedding is in u because the block's input h may say
        little of its own token (in the MQAR bench's backbone a linear probe reads the
        token from h 30% of the time): the context, not the token, fills it."""
        if not self.own_keys:
            return q, k, v, None
        B, T, d = h.shape
        u = h if embedded is None else h + F.rms_norm(embedded.to(h.dtype), (d,))
        last = state["last_u"] if state is not None else h.new_zeros(B, d)
        before = torch.cat([last.to(h.dtype)[:, None], u[:, :-1]], 1)  # [B, T, d]
        if reset is not None:
            before = before.masked_fill(reset[..., None], 0.0)
        heads = lambda t, n: t.view(B, T, n, -1).transpose(1, 2)  # noqa: E731
        return (heads(self.query_proj(u), q.shape[1]), heads(self.key_proj(before), k.shape[1]),
                heads(self.value_proj(h), v.shape[1]), u[:, -1].float())

    def read(self, q: torch.Tensor, entries: dict, mask: torch.Tensor, bias: torch.Tensor):
        """The memory's own read (em_keys "own"): q [B, H, T, D] (its queries), entries
        (from `write`), mask [B, H, T, E] (`read_mask`), bias [H, T] (`read_bias`) ->
        (y [B, T, d], share [B, H, T]). Each query's softmax runs over the entries it
        picked, scored q.k / sqrt(D) + log strength + bias, and a null entry scored 0 whose
        value is 0 (so a query that finds nothing like itself reads little); y is
        out_proj of the heads' reads; share, the softmax mass on the entries."""
        B, H, T, D = q.shape
        E, G = entries["keys"].shape[1], self.kv_heads
        heads = lambda t: t.view(B, E, G, D).transpose(1, 2).repeat_interleave(H // G, 1)  # noqa: E731 [B, H, E, D]
        keys, values = heads(entries["keys"]), heads(entries["values"])
        scores = (q.float() @ keys.transpose(-1, -2)) / math.sqrt(D) + entries["log_strength"][:, None, None] \
            + bias[None, :, :, None]
        scores = torch.cat([scores.new_zeros(B, H, T, 1), scores.masked_fill(~mask, MASKED)], -1)
        p = scores.softmax(-1)[..., 1:]  # [B, H, T, E]: the null entry's mass dropped
        y = (p @ values).transpose(1, 2).reshape(B, T, H * D)
        return self.out_proj(y.to(self.out_proj.weight.dtype)), p.sum(-1)

    # ------------------------------------------------------------------ write
    def write(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[dict], grid: SpanGrid,
              soft: bool = False, surprises: Optional[list] = None):
        """h [B, T, d] (the block's normalised input); k, v [B, G, T, D] (the WM layer's
        keys/values of this call's tokens); surprises: one [B] per span ending in the call.
        -> (entries, new state, stats). entries: what the call's queries may read, the E =
        M + n c slots it starts with and candidates it ranks: "keys", "values" [B, E, G*D];
        "pos" [B, E] (token position relative to the call's first token); "log_strength"
        [B, E] (the entry's part of its log strength, see `read_bias`); "alive" [B, n, E]
        (held at the start of span s); "doc_start" [B, T] (where each token's document
        starts, relative to the call)."""
        B, T = h.shape[:2]
        st = state if state is not None else self.zero_state(B, h.device)
        with torch.autocast(h.device.type, enabled=False):
            return self._write(h.float(), k.float(), v.float(), st, grid, soft, surprises)

    def _write(self, h, k, v, st, grid, soft, surprises):
        B, T = h.shape[:2]
        n, P, c, M = grid.n, grid.P, self.per_span, self.slots
        flat = lambda t: t.transpose(1, 2).reshape(B, T, -1)  # noqa: E731  [B, G, T, D] -> [B, T, G*D]
        valid = grid.current.expand(B, -1, -1)  # [B, n, P]: cells of the stream's current document
        z = grid.to_grid(self.salience(h).squeeze(-1))  # [B, n, P]
        kg, vg = grid.to_grid(flat(k)), grid.to_grid(flat(v))  # [B, n, P, G*D]
        pos = (torch.arange(n * P, device=h.device) - grid.offset).float().view(n, P)

        # the open span's candidates from the previous call compete in span 0 (if its document goes on)
        live = st["cand_live"].float() > 0
        keep0 = grid.keep(0)
        if keep0 is not None:
            live = live & (keep0[:, None] > 0)
        carried = (st["cand_keys"].float(), st["cand_values"].float(), st["cand_salience"].float(),
                   torch.where(live, st["cand_score"].float(), MASKED), -st["cand_age"].float())

        K, V, S, age = (st[name].float() for name in COMMITTED)
        at = -age  # slot positions relative to this call's first token
        # entries: what the call's queries may read, the slots it starts with, then its candidates
        ids = torch.arange(M, device=h.device).expand(B, -1)  # [B, M]: the entry each slot holds
        log_ref = [torch.log(S.clamp(min=1e-30))]  # log strength at the entry's reference span
        ref = [torch.zeros(M, device=h.device)]  # (slots: span 0, candidates of span s: s + 1)
        ent_k, ent_v, ent_pos = [st["keys"].float()], [st["values"].float()], [-age]
        alive, writes, ended = [], [], 0
        # unbound once: slicing span s inside the loop would make autograd scatter each slice's
        # gradient into a zero tensor of the whole grid, n times over (quadratic in T)
        kg_s, vg_s, z_s = kg.unbind(1), vg.unbind(1), z.unbind(1)
        for s in range(n):
            alive.append(self._alive(ids, S, M + n * c))  # what the queries of span s may read
            keep = grid.keep(s)
            if keep is not None and not soft:  # hard reset: the stream's episodes are gone
                K, V, S, at = (keep_streams(t, keep) for t in (K, V, S, at))
            # candidates: the span's most salient tokens, counting novelty against the memory as
            # it stands (constant over the span, so a span cut by a call boundary ranks alike):
            # salience alone would keep picking one kind of token, whose copies the gate refuses
            score = torch.where(valid[:, s], z_s[s].detach() + self._novelty(K, S, kg_s[s]), MASKED)
            pool = [kg_s[s], vg_s[s], z_s[s], score, pos[s].expand(B, -1)]
            if s == 0:
                pool = [torch.cat([a, b], 1) for a, b in zip(pool, carried)]
            idx = pool[3].topk(c, -1).indices  # [B, c]
            ck, cv = (t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1])) for t in pool[:2])
            cz, cscore, cpos = (t.gather(1, idx) for t in pool[2:])
            ok = cscore > MASKED / 2
            surprise = surprises[ended] if surprises and grid.complete[s] else S.new_zeros(B)
            if grid.complete[s]:
                S = S * self.decay
                ended += 1
            for i in range(c):
                if grid.complete[s]:
                    K, V, S, at, ids, strength, info = self._write_one(
                        K, V, S, at, ids, M + s * c + i, ck[:, i], cv[:, i], cz[:, i], cpos[:, i], ok[:, i], surprise,
                        now=float((s + 1) * P - grid.offset))
                    writes.append(info)
                else:
                    strength = S.new_zeros(B)
                log_ref.append(torch.log(strength.clamp(min=1e-30))[:, None])
                ref.append(torch.full((1,), s + 1.0, device=h.device))
            ent_k.append(ck)
            ent_v.append(cv)
            ent_pos.append(cpos)
        # where each token's document starts (relative to the call): the WM window holds only
        # that document, so anything remembered from before it is readable at once
        t = torch.arange(T, device=h.device, dtype=torch.float)
        doc_start = (-st["doc_age"].float())[:, None].expand(B, T)
        if grid.reset is not None:
            starts = torch.where(grid.from_grid(grid.reset), t, torch.full_like(t, -math.inf)).cummax(1).values
            doc_start = torch.maximum(doc_start, starts)
        entries = {"doc_start": doc_start,  # [B, T]
                   "keys": torch.cat(ent_k, 1), "values": torch.cat(ent_v, 1),  # [B, E, G*D]
                   "pos": torch.cat(ent_pos, 1),  # [B, E], relative to the call
                   # log strength at span s = log_ref + (s - ref) log(decay), the part fixed per entry:
                   "log_strength": torch.cat(log_ref, 1) - torch.cat(ref) * math.log(self.decay),
                   "alive": torch.stack(alive, 1)}  # [B, n, E]
        new_state = {"keys": K, "values": V, "strength": S, "age": torch.where(S > 0, T - at, 0.0),
                     "doc_age": T - doc_start[:, -1]}
        if grid.complete[-1]:  # no open span: nothing to carry
            new_state.update({name: torch.zeros_like(st[name]) for name in OPEN})
        else:
            real = lambda t: torch.where(ok.view(*ok.shape, *[1] * (t.dim() - 2)), t, 0.0)  # noqa: E731
            new_state.update({"cand_keys": real(ck), "cand_values": real(cv), "cand_salience": real(cz),
                              "cand_score": real(cscore), "cand_age": real(T - cpos), "cand_live": ok.float()})
        return entries, new_state, self._stats(writes, S)

    def _novelty(self, K: torch.Tensor, S: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, L, G*D] against the filled slots of K [B, M, G*D] (S [B, M]) -> [B, L]:
        1 - the largest cosine, about the filled slots' mean key (detached; 1 when empty).
        About the mean, because attention keys share a large component (q . c shifts all of
        a query's scores alike, so training leaves it free): raw cosines of a trained
        model's keys are all ~0.99, and every key looked like a copy."""
        filled = S > 0
        count = filled.sum(-1, keepdim=True).clamp(min=1).float()
        mean = ((K * filled[..., None]).sum(1) / count)[:, None]  # [B, 1, G*D]
        cos = F.normalize(keys - mean, dim=-1) @ F.normalize(K - mean, dim=-1).transpose(-1, -2)  # [B, L, M]
        best = torch.where(filled[:, None], cos, torch.full_like(cos, -1.0)).amax(-1)
        return torch.where(filled.any(-1, keepdim=True), 1.0 - best, torch.ones_like(best)).detach()

    @staticmethod
    def _alive(ids: torch.Tensor, S: torch.Tensor, E: int) -> torch.Tensor:
        """[B, E] bool: the entries held by a slot with strength > 0."""
        return torch.zeros(S.shape[0], E, dtype=torch.bool, device=S.device).scatter_(1, ids, S > 0)

    def _write_one(self, K, V, S, at, ids, entry, key, value, z, pos, ok, surprise, now: float):
        """One candidate, entry number `entry`. K, V [B, M, G*D]; S, at [B, M]; ids [B, M]
        long; key, value [B, G*D]; z, pos, surprise [B]; ok [B] bool (a real token); now,
        the span's end (relative to the call, like `at`): the slots' ages for em_age_decay.
        Returns the new (K, V, S, at, ids), the strength it was written with [B] (0 where
        not written) and detached per-stream info for the metrics."""
        novelty = self._novelty(K, S, key[:, None])[:, 0]
        salience = torch.where(ok, torch.sigmoid(z), 0.0)
        feats = torch.stack([novelty, surprise, S.mean(-1) / self.s_max, salience.detach()], -1).detach()
        delta, strength = self.neuromod(feats)
        strength = self.s_max * strength * salience
        # the slot to replace: the weakest, its strength discounted by its age (em_age_decay < 1)
        keep = S if self.age_decay == 1.0 else S * self.age_decay ** ((now - at) / self.span).clamp(min=0)
        weakest = keep.detach().min(-1)
        # written: novel enough, and stronger than what it replaces (an empty slot is 0)
        write = ((novelty + delta.detach() > self.threshold) & ok & (strength.detach() > weakest.values)).float()
        slot = F.one_hot(weakest.indices, self.slots).float() * write[:, None]  # the weakest slot, where writing
        strength = strength * write
        K = K * (1.0 - slot[..., None]) + slot[..., None] * key[:, None]
        V = V * (1.0 - slot[..., None]) + slot[..., None] * value[:, None]
        S = S * (1.0 - slot) + slot * strength[:, None]
        at = at * (1.0 - slot) + slot * pos[:, None]
        ids = torch.where(slot > 0, entry, ids)
        return K, V, S, at, ids, strength, {"write": write, "novelty": novelty, "ok": ok.float()}

    def salience_loss(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, reset: Optional[torch.Tensor],
                      tokens: Optional[torch.Tensor] = None):
        """h [B, T, d] (the block's normalised input), q [B, H, T, D], k [B, G, T, D] (the
        queries and keys the memory is looked up by, `lookup`, of this call's tokens),
        reset [B, T] bool or None -> 0-dim loss:
        binary cross-entropy of sigmoid(salience(h_j)) against a_j, the largest attention
        weight any head's query i gives token j, over the queries of the call with
        MIN_LOOKUP <= i - j <= W in j's document (softmax over the call's keys in the
        window: an estimate, the cached keys of earlier calls left out). With the memory's
        own keys the lookups are not the window's: every later query of the call counts,
        over all the call's earlier keys of its document (a token whose lookup comes from
        beyond the window is the one worth remembering), and the target is 1 where that
        weight is at least 1/2, else 0: a token that follows a common token is matched by
        its every later occurrence together with all the others that followed it, so its
        weight is spread and it would look almost as salient as one that is looked up
        alone. With the call's token ids (tokens [B, T]), a lookup counts only if the token
        after the query is the remembered token: the read would have told what came next.
        (In MQAR, "k v ... k v": v is remembered, looked up by the second k, and comes
        next; the filler after the first v is looked up by the second v too, and does
        not.) Detached target."""
        B, H, T, D = q.shape
        # the attention's keys are looked up inside its window; the memory's own, from anywhere
        horizon = T if self.own_keys else self.window
        # with own keys and the token ids: the token after each query (-1 after the call's last)
        following = F.pad(tokens[:, 1:], (0, 1), value=-1) if self.own_keys and tokens is not None else None
        with torch.no_grad():
            keys = k.float().repeat_interleave(H // k.shape[1], 1)  # [B, H, T, D]
            t = torch.arange(T, device=q.device)
            seg = reset.long().cumsum(1) if reset is not None else None
            target = q.new_zeros(B, T, dtype=torch.float32)  # [B, T(key)]
            # queries a block at a time: the scores are [B, H, block, T], not [B, H, T, T]
            # (at T = 1024 the whole square was ~270 MB a layer)
            for a in range(0, T, SALIENCE_QUERY_BLOCK):
                rows = t[a:a + SALIENCE_QUERY_BLOCK]
                scores = q[:, :, rows].float() @ keys.transpose(-1, -2) / math.sqrt(D)  # [B, H, block, T]
                delta = rows[:, None] - t[None, :]
                seen = ((delta >= 0) & (delta <= horizon))[None]
                if seg is not None:
                    seen = seen & (seg[:, rows, None] == seg[:, None, :])
                probs = scores.masked_fill(~seen[:, None], -math.inf).softmax(-1)
                far = (delta >= MIN_LOOKUP)[None, None]
                if following is not None:  # only a lookup whose query is followed by the remembered token
                    far = far & (following[:, rows, None] == tokens[:, None, :])[:, None]
                target = torch.maximum(target, torch.where(far, probs, 0.0).amax(dim=(1, 2)))
            if self.own_keys:  # looked up: picked by some later query with at least half its weight
                target = (target >= 0.5).float()
        z = self.salience(h.float()).squeeze(-1)
        return F.binary_cross_entropy_with_logits(z, target)

    # ------------------------------------------------------------------ read
    def read_mask(self, q: torch.Tensor, entries: dict, grid: SpanGrid, soft: bool = False) -> torch.Tensor:
        """q [B, H, T, D] (the WM layer's queries) -> [B, H, T, E] bool: the entries each
        query reads. An entry is readable by a query if it is held in the memory as it
        stood at the start of the query's span, its token is not in the query's window (it
        has scrolled out, or it is from an earlier document, which the window never shows;
        with em_keys "own", whose read is not the window's, in the window or not),
        (with a hard reset) the query's document has not restarted in the span, and it
        is among the query head's top k by score q.k / sqrt(D) + log strength."""
        B, H, T, D = q.shape
        G, P, E = self.kv_heads, grid.P, entries["keys"].shape[1]
        t = torch.arange(T, device=q.device)
        span = (t + grid.offset) // P  # [T]
        ok = entries["alive"][:, span]  # [B, T, E]
        pos = entries["pos"][:, None, :]
        if not self.own_keys:  # the window has its own tokens already; the memory's own read does not
            ok = ok & ((t[None, :, None] - pos > self.window) | (pos < entries["doc_start"][..., None]))
        if not soft and grid.since_reset is not None:  # a hard reset emptied the memory for these tokens
            ok = ok & ~grid.from_grid(grid.since_reset)[..., None]
        with torch.no_grad():
            keys = entries["keys"].view(B, E, G, D).permute(0, 2, 1, 3).repeat_interleave(H // G, 1)  # [B, H, E, D]
            scores = (q.float() @ keys.transpose(-1, -2)) / math.sqrt(D) + entries["log_strength"][:, None, None]
            scores = scores.masked_fill(~ok[:, None], float("-inf"))
            top = scores.topk(min(self.topk, E), -1).indices
            picked = torch.zeros_like(ok[:, None].expand(-1, H, -1, -1)).scatter_(-1, top, True)
        return picked & ok[:, None]

    def read_bias(self, grid: SpanGrid, T: int, device) -> torch.Tensor:
        """[H, T]: what every remembered key's score gains, per head and query: the head's
        learned log weight plus the strength decay of the spans since the entries' reference
        (the entry's own part is entries["log_strength"])."""
        span = (torch.arange(T, device=device) + grid.offset) // grid.P
        return self.log_weight[:, None] + span.float()[None] * math.log(self.decay)

    @staticmethod
    def _stats(writes: list, S: torch.Tensor) -> dict:
        stats = {"em_strength": S.detach().mean()}
        if writes:
            ok = torch.stack([w["ok"] for w in writes])
            stats["em_write_rate"] = (torch.stack([w["write"] for w in writes]).sum() / ok.sum().clamp(min=1))
            stats["em_novelty"] = (torch.stack([w["novelty"] for w in writes]) * ok).sum() / ok.sum().clamp(min=1)
        else:
            stats["em_write_rate"] = stats["em_novelty"] = S.new_zeros(())
        return stats
