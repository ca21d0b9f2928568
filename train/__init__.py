"""The run: exactly a budget of tokens of a preset, with evaluation, saves, DDP and fault
handling. `train(preset, budget, folder)` is the Python API scripts, notebooks and benches
use; it raises for problems a user can fix (the program, program/, turns those into
messages and exit codes).

    from train import load_preset, train
    preset, _ = load_preset("configs/10_local_tiny.json")
    result = train(preset, 2_000_000, "checkpoints")
"""
from presets import TOKEN_BUDGET, AuxiliaryConfig, Preset, PresetError, TrainConfig, load_preset, preset_from_dict

from .errors import TrainError
from .loop import RunResult, train

__all__ = ["TOKEN_BUDGET", "AuxiliaryConfig", "Preset", "PresetError", "RunResult", "TrainConfig", "TrainError",
           "load_preset", "preset_from_dict", "train"]
