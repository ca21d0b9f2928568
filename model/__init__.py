"""The network: architectures, their layers and generation. Never imports data/ or train/."""
from .base import ModelOutput, detach_state, map_state
from .config import AuxHeadsConfig, ModelConfig
from .generate import generate


def build_model(cfg: ModelConfig, vocab_size: int, aux_cfg: AuxHeadsConfig | None = None):
    """The language model named by `cfg.arch`, freshly initialised, with the auxiliary
    heads that `aux_cfg` turns on (none by default)."""
    if cfg.arch == "transformer":
        from .transformer import TransformerLM

        return TransformerLM(cfg, vocab_size, aux_cfg)
    if cfg.arch == "hatchling":
        from .hatchling import HatchlingLM

        return HatchlingLM(cfg, vocab_size, aux_cfg)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")


def count_params(model) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["AuxHeadsConfig", "ModelConfig", "ModelOutput", "build_model", "count_params", "detach_state", "map_state", "generate"]
