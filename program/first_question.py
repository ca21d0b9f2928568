"""After training: the first question `python main.py` asks when a finished model exists.

    Train (Enter)   today's behaviour: resume an interrupted run, else pick a preset
    Talk to it      a streaming prompt loop (program/talk.py)
    Evaluate it     held-out loss / perplexity / bits per byte and lm-eval tasks (program/evaluate.py)
    Export it       a Hugging Face folder (program/export.py)
    Quit

Talk, Evaluate and Export act on one of the finished checkpoints (lm_current.pth, and
lm_prev.pth / lm_prev2.pth when they exist, picked from a second menu) and come back to
the question afterwards. With no terminal on stdin the default (train) is taken and said
in one line; under torchrun (several processes) the question is not asked at all."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console

from presets import Preset
from train.checkpoint_files import ROLLING, CheckpointError, load_checkpoint

TRAIN, TALK, EVALUATE, EXPORT, QUIT = "Train", "Talk to it", "Evaluate it", "Export it", "Quit"


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def finished_models(checkpoints: Path) -> list[Path]:
    """The rolling checkpoints that exist, newest first."""
    return [Path(checkpoints) / n for n in ROLLING if (Path(checkpoints) / n).is_file()]


@dataclass
class Finished:
    """A finished model loaded for use: the network (eval mode, on `device`), its tokenizer,
    the preset it was trained with (generate/eval sections refreshed from configs/), the file."""

    model: torch.nn.Module
    tokenizer: object
    preset: Preset
    path: Path
    checkpoint: dict
    device: torch.device


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stored_preset(ckpt: dict, path: Path, configs: Optional[Path] = None, warn=print) -> Preset:
    """The preset stored in a checkpoint; its `generate` and `eval` sections are taken from
    the preset file in `configs/` with the same name when there is one, so editing the
    preset changes how a finished model is sampled and evaluated."""
    from presets import PresetError, load_preset, preset_from_dict

    preset, _ = preset_from_dict(ckpt["preset"], f"{path} (stored preset)")
    if configs is not None and Path(configs).is_dir():
        for file in sorted(Path(configs).glob("*.json")):
            if file.stem != preset.name:
                try:
                    import json

                    if json.loads(file.read_text(encoding="utf-8")).get("name") != preset.name:
                        continue
                except (OSError, ValueError, AttributeError):
                    continue
            try:
                current, _ = load_preset(file)
            except PresetError as e:
                warn(f"{file} is invalid ({e.problems[0]}); using the generate/eval settings stored in {path.name}")
                break
            preset.generate, preset.eval = current.generate, current.eval
            break
    return preset


def load_finished(path: Path, configs: Optional[Path] = None, device: Optional[torch.device] = None,
                  warn=print) -> Finished:
    """Load a finished checkpoint into a ready-to-use model (raises CheckpointError)."""
    from data import TextTokenizer
    from model import build_model

    path = Path(path)
    ckpt = load_checkpoint(path)
    if "preset" not in ckpt or "tokenizer" not in ckpt:
        raise CheckpointError(f"{path} holds no preset or tokenizer (not a finished run of this trainer)")
    preset = stored_preset(ckpt, path, configs, warn)
    tok = TextTokenizer.from_json(ckpt["tokenizer"]["json"], ckpt["tokenizer"]["spec"])
    model = build_model(preset.model, tok.vocab_size, preset.auxiliary)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing:
        raise CheckpointError(f"{path} does not fit its own preset's model ({len(missing)} missing tensors, "
                              f"e.g. {missing[0]})")
    device = device or pick_device()
    model.to(device).eval()
    with torch.no_grad():  # first forward now: one-time notices (kernels) come before any prompt
        model(torch.tensor([[tok.eot_id]], device=device), state=model.generation_state(1, device))
    return Finished(model, tok, preset, path, ckpt, device)


def describe(path: Path) -> str:
    """'lm_current.pth: tiny, transformer, 48.0k tokens, held-out loss 4.21, 2026-12-01 23:51'"""
    from train.progress import human

    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        return f"{path.name}: unreadable ({e})"
    m = ck.get("model_config", {})
    parts = [ck.get("preset", {}).get("name", "?"), str(m.get("arch", "?")), f"{human(ck.get('tokens', 0))} tokens"]
    if ck.get("eval", {}).get("eval_loss") is not None:
        parts.append(f"held-out loss {ck['eval']['eval_loss']:.2f}")
    if ck.get("finished_at"):
        parts.append(time.strftime("%Y-%m-%d %H:%M", time.localtime(ck["finished_at"])))
    return f"{path.name}: " + ", ".join(parts)


def choose_checkpoint(paths: list[Path], console: Console) -> Optional[Path]:
    """Which finished model to act on (Enter = the newest); None on Ctrl-C."""
    if len(paths) == 1 or not interactive():
        return paths[0]
    import questionary

    labels = [describe(p) for p in paths]
    answer = questionary.select("Which model? (Enter = the newest)", choices=labels, default=labels[0]).ask()
    return None if answer is None else paths[labels.index(answer)]


def first_question(root: Path, console: Optional[Console] = None) -> Optional[int]:
    """Ask what to do with a finished model. None = go on to train (the default, also when
    there is no finished model, no terminal, or several processes); an int = exit code
    (0 after Quit, 130 after Ctrl-C at a question)."""
    console = console or Console()
    root = Path(root)
    models = finished_models(root / "checkpoints")
    if not models or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    if not interactive():
        console.print(f"no terminal on stdin: training (the default; {models[0].name} can be talked to, "
                      "evaluated or exported from a terminal)", markup=False, highlight=False)
        return None
    import questionary

    console.print(f"[bold]Finished model:[/] {describe(models[0])}", highlight=False)
    while True:
        answer = questionary.select("What now? (Enter = train)", choices=[TRAIN, TALK, EVALUATE, EXPORT, QUIT],
                                    default=TRAIN).ask()
        if answer is None:
            return 130
        if answer == TRAIN:
            return None
        if answer == QUIT:
            return 0
        path = choose_checkpoint(finished_models(root / "checkpoints"), console)
        if path is None:
            return 130
        try:
            act(answer, path, root, console)
        except CheckpointError as e:
            console.print(f"error: {e}", style="red", markup=False, highlight=False)
        except KeyboardInterrupt:
            console.print("stopped.")


def act(choice: str, path: Path, root: Path, console: Console) -> None:
    """Run one of Talk / Evaluate / Export on the checkpoint at `path`."""
    warn = lambda m: console.print(f"warning: {m}", style="yellow", markup=False, highlight=False)  # noqa: E731
    with console.status(f"loading {path.name} ..."):
        fin = load_finished(path, root / "configs", warn=warn)
    if choice == TALK:
        from .talk import talk

        talk(fin, console)
    elif choice == EVALUATE:
        from .evaluate import assess

        assess(fin, console)
    elif choice == EXPORT:
        from .export import export

        out = root / "exports" / f"{fin.preset.name}-{path.stem}"
        with console.status(f"exporting to {out} ..."):
            export(fin, out)
        console.print(f"exported to {out}\n  load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, "
                      "trust_remote_code=True)", markup=False, highlight=False)
