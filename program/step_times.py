"""How long 100M tokens of a preset take here, for the picker's table.

Two kinds of figure, kept per model, sequence length, batch, device and version of
model/'s code in ~/.cache/hatchling/step_times.json:

- **timed**: the preset's real training step (forward, backward, AdamW on ~128 tokens)
  timed in interleaved rounds against one fixed reference step, and kept as the median
  *ratio* to it. Each picker sitting times the reference once and scales every ratio by
  it, so the rows of one table are comparable however loaded the machine was when each
  preset was first timed.
- **run**: the tokens/s a real training run of the preset reached here after its first
  minute (the run reports it through `train(..., on_speed=...)`); it replaces the timed
  figure, and the table marks it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

import model as model_package
from model import ModelConfig, build_model

# outside the project, so no run's folders are touched
STEP_TIMES = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hatchling" / "step_times.json"
CACHE_VERSION = 2  # entries of another version (a bare tokens/s of the first design) are timed again
REFERENCE = ModelConfig(arch="transformer", d_model=64, n_layers=2, n_heads=2)  # the yardstick step
REFERENCE_VOCAB = 512
TIMED_TOKENS = 128  # tokens of one timed step


@functools.lru_cache(maxsize=1)
def _model_code() -> str:
    """A hash of model/'s sources: a figure taken with other model code is not reused."""
    root = Path(model_package.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c", ".h")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def speed_key(model_cfg: ModelConfig, vocab_size: int, seq_length: int, batch: int, device: str) -> str:
    return json.dumps({"model": asdict(model_cfg), "vocab": vocab_size, "seq": seq_length, "batch": batch,
                       "device": device, "code": _model_code()}, sort_keys=True)


def read_cache(cache: Optional[Path]) -> dict:
    """{key: entry} of the cache file; empty when absent, unreadable or of another version."""
    if cache is None or not cache.exists():
        return {}
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(table, dict) or table.get("version") != CACHE_VERSION:
        return {}
    return table.get("entries", {})


def write_entry(cache: Optional[Path], key: str, entry: dict) -> None:
    """Store one entry (a cache only: an unwritable one is ignored)."""
    if cache is None:
        return
    entries = read_cache(cache)
    entries[key] = entry
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}))
        os.replace(tmp, cache)
    except OSError:
        pass


class _TimedStep:
    """One model's training step on `rows` x `seq` random tokens, ready to time."""

    def __init__(self, model_cfg: ModelConfig, vocab_size: int, rows: int, seq: int, device: str):
        torch.manual_seed(0)
        self.device = device
        self.model = build_model(model_cfg, vocab_size).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randint(0, vocab_size, (rows, seq + 1), device=device)
        self.tokens = rows * seq

    def __call__(self) -> float:
        """Seconds of one step."""
        t0 = time.perf_counter()
        out = self.model(self.x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), self.x[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _reference(device: str) -> _TimedStep:
    return _TimedStep(REFERENCE, REFERENCE_VOCAB, 1, TIMED_TOKENS, device)


@functools.lru_cache(maxsize=None)
def reference_tokens_per_s(device: str, rounds: int = 5) -> float:
    """The reference step's tokens/s now (median of a few steps after a warm-up); once per process."""
    step = _reference(device)
    step()
    return step.tokens / statistics.median(step() for _ in range(rounds))


def relative_speed(model_cfg: ModelConfig, vocab_size: int, seq_length: int, batch: int, device: str,
                   rounds: int = 3) -> float:
    """This model's training tokens/s as a multiple of the reference step's, from
    interleaved rounds (reference, model, reference, ...) and their median ratio, so that
    load on the machine while timing cancels out."""
    seq = min(seq_length, TIMED_TOKENS)
    rows = max(1, min(batch, TIMED_TOKENS // seq))
    step, ref = _TimedStep(model_cfg, vocab_size, rows, seq, device), _reference(device)
    step(), ref()  # warm-up (allocator, threads, one-time builds)
    ratios = []
    for _ in range(rounds):
        t_ref = ref()
        t_model = step()
        ratios.append((step.tokens / t_model) / (ref.tokens / t_ref))
    ratio = statistics.median(ratios)
    # longer sequences cost more per token in attention; the timing ran at `seq`
    if model_cfg.arch == "transformer" and seq_length > seq:
        ratio *= seq / seq_length
    return ratio


def tokens_per_s(model_cfg: ModelConfig, vocab_size: int, seq_length: int, batch: int,
                 cache: Optional[Path] = STEP_TIMES, on_measure=None) -> tuple[float, str]:
    """(training tokens/s of one process, "run" or "timed"): what a real run of this
    model reached here if one did, else its timed ratio (timed now when not cached) times
    the reference step's speed in this sitting."""
    device = device_type()
    key = speed_key(model_cfg, vocab_size, seq_length, batch, device)
    entry = read_cache(cache).get(key, {})
    if "run" in entry:
        return entry["run"], "run"
    if "relative" not in entry:
        if on_measure is not None:
            on_measure()
        entry = {"relative": relative_speed(model_cfg, vocab_size, seq_length, batch, device)}
        write_entry(cache, key, entry)
    return entry["relative"] * reference_tokens_per_s(device), "timed"


def record_run_speed(model_cfg: ModelConfig, vocab_size: int, seq_length: int, batch: int, tokens_per_s: float,
                     cache: Optional[Path] = STEP_TIMES) -> None:
    """What a real run of this model reached here (tokens/s of one process): later
    pickers show it instead of the timed figure."""
    key = speed_key(model_cfg, vocab_size, seq_length, batch, device_type())
    write_entry(cache, key, {"run": tokens_per_s, "when": time.time()})


def human_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
