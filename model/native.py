"""Kept for train/estimate.py's `from model.native import source_hash`: the native build
helpers moved to model/ops/cpu/build.py (also exported as model.ops.source_hash)."""
from .ops.cpu.build import source_hash

__all__ = ["source_hash"]
