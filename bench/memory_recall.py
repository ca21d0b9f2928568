"""Do the memories remember? Planted-fact recall across many training steps of carried
state, held-out perplexity, and drift after a lifelong session.

    python bench/memory_recall.py        # ~25 min on 2 CPU cores (~10 with --backbone FILE saved)
    python bench/memory_recall.py --global-every 2 --steps 20000 --d-model 256 --layers 4   # on a GPU
    python bench/memory_recall.py --tokenizer bpe --d-model 128 --layers 4 --global-every 2 --wm-window 128 \
        --steps 1500 --warm-steps 700 --warm-gap 4,60 --train-gap 8,1500 --phase-steps 400 \
        --gaps 30,60,1000,4000,16000 --probes 64 --threads 1       # BPE, ~1 h on one CPU core

Tokens: bytes (--tokenizer bytes, the default) or a byte-level BPE of --vocab learned from
the training text and cached in bench/results (--tokenizer bpe). Under both a code digit
is one token; under the BPE a name is one to three tokens, so copying "the digits after
this name" is the induction-head pattern small attention models learn.

Training, like the trainer's phases: one byte-level hatchling backbone is trained in phase
A (memories off) for --steps; then two copies train --phase-steps more on the same
streams: "memories_off" in phase A again, "memories_on" in phase C (procedural and
episodic memory on, the new memory parameters freshly initialised). The streams are book
text (../shared/corpus/books, first 95% of each book) into which facts "The code for
<name> is <number>." are planted and repeated (the probe) after a gap of `--train-gap`
tokens (log-uniform; a probe may fall in a later training step than its fact): state is
carried and detached between steps, exactly as the trainer does (TBPTT). The loss on a
probe's answer digits is weighted by `--probe-weight`.

The defaults are the smallest setting measured in which a model learns to copy a fact
at all: all blocks WM attention (--global-every 1), probes weighted x20, the backbone's
first 2000 steps with every probe inside the WM window (--warm-gap), then gaps of 4-300
tokens. On 2 CPU cores the default hybrid (--global-every 2: Spike-KDA + WM) stayed at
chance even inside the window after 12M tokens, and so did the all-WM model without the
curriculum; a model that cannot copy a fact it sees says nothing about its memories.

Evaluation, on the held-out 5% of the books, for memories_off, memories_on,
memories_on/switched_off (its PM/EM removed at inference) and memories_on/untrained (the
backbone with fresh memories, before any phase-C step: what the episodic memory gives
for free):
- recall: per gap g in --gaps, facts probed exactly g tokens after they end (the digits
  are ~27 tokens further apart), in the training stream format on held-out text, until
  --probes probes are answered: accuracy of the greedy (teacher-forced) answer digits (all
  digits right: recall_acc; per digit: digit_acc) and the mean loss on them (probe_loss,
  nats). The first gap (8) is inside the WM window: the control. A model at chance there
  has not learnt to copy a fact at all, and its long-gap rows cannot tell whether
  memories help.
- perplexity: held-out text without facts.
- drift: memories_on and memories_off continue training for --session-steps on one domain
  (Shakespeare, documents of --doc-len tokens) with lifelong soft resets; general
  held-out perplexity (War and Peace) before and after, and for memories_on after with
  the session's memory contents carried into the general text.

One JSON object per line on stdout:
  {"bench": "memory_recall", "kind": "config", ...}
  {"kind": "train", "model": "backbone" | "memories_off" | "memories_on", "phase", "steps", "tokens", "seconds",
   "loss_last"}
  {"kind": "recall", "model": ..., "gap": 1000, "digit_distance", "inside_window", "probes", "recall_acc",
   "digit_acc", "probe_loss", "chance_digit_acc"}
  {"kind": "perplexity", "model": ..., "held_out_ppl", "tokens"}
  {"kind": "drift", "model": ..., "ppl_before", "ppl_after", "ppl_after_memory_kept", ...}
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
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
RESULTS = ROOT / "bench" / "results"
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

class Codec:
    """Text <-> token ids for the bench: bytes (vocab 257, 256 = end of text) or an 8k-style
    byte-level BPE (data/tokenizer.py). Either way a fact's code digits are one token each
    (each digit is its own token in both), so recall is scored per digit with chance 1/10,
    and a name is one or a few tokens under the BPE (the induction-head pattern that
    name-keyed copying needs) but 6 under bytes."""

    def __init__(self, tokenizer=None):
        self.tok = tokenizer
        if tokenizer is None:
            self.name, self.vocab, self.eot = "bytes", 257, 256
            self.digits = [ord(str(i)) for i in range(10)]
            self.chunk = (32, 97)  # tokens of text between facts: 32-96 bytes
        else:
            self.name, self.vocab, self.eot = f"bpe{tokenizer.vocab_size}", tokenizer.vocab_size, tokenizer.eot_id
            self.digits = [tokenizer.encode(str(i)) for i in range(10)]
            if any(len(d) != 1 for d in self.digits):
                sys.exit(f"this BPE splits a digit into several tokens: {self.digits}")
            self.digits = [d[0] for d in self.digits]
            self.chunk = (8, 25)  # about the same 32-96 bytes of text, at ~4 bytes a token

    def encode(self, text: str) -> list[int]:
        return list(text.encode()) if self.tok is None else self.tok.encode(text)

    def fact(self, name: str, code: str) -> tuple[list[int], list[int]]:
        """Tokens of ' The code for <name> is <code>. ' and the indices of the code's digits."""
        head = self.encode(f" The code for {name} is ")
        return head + [self.digits[int(c)] for c in code] + self.encode(". "), list(range(len(head), len(head) + len(code)))


