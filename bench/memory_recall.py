"""Do the memories remember? Planted-fact recall across many training steps of carried
state, held-out perplexity, and drift after a lifelong session.

    python bench/memory_recall.py        # both models, one after the other
    # the same on two cores, one model each: ~13 min (off) and ~28 min (on)
    python bench/memory_recall.py --models memories_off --threads 1 > off.jsonl &
    python bench/memory_recall.py --models memories_on --threads 1 > on.jsonl
    python bench/memory_recall.py --global-every 2 --steps 20000 --d-model 256 --layers 4   # on a GPU

The defaults are the smallest setting measured in which the models learn to copy a fact
at all (the control below): all blocks WM attention (--global-every 1), probes weighted
x20, a 2000-step curriculum with every probe inside the WM window, then gaps of 4-300
tokens. On 2 CPU cores the default hybrid (--global-every 2: Spike-KDA + WM) stayed at
chance even inside the window after 12M tokens, and so did the all-WM model without the
curriculum; a model that cannot copy a fact it sees says nothing about its memories.

Two byte-level hatchlings are trained on the same streams with the same seed and steps:
"memories_off" (phase A) and "memories_on" (PM + EM, phase C). The streams are book text
(../shared/corpus/books, first 95% of each book) into which facts "The code for <name> is
<number>." are planted and repeated (the probe) after a gap of `--train-gap` tokens
(log-uniform; a probe may fall in a later training step than its fact): state is carried
and detached between steps, exactly as the trainer does (TBPTT). The loss on a probe's answer digits
is weighted by `--probe-weight` (both models alike).

Evaluation, on the held-out 5% of the books:
- recall: per gap g in --gaps (default 300, 1k, 4k, 16k tokens), facts planted g tokens before
  their probe; accuracy of the greedy (teacher-forced) answer digits (all digits right:
  recall_acc; per digit: digit_acc) and the mean loss on them (probe_loss, nats), for
  memories_off, memories_on, and memories_on with its memories switched off at inference.
  First, a control: the same at --window-gap tokens, inside the WM window (digit_acc,
  probe_loss). A model at chance there has not learnt to copy a fact at all, and its
  long-gap rows cannot tell whether memories help.
- perplexity: held-out text without facts, same three models.
- drift: memories_on continues training for --session-steps on one domain (Shakespeare,
  documents of --doc-len tokens) with lifelong soft resets; general held-out perplexity
  (War and Peace) before and after, the session's memory contents carried or cleared;
  memories_off gets the same session (its drift is the weights' alone).

One JSON object per line on stdout:
  {"bench": "memory_recall", "kind": "config", ...}
  {"kind": "train", "model": ..., "steps", "tokens", "seconds", "loss_last"}
  {"kind": "recall", "model": ..., "gap": 1000, "probes", "recall_acc", "digit_acc", "probe_loss", "chance_digit_acc"}
  {"kind": "perplexity", "model": ..., "held_out_ppl", "tokens"}
  {"kind": "drift", "model": ..., "ppl_before", "ppl_after", "ppl_after_memory_kept", ...}
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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EOT = 256  # bytes are 0..255; one extra token ends a document
VOCAB = 257
NAMES = ["Zorvan", "Kelith", "Amrod", "Tesska", "Bruvik", "Ondrel", "Yavine", "Quorra", "Felmar", "Isolde",
         "Praxil", "Undrai", "Velkan", "Mireth", "Corvid", "Halvor", "Sybren", "Dagny", "Rusalk", "Elowen",
         "Torvik", "Nimrah", "Gaspin", "Liora"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(row: dict) -> None:
    print(json.dumps({"bench": "memory_recall", **row}), flush=True)


# ------------------------------------------------------------------------------------
# Text with planted facts
# ------------------------------------------------------------------------------------

def fact(name: str, code: str) -> tuple[list[int], list[int]]:
    """Bytes of ' The code for <name> is <code>. ' and the indices of the code's digits."""
    head = f" The code for {name} is ".encode()
    body = head + code.encode() + b". "
    return list(body), list(range(len(head), len(head) + len(code)))


