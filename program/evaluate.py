"""Evaluate a finished model: held-out cross-entropy, perplexity and bits per byte on the
preset's own held-out documents (the same documents and windows training evaluated on,
through train/heldout.py), the loss on re-mentions beyond the window (tokens continuing a
piece of text their document showed only further back than the model's attention
reaches: what carried state and the memories are for), then the lm-eval tasks of the
preset's `eval` section. The results go to `<checkpoint>.eval.json` beside the checkpoint
and to a table on screen."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table


def attention_reach(model_cfg, seq_length: int) -> int:
    """How far back the model's attention sees: a transformer its sequence; a hatchling's
    working-memory attention the current sequence plus its window of cached keys."""
    return seq_length + (model_cfg.wm_window if model_cfg.arch == "hatchling" else 0)


def heldout(fin, log=print) -> dict:
    """eval_loss (nats/token), eval_ppl, eval_bpb (bits per UTF-8 byte), eval_tokens;
    beyond_window_loss / _tokens (train.heldout.beyond_window) and the reach they use."""
    from data import eval_documents, eval_windows, open_sources
    from train.heldout import beyond_window, evaluate

    preset, tok, cfg = fin.preset, fin.tokenizer, fin.preset.train
    sources = open_sources(preset.data, log=log)
    per_source = max(20_000, cfg.eval_tokens * 8 // max(1, len(sources)))  # as the training run's evaluation
    docs = eval_documents(sources, preset.data, per_source)
    ids = tok.encode_batch([d.text for d in docs]) if docs else []
    windows = eval_windows(iter(ids), tok.eot_id, min(cfg.batch_size, 8), cfg.seq_length, cfg.eval_tokens)
    if not windows:
        log("[eval] no held-out text (raise data.eval_fraction): held-out figures skipped")
        return {}
    reach = attention_reach(preset.model, cfg.seq_length)
    row = evaluate(fin.model, windows, tok.eot_id, fin.device,
                   masks={"beyond_window": beyond_window(windows, tok.eot_id, reach)})
    row["beyond_window_reach"] = reach
    n_bytes = sum(len(tok.decode(w[b, 1:].tolist()).encode("utf-8")) for w in windows for b in range(w.shape[0]))
    row["eval_bpb"] = row["eval_loss"] * row["eval_tokens"] / (math.log(2) * max(1, n_bytes))
    row["eval_bytes"] = n_bytes
    row["eval_documents"] = len(docs)
    return row


def _progress_factory(progress):
    def make(label: str, total: int):
        task = progress.add_task(label, total=total)
        return lambda n: progress.update(task, advance=n)
    return make


def assess(fin, console: Optional[Console] = None) -> dict:
    """Run the whole evaluation, write the JSON, show the table; returns the results."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = console or Console()
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    e = fin.preset.eval
    results: dict = {"checkpoint": str(fin.path), "preset": fin.preset.name, "arch": fin.preset.model.arch,
                     "training_tokens": fin.checkpoint.get("tokens"), "finished_at": fin.checkpoint.get("finished_at"),
                     "evaluated_at": time.time(), "eval_settings": {"tasks": e.tasks, "num_fewshot": e.num_fewshot,
                                                                    "limit": e.limit}}
    with console.status("held-out evaluation ..."):
        results["heldout"] = heldout(fin, log)
    results["tasks"] = {}
    if e.tasks:
        from data import hub_status

        ok, reason = hub_status()
        if not ok:  # fail fast instead of retrying every download
            log(f"[eval] offline ({reason}): tasks whose data is not cached are skipped")
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_DATASETS_OFFLINE"] = "1"
        from .lm_eval_adapter import TrainerLM, run_tasks

        include = e.include_path
        if include and not Path(include).is_absolute():
            include = str(Path.cwd() / include)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as progress:
            lm = TrainerLM(fin.model, fin.tokenizer, fin.device, batch_size=e.batch_size,
                           max_length=fin.preset.train.seq_length, progress=_progress_factory(progress))
            results["tasks"] = run_tasks(lm, e.tasks, e.num_fewshot, e.limit, include, log=progress.console.print)
    out = fin.path.with_name(f"{fin.path.stem}.eval.json")
    console.print(results_table(results))
    try:  # a secondary write: the results are on the screen either way
        out.write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
        console.print(f"results written to {out}", markup=False, highlight=False)
    except OSError as e:
        console.print(f"warning: cannot write {out} ({e.strerror or e}): the results are only in the table above",
                      style="yellow", markup=False, highlight=False)
    return results


def results_table(results: dict) -> Table:
    table = Table(title=f"{Path(results['checkpoint']).name} ({results['preset']}, {results['arch']})")
    table.add_column("evaluation", style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right", style="dim")
    h = results.get("heldout") or {}
    if h:
        for n, (key, label, fmt) in enumerate((("eval_loss", "cross-entropy (nats/token)", "{:.4f}"),
                                               ("eval_ppl", "perplexity", "{:.2f}"), ("eval_bpb", "bits per byte", "{:.4f}"))):
            table.add_row(f"held-out, {h['eval_tokens']:,} tokens" if n == 0 else "", label, fmt.format(h[key]), "")
        if "beyond_window_tokens" in h:
            loss = h["beyond_window_loss"]
            table.add_row(f"re-mentions beyond {h['beyond_window_reach']:,} tokens, {h['beyond_window_tokens']:,} tokens",
                          "cross-entropy (nats/token)",
                          f"{loss:.4f}" if loss is not None else "none in the held-out text", "")
    for task, r in results.get("tasks", {}).items():
        if "error" in r:
            table.add_row(task, "[red]skipped[/]", "", r["error"][:60])
            continue
        for n, (metric, value) in enumerate(r["metrics"].items()):
            err = r["stderr"].get(metric)
            table.add_row(task if n == 0 else "", metric, f"{value:.4f}",
                          f"{err:.4f}" if isinstance(err, (int, float)) and math.isfinite(err) else "")
    return table