def bpe_codec(train_texts: list[str], vocab: int) -> Codec:
    """A byte-level BPE learned from the training text, cached in bench/results by its inputs."""
    from data import TokenizerConfig, build_tokenizer

    digest = hashlib.blake2b(json.dumps([vocab, [len(t) for t in train_texts]]).encode(), digest_size=6).hexdigest()
    path = RESULTS / f"memory_tokenizer_{vocab}_{digest}.json"
    if not path.exists():
        log(f"learning a {vocab}-token BPE from the training text (once; cached as {path.name})")
        tok = build_tokenizer(TokenizerConfig(type="bpe", vocab_size=vocab), train_texts)
        RESULTS.mkdir(parents=True, exist_ok=True)
        tok.tok.save(str(path))
    return Codec(build_tokenizer(TokenizerConfig(type="file", path=str(path))))


class FactStreams:
    """B endless token streams of book text with planted facts and their later probes.

    next_batch() -> (x [B, T], y [B, T], weight [B, T], reset [B, T]): inputs, targets,
    per-target loss weights (`probe_weight` on the answer digits of a probe) and document
    starts (only when doc_len is set: an EOT every ~doc_len tokens, no facts across it).
    """

    def __init__(self, codec: Codec, texts: list[list[int]], B: int, T: int, seed: int, digits: int,
                 fact_every: int, gap: tuple[int, int], probe_weight: float, doc_len: int = 0):
        self.codec, self.texts, self.B, self.T, self.digits = codec, texts, B, T, digits
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
            toks, answer = self.codec.fact(name, code)
            self._append(s, toks, answer)
            return
        if self.fact_every and self.rng.random() < sum(self.codec.chunk) / 2 / self.fact_every:  # a text fill's mean length
            used = {p[0] for p in s["pending"]}
            name = self.rng.choice([n for n in NAMES if n not in used] or NAMES)
            code = self._code()
            toks, _ = self.codec.fact(name, code)
            self._append(s, toks)
            lo, hi = self.gap
            s["pending"].append((name, code, s["pos"] + int(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))))
            return
        n = self.rng.randrange(*self.codec.chunk)
        if s["pending"]:  # end the chunk where the next probe is due, so gaps are as planned
            n = max(1, min(n, min(p[2] for p in s["pending"]) - s["pos"]))
        text = s["text"]
        chunk = text[s["at"]:s["at"] + n]
        s["at"] = (s["at"] + n) % max(1, len(text) - 1)
        self._append(s, list(chunk))
        if self.doc_len:
            s["doc_left"] -= len(chunk)
            if s["doc_left"] <= 0:  # a new document: nothing pending survives it
                self._append(s, [self.codec.eot])
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
        reset[:, 1:] = x[:, :-1] == self.codec.eot
        return x.to(DEVICE), y.to(DEVICE), torch.tensor(weights).to(DEVICE), reset.to(DEVICE)


