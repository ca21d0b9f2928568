"""What a run shows while it trains: a rich progress bar on a terminal, plain log lines
elsewhere (CI, a pipe, a log file), and the progress updates (ProgressLog) that feed it and
the metrics: the `train` row, the progress line's detail text, the run's speed."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from presets import Preset


def human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{1 if n < 10 * size else 0}f}{unit}"
    return f"{n:.0f}"


def eta(remaining_tokens: float, tokens_per_s: float) -> str:
    """'h:mm:ss' (or 'Nd hh:mm:ss') for the remaining tokens at the measured rate."""
    if tokens_per_s <= 0 or remaining_tokens < 0:
        return "-:--:--"
    secs = int(round(remaining_tokens / tokens_per_s))
    days, secs = divmod(secs, 86400)
    clock = f"{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}"
    return f"{days}d {clock}" if days else clock


class Reporter:
    """Progress and messages of one run; silent on DDP ranks other than 0."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=False)
        self.progress: Progress | None = None
        self.task = None
        self.total = 0
        self._last_plain = 0.0

    def log(self, message: str, style: str | None = None) -> None:
        if self.enabled:
            (self.progress.console if self.progress else self.console).print(message, style=style, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        self.log(f"warning: {message}", style="yellow")

    def start(self, total_tokens: int, done_tokens: int = 0) -> None:
        self.total = total_tokens
        if not self.enabled or not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.fields[tokens]}[/]/{task.fields[budget]} tokens"),
            BarColumn(),
            TextColumn("{task.fields[tps]} tok/s  loss {task.fields[loss]}  lr {task.fields[lr]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[detail]}", style="dim"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_tokens, completed=done_tokens, tokens=human(done_tokens),
                                           budget=human(total_tokens), tps="-", loss="-", lr="-", eta="-:--:--",
                                           detail="")

    def update(self, tokens: int, loss: float, lr: float, tokens_per_s: float, detail: str = "") -> None:
        if not self.enabled:
            return
        # the ETA is the measured rate over the remaining tokens, so it shows from the first update
        fields = dict(tokens=human(tokens), tps=human(tokens_per_s), loss=f"{loss:.3f}", lr=f"{lr:.2e}", detail=detail,
                      eta=eta(self.total - tokens, tokens_per_s))
        if self.progress is not None:
            self.progress.update(self.task, completed=tokens, **fields)
        elif time.monotonic() - self._last_plain >= 5.0 or tokens >= self.total:  # plain lines, not a flood
            self._last_plain = time.monotonic()
            pct = 100.0 * tokens / max(1, self.total)
            self.log(f"[train] {fields['tokens']}/{human(self.total)} tokens ({pct:.1f}%)  {fields['tps']} tok/s  "
                     f"loss {fields['loss']}  lr {fields['lr']}  ETA {fields['eta']}  {detail}".rstrip())

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class Window:
    """This rank's training loss and per-source loss and token sums since the last
    progress update, and when that was."""

    def __init__(self, n_sources: int, device: torch.device, tokens: int):
        self.n_sources, self.device = n_sources, device
        self.restart(tokens)

    def restart(self, tokens: int) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.src_loss = torch.zeros(self.n_sources, device=self.device)
        self.src_count = torch.zeros(self.n_sources, device=self.device)
        self.t, self.tokens = time.perf_counter(), tokens

    def add(self, step: dict) -> None:
        self.loss += step["loss_sum"]
        self.src_loss += step["src_loss"]
        self.src_count += step["src_count"]

    def packed(self) -> torch.Tensor:
        """[loss, per-source loss..., per-source tokens...]: one tensor to sum over ranks."""
        return torch.cat([self.loss.view(1), self.src_loss, self.src_count])


# per-block metrics shown (averaged over blocks) on the progress detail line
DETAIL_METRICS = (("spike_rate", "spike rate"), ("pm_commit_rate", "PM commits"), ("pm_strength", "PM strength"),
                  ("em_write_rate", "EM writes"), ("em_strength", "EM strength"), ("em_read_share", "EM share"))


def block_summary(metrics: dict) -> str:
    """'  spike rate 0.12  PM commits 0.50 ...' from "metric/<name>/layer<i>" values, each
    averaged over the blocks that report it ('' when none do)."""
    parts = []
    for name, label in DETAIL_METRICS:
        vals = [float(v) for k, v in metrics.items() if k.startswith(f"metric/{name}/")]
        if vals:
            parts.append(f"{label} {sum(vals) / len(vals):.2f}")
    return "".join(f"  {p}" for p in parts)


