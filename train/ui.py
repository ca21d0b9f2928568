"""The interactive front: preset picker and resume question. Every question has a
default that Enter takes, and with no terminal on stdin the default is taken and said."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .checkpoint import RUN_STATE, CheckpointError, load_checkpoint
from .config import TOKEN_BUDGET, Preset
from .estimate import human_duration, machine_flops, param_count, train_seconds, vocab_size_guess
from .preset import PresetError, load_preset
from .progress import human

DEFAULT_PRESET = "00_best_general"


@dataclass
class RunPlan:
    preset: Optional[Preset]  # None when resuming: the run's stored preset is used
    resume: bool
    source: str  # preset file or checkpoint, for messages


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def preset_table(paths: list[Path], console: Console) -> Table:
    rate, device = machine_flops()
    table = Table(title=f"Presets (each trains {TOKEN_BUDGET:,} tokens; time estimated for this {device})")
    table.add_column("preset", no_wrap=True, style="bold")
    table.add_column("params", no_wrap=True, justify="right")
    table.add_column("est. time", no_wrap=True, justify="right")
    table.add_column("model and data", ratio=1)
    for path in paths:
        try:
            preset, _ = load_preset(path)
        except PresetError as e:
            table.add_row(path.stem, "", "", Text(f"invalid: {e.problems[0]}", style="red"))
            continue
        n = param_count(preset.model, vocab_size_guess(preset.tokenizer))
        secs = train_seconds(n, preset.model, preset.train.seq_length, TOKEN_BUDGET)
        m = preset.model
        about = Text(f"{m.arch} d{m.d_model} L{m.n_layers}", style="cyan")
        about.append(f"  {preset.description}", style="default")
        table.add_row(path.stem, human(n), human_duration(secs), about)
    return table


def choose_preset(configs: Path, console: Console) -> Optional[Path]:
    """The preset file to train: picked with questionary, Enter = 00_best_general."""
    paths = sorted(Path(configs).glob("*.json"))
    if not paths:
        console.print(f"[red]no presets in {configs}/[/]")
        return None
    default = next((p for p in paths if p.stem == DEFAULT_PRESET), paths[0])
    console.print(preset_table(paths, console))
    if not interactive():
        console.print(f"no terminal on stdin: taking the default preset [bold]{default.stem}[/]")
        return default
    import questionary

    answer = questionary.select("Preset to train (Enter = default):", choices=[p.stem for p in paths],
                                default=default.stem).ask()  # None on Ctrl-C
    return None if answer is None else next(p for p in paths if p.stem == answer)


def ask_resume(checkpoints: Path, console: Console) -> Optional[bool]:
    """True to resume an interrupted run, False for a new run, None on Ctrl-C."""
    path = Path(checkpoints) / RUN_STATE
    if not path.exists():
        return False
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        console.print(f"[yellow]warning: an interrupted run cannot be resumed: {e}[/]")
        return False
    name = state.get("preset", {}).get("name", "?")
    what = f"interrupted run of '{name}' at {human(state['tokens'])}/{human(state['budget'])} tokens"
    if not interactive():
        console.print(f"no terminal on stdin: resuming the {what}")
        return True
    import questionary

    return questionary.confirm(f"Resume the {what}? (Enter = yes; no starts a new run)", default=True).ask()


def choose_run(configs: Path, checkpoints: Path, console: Console | None = None) -> Optional[RunPlan]:
    console = console or Console()
    resume = ask_resume(checkpoints, console)
    if resume is None:
        return None
    if resume:
        return RunPlan(None, True, str(Path(checkpoints) / RUN_STATE))
    path = choose_preset(configs, console)
    if path is None:
        return None
    preset, notices = load_preset(path)
    for note in notices:
        console.print(f"[yellow]notice: {path}: {note}[/]")
    return RunPlan(preset, False, str(path))