class FactStreams:
    """B endless byte streams of book text with planted facts and their later probes.

    next_batch() -> (x [B, T], y [B, T], weight [B, T], reset [B, T]): inputs, targets,
    per-target loss weights (`probe_weight` on the answer digits of a probe) and document
    starts (only when doc_len is set: an EOT every ~doc_len tokens, no facts across it).
    """

    def __init__(self, texts: list[bytes], B: int, T: int, seed: int, digits: int, fact_every: int,
                 gap: tuple[int, int], probe_weight: float, doc_len: int = 0):
        self.texts, self.B, self.T, self.digits = texts, B, T, digits
        self.fact_every, self.gap, self.probe_weight, self.doc_len = fact_every, gap, probe_weight, doc_len
        self.rng = random.Random(seed)
        self.streams = [self._new_stream() for _ in range(B)]

    def _new_stream(self) -> dict:
        text = self.rng.choice(self.texts)
        return {"text": text, "at": self.rng.randrange(len(text)), "tok": [], "w": [], "pos": 0, "pending": [],
                "doc_left": self.doc_len}

    def _code(self) -> str:
        return "".join(self.rng.choice("0123456789") for _ in range(self.digits))

    def _append(self, s: dict, toks: list[int], answer: list[int] = ()):
        w = [1.0] * len(toks)
        for i in answer:
            w[i] = self.probe_weight
        s["tok"] += toks
        s["w"] += w
        s["pos"] += len(toks)

    def _fill(self, s: dict):
        due = [p for p in s["pending"] if p[2] <= s["pos"]]
        if due:  # a probe: the fact again, its digits are what the model should recall
            name, code, _ = due[0]
            s["pending"].remove(due[0])
            toks, answer = fact(name, code)
            self._append(s, toks, answer)
            return
        if self.fact_every and self.rng.random() < 64 / self.fact_every:
            used = {p[0] for p in s["pending"]}
            name = self.rng.choice([n for n in NAMES if n not in used] or NAMES)
            code = self._code()
            toks, _ = fact(name, code)
            self._append(s, toks)
            lo, hi = self.gap
            s["pending"].append((name, code, s["pos"] + int(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))))
            return
        n = self.rng.randrange(32, 97)
        if s["pending"]:  # end the chunk where the next probe is due, so gaps are as planned
            n = max(1, min(n, min(p[2] for p in s["pending"]) - s["pos"]))
        text = s["text"]
        chunk = text[s["at"]:s["at"] + n]
        s["at"] = (s["at"] + n) % max(1, len(text) - 1)
        self._append(s, list(chunk))
        if self.doc_len:
            s["doc_left"] -= len(chunk)
            if s["doc_left"] <= 0:  # a new document: nothing pending survives it
                self._append(s, [EOT])
                s["pending"], s["doc_left"] = [], self.doc_len
                s["at"] = self.rng.randrange(len(text))

    def next_batch(self):
        rows, weights = [], []
        for s in self.streams:
            while len(s["tok"]) < self.T + 1:
                self._fill(s)
            rows.append(s["tok"][:self.T + 1])
            weights.append(s["w"][1:self.T + 1])
            del s["tok"][:self.T], s["w"][:self.T]
        tok = torch.tensor(rows)
        x, y = tok[:, :-1], tok[:, 1:]
        reset = torch.zeros_like(x, dtype=torch.bool)
        reset[:, 1:] = x[:, :-1] == EOT
        return x.to(DEVICE), y.to(DEVICE), torch.tensor(weights).to(DEVICE), reset.to(DEVICE)


def recall_streams(text: bytes, B: int, gaps: list[int], per_gap: int, digits: int, seed: int):
    """Evaluation streams: per stream, `per_gap` facts for every gap, each planted so that
    its probe comes about `gap` tokens later; all probes at the end.
    Returns (tokens [B, L], probes: list of (stream, answer positions, planned gap, actual gap))."""
    rng = random.Random(seed)
    streams, probes = [], []
    tail = 400
    for b in range(B):
        names = rng.sample(NAMES, per_gap * len(gaps))
        facts = [(names[i * per_gap + j], "".join(rng.choice("0123456789") for _ in range(digits)), g)
                 for i, g in enumerate(sorted(gaps, reverse=True)) for j in range(per_gap)]
        end = max(gaps) + 64
        plan = sorted(((end - g - 40 * j, f) for j, f in enumerate(facts) for g in [f[2]]), key=lambda p: p[0])
        at = rng.randrange(len(text) - 2 * end - 4 * tail)
        toks: list[int] = []
        fact_pos = {}
        for target, (name, code, gap) in plan:
            need = max(0, target - len(toks))
            toks += list(text[at:at + need])
            at += need
            body, answer = fact(name, code)
            fact_pos[name] = len(toks) + answer[0]
            toks += body
        toks += list(text[at:at + max(0, end - len(toks))])
        at += end
        rng.shuffle(facts)
        for name, code, gap in facts:
            toks += list(text[at:at + 20])
            at += 20
            body, answer = fact(name, code)
            probes.append((b, [len(toks) + i for i in answer], gap, len(toks) + answer[0] - fact_pos[name]))
            toks += body
        streams.append(toks)
    L = max(len(s) for s in streams)
    filler = list(text[:L])
    tokens = torch.tensor([s + filler[:L - len(s)] for s in streams])
    return tokens, probes


