"""Quality side by side: held-out loss and bits per byte of the transformer,
the hatchling (phase A) and the hatchling with its spikes switched off, at equal
parameters and equal training tokens, over several seeds.

Method
  - Data: the folders of --corpus (default ../shared/corpus/books and .../library), one
    `text` source each, read by the real data registry (8000-character documents,
    round robin). The files named by --heldout are WHOLE documents kept out of training:
    a corpus folder holding one is replaced, for training, by a temporary folder of
    symlinks to its other files (same relative paths, so the same document ids). The
    registry's own split (data.eval_fraction) hashes 8000-character pieces, so it holds
    out pieces of books whose other pieces are trained on; here it is only used for the
    loop's periodic eval curve (--curve-fraction of the training pieces).
  - Tokenizer: one byte-level BPE (--vocab) learned once from the training files and
    cached beside the results file; every run loads it as `tokenizer.type: "file"`.
  - Models: hatchling = d_model x layers x heads, working-memory attention every 4th
    layer (window 2 x seq); hatchling_nospike = the same with `model.spiking: false`
    (plain KDA: no LIF neurons, and one projection fewer per KDA layer);
    hatchling_floor50 / hatchling_alphaonly = the hatchling with `model.beta_spike_floor`
    0.5 / 1.0 (half of a head's write strength, or all of it, not gated by its spike
    rate; the spikes still gate forgetting); hatchling_betaonly = the hatchling with
    `model.alpha_spike_floor` 1.0 (every channel forgets at every token; the spikes gate
    writing only: what the shipped hatchling presets use), hatchling_betaonly_floor50 = that with beta_spike_floor 0.5; transformer =
    the same width and depth with its MLP widened until its parameter count matches the
    hatchling's (up to the MLP's 64-wide rounding).
  - Training: `train.train` (the real loop) on a preset built here, in a fresh temporary
    folder per run; every model sees the same token streams (the stream order does not
    depend on the seed; the seed sets the initialisation).
  - Held-out figures: the finished checkpoint is loaded, and the held-out files, cut into
    documents exactly as training cuts its files, are packed into `min(batch, 8)` streams
    of seq-token windows (state carries from window to window, as in the loop's own
    evaluation); for --eval-tokens, whole documents evenly spaced through the held-out
    files are taken. loss = mean cross-entropy (nats/token) over every predicted token;
    bpb = loss * tokens / bytes / ln 2, with the exact UTF-8 bytes of the predicted tokens
    (a byte-level BPE token of n symbols is n bytes; end-of-text is 0).
  - Budget: the default (1.2M tokens per run) is what lets the whole table (3 models x 2
    seeds) finish in about 65 minutes on a shared 2-core CPU: each model trained at about
    1,900 tokens/s there (d224 x 4, one thread, batch 16 x 128), so a run takes ~11
    minutes with its evaluations. 2M tokens per run takes about 1h50 for the table: run it
    in parts (--models / --seeds) and let the resume file join them.

Output (stdout, JSON lines)
  {"bench": "quality", "kind": "curve", "model", "seed", "row": "train"|"eval", "tokens", "loss"}
      the loop's metrics.jsonl rows of each run trained now;
  {"bench": "quality", "kind": "run", "model", "seed", "params", "tokens", "heldout_loss", "heldout_bpb", ...}
      one per finished run, also appended to --results (the resume file);
  {"bench": "quality", "kind": "summary", "model", "seeds", "heldout_loss_mean", ..._min, ..._max, ..._std, ...}
      one per model over the seeds in the table, then the same as a plain table on stderr.
Progress messages go to stderr.

Resuming: a cell is (model, seed, budget, dims): dims are d_model, layers, heads, seq,
batch, vocab, lr and the held-out files. A rerun skips every cell already in --results
and trains only the missing ones, so a long table can be finished in parts (Ctrl-C
stops the current run; nothing is recorded for it).

    python bench/quality.py                                  # 4 models (the default list) x seeds 0,1, ~1.5 hours
    python bench/quality.py 20000 --seeds 0                  # a quick check that everything runs
    python bench/quality.py --models hatchling,transformer --seeds 0,1,2
    python bench/quality.py --results /tmp/q.jsonl --d-model 192 --lr 3e-3

Flags: budget (positional, training tokens per run), --models, --seeds, --corpus,
--heldout, --d-model, --layers, --heads, --seq, --batch, --vocab, --lr, --eval-tokens,
--curve-fraction, --results, --threads (torch threads, default 1: on the shared 2-core
machine one thread trained 2-3x faster than two), --verbose (show the loop's progress).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import (  # noqa: E402
    DataConfig,
    TextSourceSpec,
    TextTokenizer,
    TokenizerConfig,
    build_tokenizer,
    eval_windows,
    open_sources,
    sample_texts,
)
from data.registry import make_source  # noqa: E402
from model import ModelConfig  # noqa: E402
from program.first_question import load_finished  # noqa: E402
from train import preset_from_dict, train  # noqa: E402
from train.heldout import evaluate  # noqa: E402
from train.memory_check import param_count  # noqa: E402
from train.progress import Reporter  # noqa: E402

MODELS = ("transformer", "hatchling", "hatchling_nospike", "hatchling_floor50", "hatchling_alphaonly",
          "hatchling_betaonly", "hatchling_betaonly_floor50")
CORPUS = ROOT.parent / "shared" / "corpus"
DEFAULT_HELDOUT = "library/news_from_nowhere.txt,library/log_school_house.txt"
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
            "hatchling_betaonly_floor50": replace(hatch, alpha_spike_floor=1.0, beta_spike_floor=0.5)}


# -- data: the whole-document split and the shared tokenizer ---------------------------------
def split_corpus(corpora: list[Path], heldout: list[str], tmp: Path) -> tuple[list[Path], list[Path]]:
    """(training folders, held-out files). `heldout` names files as '<corpus folder>/<path>'.
    A folder holding a held-out file is replaced by a folder of symlinks to its other files."""
    by_name = {c.name: c for c in corpora}
    held: list[Path] = []
    for name in heldout:
        folder, _, rel = name.partition("/")
        path = by_name.get(folder, Path("/nonexistent")) / rel
        if not path.is_file():
            sys.exit(f"held-out file not found: {name} (give '<corpus folder>/<file>', corpus folders: "
                     f"{', '.join(by_name)})")
        held.append(path)
    train_dirs = []
    for corpus in corpora:
        if not any(corpus in h.parents for h in held):
            train_dirs.append(corpus)
            continue
        mirror = tmp / corpus.name
        for f in sorted(p for p in corpus.rglob("*") if p.is_file() and p not in held):
            (mirror / f.relative_to(corpus)).parent.mkdir(parents=True, exist_ok=True)
            (mirror / f.relative_to(corpus)).symlink_to(f.resolve())
        train_dirs.append(mirror)
    return train_dirs, held


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


def heldout_set(files: list[Path], tokenizer_path: Path, args) -> tuple[list, int, int]:
    """(windows, predicted tokens' UTF-8 bytes, documents) of the held-out files, cut into
    documents as training cuts its files (the text source's chunking, min length)."""
    tok = build_tokenizer(TokenizerConfig(type="file", path=str(tokenizer_path)))
    min_len = DataConfig().min_text_length
    docs = [d.text for f in files for d in make_source(TextSourceSpec(type="text", path=str(f))).documents()
            if len(d.text.strip()) >= min_len]
    ids = tok.encode_batch(docs)
    stride = max(1, math.ceil(sum(len(x) + 1 for x in ids) / args.eval_tokens))  # evenly spaced documents
    ids = ids[::stride]
    windows = eval_windows(iter(ids), tok.eot_id, min(args.batch, 8), args.seq, args.eval_tokens)
    table = token_bytes(tok)
    n_bytes = sum(table[w[:, 1:]].sum().item() for w in windows)
    return windows, n_bytes, len(ids)


def token_bytes(tok: TextTokenizer) -> torch.Tensor:
    """UTF-8 bytes per token id of a byte-level BPE (one symbol = one byte; end-of-text 0)."""
    table = torch.tensor([len(tok.tok.id_to_token(i) or "") for i in range(tok.vocab_size)])
    table[tok.eot_id] = 0
    return table


# -- one run ---------------------------------------------------------------------------------
def cell_key(model: str, seed: int, args) -> str:
    dims = {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "seq": args.seq,
            "batch": args.batch, "vocab": args.vocab, "lr": args.lr, "heldout": sorted(args.heldout),
            "eval_tokens": args.eval_tokens}
    return json.dumps({"model": model, "seed": seed, "budget": args.budget, **dims}, sort_keys=True)


def preset_for(model: str, cfg: ModelConfig, seed: int, train_dirs: list[Path], tokenizer_path: Path, args):
    t = args.budget
    raw = {
        "name": f"quality-{model}-s{seed}", "model": asdict(cfg),
        "train": {"seq_length": args.seq, "batch_size": args.batch, "lr": args.lr, "seed": seed,
                  "warmup_tokens": max(1, t // 20), "eval_every_tokens": max(1, t // 4), "eval_tokens": 16384,
                  "checkpoint_every_tokens": 10**12, "samples": 0, "log_every_steps": 10, "device": "cpu"},
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


def run_cell(model: str, cfg: ModelConfig, seed: int, setup: dict, args) -> dict | None:
    """Train one (model, seed), evaluate it on the held-out files; its row (None if stopped)."""
    preset = preset_for(model, cfg, seed, setup["train_dirs"], setup["tokenizer"], args)
    with tempfile.TemporaryDirectory(prefix=f"quality-{model}-") as out:
        t0 = time.perf_counter()
        result = train(preset, budget=args.budget, out_dir=out, reporter=Reporter(enabled=args.verbose))
        seconds = time.perf_counter() - t0
        if not result.finished:
            return None
        fin = load_finished(Path(out) / "lm_current.pth", warn=log)
        held = evaluate(fin.model, setup["windows"], fin.tokenizer.eot_id, fin.device)
        curves = curve(Path(out) / "metrics.jsonl")
    for kind, points in curves.items():
        for point in points:
            emit({"kind": "curve", "model": model, "seed": seed, "row": kind, "tokens": point[0], "loss": point[1]})
    speeds = [p[2] for p in curves["train"][1:]] or [p[2] for p in curves["train"]]  # the first includes warm-up
    loss = held["eval_loss"]
    return {"kind": "run", "key": cell_key(model, seed, args), "model": model, "seed": seed,
            "params": param_count(cfg, args.vocab), "tokens": result.tokens, "budget": args.budget,
            "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "mlp_mult": round(cfg.mlp_mult, 3),
            "spiking": cfg.spiking, "beta_spike_floor": cfg.beta_spike_floor,
            "alpha_spike_floor": cfg.alpha_spike_floor, "seq": args.seq, "batch": args.batch, "vocab": args.vocab, "lr": args.lr,
            "heldout": sorted(args.heldout), "heldout_loss": round(loss, 4),
            "heldout_bpb": round(loss * held["eval_tokens"] / setup["bytes"] / math.log(2), 4),
            "heldout_tokens": held["eval_tokens"], "heldout_bytes": setup["bytes"],
            "curve_eval_loss": result.eval.get("eval_loss"), "final_train_loss": (curves["train"] or [[0, None]])[-1][1],
            "tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
            "wall_s": round(seconds, 1), "curve": curves, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- the table -------------------------------------------------------------------------------
def load_results(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows if r.get("kind") == "run"}


def summarise(rows: list[dict]) -> list[dict]:
    """One row per model: mean, min, max and std over seeds of the held-out loss and bpb."""
    out = []
    for model in MODELS:
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["seed"])
        if not mine:
            continue
        row = {"kind": "summary", "model": model, "seeds": [r["seed"] for r in mine], "params": mine[0]["params"],
               "tokens": mine[0]["tokens"]}
        for metric in ("heldout_loss", "heldout_bpb"):
            values = [r[metric] for r in mine]
            row.update({f"{metric}_mean": round(statistics.mean(values), 4), f"{metric}_min": min(values),
                        f"{metric}_max": max(values),
                        f"{metric}_std": round(statistics.stdev(values), 4) if len(values) > 1 else None})
        row["tokens_per_s"] = round(statistics.mean(r["tokens_per_s"] or 0 for r in mine), 1)
        out.append(row)
    return out


def print_table(summary: list[dict]) -> None:
    w = max([18] + [len(s["model"]) for s in summary])
    head = f"{'model':<{w}} {'params':>8} {'tokens':>9} {'seeds':>5}  {'held-out loss':<24} {'bits/byte':<24} {'tok/s':>6}"
    lines = [head, "-" * len(head)]
    for s in summary:
        loss, bpb = (f"{s[m + '_mean']:.4f} [{s[m + '_min']:.4f}, {s[m + '_max']:.4f}]"
                     for m in ("heldout_loss", "heldout_bpb"))
        lines.append(f"{s['model']:<{w}} {s['params'] / 1e6:>7.2f}M {s['tokens']:>9,} {len(s['seeds']):>5}  "
                     f"{loss:<24} {bpb:<24} {s['tokens_per_s']:>6.0f}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("budget", type=int, nargs="?", default=DEFAULT_BUDGET, help="training tokens per run")
    ap.add_argument("--models", default="transformer,hatchling,hatchling_nospike,hatchling_betaonly", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--seeds", default="0,1", help="comma list of training seeds")
    ap.add_argument("--corpus", default=f"{CORPUS / 'books'},{CORPUS / 'library'}", help="comma list of folders")
    ap.add_argument("--heldout", default=DEFAULT_HELDOUT, help="comma list of '<corpus folder>/<file>' held out whole")
    ap.add_argument("--d-model", type=int, default=224)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=65536,
                    help="held-out tokens evaluated: whole documents evenly spaced through the held-out files")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    ap.add_argument("--curve-fraction", type=float, default=0.02,
                    help="share of training pieces held out for the loop's periodic eval curve only")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality.jsonl"))
    ap.add_argument("--verbose", action="store_true", help="show the training loop's own progress")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.heldout = [h for h in args.heldout.split(",") if h]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results_path = Path(args.results)
    done = load_results(results_path)
    configs = model_configs(args)
    cells = [(m, s) for s in args.seeds for m in args.models]
    todo = [(m, s) for m, s in cells if cell_key(m, s, args) not in done]
    log(f"{len(cells) - len(todo)} of {len(cells)} runs already in {results_path}; {len(todo)} to train")
    if todo:
        corpora = [Path(c).resolve() for c in args.corpus.split(",") if c]
        missing = [str(c) for c in corpora if not c.is_dir()]
        if missing:
            sys.exit(f"corpus folder not found: {', '.join(missing)}")
        with tempfile.TemporaryDirectory(prefix="quality-split-") as tmp:
            train_dirs, held = split_corpus(corpora, args.heldout, Path(tmp))
            tokenizer = shared_tokenizer(train_dirs, args.vocab, results_path.parent)
            windows, n_bytes, n_docs = heldout_set(held, tokenizer, args)
            log(f"held out {len(held)} whole files; evaluating {n_docs} of their documents: "
                f"{sum(w[:, 1:].numel() for w in windows):,} tokens, {n_bytes:,} bytes; "
                f"training on {', '.join(str(d) for d in train_dirs)}")
            setup = {"train_dirs": train_dirs, "tokenizer": tokenizer, "windows": windows, "bytes": n_bytes}
            for i, (model, seed) in enumerate(todo):
                log(f"run {i + 1}/{len(todo)}: {model} seed {seed}, {args.budget:,} tokens, "
                    f"{param_count(configs[model], args.vocab) / 1e6:.2f}M parameters")
                row = run_cell(model, configs[model], seed, setup, args)
                if row is None:
                    log("stopped; the finished runs are kept, rerun to continue")
                    break
                results_path.parent.mkdir(parents=True, exist_ok=True)
                with results_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done[row["key"]] = row
                emit({k: v for k, v in row.items() if k not in ("key", "curve")})
    rows = [done[cell_key(m, s, args)] for m, s in cells if cell_key(m, s, args) in done]
    summary = summarise(rows)
    for s in summary:
        emit(s)
    print_table(summary)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside a run (a run saves and returns on Ctrl-C itself)
        sys.exit("[quality] interrupted; the finished runs are kept in the results file")
