"""Size and duration estimates shown in the preset picker: parameters from a model built
on the meta device (no memory), time from a short matmul probe of this machine."""
from __future__ import annotations

import functools
import time

import torch

from model import ModelConfig, build_model, count_params

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


@functools.lru_cache(maxsize=1)
def machine_flops() -> tuple[float, str]:
    """(sustained matmul FLOP/s, device label), measured in a fraction of a second."""
    if torch.cuda.is_available():
        n, dtype, dev = 4096, torch.bfloat16, "cuda"
    else:
        n, dtype, dev = 512, torch.float32, "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = 0.0
    for _ in range(4):  # the first windows warm up threads and clocks: keep the best
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.05:
            a @ b
            reps += 1
        if dev == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    label = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    return best, label


def train_seconds(n_params: int, model_cfg: ModelConfig, seq_length: int, tokens: int) -> float:
    """Rough wall time for `tokens` training tokens: 6 FLOPs per parameter per token plus
    attention, at half the probed matmul rate (the rest of a step is not matmuls)."""
    attn = 6 * model_cfg.n_layers * model_cfg.d_model * seq_length
    flops = (6 * n_params + attn) * tokens
    rate, _ = machine_flops()
    return flops / (rate / 2)


def human_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
