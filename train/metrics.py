"""Curves: the metrics log also written as TensorBoard event files, and a small loss curve
printed in the terminal at each evaluation.

`CurveLog` is a `MetricsLog` (metrics.jsonl stays exactly as it was) that also writes every
numeric value of a row as a TensorBoard scalar, with the run's token count as the step,
into `<checkpoints>/tensorboard/<run id>/` (a resumed run keeps its id, so its curves go
on in the same folder). Tags:

    train/loss, train/lr, train/tokens_per_s, train/grad_norm, train/skipped_steps,
    train/loss_total, eval/loss, eval/ppl, loss/<aux term>, share/<aux term>,
    source_loss/<source>, source_weight/<source>, metric/<name>/layer<i> (spike rates,
    memory figures, auxiliary metrics)

When tensorboard is not installed, one line says so and only metrics.jsonl is written.

Both are secondary writes: they never stop a run. The first failure of each (a read-only
or full disk) is said in one line with the reason and the path, and the run goes on
without that output (the checkpoints, the primary writes, are handled apart:
train/checkpoint_files.py)."""
from __future__ import annotations

import atexit
import json
import re
import threading
import time
from pathlib import Path
from typing import Callable, Optional


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (read it with pandas.read_json(lines=True))."""

    def __init__(self, path: Path, enabled: bool = True, run: str | None = None,
                 log: Optional[Callable[[str], None]] = None):
        self.path, self.enabled = Path(path), enabled
        self.run = run  # every row names the run it belongs to (a resumed run keeps its id)
        self.log = log or print
        self.failed = False  # a write failed: said once, then no more rows

    def write(self, row: dict) -> None:
        if not self.enabled or self.failed:
            return
        if self.run is not None:
            row = {"run": self.run, **row}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=float) + "\n")
        except OSError as e:
            self.failed = True
            self.log(f"warning: cannot write {self.path} ({e.strerror or e}): the run goes on without it")


SPARK = "▁▂▃▄▅▆▇█"
RENAME = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "grad_norm": "train/grad_norm",
          "skipped_steps": "train/skipped_steps", "loss_total": "train/loss_total", "eval_loss": "eval/loss",
          "eval_ppl": "eval/ppl"}
SKIP = {"kind", "step", "tokens", "eval_tokens", "run"}
CURVE_KINDS = ("train", "eval", "source_weights")  # rows that are curves (not run_start notes)


def scalars(row: dict) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics.jsonl row."""
    out = {}
    for key, value in row.items():
        if key in SKIP:
            continue
        if isinstance(value, dict):  # source_loss / weights: {source name: value}
            prefix = "source_weight" if key == "weights" else key
            for name, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{prefix}/{re.sub(r'[^A-Za-z0-9_.-]', '_', str(name))}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[RENAME.get(key, key)] = float(value)
    return out


def sparkline(values: list[float], width: int = 60) -> str:
    """values as a row of block characters (resampled to at most `width`)."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [sum(values[int(i * step):int((i + 1) * step)]) / max(1, len(values[int(i * step):int((i + 1) * step)]))
                  for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


class CurveLog(MetricsLog):
    """metrics.jsonl + TensorBoard scalars + a terminal loss curve at each evaluation."""

    def __init__(self, path: Path, enabled: bool = True, log: Optional[Callable[[str], None]] = None, **kwargs):
        super().__init__(path, enabled, log=log, **kwargs)
        self.writer = None
        self.train_losses: list[float] = []
        self.eval_losses: list[float] = []
        # one folder per run id (a resumed run keeps its id, so its curves continue in place)
        run = getattr(self, "run", None) or time.strftime("%Y%m%d-%H%M%S")
        self.logdir = self.path.parent / "tensorboard" / str(run)
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            self.log(f"[curves] TensorBoard files not written ({e}); pip install tensorboard for them. "
                     f"metrics.jsonl has every figure")
            return
        _quiet_writer_threads()  # before the writer exists: its first write happens in its constructor
        try:
            self.writer = SummaryWriter(str(self.logdir), flush_secs=30)
        except Exception as e:  # a read-only or full disk: tensorboard's own errors as well as OSError
            self._tensorboard_failed(e)
            return
        atexit.register(self.close)
        self.log(f"[curves] tensorboard --logdir {self.path.parent / 'tensorboard'}")

    def _tensorboard_failed(self, e: BaseException) -> None:
        """The first TensorBoard failure: said once; no more event files this run."""
        writer, self.writer = self.writer, None
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:160] or e.__class__.__name__
        self.log(f"warning: cannot write TensorBoard files in {self.logdir} ({reason}): the run goes on without them")
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def write(self, row: dict) -> None:
        super().write(row)
        if not self.enabled:
            return
        step = int(row.get("tokens", 0))
        try:
            if self.writer is not None and row.get("kind", "train") in CURVE_KINDS:
                for tag, value in scalars(row).items():
                    self.writer.add_scalar(tag, value, step)
            if self.writer is not None and row.get("kind") == "eval":
                self.writer.flush()
        except Exception as e:  # the writer thread's OSError surfaces at the next add or flush
            self._tensorboard_failed(e)
        if row.get("kind") == "train" and isinstance(row.get("loss"), (int, float)):
            self.train_losses.append(float(row["loss"]))
        if row.get("kind") == "eval" and isinstance(row.get("eval_loss"), (int, float)):
            self.eval_losses.append(float(row["eval_loss"]))
            self.show_curve()

    def show_curve(self) -> None:
        """Two lines: the training loss so far and the held-out losses, as sparklines."""
        t, e = self.train_losses, self.eval_losses
        if t:
            self.log(f"[curve] train loss {t[0]:.2f} {sparkline(t)} {t[-1]:.2f}")
        if len(e) > 1:
            self.log(f"[curve] held-out   {e[0]:.2f} {sparkline(e)} {e[-1]:.2f}")

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:
                self._tensorboard_failed(e)
            self.writer = None


def _quiet_writer_threads() -> None:
    """TensorBoard writes from a thread of its own, which re-raises a failed write (after
    keeping it for the next add_scalar, where CurveLog says it in one line); without this
    the thread's exit would also print a traceback. Installed once; other threads' errors
    go to the previous hook as before."""
    if getattr(threading.excepthook, "_curves", False):
        return
    previous = threading.excepthook

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, Exception):
            return
        previous(args)
    hook._curves = True
    threading.excepthook = hook