def train_row(figures: dict, source_loss: dict, aux: dict, metrics: dict) -> tuple[dict, str]:
    """The metrics.jsonl row of a progress update and the progress line's detail text.
    `figures` holds the update's own (step, tokens, the cross-entropy "loss", lr, ...);
    added are the per-source losses when there are several sources (None: no tokens),
    the weighted auxiliary loss terms with their share of the total loss, and the
    model's metrics."""
    row, loss = {"kind": "train", **figures}, figures["loss"]
    if len(source_loss) > 1:
        row["source_loss"] = {name: value for name, value in source_loss.items() if value is not None}
    for key, value in {**aux, **metrics}.items():
        row[key] = float(value)
    total = loss + sum(float(v) for v in aux.values())  # CE + the weighted auxiliary terms
    if aux:
        row["loss_total"] = total
    for key, value in aux.items():
        row[f"share/{key.split('/', 1)[1]}"] = float(value) / max(total, 1e-12)
    detail = "  ".join(f"{k.split('/', 1)[1]} {float(v):.3g} ({100 * float(v) / max(total, 1e-12):.1f}%)"
                       for k, v in aux.items())
    return row, detail + block_summary(metrics)


class SpeedReport:
    """Calls `on_speed(preset, tokens/s of one process)` once, measured from the first
    progress update (past the warm-up steps) until `after_s` seconds later."""

    def __init__(self, on_speed: Optional[Callable[[Preset, float], None]], after_s: float = 60.0):
        self.on_speed, self.after_s, self.start = on_speed, after_s, None

    def observe(self, preset: Preset, tokens: int, world_size: int) -> None:
        if self.on_speed is None:
            return
        now = time.perf_counter()
        if self.start is None:
            self.start = (now, tokens)
        elif now - self.start[0] >= self.after_s:
            self.on_speed(preset, (tokens - self.start[1]) / (now - self.start[0]) / world_size)
            self.on_speed = None


class ProgressLog:
    """The run's progress updates: each step's figures go into this rank's window, and
    every `every` steps (and at the budget) the window, summed over ranks, becomes a
    `train` row in the metrics, the progress line, and the run's speed report."""

    def __init__(self, every: int, source_names: list[str], device: torch.device, ddp, scheduler, faults, metrics,
                 reporter: Reporter, speed: SpeedReport, preset):
        self.every, self.names, self.ddp, self.scheduler, self.faults = every, source_names, ddp, scheduler, faults
        self.metrics, self.reporter, self.speed, self.preset = metrics, reporter, speed, preset
        self.window = Window(len(source_names), device, 0)

    def restart(self, tokens: int) -> None:
        self.window.restart(tokens)

    def after_step(self, out: dict, counters, budget: int) -> None:
        if not out["skipped"]:
            self.window.add(out)
        if counters.step % self.every == 0 or counters.tokens >= budget:
            self.update(out, counters)

    def update(self, out: dict, counters) -> None:
        """A progress update: the window's figures summed over ranks, to the metrics and the display."""
        from .distributed import all_reduce_sum

        window, tokens, n_src = self.window, counters.tokens, len(self.names)
        packed = all_reduce_sum(window.packed(), self.ddp)
        tokens_per_s = (tokens - window.tokens) / max(1e-9, time.perf_counter() - window.t)
        loss = packed[0].item() / max(1, tokens - window.tokens)
        lr = self.scheduler.get_last_lr()[0]
        src_l, src_c = packed[1:1 + n_src], packed[1 + n_src:]
        source_loss = {name: (src_l[i] / src_c[i]).item() if src_c[i] > 0 else None
                       for i, name in enumerate(self.names)}
        row, detail = train_row({"step": counters.step, "tokens": tokens, "loss": loss, "lr": lr,
                                 "tokens_per_s": tokens_per_s, "grad_norm": float(out["grad_norm"]),
                                 "skipped_steps": self.faults.skipped_steps}, source_loss, out["aux"], out["metrics"])
        self.metrics.write(row)
        self.reporter.update(tokens, loss, lr, tokens_per_s, detail)
        if self.ddp.is_main:
            self.speed.observe(self.preset, tokens, self.ddp.world_size)
        window.restart(tokens)
