"""Size, memory and duration estimates: parameters from a model built on the meta device
(no memory); the memory a run needs, checked against the machine before anything is
built; time from a short timing of the preset's real training step on this machine
(cached per model, machine and version of model/'s code in ~/.cache/hatchling/step_times.json)."""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

import model as model_package
from model import ModelConfig, build_model, count_params
from model.native import source_hash

KNOWN_VOCAB = {"gpt2": 50257, "EleutherAI/gpt-neox-20b": 50277}


def vocab_size_guess(tokenizer_cfg) -> int:
    if tokenizer_cfg.type == "bpe":
        return tokenizer_cfg.vocab_size
    if tokenizer_cfg.type == "file" and tokenizer_cfg.path:
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(tokenizer_cfg.path).get_vocab_size()
        except Exception:
            pass
    return KNOWN_VOCAB.get(tokenizer_cfg.name or "", 50257)


def param_count(model_cfg: ModelConfig, vocab_size: int) -> int:
    with torch.device("meta"):
        return count_params(build_model(model_cfg, vocab_size))


# bytes per parameter while training with AdamW in fp32: weight, gradient, two moments
TRAIN_BYTES_PER_PARAM = 16
# activation floats kept for the backward pass, per token, per layer, per d_model channel: a generous
# bound (attention, SwiGLU and norms keep ~20-30 per channel; the hatchling's chunked KDA and LIF more)
ACTIVATION_FLOATS = {"transformer": 28, "hatchling": 60}


def training_bytes(model_cfg: ModelConfig, n_params: int, vocab_size: int, batch: int, seq_length: int) -> int:
    """The memory one training step needs: weights, gradients and AdamW moments, the
    activations of one micro-batch, and its logits (kept, their softmax and gradient)."""
    tokens = batch * seq_length
    acts = ACTIVATION_FLOATS.get(model_cfg.arch, 60) * model_cfg.n_layers * model_cfg.d_model * tokens * 4
    logits = 3 * tokens * vocab_size * 4
    return TRAIN_BYTES_PER_PARAM * n_params + acts + logits


def machine_memory(device: str = "cpu") -> tuple[int, str]:
    """(bytes available for a run, label): free GPU memory, or the RAM the OS reports as available."""
    if device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"free memory on {torch.cuda.get_device_name()}"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "available RAM"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def memory_problem(model_cfg: ModelConfig, n_params: int, vocab_size: int, batch: int, seq_length: int,
                   device: str = "cpu") -> str | None:
    """A sentence saying why this run cannot fit in this machine's memory, or None."""
    need = training_bytes(model_cfg, n_params, vocab_size, batch, seq_length)
    have, label = machine_memory(device)
    if need <= have:
        return None
    return (f"needs about {human_bytes(need)} to train ({n_params / 1e6:,.1f}M parameters with AdamW, "
            f"activations of {batch} x {seq_length} tokens), more than the {human_bytes(have)} of {label}; "
            "make the model smaller or lower train.batch_size / train.seq_length")


# measured training speed per model and machine: outside the project, so no run's folders are touched
STEP_TIMES = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hatchling" / "step_times.json"


@functools.lru_cache(maxsize=1)
def _model_code() -> str:
    """A hash of model/'s sources: a timing taken with other model code is not reused."""
    root = Path(model_package.__file__).resolve().parent
    return source_hash(sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c", ".cu", ".cuh", ".h")), length=12)


def _timing_key(model_cfg: ModelConfig, vocab_size: int, seq_length: int, device: str) -> str:
    return json.dumps({"model": asdict(model_cfg), "vocab": vocab_size, "seq": seq_length, "device": device,
                       "code": _model_code()}, sort_keys=True)


def measured_tokens_per_s(model_cfg: ModelConfig, vocab_size: int, seq_length: int, batch: int,
                          cache: Path | None = STEP_TIMES, budget_s: float = 1.0, on_measure=None) -> float:
    """Training tokens/s of this model on this machine: real forward+backward+AdamW steps
    on ~128 tokens (the preset's batch, fewer streams when long), timed after a warm-up;
    cached by model, size, sequence length and device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq = min(seq_length, 128)
    rows = max(1, min(batch, 128 // seq))
    key = _timing_key(model_cfg, vocab_size, seq_length, device) + f"x{rows}"
    table = {}
    if cache is not None and cache.exists():
        try:
            table = json.loads(cache.read_text())
        except (OSError, ValueError):
            table = {}
    if key in table:
        return table[key]
    if on_measure is not None:
        on_measure()
    torch.manual_seed(0)
    model = build_model(model_cfg, vocab_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (rows, seq + 1), device=device)

    def step(x=x):
        out = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step(x[:1, :17])  # warm-up (allocator, threads), on a few tokens
    steps, t0 = 0, time.perf_counter()
    while steps < 1 or (time.perf_counter() - t0 < budget_s / 2 and steps < 4):
        step()
        steps += 1
    rate = steps * x[:, 1:].numel() / (time.perf_counter() - t0)
    # longer sequences cost more per token in attention; the timing ran at `seq`
    rate *= seq / seq_length if model_cfg.arch == "transformer" and seq_length > seq else 1.0
    if cache is not None:
        table[key] = rate
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(table))
        except OSError:
            pass  # a cache only
    return rate


def human_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
