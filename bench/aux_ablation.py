"""Auxiliary heads ablation: the same transformer, the same init and the same token
batches of a local corpus, trained with the heads off, each head on alone, and all on;
held-out cross-entropy after the budget and the step-time overhead of each head.

    python bench/aux_ablation.py                # 100k tokens per configuration: ~7-11 min on 2 shared CPU cores
    python bench/aux_ablation.py 300000 --configs off,value --weight 0.05 --d-model 128
    python bench/aux_ablation.py 2000000 --device cuda --batch 32 --threads 0

Held-out CE is the LM's own loss (the heads are off in eval mode). A "noise" run (heads
off, another init and batch seed) shows how far held-out CE moves by chance alone; a
head whose eval_delta is > 0 is listed under hurts_eval whatever the noise.

Step time (forward, backward, AdamW) is measured after training, in interleaved rounds
(every configuration in turn, so load from other processes on a shared machine hits
them alike), and the minimum over all timed steps is kept: overhead_pct compares full
steps. head_overhead_pct is steadier: the head's own forward and backward (on the model's
real hidden states, many repetitions, minimum) over the heads-off step time. On a shared
CPU keep --threads 1: two threads fighting other processes for two cores were 2-4x
slower and far noisier. One JSON line per configuration, then a summary line:

  {"bench": "aux_ablation", "config": "value", "tokens": ..., "eval_loss": ..., "eval_delta": ...,
   "step_ms": ..., "overhead_pct": ..., "head_ms": ..., "head_overhead_pct": ..., "head_params": ...,
   "aux": {"loss/value": ..., "metric/aux/value": ...}}
  {"bench": "aux_ablation", "summary": true, "costly_over_10pct": [...], "hurts_eval": [...],
   "noise_eval_delta": ...}
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data import TokenizerConfig, build_tokenizer  # noqa: E402
from model import count_params  # noqa: E402
from model.config import AuxHeadsConfig, ModelConfig  # noqa: E402
from model.transformer import TransformerLM  # noqa: E402
from presets import TrainConfig  # noqa: E402
from train.optim import build_optimizer, build_scheduler  # noqa: E402

HEADS = {"policy": "policy_kl_weight", "value": "value_weight", "dynamics": "dynamics_weight",
         "span": "span_contrastive_weight"}


def load_corpus(corpus: Path, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): the last `heldout_fraction` of every file is held out."""
    files = sorted(p for p in corpus.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    if not files:
        sys.exit(f"no .txt/.md files under {corpus}")
    train, held = [], []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * (1 - heldout_fraction))
        train.append(text[:cut])
        held.append(text[cut:])
    return train, held