# ------------------------------------------------------------------------------------
# Models, training, evaluation
# ------------------------------------------------------------------------------------

def model_config(args, memories: bool) -> ModelConfig:
    return ModelConfig(arch="hatchling", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=max(1, args.heads // 2), global_every=args.global_every, wm_window=args.wm_window,
                       chunk_size=16, pm_enabled=memories, em_enabled=memories, plasticity_span=args.span,
                       em_slots=args.em_slots, pm_slots=args.pm_slots)


@contextlib.contextmanager
def memories_switched_off(model):
    """Inference ablation: the same weights with PM/EM reads (and writes) removed."""
    saved = [(b.pm, b.em) for b in model.blocks], model.memories
    for b in model.blocks:
        b.pm = b.em = None
    model.memories = False
    try:
        yield model
    finally:
        for b, (pm, em) in zip(model.blocks, saved[0]):
            b.pm, b.em = pm, em
        model.memories = saved[1]


def train(model, streams: FactStreams, steps: int, lr: float, label: str, warm: tuple = (0, None)) -> dict:
    """warm = (steps, gap range): the first steps probe at these gaps (a curriculum: copying
    is learnt where attention sees the fact, then the gaps widen to streams.gap)."""
    final_gap = streams.gap
    if warm[0]:
        streams.gap = warm[1]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (1.0 if s < 0.8 * steps else max(0.1, (steps - s) / (0.2 * steps))))
    model.train()
    state, t0, losses = None, time.time(), []
    for step in range(steps):
        if step == warm[0]:
            streams.gap = final_gap
        x, y, w, reset = streams.next_batch()
        out = model(x, state=state, reset_mask=reset)
        ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        state = detach_state(out.state)
        losses.append(ce.mean().item())
        if step % 25 == 0 or step == steps - 1:
            extra = ""
            for key in ("pm_commit_rate", "pm_read_norm", "em_write_rate", "em_novelty", "em_read_norm"):
                if f"metric/{key}/layer0" in out.aux:
                    extra += f" {key} {out.aux[f'metric/{key}/layer0']:.3f}"
            log(f"[{label}] step {step}/{steps} loss {sum(losses[-25:]) / len(losses[-25:]):.3f} "
                f"({time.time() - t0:.0f}s){extra}")
    return {"steps": steps, "tokens": steps * x.numel(), "seconds": round(time.time() - t0, 1),
            "loss_last": sum(losses[-25:]) / len(losses[-25:])}


@torch.no_grad()
def run_stream(model, tokens: torch.Tensor, T: int, reset=None, state=None):
    """Per-token NLL [B, L-1] and correctness of the greedy prediction, state carried in T-token calls."""
    model.eval()
    tokens = tokens.to(DEVICE)
    x, y = tokens[:, :-1], tokens[:, 1:]
    nll, hit = [], []
    for lo in range(0, x.shape[1], T):
        out = model(x[:, lo:lo + T], state=state, reset_mask=None if reset is None else reset[:, lo:lo + T])
        state = detach_state(out.state)
        logp = out.logits.float().log_softmax(-1)
        nll.append(-logp.gather(-1, y[:, lo:lo + T, None]).squeeze(-1))
        hit.append(logp.argmax(-1) == y[:, lo:lo + T])
    return torch.cat(nll, 1), torch.cat(hit, 1), state


