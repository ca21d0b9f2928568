"""The `train` and `auxiliary` sections of a preset, and the preset as a whole."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from data import DataConfig, TokenizerConfig
from model import AuxHeadsConfig, ModelConfig

# The fixed budget of every run: real (non-padding) training tokens, summed over ranks.
TOKEN_BUDGET = 100_000_000


def ranged(default, interval: str):
    """A numeric preset key's field: its default and its valid interval ("[0, 1)": 0
    allowed, 1 not), which the preset validator checks (presets/rules.py)."""
    return field(default=default, metadata={"range": interval})


@dataclass
class TrainConfig:
    seq_length: int = ranged(256, "[1, 1048576]")  # tokens per stream per step (T)
    batch_size: int = ranged(16, "[1, 1048576]")  # parallel streams per rank (B)
    grad_accum_steps: int = ranged(1, "[1, 1048576]")  # micro-steps per optimizer step
    lr: float = ranged(3e-4, "(0, 10]")
    min_lr_ratio: float = ranged(0.1, "[0, 1]")  # final lr = lr * min_lr_ratio
    schedule: Literal["wsd", "cosine"] = "wsd"  # warmup-stable-decay, or warmup-cosine
    warmup_tokens: int = ranged(2_000_000, "[0, 1000000000000]")
    decay_fraction: float = ranged(0.2, "[0, 1]")  # wsd: share of the run spent decaying
    weight_decay: float = ranged(0.1, "[0, 10]")
    grad_clip: float = ranged(1.0, "(0, 1e6]")
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = ranged(1337, "[0, 4294967295]")
    log_every_steps: int = ranged(10, "[1, 1e9]")
    eval_every_tokens: int = ranged(5_000_000, "[1, 1000000000000]")
    eval_tokens: int = ranged(65_536, "[1, 1000000000000]")  # held-out tokens per evaluation
    checkpoint_every_tokens: int = ranged(5_000_000, "[1, 1000000000000]")  # in-run saves for crash recovery
    samples: int = ranged(2, "[0, 100]")  # generated samples shown at each evaluation
    sample_tokens: int = ranged(48, "[0, 100000]")
    # training phase (hatchling): A backbone + working memory; B adds procedural memory;
    # C adds episodic memory; E lifelong (soft resets keep committed memories across
    # documents, and the memory contents are saved with lm_current.pth)
    phase: Literal["A", "B", "C", "E"] = "A"


@dataclass
class AuxiliaryConfig(AuxHeadsConfig):
    """The `auxiliary` section: the auxiliary heads' keys (AuxHeadsConfig) plus adaptive source weights."""

    enable_adaptive_sources: bool = False
    adaptive_interval_tokens: int = ranged(1_000_000, "[1, 1000000000000]")
    adaptive_min_weight: float = ranged(0.1, "(0, 1000]")
    adaptive_max_weight: float = ranged(5.0, "(0, 1000]")
    adaptive_smoothing: float = ranged(0.5, "[0, 1)")


@dataclass
class GenerateConfig:
    """The `generate` section: sampling when you talk to a finished model (program/talk.py)."""

    temperature: float = ranged(0.8, "[0, 100]")
    top_p: float = ranged(0.9, "(0, 1]")
    max_tokens: int = ranged(128, "[1, 1048576]")  # most tokens of one reply
    no_repeat_ngram: int = ranged(3, "[0, 64]")  # a token that would repeat an n-gram already in the text is never sampled (0 = off)


# lm-eval tasks suited to 50-150M-parameter models trained on 100M tokens
DEFAULT_EVAL_TASKS = ["lambada_openai", "wikitext", "hellaswag", "arc_easy", "piqa"]


@dataclass
class EvalConfig:
    """The `eval` section: what "Evaluate it" runs on a finished model (program/evaluate.py)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_TASKS))  # lm-eval task names ([] = none)
    num_fewshot: int = ranged(0, "[0, 1000]")
    limit: Optional[int] = ranged(None, "[1, 1e12]")  # at most this many examples per task (null = all)
    batch_size: int = ranged(16, "[1, 65536]")  # sequences per forward pass
    include_path: Optional[str] = None  # a folder of your own lm-eval task YAML files


@dataclass
class Preset:
    name: str
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    auxiliary: AuxiliaryConfig = field(default_factory=AuxiliaryConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def apply_phase(self) -> None:
        """Turn on the memories the training phase asks for (explicit model flags stay on)."""
        phase = self.train.phase
        m = self.model
        m.pm_enabled = m.pm_enabled or phase in ("B", "C", "E")
        m.em_enabled = m.em_enabled or phase in ("C", "E")
        m.lifelong = m.lifelong or phase == "E"

    def to_dict(self) -> dict:
        """Plain JSON-able dict (stored in checkpoints, broadcast to DDP ranks)."""
        return asdict(self)


# keys that are accepted anywhere sensible but ignored, with the notice to print
IGNORED_KEYS = {
    "train_tokens": f"the token budget is fixed at {TOKEN_BUDGET:,} tokens per run; train_tokens is ignored",
}

