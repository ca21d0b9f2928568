"""Does the episodic memory recall beyond the window? Multi-query associative recall
(MQAR, Zoology: Arora et al. 2023) in the real hatchling, with its real phases, trained in
minutes on a CPU.

Streams (`PairStreams`): endless token streams into which key-value pairs "k v" are
placed, and later queries "k v" of the same keys: the value after a query's key is the
answer. Keys and values are tokens of their own (ids above the filler's), a key is not
placed again while its pair is pending or within `cooldown` tokens of its last use, so
every query has exactly one right answer. Between events: filler, random tokens of a small
vocabulary (--filler random) or book text as bytes (--filler text: the pairs a few hundred
tokens of ../shared/corpus/books apart). A query's gap is how far back its pair's value
lies: answer position - value position.

Model: a hatchling, d_model x layers, working-memory attention every `global_every`-th
layer over a window W = --window, calls of T = W tokens (so a gap of 2W or more is never
in a query's attention, whatever its place in the call), state carried from call to call
and detached between steps, as the trainer does.

Method
 1. Backbone, phase A (memories off): gaps uniform in [1, --backbone-gap] (default W/2:
    every query in the window) until recall at W/4 is >= --target (checked every 100
    steps) or --steps (--init: start from saved weights). The in-window row comes first: a
    backbone that cannot copy says nothing about memory. It is measured again with the
    WM attention's output zeroed (backbone/attention_silenced): with --em-keys attention
    the episodic memory is read by that attention, so if recall does not drop, the lookup
    lives in the Spike-KDA state and such a memory has nothing to extend.
 2. Two copies train --phase-steps more on streams with gaps log-uniform in
    [--train-gap-min, --train-gap], pairs every --phase-pair-every tokens (a list: the
    batch's streams take its spacings in turn), calls of
    --phase-call tokens (longer than W, an entry is written and read inside one call, so
    its key and salience get the read's gradient): memories_off in phase A, memories_on
    in phase C (procedural and episodic memory on, their parameters fresh), as the
    trainer's phases do. --em-keys picks the memory's lookup (model.em_keys);
    --oracle-salience, a diagnostic, tells the memory to keep the value tokens, so only
    its read is on trial; --skip-off reuses memories_off from a run with the same flags.
 3. Recall (argmax of the answer = the value) at gaps W/4, W/2 (inside), 2W, 8W, 32W for
    memories_off, memories_on, memories_on/switched_off (its memories removed at
    inference), with state carried across calls, until --probes answers per gap, counted
    from the stream's start or (--warmup) once the memory has filled.
Chance is 1 / --values.

    python bench/mqar.py                    # random filler, ~25 min on one core
    python bench/mqar.py --backbone bench/results/mqar_backbone_pe8b.pth --phase-steps 1500 \
        --phase-call 256 --train-gap-min 1 --phase-pair-every 8,32 --cooldown 2048 --em-keys own \
        --em-writes 4 --em-age-decay 0.95 --warmup 2048 --skip-off   # the memory that recalls, ~20 min
    python bench/mqar.py --filler text      # book text between the pairs
    python bench/mqar.py --backbone bench/results/mqar_backbone.pth   # train the backbone once, reuse it

Output: JSON lines {"bench": "mqar", "kind": "config" | "train" | "recall", ...}; progress on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig, build_model, detach_state  # noqa: E402
from model.wm_attention import WorkingMemoryAttention  # noqa: E402

BOOKS = ROOT.parent / "shared" / "corpus" / "books"


def log(msg: str) -> None:
    print(f"[mqar] {msg}", file=sys.stderr, flush=True)


def emit(row: dict) -> None:
    print(json.dumps({"bench": "mqar", **row}), flush=True)


class PairStreams:
    """B endless streams of filler with key-value pairs and their queries.

    Token ids: filler [0, n_filler), keys [n_filler, n_filler + n_keys), values after the
    keys. `text` (a list of filler ids) is read in order from a random start per stream;
    without it the filler is uniform random. A pair is placed every ~`pair_every`
    tokens (exponential spacing; a tuple: stream b uses pair_every[b % len], a batch of
    dense and sparse streams), its query `gap` tokens after it (a (lo, hi) range: log-uniform, or uniform
    when `uniform`).

    next_batch() -> (x [B, T], y [B, T], gap [B, T]): inputs, targets, and for every
    target that is a query's answer the gap to its pair's value (-1 elsewhere)."""

    def __init__(self, B: int, T: int, n_filler: int, n_keys: int, n_values: int, gap: tuple[int, int],
                 pair_every: int | tuple[int, ...], seed: int, text: list[int] | None = None, uniform: bool = False,
                 cooldown: int | None = None):
        self.B, self.T, self.n_filler, self.n_keys, self.n_values = B, T, n_filler, n_keys, n_values
        self.gap, self.text, self.uniform = gap, text, uniform
        spacing = pair_every if isinstance(pair_every, tuple) else (pair_every,)
        self.cooldown = cooldown if cooldown is not None else 2 * gap[1]
        self.rng = random.Random(seed)
        self.streams = [self._new(spacing[b % len(spacing)]) for b in range(B)]

    @property
    def vocab(self) -> int:
        return self.n_filler + self.n_keys + self.n_values

    def _new(self, pair_every: int) -> dict:
        return {"tok": [], "gap": [], "pos": 0, "pending": [], "last_use": {}, "pair_every": pair_every,
                "at": self.rng.randrange(len(self.text)) if self.text else 0, "next_pair": self.rng.randrange(pair_every)}

    def _draw_gap(self) -> int:
        lo, hi = self.gap
        if self.uniform or lo == hi:
            return self.rng.randint(lo, hi)
        return int(round(math.exp(self.rng.uniform(math.log(lo), math.log(hi)))))

    def _push(self, s: dict, token: int, gap: int = -1) -> None:
        s["tok"].append(token)
        s["gap"].append(gap)
        s["pos"] += 1

    def _step(self, s: dict) -> None:
        """One event: a due query, a new pair, or one filler token."""
        pos = s["pos"]
        due = [p for p in s["pending"] if p[2] <= pos + 1]  # the query's answer lands at pos + 1
        if due:  # pending: (key index, value token, answer position, value position)
            first = min(due, key=lambda p: p[2])
            s["pending"].remove(first)
            key, value, _, value_pos = first
            self._push(s, self.n_filler + key)
            self._push(s, value, gap=s["pos"] - value_pos)  # the answer (at pos): its gap to the value
            s["last_use"][key] = s["pos"]
            return
        if pos >= s["next_pair"]:
            busy = {p[0] for p in s["pending"]}
            free = [k for k in range(self.n_keys) if k not in busy and pos - s["last_use"].get(k, -10**9) > self.cooldown]
            if free:
                key = self.rng.choice(free)
                value = self.n_filler + self.n_keys + self.rng.randrange(self.n_values)
                self._push(s, self.n_filler + key)
                self._push(s, value)
                value_pos = s["pos"] - 1
                s["pending"].append((key, value, value_pos + max(2, self._draw_gap()), value_pos))
                s["last_use"][key] = s["pos"]
                s["next_pair"] = s["pos"] + max(1, int(self.rng.expovariate(1 / s["pair_every"])))
                return
        if self.text:
            self._push(s, self.text[s["at"]])
            s["at"] = (s["at"] + 1) % len(self.text)
        else:
            self._push(s, self.rng.randrange(self.n_filler))

    def next_batch(self):
        rows, gaps = [], []
        for s in self.streams:
            while len(s["tok"]) < self.T + 1:
                self._step(s)
            rows.append(s["tok"][:self.T + 1])
            gaps.append(s["gap"][1:self.T + 1])
            del s["tok"][:self.T], s["gap"][:self.T]
        tok = torch.tensor(rows)
        return tok[:, :-1], tok[:, 1:], torch.tensor(gaps)


def model_config(args, memories: bool) -> ModelConfig:
    return ModelConfig(arch="hatchling", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       global_every=args.global_every, wm_window=args.window, chunk_size=16,
                       alpha_spike_floor=1.0, pm_enabled=memories, em_enabled=memories,
                       plasticity_span=args.span, em_slots=args.em_slots, em_writes_per_span=args.em_writes,
                       em_topk=args.em_topk, em_keys=args.em_keys, em_salience_weight=args.salience_weight,
                       em_strength_max=args.em_strength_max, em_age_decay=args.em_age_decay)


class OracleSalience(torch.nn.Module):
    """A diagnostic stand-in for the episodic memory's salience head: +5 at value tokens,
    -5 elsewhere, read from the ids of the call being run (`tokens`, set before each
    forward), so the memory is told which tokens to keep and only its read is on trial."""

    tokens: torch.Tensor | None = None

    def __init__(self, first_value: int):
        super().__init__()
        self.first_value = first_value

    def forward(self, h):
        return torch.where(OracleSalience.tokens >= self.first_value, 5.0, -5.0)[..., None].to(h.dtype)


def run_model(model, x, state):
    OracleSalience.tokens = x
    return model(x, state=state)


@contextlib.contextmanager
def attention_silenced(model):
    """The backbone's WM attention blocks output zeros (a probe: does its recall go through
    its attention at all?). Memories must be off: with them the block calls `attend`."""
    silence = lambda module, inputs, out: (torch.zeros_like(out[0]), *out[1:])  # noqa: E731
    hooks = [block.mixer.register_forward_hook(silence) for block in model.blocks
             if isinstance(block.mixer, WorkingMemoryAttention)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def loss_of(logits, y, gap, text_weight: float):
    """Mean CE over the answers, plus text_weight x the mean over filler targets (book text)."""
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    answer = gap >= 0
    loss = ce[answer].sum() / answer.sum().clamp(min=1)
    if text_weight:
        loss = loss + text_weight * ce[~answer].mean()
    return loss


def train(model, streams: PairStreams, steps: int, args, label: str, until=None) -> dict:
    """AdamW with warmup, state carried and detached per step; `until()` (every 100 steps)
    ends training early when it returns True."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    state, t0, losses, step = None, time.time(), [], 0
    for step in range(1, steps + 1):
        x, y, gap = streams.next_batch()
        out = run_model(model, x, state)
        loss = loss_of(out.logits, y, gap, args.text_weight)
        loss = loss + sum(v for k, v in out.aux.items() if k.startswith("loss/"))  # the memories' own terms
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        state = detach_state(out.state)
        losses.append(loss.item())
        if step % 100 == 0:
            extra = " ".join(f"{k.split('/')[1]} {float(v):.3f}" for k, v in out.aux.items()
                             if k.startswith("metric/em_"))
            log(f"[{label}] step {step}/{steps} loss {sum(losses[-100:]) / 100:.3f} ({time.time() - t0:.0f}s) {extra}")
            if until is not None and until():
                model.train()
                break
            model.train()
    return {"steps": step, "seconds": round(time.time() - t0, 1), "loss_last": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4)}


