"""The interactive front: preset picker and resume question. Every question has a
default that Enter takes, and with no terminal on stdin the default is taken and said."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from data import hub_status, needs_hub
from presets import TOKEN_BUDGET, Preset, PresetError, load_preset
from train.checkpoint_files import RUN_STATE, CheckpointError, load_checkpoint
from train.checkpointer import run_summary
from train.memory_check import memory_problem, param_count, vocab_size_guess
from train.progress import human

from .step_times import STEP_TIMES, human_duration, tokens_per_s
from .torchrun import restarted_by_agent

DEFAULT_PRESET = "00_best_general"


@dataclass
class RunPlan:
    preset: Optional[Preset]  # None when resuming: the run's stored preset is used
    resume: bool
    source: str  # preset file or checkpoint, for messages


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _estimate(preset: Preset, cache: Optional[Path], on_measure=None) -> tuple[str, str, Optional[str]]:
    """(params, duration, problem) of one preset's row; problem says why it cannot run here."""
    vocab = vocab_size_guess(preset.tokenizer)
    n = param_count(preset.model, vocab)
    t = preset.train
    device = "cuda" if torch.cuda.is_available() and t.device != "cpu" else "cpu"
    problem = memory_problem(preset.model, n, vocab, t.batch_size, t.seq_length, device)
    if problem:
        return human(n), "", problem
    rate, kind = tokens_per_s(preset.model, vocab, t.seq_length, t.batch_size, cache, on_measure=on_measure)
    return human(n), human_duration(TOKEN_BUDGET / rate) + (" (run)" if kind == "run" else ""), None


def preset_table(paths: list[Path], console: Console, cache: Optional[Path] = STEP_TIMES) -> tuple[Table, set[str]]:
    """The picker's table, and the presets that cannot run here (invalid, too big, or
    needing the Hugging Face hub when it is unreachable). One bad preset marks its own row."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = Table(title=f"Presets (each trains {TOKEN_BUDGET:,} tokens; time measured on this {device})",
                  caption="est. time: from a timed training step, relative to a reference step timed now; "
                          "(run): the speed a real run of the preset reached here", caption_justify="left")
    table.add_column("preset", no_wrap=True, style="bold")
    table.add_column("params", no_wrap=True, justify="right")
    table.add_column("est. time", no_wrap=True, justify="right")
    table.add_column("model and data", ratio=1)
    unusable: set[str] = set()
    hub = None  # checked once, only when some preset needs it
    said = []

    def on_measure():  # the first start times each preset's training step once; later starts read the cache
        if not said:
            console.print(f"timing a training step of each preset on this {device} (once; cached)...", style="dim")
            said.append(True)
    for path in paths:
        try:
            preset, _ = load_preset(path)
        except PresetError as e:
            table.add_row(path.stem, "", "", Text(f"invalid: {e.problems[0]}", style="red"))
            unusable.add(path.stem)
            continue
        m = preset.model
        about = Text(f"{m.arch} d{m.d_model} L{m.n_layers}", style="cyan")
        about.append(f"  {preset.description}", style="default")
        try:
            params, secs, problem = _estimate(preset, cache, on_measure)
        except Exception as e:  # a preset that validates but cannot be built must not stop the picker
            params, secs, problem = "", "", f"cannot be built: {e.__class__.__name__}: {e}"
        if problem is None and any(needs_hub(s) for s in preset.data.sources):
            hub = hub if hub is not None else hub_status()
            if not hub[0]:
                problem = "needs the Hugging Face hub, which is unreachable from here"
        if problem:
            about.append(f"  ({problem})", style="red")
            unusable.add(path.stem)
        table.add_row(path.stem, params, secs, about)
    return table, unusable


def choose_preset(configs: Path, console: Console, cache: Optional[Path] = STEP_TIMES) -> Optional[Path]:
    """The preset file to train: picked with questionary, Enter = 00_best_general; None on
    Ctrl-C. PresetError when there is none to pick (exit code 2: nothing to train)."""
    paths = sorted(Path(configs).glob("*.json"))
    if not paths:
        raise PresetError(f"{configs}/", ["no presets here (a preset is a .json file): put one in this folder "
                                          "(the README's Presets section shows one), then start again"])
    default = next((p for p in paths if p.stem == DEFAULT_PRESET), paths[0])
    table, unusable = preset_table(paths, console, cache)
    console.print(table)
    if not interactive():
        console.print(f"no terminal on stdin: taking the default preset [bold]{default.stem}[/]")
        return default
    if default.stem in unusable:  # Enter should not lead into a preset that can only fail here
        usable = [p for p in paths if p.stem not in unusable]
        if usable:
            console.print(f"[yellow]{default.stem} cannot run here (see the table): Enter takes "
                          f"{usable[0].stem} instead[/]")
            default = usable[0]
    import questionary

    answer = questionary.select("Preset to train (Enter = default):", choices=[p.stem for p in paths],
                                default=default.stem).ask()  # None on Ctrl-C
    return None if answer is None else next(p for p in paths if p.stem == answer)


def ask_resume(checkpoints: Path, console: Console) -> Optional[bool]:
    """True to resume an interrupted run, False for a new run (none there, or one that
    cannot be read at all), None on Ctrl-C. A run saved in a format this version cannot
    read raises CheckpointError: the file is left for the version that wrote it."""
    path = Path(checkpoints) / RUN_STATE
    if not path.exists():
        return False
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        console.print(f"[yellow]warning: an interrupted run cannot be resumed: {e}[/]")
        return False
    name, tokens, budget = run_summary(state, path)  # a format this version cannot read: CheckpointError
    what = f"interrupted run of '{name}' at {human(tokens or 0)}/{human(budget or 0)} tokens"
    if restarted_by_agent():
        console.print(f"restarted by torchrun: resuming the {what}")
        return True
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
