"""Hatchling: the neuromorphic hybrid language model.

A pre-norm (RMSNorm) stack with tied input/output embeddings. Most blocks mix tokens
with Spike-KDA (spike-gated delta-rule fast weights, `spike_kda.py`); every
`global_every`-th block (layer i with (i + 1) % global_every == 0) uses working-memory
softmax attention over a sliding window (`wm_attention.py`). Every block ends with a
SwiGLU MLP.

State (batch first throughout): {"layers": [per-layer state]}, where a Spike-KDA layer
holds {"S", "membrane", "conv"} and a WM layer {"k", "v", "valid"}; a None state (or a
None entry) means zeros. `reset_mask` [B, T] resets one stream's state at the first
token of its new document, in every layer.

Memories (cfg.pm_enabled / cfg.em_enabled; absent, with no parameters, when off): every
block gets a procedural memory (`procedural.py`) read into the mixer's output, and every
WM block an episodic memory (`episodic.py`) that remembers tokens scrolling out of its
window and lets its attention read them as if they were still in it. Their contents sit
in the layer state under "pm" and "em", and the state gains "clock" [B] int64, the
stream position, which aligns plasticity spans to absolute positions (`memory.py`). At a
document start the reset is hard (memories emptied) unless `lifelong` (cfg.lifelong, an
attribute that may be flipped), which keeps the committed PM and EM contents and resets
the rest. `memory_state(state)` / `state_from_memory(memory, B, device)` take the
committed contents out of a state and seed a fresh state with them. Memories are built
on a backbone initialised exactly as without them. A fresh PM is silent (zero output
projection); a fresh EM adds nothing until a remembered token has left the window, and
from then on extends the window in the key space the attention already learnt.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn

from .aux_heads import AuxHeads
from .base import ModelOutput
from .config import AuxHeadsConfig, ModelConfig
from .episodic import COMMITTED as EM_COMMITTED, EpisodicMemory
from .layers import RMSNorm, SwiGLU
from .memory import SpanGrid, committed
from .procedural import COMMITTED as PM_COMMITTED, ProceduralMemory
from .spike_kda import SpikeKDA
from .wm_attention import WorkingMemoryAttention


def is_wm_layer(cfg: ModelConfig, i: int) -> bool:
    """Whether layer i (0-based) is a working-memory attention layer."""
    return (i + 1) % cfg.global_every == 0


class HatchlingBlock(nn.Module):
    """x + mixer(norm(x)) [+ pm(norm(x))], then + mlp(norm(x)); a WM mixer's window is
    extended by the episodic memory [em] when it is on.
    x: [B, T, d] -> ([B, T, d], state, spikes|None).

    With memories on, `grid` (the call's SpanGrid) is required, the state carries "pm" /
    "em" next to the mixer's entries, and `metrics` (a dict, if given) receives the
    memories' 0-dim detached statistics."""

    def __init__(self, cfg: ModelConfig, wm: bool):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = WorkingMemoryAttention(cfg) if wm else SpikeKDA(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        # built only when on, so a phase-A model has exactly the phase-A parameters; from a
        # side stream of the RNG, so the backbone draws the same initial weights either way
        with torch.random.fork_rng(devices=[]):
            self.pm = ProceduralMemory(cfg) if cfg.pm_enabled else None
            self.em = EpisodicMemory(cfg) if cfg.em_enabled and wm else None

    def zero_state(self, batch_size: int, device) -> dict:
        state = self.mixer.zero_state(batch_size, device)
        for name in ("pm", "em"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name).zero_state(batch_size, device)
        return state

    def forward(self, x, state=None, reset=None, grid: Optional[SpanGrid] = None, soft: bool = False,
                metrics: Optional[dict] = None, embedded: Optional[torch.Tensor] = None,
                tokens: Optional[torch.Tensor] = None):
        """embedded [B, T, d], tokens [B, T]: the model's token embeddings and ids (an
        episodic memory with its own keys is looked up by the embeddings, and its salience
        target checks the ids, `EpisodicMemory.lookup` / `salience_loss`)."""
        spikes = None
        memory = {k: state[k] for k in ("pm", "em") if k in state} if state is not None else {}
        if memory:
            state = {k: v for k, v in state.items() if k not in memory}
        h = self.norm1(x)
        stats, surprises, pm_read = {}, None, None
        if self.pm is not None:
            pm_read, pm_state, pm_stats, surprises = self.pm(h, memory.get("pm"), grid, soft)
            stats.update(pm_stats)
        if isinstance(self.mixer, SpikeKDA):
            y, new_state, spikes = self.mixer(h, state, reset)
        elif self.em is None:
            y, new_state = self.mixer(h, state, reset)
        else:  # the episodic memory extends the WM window: written from, and read by, its keys
            q, k, v = self.mixer.project(h)
            # the attention's queries/keys/values, or the memory's own
            q_mem, k_mem, v_mem, last_u = self.em.lookup(h, q, k, v, memory.get("em"), reset, embedded)
            entries, em_state, em_stats = self.em.write(h, k_mem, v_mem, memory.get("em"), grid, soft, surprises)
            if last_u is not None:  # the next call's first token is remembered under this call's last
                em_state["last_u"] = last_u
            bias, picked = self.em.read_bias(grid, h.shape[1], h.device), self.em.read_mask(q_mem, entries, grid, soft)
            if self.em.own_keys:  # its own read, added to the attention's output
                y, new_state, _ = self.mixer.attend(q, k, v, state, reset)
                read, share = self.em.read(q_mem, entries, picked, bias)
                y = y + read.to(y.dtype)
            else:  # remembered keys join the attention's softmax
                B, E = entries["keys"].shape[:2]
                heads = lambda t: t.view(B, E, self.mixer.kv_heads, -1).transpose(1, 2)  # noqa: E731 [B, G, E, D]
                remembered = (heads(entries["keys"]), heads(entries["values"]), entries["log_strength"], bias, picked)
                y, new_state, share = self.mixer.attend(q, k, v, state, reset, remembered)
            new_state["em"] = em_state
            stats.update(em_stats, em_read_share=share.detach().float().mean())
            if self.training and self.em.salience_weight > 0:
                salience = self.em.salience_loss(h, q_mem, k_mem, reset, tokens)  # what the memory's lookup picks
                stats["em_salience"] = salience.detach()
                stats["loss/em_salience"] = self.em.salience_weight * salience
        if self.pm is not None:
            y = y + pm_read.to(y.dtype)
            new_state["pm"] = pm_state
        x = x + self.drop(y)
        x = x + self.mlp(self.norm2(x))
        if metrics is not None:
            metrics.update(stats)
        return x, new_state, spikes


class HatchlingLM(nn.Module):
    """tokens [B, T] -> ModelOutput(logits [B, T, V], state, aux).

    aux: "metric/spike_rate/layer{i}" (0-dim, detached) for every Spike-KDA layer i, and
    with memories on, for every layer i: "metric/pm_{commit_rate, strength, evidence,
    surprise, gate_prob, read_norm}/layer{i}" and "metric/em_{write_rate, strength,
    novelty, read_norm, salience}/layer{i}" (commit/write statistics are over the spans that
    ended in the call, 0 when none did); in training, with episodic memory, the salience
    head's loss "loss/em_salience/layer{i}" (added to the training loss).
    """

    carries_state = True

    def __init__(self, cfg: ModelConfig, vocab_size: int, aux_cfg: Optional[AuxHeadsConfig] = None):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(HatchlingBlock(cfg, is_wm_layer(cfg, i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.memories = cfg.pm_enabled or cfg.em_enabled
        self.lifelong = cfg.lifelong  # soft resets; an attribute, so a session can switch it
        self._init_backbone(self)
        for block in self.blocks:
            # GPT-2 style: projections into the residual stream scaled down by depth
            for p in (block.mixer.out_proj.weight, block.mlp.down.weight):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))
            if isinstance(block.mixer, SpikeKDA):
                block.mixer.init_special()
        # PM starts silent (zero output projection): it reads through projections of its own,
        # so its reads enter the residual stream only as fast as the LM loss finds them
        # useful. EM needs no such start: it reads with the attention's own keys and adds
        # nothing before a token has left the window. Their init draws from a side stream of
        # the RNG, like their construction.
        with torch.random.fork_rng(devices=[]):
            for block in self.blocks:
                for mem in (block.pm, block.em):
                    if mem is not None:
                        mem.apply(self._init)
                        mem.init_special()
                if block.pm is not None:
                    nn.init.zeros_(block.pm.out_proj.weight)
        # auxiliary heads (aux_heads.py): built last, with their own init; None when all are off
        self.aux_heads = AuxHeads.build(aux_cfg, cfg, vocab_size)

    def _init_backbone(self, module):
        """self._init on every module below `module` but the memories (children first, like apply)."""
        if isinstance(module, (ProceduralMemory, EpisodicMemory)):
            return
        for child in module.children():
            self._init_backbone(child)
        self._init(module)

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def generation_state(self, batch_size: int, device) -> dict:
        """A zero state: forward(prompt, state) then forward(one token, state) decodes."""
        state = {"layers": [b.zero_state(batch_size, device) for b in self.blocks]}
        if self.memories:
            state["clock"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return state

    def memory_state(self, state: dict) -> dict:
        """The committed memory contents of a state (detached copies), batch first:
        {"pm": [{"keys", "values", "strength"} per layer], "em": [{"keys", "values",
        "strength", "age"} per WM layer, {} for the others]} (only the memories that are
        on; a stored memory without some of these leaves them zero). What a
        lifelong run keeps from one run to the next; eligibility, open-span sums and the
        mixers' state are not part of it."""
        out = {}
        for name, keys in (("pm", PM_COMMITTED), ("em", EM_COMMITTED)):
            if self._has(name):
                out[name] = [committed(layer.get(name), keys) for layer in state["layers"]]
        return out

    def state_from_memory(self, memory: dict, batch_size: int, device) -> dict:
        """A zero state whose committed PM/EM contents come from `memory` (as returned by
        memory_state). Stream b gets stream b mod B' of the stored B' streams; memories
        stored but off in this model, or on here but not stored, are ignored / left empty,
        and so are stored entries this model does not have in that shape (a memory saved
        by an earlier design of the model)."""
        state = self.generation_state(batch_size, device)
        for name in ("pm", "em"):
            if name not in memory or not self._has(name):
                continue
            for layer, stored in zip(state["layers"], memory[name]):
                for key, value in stored.items():
                    if name not in layer or key not in layer[name] or value.shape[1:] != layer[name][key].shape[1:]:
                        continue
                    idx = torch.arange(batch_size) % value.shape[0]
                    layer[name][key] = value[idx].to(device=device, dtype=layer[name][key].dtype).clone()
        return state

    @contextlib.contextmanager
    def memories_switched_off(self):
        """Within the block, the same weights with the memories' reads and writes removed
        (the inference ablation that shows what the memories contribute). A state made
        inside has no memory entries: do not carry it out."""
        saved, memories = [(b.pm, b.em) for b in self.blocks], self.memories
        for b in self.blocks:
            b.pm = b.em = None
        self.memories = False
        try:
            yield self
        finally:
            for b, (pm, em) in zip(self.blocks, saved):
                b.pm, b.em = pm, em
            self.memories = memories

    def _has(self, name: str) -> bool:
        """Whether some block has the memory `name` ("pm" or "em")."""
        return any(getattr(b, name) is not None for b in self.blocks)

    def forward(self, tokens: torch.Tensor, state=None, reset_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        layer_states = state["layers"] if state is not None else [None] * len(self.blocks)
        x = embedded = self.drop(self.embed(tokens))
        new_states, aux = [], {}
        grid, clock = None, None
        if self.memories:
            B, T = tokens.shape
            clock = state.get("clock") if state is not None else None
            if clock is None:
                clock = torch.zeros(B, dtype=torch.long, device=tokens.device)
            start = int(clock[0])  # streams advance together, so one clock value serves them all
            if B > 1 and not bool((clock == start).all()):
                raise ValueError("the streams of a state must share one clock (stream position)")
            grid = SpanGrid(T, self.cfg.plasticity_span, start % self.cfg.plasticity_span, reset_mask, tokens.device)
        heads = self.aux_heads if self.training else None
        tap, mid = (heads.tap_layer if heads is not None else None), None
        for i, block in enumerate(self.blocks):
            metrics = {} if self.memories else None
            x, layer_state, spikes = block(x, layer_states[i], reset_mask, grid, self.lifelong, metrics, embedded,
                                             tokens)
            if i == tap:
                mid = x  # the policy head's input
            new_states.append(layer_state)
            if spikes is not None:
                aux[f"metric/spike_rate/layer{i}"] = spikes.detach().mean()
            for key, value in (metrics or {}).items():  # a block's "loss/..." terms join the training loss
                aux[f"{key}/layer{i}" if key.startswith("loss/") else f"metric/{key}/layer{i}"] = value
        new_state = {"layers": new_states}
        if self.memories:
            new_state["clock"] = clock + tokens.shape[1]
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        if heads is not None:
            aux.update(heads(tokens, hidden, logits, self.embed.weight, mid))
        return ModelOutput(logits, new_state, aux)