def encode(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:  # in slices: the tokenizer is happier with paragraphs than with whole books
        for i in range(0, len(t), 100_000):
            ids.extend(tok.encode(t[i:i + 100_000]))
        ids.append(tok.eot_id)
    return torch.tensor(ids, dtype=torch.long)


def batches(ids: torch.Tensor, n: int, batch: int, seq: int, seed: int):
    """n batches [batch, seq+1] of random windows, the same for every configuration."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def held_out_ce(model, windows: list[torch.Tensor]) -> float:
    model.eval()
    total, count = 0.0, 0
    for w in windows:
        logits = model(w[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def step(model, opt, sched, x: torch.Tensor, clip: float) -> dict:
    out = model(x[:, :-1])
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
    loss = ce
    for k, v in out.aux.items():
        if k.startswith("loss/"):
            loss = loss + v
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return {"ce": ce.item(), **{k: float(v) for k, v in out.aux.items() if k.startswith(("loss/", "metric/"))}}


def time_heads(model, x: torch.Tensor, sync, reps: int) -> list[float]:
    """Seconds of the heads' own forward + backward on the model's real (detached) hidden
    states, `reps` times: the marginal cost of the heads, free of the backbone's noise."""
    seen, mids = {}, []
    hooks = [model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("hidden", o)),
             model.lm_head.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o))]
    heads = model.aux_heads
    if heads.tap_layer is not None:
        hooks.append(model.blocks[heads.tap_layer].register_forward_hook(lambda m, i, o: mids.append(o)))
    with torch.no_grad():
        model(x[:, :-1])
    for h in hooks:
        h.remove()
    tokens = x[:, :-1]
    times = []
    for _ in range(reps):
        hidden = seen["hidden"].detach().requires_grad_()
        logits = seen["logits"].detach().requires_grad_()
        mid = mids[0].detach().requires_grad_() if mids else None
        sync()
        t = time.perf_counter()
        aux = heads(tokens, hidden, logits, model.embed.weight, mid)
        sum(v for k, v in aux.items() if k.startswith("loss/")).backward()
        sync()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("budget", type=int, nargs="?", default=100_000, help="training tokens per configuration")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "books"))
    ap.add_argument("--configs", default="off,policy,value,dynamics,span,all,noise",
                    help="comma list of: off, policy, value, dynamics, span, all, noise")
    ap.add_argument("--weight", type=float, default=0.05, help="weight of every head that is on")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    ap.add_argument("--timing-rounds", type=int, default=5)
    ap.add_argument("--timing-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    corpus = Path(args.corpus)
    if not corpus.exists():
        sys.exit(f"corpus not found: {corpus}")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in names:
        if c not in ("off", "all", "noise", *HEADS):
            sys.exit(f"unknown config {c!r}")

    t0 = time.perf_counter()
    train_texts, held_texts = load_corpus(corpus, 0.02)
    tok = build_tokenizer(TokenizerConfig(type="bpe", vocab_size=args.vocab, train_chars=3_000_000),
                          [t[:3_000_000 // len(train_texts)] for t in train_texts])
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    span = args.seq + 1
    n_windows = min(len(held_ids) // span, max(1, args.eval_tokens // args.seq))
    windows = [held_ids[i * span:(i + 1) * span].view(1, -1) for i in range(n_windows)]
    windows = [torch.cat(windows[i:i + 8]).to(device) for i in range(0, len(windows), 8)]
    print(f"# corpus {corpus}: {len(train_ids):,} train tokens, {sum(w[:, 1:].numel() for w in windows):,} held-out "
          f"tokens, vocab {tok.vocab_size} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    mcfg = ModelConfig(arch="transformer", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads)
    tcfg = TrainConfig(seq_length=args.seq, batch_size=args.batch, lr=args.lr, warmup_tokens=max(1, args.budget // 10))
    tokens_per_step = args.batch * args.seq
    total_steps = max(1, math.ceil(args.budget / tokens_per_step))

    def aux_cfg(name: str) -> AuxHeadsConfig:
        on = list(HEADS) if name == "all" else [name] if name in HEADS else []
        return AuxHeadsConfig(**{HEADS[h]: args.weight for h in on})

    models, rows = {}, {}
    for name in names:
        seed = args.seed + (1 if name == "noise" else 0)
        torch.manual_seed(seed)
        model = TransformerLM(mcfg, tok.vocab_size, aux_cfg(name)).to(device)
        opt = build_optimizer(model, tcfg, device)
        sched = build_scheduler(opt, tcfg, total_steps, tokens_per_step)
        torch.manual_seed(seed)  # the heads' own sampling (positions, spans)
        times, last = [], []
        model.train()
        t_run = time.perf_counter()
        for x in batches(train_ids, total_steps, args.batch, args.seq, seed):
            x = x.to(device)
            sync()
            t = time.perf_counter()
            last.append(step(model, opt, sched, x, tcfg.grad_clip))
            sync()
            times.append(time.perf_counter() - t)
            last = last[-20:]
        eval_loss = held_out_ce(model, windows)
        head_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("aux_heads."))
        aux = {k: round(statistics.mean(r[k] for r in last), 4) for k in last[-1] if k != "ce"}
        rows[name] = {"bench": "aux_ablation", "config": name, "weight": args.weight if name not in ("off", "noise") else 0.0,
                      "tokens": total_steps * tokens_per_step, "steps": total_steps,
                      "params": count_params(model), "head_params": head_params,
                      "train_ce_last20": round(statistics.mean(r["ce"] for r in last), 4),
                      "eval_loss": round(eval_loss, 4), "train_step_ms": round(1000 * statistics.median(times), 1),
                      "train_s": round(time.perf_counter() - t_run, 1), "aux": aux}
        models[name] = (model, opt, sched)
        print(f"# {name}: eval {eval_loss:.4f}, {1000 * statistics.median(times):.0f} ms/step", file=sys.stderr)

    # interleaved timing rounds: each configuration in turn, several rounds
    timing = {name: [] for name in names}
    head_timing = {name: [] for name in names}
    timing_batches = [x.to(device) for x in batches(train_ids, args.timing_steps, args.batch, args.seq, args.seed + 99)]
    for _ in range(args.timing_rounds):
        for name in names:
            model, opt, sched = models[name]
            for x in timing_batches:
                sync()
                t = time.perf_counter()
                step(model, opt, sched, x, tcfg.grad_clip)
                sync()
                timing[name].append(time.perf_counter() - t)
            if model.aux_heads is not None:
                head_timing[name].extend(time_heads(model, timing_batches[0], sync, reps=3 * args.timing_steps))

    base = rows.get("off")
    ref_ms = 1000 * min(timing["off"]) if base else None
    costly, hurts = [], []
    noise = abs(rows["noise"]["eval_loss"] - base["eval_loss"]) if base and "noise" in rows else None
    for name in names:
        row = rows[name]
        row["step_ms"] = round(1000 * min(timing[name]), 1)
        row["step_ms_median"] = round(1000 * statistics.median(timing[name]), 1)
        if head_timing[name]:
            row["head_ms"] = round(1000 * min(head_timing[name]), 1)
        if base:
            row["eval_delta"] = round(row["eval_loss"] - base["eval_loss"], 4)
            row["overhead_pct"] = round(100 * (row["step_ms"] / ref_ms - 1), 1)
            if "head_ms" in row:
                row["head_overhead_pct"] = round(100 * row["head_ms"] / ref_ms, 1)
            if name in HEADS and max(row["overhead_pct"], row.get("head_overhead_pct", 0)) > 10:
                costly.append(name)
            if name not in ("off", "noise") and row["eval_delta"] > 0:
                hurts.append(name)
        print(json.dumps(row))
    print(json.dumps({"bench": "aux_ablation", "summary": True, "d_model": args.d_model, "n_layers": args.layers,
                      "seq": args.seq, "batch": args.batch, "vocab": tok.vocab_size, "budget": args.budget,
                      "threads": torch.get_num_threads(), "device": str(device), "costly_over_10pct": costly, "hurts_eval": hurts,
                      "noise_eval_delta": None if noise is None else round(noise, 4),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