# ------------------------------------------------------------------------------------
# Models, training, evaluation
# ------------------------------------------------------------------------------------

def model_config(args, memories: bool) -> ModelConfig:
    return ModelConfig(arch="hatchling", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=max(1, args.heads // 2), global_every=args.global_every, wm_window=args.wm_window,
                       chunk_size=16, pm_enabled=memories, em_enabled=memories, plasticity_span=args.span,
                       em_slots=args.em_slots, em_writes_per_span=args.em_writes, pm_slots=args.pm_slots)


def train(model, streams: FactStreams, steps: int, lr: float, label: str, warm: tuple = (0, None)) -> dict:
    """warm = (steps, gap range): the first steps probe at these gaps (a curriculum: copying
    is learnt where attention sees the fact, then the gaps widen to streams.gap)."""
    if steps == 0:  # --phase-steps 0: the backbone as it is (memories_on: with fresh memories)
        return {"steps": 0, "tokens": 0, "seconds": 0.0, "loss_last": None}
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
            for key in ("pm_commit_rate", "pm_read_norm", "em_write_rate", "em_novelty", "em_strength",
                        "em_read_share"):
                vals = [f"{float(v):.3f}" for k, v in out.aux.items() if k.startswith(f"metric/{key}/")]
                if vals:  # per block
                    extra += f" {key} {'/'.join(vals)}"
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


@torch.no_grad()
def gap_recall(model, codec: Codec, texts: list[list[int]], gap: int, args, seed: int) -> dict:
    """Facts probed exactly `gap` tokens after they end (the digits ~gap + 27 tokens back),
    on held-out text, in the training stream format with state carried between calls.
    Facts come every max(--fact-every, gap / 4) tokens, so a handful are pending at once
    (24 names: a name is never reused while its fact is pending). Streams run until
    --probes probes are answered (or 4x the expected calls)."""
    fact_every = max(args.fact_every, gap // 4)
    streams = FactStreams(codec, texts, args.eval_batch, args.seq, seed, args.digits, fact_every, (gap, gap + 1), 2.0)
    expected = math.ceil((gap + fact_every * args.probes / args.eval_batch) / args.seq) + 1
    model.eval()
    state, per_stream, losses = None, [[] for _ in range(args.eval_batch)], []
    for _ in range(4 * expected):
        x, y, w, reset = streams.next_batch()
        out = model(x, state=state, reset_mask=reset)
        state = detach_state(out.state)
        logits = out.logits.float()
        probe = w > 1  # answer digits of a probe
        hit = logits.argmax(-1) == y
        losses.append(F.cross_entropy(logits[probe], y[probe], reduction="none"))
        for b in range(args.eval_batch):
            per_stream[b] += hit[b][probe[b]].tolist()
        if sum(len(h) for h in per_stream) // args.digits >= args.probes:
            break
    # a stream's digits come in probe order, digits consecutive: whole probes are runs of `digits`
    probes = [h[i:i + args.digits] for h in per_stream for i in range(0, len(h) - args.digits + 1, args.digits)]
    hits = torch.tensor(probes, dtype=torch.float)
    distance = gap + len(codec.fact("Zorvan", "0" * args.digits)[0])  # fact's digits to the probe's, about
    return {"gap": gap, "digit_distance": distance, "inside_window": distance <= args.wm_window,
            "probes": len(probes), "recall_acc": round(hits.all(-1).float().mean().item(), 4),
            "digit_acc": round(hits.mean().item(), 4), "probe_loss": round(torch.cat(losses).mean().item(), 4),
            "chance_digit_acc": 0.1}


@torch.no_grad()
def salience_rows(model, codec: Codec, texts: list[list[int]], args) -> list[dict]:
    """What the episodic memory chose to keep: per WM block, the mean salience sigmoid(z)
    of fact digits (the tokens a probe needs) and of all other tokens, on held-out streams."""
    streams = FactStreams(codec, texts, args.eval_batch, args.seq, args.seed + 9, args.digits, args.fact_every,
                          (4, 300), 2.0)
    seen, hooks = {}, []
    for i, block in enumerate(model.blocks):
        if block.em is not None:
            hooks.append(block.em.salience.register_forward_hook(
                lambda m, inp, out, i=i: seen.setdefault(i, []).append(torch.sigmoid(out.squeeze(-1)).cpu())))
    state, xs = None, []
    model.eval()
    for _ in range(8):
        x, _, _, reset = streams.next_batch()
        state = detach_state(model(x, state=state, reset_mask=reset).state)
        xs.append(x.cpu())
    for h in hooks:
        h.remove()
    x = torch.cat(xs, 1)
    digit = torch.isin(x, torch.tensor(codec.digits))
    rows = []
    for i, vals in seen.items():
        sal = torch.cat(vals, 1)
        rows.append({"layer": i, "digit_salience": round(sal[digit].mean().item(), 4),
                     "other_salience": round(sal[~digit].mean().item(), 4),
                     "digit_share_of_tokens": round(digit.float().mean().item(), 4)})
    return rows


def held_out_ppl(model, text: list[int], B: int, L: int, T: int, seed: int, state=None) -> tuple[float, int]:
    rng = random.Random(seed)
    starts = [rng.randrange(len(text) - L - 1) for _ in range(B)]
    tokens = torch.tensor([list(text[s:s + L + 1]) for s in starts])
    nll, _, _ = run_stream(model, tokens, T, state=state)
    return math.exp(nll.mean().item()), nll.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "books"))
    ap.add_argument("--steps", type=int, default=3500, help="phase-A steps of the shared backbone")
    ap.add_argument("--phase-steps", type=int, default=1000,
                    help="then per model: this many more steps, phase A (memories_off) or C (memories_on)")
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
    ap.add_argument("--em-writes", type=int, default=4, help="episodic write candidates per span")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--fact-every", type=int, default=100, help="mean tokens between planted facts in training")
    ap.add_argument("--train-gap", default="4,300", help="probe gap range in training (log-uniform)")
    ap.add_argument("--probe-weight", type=float, default=20.0)
    ap.add_argument("--warm-steps", type=int, default=2000, help="curriculum: first steps probe at --warm-gap")
    ap.add_argument("--warm-gap", default="4,12", help="the curriculum's gap range (inside the WM window)")
    ap.add_argument("--gaps", default="8,100,300,1000,4000,16000",
                    help="tokens from a fact's end to its probe (the digits are ~27 more apart); the first, "
                         "inside the WM window, is the control")
    ap.add_argument("--probes", type=int, default=96, help="probes answered per gap and model")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out perplexity tokens per stream")
    ap.add_argument("--session-steps", type=int, default=30)
    ap.add_argument("--doc-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone", default="",
                    help="a .pth file: load the phase-A backbone from it if it exists (it must come from the same "
                         "settings), else train it and save it there")
    ap.add_argument("--tokenizer", default="bytes", choices=["bytes", "bpe"],
                    help="bytes (vocab 257) or a byte-level BPE of --vocab learned from the training text")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary (with --tokenizer bpe)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = Path(args.corpus)
    books = {p.stem: p.read_text(encoding="utf-8", errors="replace") for p in sorted(corpus.glob("*.txt"))}
    if not books:
        sys.exit(f"no .txt books in {corpus}")
    train_str = {k: v[:int(len(v) * 0.95)] for k, v in books.items()}
    codec = Codec() if args.tokenizer == "bytes" else bpe_codec(list(train_str.values()), args.vocab)
    train_text = {k: codec.encode(v) for k, v in train_str.items()}
    held = {k: codec.encode(v[int(len(v) * 0.95):]) for k, v in books.items()}
    gaps = [int(g) for g in args.gaps.split(",")]
    t_start = time.time()
    emit({"kind": "config", **{k: v for k, v in vars(args).items()}, "books": list(books), "codec": codec.name,
          "train_tokens": sum(len(t) for t in train_text.values())})

    # one phase-A backbone, then the same further steps for both models: phase A again
    # (memories_off) or phase C with PM and EM on (memories_on), as the trainer's phases do
    def streams(seed: int, gap: str) -> FactStreams:
        return FactStreams(codec, list(train_text.values()), args.batch, args.seq, seed, args.digits, args.fact_every,
                           tuple(int(g) for g in gap.split(",")), args.probe_weight)

    torch.manual_seed(args.seed)
    backbone = build_model(model_config(args, False), codec.vocab).to(DEVICE)
    warm = (args.warm_steps, tuple(int(g) for g in args.warm_gap.split(",")))
    if args.backbone and Path(args.backbone).exists():
        backbone.load_state_dict(torch.load(args.backbone, map_location=DEVICE, weights_only=True))
        emit({"kind": "train", "model": "backbone", "phase": "A", "loaded": args.backbone})
    else:
        emit({"kind": "train", "model": "backbone", "phase": "A",
              **train(backbone, streams(args.seed, args.train_gap), args.steps, args.lr, "backbone", warm)})
        if args.backbone:
            torch.save(backbone.state_dict(), args.backbone)
    models = {}
    for label, memories in (("memories_off", False), ("memories_on", True)):
        torch.manual_seed(args.seed + 1)
        model = build_model(model_config(args, memories), codec.vocab).to(DEVICE)
        missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
        assert not unexpected and all(".pm." in k or ".em." in k for k in missing), (missing, unexpected)
        if memories:  # the zero-shot row: the backbone's weights with fresh memories, before phase C
            models["memories_on/untrained"] = copy.deepcopy(model)
        row = train(model, streams(args.seed + 7, args.train_gap), args.phase_steps, args.lr, label)
        emit({"kind": "train", "model": label, "phase": "C" if memories else "A",
              "params": sum(p.numel() for p in model.parameters()), **row})
        models[label] = model
        if memories:
            for row in salience_rows(model, codec, list(held.values()), args):
                emit({"kind": "salience", "model": label, **row})

    variants = {"memories_off": models["memories_off"], "memories_on": models["memories_on"],
                "memories_on/switched_off": models["memories_on"],
                "memories_on/untrained": models["memories_on/untrained"]}

    def variant(label):  # a fresh context each time: the switch-off is undone on exit
        model = variants[label]
        return model.memories_switched_off() if label.endswith("switched_off") else contextlib.nullcontext(model)

    for label in variants:
        t0 = time.time()
        with variant(label) as model:
            for gap in gaps:
                emit({"kind": "recall", "model": label, **gap_recall(model, codec, list(held.values()), gap, args,
                                                                     args.seed + 1 + gap)})
        log(f"[recall] {label} ({time.time() - t0:.0f}s)")

    general = held.get("war_and_peace", max(held.values(), key=len))
    for label in variants:
        with variant(label) as model:
            ppl, n = held_out_ppl(model, [t for h in held.values() for t in h], args.eval_batch, args.eval_tokens, args.seq, args.seed)
        emit({"kind": "perplexity", "model": label, "held_out_ppl": round(ppl, 4), "tokens": n})

    # drift: a lifelong session on one domain
    domain = "tinyshakespeare" if "tinyshakespeare" in train_text else next(iter(train_text))
    for label in ("memories_on", "memories_off"):
        model = copy.deepcopy(models[label])
        before, _ = held_out_ppl(model, general, args.eval_batch, args.eval_tokens, args.seq, args.seed + 2)
        model.lifelong = True
        session = FactStreams(codec, [train_text[domain]], args.batch, args.seq, args.seed + 3, args.digits, 0, (1, 2), 1.0,
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
        if model.memories and state is not None:  # the session's committed memories carried into the general text
            kept = model.state_from_memory(model.memory_state(state), args.eval_batch, DEVICE)
            row["ppl_after_memory_kept"] = round(held_out_ppl(model, general, args.eval_batch, args.eval_tokens,
                                                              args.seq, args.seed + 2, state=kept)[0], 4)
        row["seconds"] = round(time.time() - t0, 1)
        emit(row)
    emit({"kind": "done", "seconds": round(time.time() - t_start, 1)})


if __name__ == "__main__":
    main()
