"""Quality at equal parameters and equal tokens: hatchling vs the baseline transformer,
trained by the same loop on the same streams of a local corpus; held-out loss of each.

    python bench/quality.py 2000000                # budget in tokens (default 1,000,000)
    python bench/quality.py 2000000 --corpus ../shared/corpus/books --d-model 256 --layers 4

The transformer's MLP width is solved so its parameter count matches hatchling's
(up to the MLP's 64-wide rounding). One JSON line per model, then one with the difference:

  {"bench": "quality", "arch": "hatchling", "params": ..., "tokens": ..., "eval_loss": ..., "eval_ppl": ...,
   "tokens_per_s": ...}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig  # noqa: E402
from train import preset_from_dict, train  # noqa: E402
from train.estimate import param_count  # noqa: E402
from train.progress import Reporter  # noqa: E402


def matched_transformer(hatch: ModelConfig, vocab: int) -> ModelConfig:
    """A transformer of hatchling's width and depth whose MLP is sized to match its params."""
    target = param_count(hatch, vocab)
    lo, hi = 0.5, 12.0
    for _ in range(40):  # bisection on mlp_mult (params grow monotonically with it)
        mid = (lo + hi) / 2
        cfg = ModelConfig(**{**hatch.__dict__, "arch": "transformer", "mlp_mult": mid})
        lo, hi = (mid, hi) if param_count(cfg, vocab) < target else (lo, mid)
    # the MLP width moves in steps of 64: take whichever neighbour lands closer
    candidates = [ModelConfig(**{**hatch.__dict__, "arch": "transformer", "mlp_mult": m}) for m in (lo, hi)]
    return min(candidates, key=lambda c: abs(param_count(c, vocab) - target))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("budget", type=int, nargs="?", default=1_000_000, help="training tokens per model")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "books"))
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    if not Path(args.corpus).exists():
        sys.exit(f"corpus not found: {args.corpus}")

    hatch = ModelConfig(arch="hatchling", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        global_every=4, wm_window=args.seq * 2, chunk_size=64)
    models = {"hatchling": hatch, "transformer": matched_transformer(hatch, args.vocab)}
    results = {}
    for arch, cfg in models.items():
        raw = {
            "name": f"quality-{arch}", "model": {k: v for k, v in cfg.__dict__.items()},
            "train": {"seq_length": args.seq, "batch_size": args.batch, "lr": args.lr,
                      "warmup_tokens": max(1, args.budget // 20), "eval_every_tokens": 10**12,
                      "checkpoint_every_tokens": 10**12, "eval_tokens": 65536, "samples": 0, "log_every_steps": 50},
            "data": {"sources": [{"type": "text", "path": args.corpus, "name": "corpus"}], "eval_fraction": 0.02},
            "tokenizer": {"type": "bpe", "vocab_size": args.vocab, "train_chars": 3_000_000},
        }
        preset, _ = preset_from_dict(raw, f"quality-{arch}")
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            result = train(preset, budget=args.budget, out_dir=out, reporter=Reporter(enabled=False))
            seconds = time.perf_counter() - t0
        row = {"bench": "quality", "arch": arch, "params": param_count(cfg, args.vocab), "tokens": result.tokens,
               "d_model": cfg.d_model, "n_layers": cfg.n_layers, "mlp_mult": round(cfg.mlp_mult, 3),
               "eval_loss": round(result.eval["eval_loss"], 4), "eval_ppl": round(result.eval["eval_ppl"], 2),
               "tokens_per_s": round(result.tokens / seconds, 1)}
        results[arch] = row
        print(json.dumps(row), flush=True)
    h, t = results["hatchling"], results["transformer"]
    print(json.dumps({"bench": "quality", "summary": True, "tokens": args.budget,
                      "eval_loss_hatchling_minus_transformer": round(h["eval_loss"] - t["eval_loss"], 4),
                      "target_met": h["eval_loss"] <= t["eval_loss"]}))


if __name__ == "__main__":
    main()
