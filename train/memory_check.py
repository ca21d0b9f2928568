"""Whether a run fits this machine: parameters from a model built on the meta device (no
memory), the memory one training step needs, and the machine's, compared before anything
is built."""
from __future__ import annotations

import os

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