def recall(model, tokens, probes, T: int, gaps: list[int]) -> list[dict]:
    nll, hit, _ = run_stream(model, tokens, T)
    rows = []
    for g in gaps:
        mine = [(b, pos) for b, pos, planned, _ in probes if planned == g]
        actual = [a for _, _, planned, a in probes if planned == g]
        digit_hits = torch.stack([hit[b, [p - 1 for p in pos]] for b, pos in mine]).float()  # predicted at p-1
        losses = torch.stack([nll[b, [p - 1 for p in pos]] for b, pos in mine])
        rows.append({"gap": g, "actual_gap_mean": round(sum(actual) / len(actual)), "probes": len(mine), "recall_acc": round(digit_hits.all(-1).float().mean().item(), 4),
                     "digit_acc": round(digit_hits.mean().item(), 4), "probe_loss": round(losses.mean().item(), 4),
                     "chance_digit_acc": 0.1})
    return rows


@torch.no_grad()
def window_recall(model, texts: list[bytes], gap: int, args, calls: int = 40) -> dict:
    """The control: facts probed `gap` tokens later (inside the WM window) on held-out text,
    in the training stream format. If a model cannot recall here, where its attention sees
    the fact, its long-gap figures say nothing about its memories."""
    streams = FactStreams(texts, args.eval_batch, args.seq, args.seed + 5, args.digits, args.fact_every,
                          (gap, gap + 1), args.probe_weight)
    model.eval()
    state, hits, losses = None, [], []
    for _ in range(calls):
        x, y, w, reset = streams.next_batch()
        out = model(x, state=state, reset_mask=reset)
        state = detach_state(out.state)
        probe = w > 1
        logits = out.logits.float()[probe]
        hits.append(logits.argmax(-1) == y[probe])
        losses.append(F.cross_entropy(logits, y[probe], reduction="none"))
    hits, losses = torch.cat(hits).float(), torch.cat(losses)
    return {"gap": gap, "probes": hits.numel() // args.digits, "digit_acc": round(hits.mean().item(), 4),
            "probe_loss": round(losses.mean().item(), 4), "chance_digit_acc": 0.1, "control": "inside the WM window"}


