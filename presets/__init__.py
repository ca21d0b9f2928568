"""Presets: the JSON files in configs/ and the schema they follow.

`schema.py` is the schema (dataclasses: a key's type, default and valid range live on its
field), `load.py` reads and validates a file, reporting every problem at once as
`file: key.path: what was expected`, and `rules.py` holds the range checks and the
accepted vocabulary (other trainers' key names, mapped onto ours)."""
from .load import PresetError, load_preset, preset_from_dict
from .schema import TOKEN_BUDGET, AuxiliaryConfig, EvalConfig, GenerateConfig, Preset, TrainConfig

__all__ = ["TOKEN_BUDGET", "AuxiliaryConfig", "EvalConfig", "GenerateConfig", "Preset", "PresetError", "TrainConfig",
           "load_preset", "preset_from_dict"]
