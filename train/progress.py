"""What a run shows while it trains: a rich progress bar on a terminal, plain log lines
elsewhere (CI, a pipe, a log file), and the metrics log `metrics.jsonl`."""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn


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


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (read it with pandas.read_json(lines=True))."""

    def __init__(self, path: Path, enabled: bool = True, run: str | None = None):
        self.path, self.enabled = Path(path), enabled
        self.run = run  # every row names the run it belongs to (a resumed run keeps its id)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.run is not None:
            row = {"run": self.run, **row}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