def held_out_ppl(model, text: bytes, B: int, L: int, T: int, seed: int, state=None) -> tuple[float, int]:
    rng = random.Random(seed)
    starts = [rng.randrange(len(text) - L - 1) for _ in range(B)]
    tokens = torch.tensor([list(text[s:s + L + 1]) for s in starts])
    nll, _, _ = run_stream(model, tokens, T, state=state)
    return math.exp(nll.mean().item()), nll.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "books"))
    ap.add_argument("--steps", type=int, default=3500, help="training steps per model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--wm-window", type=int, default=64)
    ap.add_argument("--global-every", type=int, default=1,
                    help="every n-th block is WM attention (1: all; see the docstring for why the default)")
    ap.add_argument("--span", type=int, default=32, help="plasticity span P")
    ap.add_argument("--pm-slots", type=int, default=16)
    ap.add_argument("--em-slots", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--fact-every", type=int, default=100, help="mean tokens between planted facts in training")
    ap.add_argument("--train-gap", default="4,300", help="probe gap range in training (log-uniform)")
    ap.add_argument("--probe-weight", type=float, default=20.0)
    ap.add_argument("--warm-steps", type=int, default=2000, help="curriculum: first steps probe at --warm-gap")
    ap.add_argument("--warm-gap", default="4,12", help="the curriculum's gap range (inside the WM window)")
    ap.add_argument("--gaps", default="300,1000,4000,16000")
    ap.add_argument("--window-gap", type=int, default=8,
                    help="the control's gap: tokens from a fact's end to its probe (digits to digits: this plus "
                         "the ~27-byte fact, inside the WM window)")
    ap.add_argument("--per-gap", type=int, default=2, help="facts per gap per evaluation stream")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out perplexity tokens per stream")
    ap.add_argument("--session-steps", type=int, default=30)
    ap.add_argument("--doc-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="memories_off,memories_on",
                    help="which to train and evaluate (two processes, one model each, use two cores better)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = Path(args.corpus)
    books = {p.stem: p.read_bytes() for p in sorted(corpus.glob("*.txt"))}
    if not books:
        sys.exit(f"no .txt books in {corpus}")
    train_text = {k: v[:int(len(v) * 0.95)] for k, v in books.items()}
    held = {k: v[int(len(v) * 0.95):] for k, v in books.items()}
    gaps = [int(g) for g in args.gaps.split(",")]
    t_start = time.time()
    emit({"kind": "config", **{k: v for k, v in vars(args).items()}, "books": list(books)})

    models, results = {}, {}
    wanted = args.models.split(",")
    if not set(wanted) <= {"memories_off", "memories_on"}:
        sys.exit(f"--models: expected memories_off and/or memories_on, got {args.models!r}")
    for label, memories in (("memories_off", False), ("memories_on", True)):
        if label not in wanted:
            continue
        torch.manual_seed(args.seed)
        model = build_model(model_config(args, memories), VOCAB).to(DEVICE)
        streams = FactStreams(list(train_text.values()), args.batch, args.seq, args.seed, args.digits, args.fact_every,
                              tuple(int(g) for g in args.train_gap.split(",")), args.probe_weight)
        warm = (args.warm_steps, tuple(int(g) for g in args.warm_gap.split(",")))
        results[label] = train(model, streams, args.steps, args.lr, label, warm)
        params = sum(p.numel() for p in model.parameters())
        emit({"kind": "train", "model": label, "params": params, **results[label]})
        models[label] = model

    # recall: the held-out text of the longest book carries the gaps
    text = max(held.values(), key=len)
    tokens, probes = recall_streams(text, args.eval_batch, gaps, args.per_gap, args.digits, args.seed + 1)
    variants = {label: models[label.split("/")[0]] for label in
                ("memories_off", "memories_on", "memories_on/switched_off") if label.split("/")[0] in models}

    def variant(label):  # a fresh context each time: the switch-off is undone on exit
        model = variants[label]
        return memories_switched_off(model) if label.endswith("switched_off") else contextlib.nullcontext(model)

    for label in variants:
        t0 = time.time()
        with variant(label) as model:
            emit({"kind": "recall", "model": label, **window_recall(model, list(held.values()), args.window_gap, args)})
            for row in recall(model, tokens, probes, args.seq, gaps):
                emit({"kind": "recall", "model": label, **row})
        log(f"[recall] {label} ({time.time() - t0:.0f}s)")

    general = held["war_and_peace"] if "war_and_peace" in held else text
    for label in variants:
        with variant(label) as model:
            ppl, n = held_out_ppl(model, b"".join(held.values()), args.eval_batch, args.eval_tokens, args.seq, args.seed)
        emit({"kind": "perplexity", "model": label, "held_out_ppl": round(ppl, 4), "tokens": n})

    # drift: a lifelong session on one domain
    domain = "tinyshakespeare" if "tinyshakespeare" in train_text else next(iter(train_text))
    for label in [m for m in ("memories_on", "memories_off") if m in models]:
        model = copy.deepcopy(models[label])
        before, _ = held_out_ppl(model, general, args.eval_batch, args.eval_tokens, args.seq, args.seed + 2)
        model.lifelong = True
        session = FactStreams([train_text[domain]], args.batch, args.seq, args.seed + 3, args.digits, 0, (1, 2), 1.0,
                              doc_len=args.doc_len)
        # the session's runtime state is what a lifelong run would carry: train and keep it
        state, t0 = None, time.time()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr * 0.1, betas=(0.9, 0.95), weight_decay=0.0)
        model.train()
        for _ in range(args.session_steps):
            x, y, w, reset = session.next_batch()
            out = model(x, state=state, reset_mask=reset)
            loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            state = detach_state(out.state)
        after, _ = held_out_ppl(model, general, args.eval_batch, args.eval_tokens, args.seq, args.seed + 2)
        row = {"kind": "drift", "model": label, "domain": domain, "general": "war_and_peace held-out",
               "session_tokens": args.session_steps * args.batch * args.seq, "ppl_before": round(before, 4),
               "ppl_after": round(after, 4)}
        if model.memories:  # the session's committed memories carried into the general text
            kept = model.state_from_memory(model.memory_state(state), args.eval_batch, DEVICE)
            row["ppl_after_memory_kept"] = round(held_out_ppl(model, general, args.eval_batch, args.eval_tokens,
                                                              args.seq, args.seed + 2, state=kept)[0], 4)
        row["seconds"] = round(time.time() - t0, 1)
        emit(row)
    emit({"kind": "done", "seconds": round(time.time() - t_start, 1)})


if __name__ == "__main__":
    main()
