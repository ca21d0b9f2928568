"""The network: architectures, their layers and generation. Never imports data/ or train/."""
from .base import ModelOutput, detach_state, map_state
from .config import ModelConfig
from .generate import generate


def build_model(cfg: ModelConfig, vocab_size: int):
    """The language model named by `cfg.arch`, freshly initialised."""
    if cfg.arch == "transformer":
        from .transformer import TransformerLM

        return TransformerLM(cfg, vocab_size)
    if cfg.arch == "hatchling":
        from .hatchling import HatchlingLM

        return HatchlingLM(cfg, vocab_size)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")


def count_params(model) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["ModelConfig", "ModelOutput", "build_model", "count_params", "detach_state", "map_state", "generate"]
