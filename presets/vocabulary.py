"""The accepted vocabulary: other names a preset may use for our keys.

Presets written in the simple_lm vocabulary (`model.hidden_size`, `train.per_gpu_batch_size`,
`auxiliary.enable_policy`, ...) load with their meaning: each such key is read as ours
with a notice naming our key, and the heads' on/off switches set the weight that switches
ours. An other name and our key set to different values is an error naming both. The
README's "Other names for keys" lists the same table."""
from __future__ import annotations

# (section, other name) -> (section, our key)
ALIASES = {
    ("model", "hidden_size"): ("model", "d_model"),
    ("model", "num_layers"): ("model", "n_layers"),
    ("model", "num_heads"): ("model", "n_heads"),
    ("model", "seq_length"): ("train", "seq_length"),
    ("train", "per_gpu_batch_size"): ("train", "batch_size"),
    ("train", "accumulation_steps"): ("train", "grad_accum_steps"),
    ("auxiliary", "span_contrastive_temperature"): ("auxiliary", "span_temperature"),
}
# on/off switches of the auxiliary heads -> the weight that switches ours
HEAD_SWITCHES = {"enable_policy": "policy_kl_weight", "enable_value": "value_weight",
                 "enable_dynamics": "dynamics_weight", "enable_span_contrastive": "span_contrastive_weight"}
SWITCHED_ON_WEIGHT = 0.05  # the weight of a head switched on with no weight of its own


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
                aux[weight_key] = SWITCHED_ON_WEIGHT
                notices.append(f"auxiliary.{switch}: true with no {weight_key}: weight {SWITCHED_ON_WEIGHT} "
                               "(the default of a switched-on head)")
    return out, notices, problems
