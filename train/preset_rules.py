"""What a preset's numbers may be, and the preset vocabulary of the trainer this one
replaces (its README's keys), accepted as aliases of ours.

RANGES gives every numeric key of every section its valid interval, in interval
notation ("[0, 1)": 0 allowed, 1 not). A value outside is refused with the interval, so
a preset can neither train by gradient ascent (`grad_clip: -1`) nor ask the allocator
for a petabyte before anything says no. The memory a preset needs is checked separately,
against the machine (train/estimate.py)."""
from __future__ import annotations

import math
import re

from data import DataConfig, HFSourceSpec, PdfSourceSpec, TextSourceSpec, TokenizerConfig
from model import ModelConfig

from .config import AuxiliaryConfig, EvalConfig, GenerateConfig, TrainConfig

_BIG = 10**12  # token counts: far beyond any run, short of overflow
RANGES: dict[type, dict[str, str]] = {
    ModelConfig: {
        "d_model": "[8, 16384]", "n_layers": "[1, 512]", "n_heads": "[1, 512]", "n_kv_heads": "[1, 512]",
        "mlp_mult": "(0, 32]", "dropout": "[0, 1)", "rope_theta": "[1, 1e9]", "norm_eps": "(0, 0.1]",
        "init_std": "(0, 1]", "global_every": "[1, 512]", "wm_window": "[0, 1048576]", "chunk_size": "[1, 4096]",
        "conv_size": "[1, 128]", "decay_rank": "[1, 16384]", "lif_decay": "(0, 1]", "lif_threshold": "(0, 1000]",
        "lif_init_rate": "(0, 1)", "lif_surrogate_slope": "(0, 1000]", "beta_spike_floor": "[0, 1]",
        "alpha_spike_floor": "[0, 1]", "mem_dim": "[0, 16384]",
        "plasticity_span": "[1, 65536]", "pm_slots": "[1, 65536]", "pm_rho": "(0, 1]",
        "pm_commit_threshold": "[-1000, 1000]", "pm_commit_cap": "(0, 1000]", "pm_strength_max": "(0, 1000]",
        "pm_budget": "(0, 1e6]", "pm_base_decay": "(0, 1]", "em_slots": "[1, 65536]", "em_topk": "[1, 65536]",
        "em_writes_per_span": "[1, 65536]", "em_novelty_threshold": "[-2, 2]", "em_decay": "(0, 1]",
        "em_strength_max": "(0, 1000]",
    },
    TrainConfig: {
        "seq_length": "[1, 1048576]", "batch_size": "[1, 1048576]", "grad_accum_steps": "[1, 1048576]",
        "lr": "(0, 10]", "min_lr_ratio": "[0, 1]", "warmup_tokens": f"[0, {_BIG}]", "decay_fraction": "[0, 1]",
        "weight_decay": "[0, 10]", "grad_clip": "(0, 1e6]", "seed": "[0, 4294967295]",
        "log_every_steps": "[1, 1e9]", "eval_every_tokens": f"[1, {_BIG}]", "eval_tokens": f"[1, {_BIG}]",
        "checkpoint_every_tokens": f"[1, {_BIG}]", "samples": "[0, 100]", "sample_tokens": "[0, 100000]",
    },
    AuxiliaryConfig: {
        "policy_kl_weight": "[0, 100]", "policy_layer": "[-1, 512]", "policy_token_fraction": "(0, 1]",
        "value_weight": "[0, 100]", "value_horizon": "[1, 65536]", "dynamics_weight": "[0, 100]",
        "dynamics_steps": "[1, 3]", "span_contrastive_weight": "[0, 100]", "span_mask_fraction": "(0, 1)",
        "span_temperature": "(0, 100]", "adaptive_interval_tokens": f"[1, {_BIG}]",
        "adaptive_min_weight": "(0, 1000]", "adaptive_max_weight": "(0, 1000]", "adaptive_smoothing": "[0, 1)",
    },
    DataConfig: {
        "eval_fraction": "[0, 0.5)", "min_text_length": "[0, 1e9]", "num_workers": "[0, 256]",
        "prefetch_docs": "[1, 1e6]", "source_retries": "[0, 100]", "retry_backoff_s": "[0, 3600]",
        "seed": "[0, 4294967295]",
    },
    TokenizerConfig: {"vocab_size": "[257, 1048576]", "train_chars": "[1000, 1e11]"},
    GenerateConfig: {"temperature": "[0, 100]", "top_p": "(0, 1]", "max_tokens": "[1, 1048576]",
                     "no_repeat_ngram": "[0, 64]"},
    EvalConfig: {"num_fewshot": "[0, 1000]", "limit": "[1, 1e12]", "batch_size": "[1, 65536]"},
    TextSourceSpec: {"chunk_chars": "[100, 1e9]"},
    HFSourceSpec: {"chunk_chars": "[0, 1e9]"},
    PdfSourceSpec: {"min_chunk_chars": "[1, 1e9]", "max_chunk_chars": "[1, 1e9]"},
}