@torch.no_grad()
def recall(model, gap: int, args, seed: int, text) -> dict:
    """Accuracy of the argmax answer at queries `gap` tokens after their pair, state carried,
    counted once the streams have run max(gap, --warmup) tokens (a warm-up: the trained
    model has only seen memories in their steady state)."""
    pair_every = max(args.pair_every, gap // 16)
    streams = PairStreams(args.eval_batch, args.window, args.filler_vocab, args.keys, args.values, (gap, gap),
                          pair_every, seed, text, cooldown=args.cooldown)
    model.eval()
    state, hits, n, nll = None, 0, 0, 0.0
    calls = 0
    start = max(gap, args.warmup)
    while n < args.probes and calls < 8 * (start + pair_every * args.probes // args.eval_batch) // args.window + 16:
        x, y, g = streams.next_batch()
        out = run_model(model, x, state)
        state = detach_state(out.state)
        answer = g >= 0
        if calls * args.window >= start:  # before gap, every stream is still filling its first gap
            logits = out.logits.float()[answer]
            hits += int((logits.argmax(-1) == y[answer]).sum())
            nll += float(F.cross_entropy(logits, y[answer], reduction="sum"))
            n += int(answer.sum())
        calls += 1
    return {"gap": gap, "gap_windows": round(gap / args.window, 2), "probes": n,
            "recall_acc": round(hits / max(1, n), 4), "answer_loss": round(nll / max(1, n), 4),
            "chance": round(1 / args.values, 4), "warmup": args.warmup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filler", choices=("random", "text"), default="random")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--global-every", type=int, default=2)
    ap.add_argument("--window", type=int, default=64, help="W: the WM window and the call length")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--keys", type=int, default=256)
    ap.add_argument("--values", type=int, default=64)
    ap.add_argument("--filler-vocab", type=int, default=64, help="random filler: its vocabulary (text: bytes, 256)")
    ap.add_argument("--pair-every", type=int, default=8, help="mean tokens between placed pairs (training streams)")
    ap.add_argument("--steps", type=int, default=9000, help="most phase-A backbone steps")
    ap.add_argument("--init", default=None, help="a .pth file: the backbone starts from these weights (same model flags) "
                    "and trains on this run's streams, e.g. denser pairs than it learnt on")
    ap.add_argument("--backbone-gap", type=int, default=None, help="backbone gaps: uniform in [1, this] (default W/2)")
    ap.add_argument("--target", type=float, default=0.9, help="in-window recall that ends the backbone's training")
    ap.add_argument("--phase-steps", type=int, default=600)
    ap.add_argument("--train-gap", type=int, default=1024, help="phase-C/A' gaps: log-uniform in [--train-gap-min, this]")
    ap.add_argument("--train-gap-min", type=int, default=1)
    ap.add_argument("--phase-call", type=int, default=None,
                    help="call length of the phase-C/A' steps (default W; longer calls let a memory entry written "
                         "and read in one call train the keys and salience that wrote it)")
    ap.add_argument("--phase-pair-every", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                    help="pair spacing of the phase-C/A' streams (default --pair-every); a list such as 8,32 "
                         "gives the batch's streams these spacings in turn")
    ap.add_argument("--span", type=int, default=32, help="plasticity span P")
    ap.add_argument("--em-slots", type=int, default=64)
    ap.add_argument("--em-writes", type=int, default=2)
    ap.add_argument("--em-topk", type=int, default=4)
    ap.add_argument("--em-strength-max", type=float, default=1.0, help="model.em_strength_max")
    ap.add_argument("--em-age-decay", type=float, default=1.0, help="model.em_age_decay: a full memory replaces "
                    "the entry of lowest strength x this ** (spans since written)")
    ap.add_argument("--em-keys", choices=("attention", "own"), default="attention",
                    help="model.em_keys: the memory looked up by the attention's queries/keys or by its own")
    ap.add_argument("--skip-off", action="store_true", help="train and score only memories_on (memories_off "
                    "does not depend on the memory's flags: reuse its rows from a run with the same other flags)")
    ap.add_argument("--skip-on", action="store_true", help="train and score only memories_off")
    ap.add_argument("--save-models", default=None, help="a path prefix: the trained phase models are saved as "
                    "PREFIX_memories_on.pth / PREFIX_memories_off.pth (to look into them)")
    ap.add_argument("--oracle-salience", action="store_true", help="diagnostic: the memory is told to keep the "
                    "value tokens (its salience head replaced by the token ids), so only its read is on trial")
    ap.add_argument("--cooldown", type=int, default=None, help="tokens before a key is placed again (default: "
                    "2x the stream's largest gap); a key re-bound sooner is answered from an older pair still in memory")
    ap.add_argument("--salience-weight", type=float, default=1.0,
                    help="model.em_salience_weight (0: the salience learns from the memory's reads alone)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--text-weight", type=float, default=None, help="weight of the filler's LM loss (text: 1, random: 0)")
    ap.add_argument("--probes", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=0, help="recall counts answers once a stream has run this many "
                    "tokens (and its gap): 0 measures from the stream's start, the memory still filling")
    ap.add_argument("--load-models", default=None, help="a --save-models prefix: the phase models are loaded from "
                    "it (same flags) instead of trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default=None,
                    help="a .pth file: the phase-A backbone is loaded from it if it exists, else trained and saved there "
                         "(it must come from the same model and stream flags)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = None
    if args.filler == "text":
        files = sorted(BOOKS.glob("*.txt"))
        if not files:
            sys.exit(f"no books in {BOOKS} for --filler text")
        raw = b"\n".join(f.read_bytes() for f in files)
        text, args.filler_vocab = list(raw[: len(raw) * 9 // 10]), 256
        eval_text = list(raw[len(raw) * 9 // 10:])  # held-out text for the recall streams
    if args.text_weight is None:
        args.text_weight = 1.0 if text else 0.0
    W = args.window
    emit({"kind": "config", **vars(args)})

    def streams(gap, seed, uniform=False, T=W, pair_every=args.pair_every):
        return PairStreams(args.batch, T, args.filler_vocab, args.keys, args.values, gap, pair_every, seed,
                           text, uniform, cooldown=args.cooldown)

    vocab = args.filler_vocab + args.keys + args.values
    backbone = build_model(model_config(args, False), vocab)
    saved = Path(args.backbone) if args.backbone else None
    if saved is not None and saved.exists():
        backbone.load_state_dict(torch.load(saved, weights_only=True))
        emit({"kind": "train", "model": "backbone", "phase": "A", "loaded": str(saved)})
    else:
        if args.init:
            backbone.load_state_dict(torch.load(args.init, weights_only=True))
        inside = lambda m: recall(m, W // 4, args, 99, eval_text if text else None)["recall_acc"] >= args.target  # noqa: E731
        row = train(backbone, streams((1, args.backbone_gap or W // 2), args.seed, uniform=True), args.steps, args, "backbone",
                    until=lambda: inside(backbone))
        emit({"kind": "train", "model": "backbone", "phase": "A", **row})
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(backbone.state_dict(), saved)
    for gap in (W // 4, W // 2):
        emit({"kind": "recall", "model": "backbone", **recall(backbone, gap, args, 7, eval_text if text else None)})
        with attention_silenced(backbone):  # the same probes with the attention's output zeroed
            emit({"kind": "recall", "model": "backbone/attention_silenced",
                  **recall(backbone, gap, args, 7, eval_text if text else None)})

    models = {}
    for label, memories in (("memories_off", False), ("memories_on", True))[int(args.skip_off):2 - int(args.skip_on)]:
        model = build_model(model_config(args, memories), vocab)
        missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
        assert not unexpected, unexpected
        if memories:
            if args.oracle_salience:
                for block in model.blocks:
                    if block.em is not None:
                        block.em.salience = OracleSalience(args.filler_vocab + args.keys)
            models["memories_on/untrained"] = copy.deepcopy(model)
        if args.load_models:
            model.load_state_dict(torch.load(f"{args.load_models}_{label}.pth", weights_only=True))
            row = {"loaded": f"{args.load_models}_{label}.pth"}
        else:
            row = train(model, streams((args.train_gap_min, args.train_gap), args.seed + 1, T=args.phase_call or W,
                                       pair_every=args.phase_pair_every or args.pair_every),
                        args.phase_steps, args, label)
        emit({"kind": "train", "model": label, "phase": "C" if memories else "A", **row})
        if args.save_models and not args.load_models:
            torch.save(model.state_dict(), f"{args.save_models}_{label}.pth")
        models[label] = model
    for gap in (W // 4, W // 2, 2 * W, 8 * W, 32 * W):
        labels = ("memories_off", "memories_on", "memories_on/switched_off", "memories_on/untrained")
        for label in labels[int(args.skip_off):1 if args.skip_on else 4]:
            model = models["memories_on" if label.endswith("switched_off") else label]
            ctx = model.memories_switched_off() if label.endswith("switched_off") else contextlib.nullcontext()
            with ctx:
                t0 = time.time()
                r = recall(model, gap, args, 1000 + gap, eval_text if text else None)
            emit({"kind": "recall", "model": label, "inside_window": gap <= W, **r, "seconds": round(time.time() - t0, 1)})
            log(f"gap {gap} ({gap / W:g} W) {label}: recall {r['recall_acc']:.3f} over {r['probes']} probes")


if __name__ == "__main__":
    main()
