"""AdamW with decay on matrices only, and the learning-rate schedules."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from presets import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95); weight decay on >=2-D weights (matmuls, embeddings),
    none on norms' gains and biases. Fused kernel on CUDA."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # warmup-stable-decay: flat at the peak, then a linear decay over the last decay_fraction
    decay_steps = max(1, int(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int, tokens_per_step: int, scale=lambda: 1.0,
                    position: Optional[Callable[[int], float]] = None):
    """LambdaLR over optimizer steps; `scale()` multiplies it (the trainer halves it after a roll-back).
    `position(s)`, when given, is where step s sits on a schedule of `total_steps` steps of
    `tokens_per_step` (a run resumed with another global batch follows its schedule by tokens)."""
    warmup_steps = max(1, min(total_steps // 2, cfg.warmup_tokens // max(1, tokens_per_step)))
    at = position or (lambda s: s)
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda s: scale() * lr_factor(at(s), total_steps, warmup_steps, cfg))