_INTERVAL = re.compile(r"^([\[(])\s*([^,]+),\s*([^\])]+)([\])])$")


def in_range(value: float, interval: str) -> bool:
    lo_b, lo, hi, hi_b = _INTERVAL.match(interval).groups()
    lo, hi = float(lo), float(hi)
    return math.isfinite(value) and (lo <= value if lo_b == "[" else lo < value) and (
        value <= hi if hi_b == "]" else value < hi)


def range_problems(obj) -> list[tuple[str, str]]:
    """(key, problem) for each numeric field of a section object outside its interval."""
    problems = []
    for key, interval in RANGES.get(type(obj), {}).items():
        value = getattr(obj, key)
        if value is not None and not in_range(value, interval):
            problems.append((key, f"must be in {interval}, got {value:g}"))
    return problems


# The replaced trainer's keys: (section, its key) -> (section, our key)
ALIASES = {
    ("model", "hidden_size"): ("model", "d_model"),
    ("model", "num_layers"): ("model", "n_layers"),
    ("model", "num_heads"): ("model", "n_heads"),
    ("model", "seq_length"): ("train", "seq_length"),
    ("train", "per_gpu_batch_size"): ("train", "batch_size"),
    ("train", "accumulation_steps"): ("train", "grad_accum_steps"),
    ("auxiliary", "span_contrastive_temperature"): ("auxiliary", "span_temperature"),
}
# its on/off switches of the auxiliary heads -> the weight that switches ours
HEAD_SWITCHES = {"enable_policy": "policy_kl_weight", "enable_value": "value_weight",
                 "enable_dynamics": "dynamics_weight", "enable_span_contrastive": "span_contrastive_weight"}
SEED_HEAD_WEIGHT = 0.05  # the replaced trainer's default weight of a head switched on


def resolve_aliases(raw: dict) -> tuple[dict, list[str], list[str]]:
    """(preset in our keys, notices, problems). Each alias is moved onto our key with a
    notice; an alias and our key both set, to different values, is a problem naming both."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    notices, problems = [], []
    for (sec, old), (new_sec, new) in ALIASES.items():
        section = out.get(sec)
        if not isinstance(section, dict) or old not in section:
            continue
        value = section.pop(old)
        target = out.setdefault(new_sec, {})
        if not isinstance(target, dict):
            continue  # the section's own type error is reported by the validator
        if new in target and target[new] != value:
            problems.append(f"{sec}.{old}: {value!r} conflicts with {new_sec}.{new}: {target[new]!r} "
                            f"(the same setting under two names; keep one)")
            continue
        target[new] = value
        notices.append(f"{sec}.{old}: read as {new_sec}.{new} (this trainer's name for it)")
    aux = out.get("auxiliary")
    if isinstance(aux, dict):
        for switch, weight_key in HEAD_SWITCHES.items():
            if switch not in aux:
                continue
            on = aux.pop(switch)
            if not isinstance(on, bool):
                problems.append(f"auxiliary.{switch}: expected true or false, got {on!r}")
                continue
            weight = aux.get(weight_key, 0)
            if not on:
                if isinstance(weight, (int, float)) and weight:
                    notices.append(f"auxiliary.{switch}: false turns the head off ({weight_key} {weight} ignored)")
                aux[weight_key] = 0.0
            elif isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight == 0:
                aux[weight_key] = SEED_HEAD_WEIGHT
                notices.append(f"auxiliary.{switch}: true with no {weight_key}: weight {SEED_HEAD_WEIGHT} "
                               "(the replaced trainer's default)")
    return out, notices, problems
