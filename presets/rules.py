"""What a preset's numbers may be: every numeric key's field carries its valid interval
(`ranged(default, "[0, 1)")` in the schema: 0 allowed, 1 not). A value outside is
refused with the interval, so a preset can neither train by gradient ascent
(`grad_clip: -1`) nor ask the allocator for a petabyte before anything says no. The
memory a preset needs is checked separately, against the machine (train/memory_check.py).
Other names a preset may use for our keys are in vocabulary.py."""
from __future__ import annotations

import dataclasses
import math
import re

_INTERVAL = re.compile(r"^([\[(])\s*([^,]+),\s*([^\])]+)([\])])$")


def in_range(value: float, interval: str) -> bool:
    lo_b, lo, hi, hi_b = _INTERVAL.match(interval).groups()
    lo, hi = float(lo), float(hi)
    return math.isfinite(value) and (lo <= value if lo_b == "[" else lo < value) and (
        value <= hi if hi_b == "]" else value < hi)


def field_ranges(cls) -> dict[str, str]:
    """{key: interval} of a section class's numeric fields (each field's `range` metadata)."""
    return {f.name: f.metadata["range"] for f in dataclasses.fields(cls) if "range" in f.metadata}


def range_problems(obj) -> list[tuple[str, str]]:
    """(key, problem) for each numeric field of a section object outside its interval."""
    problems = []
    for key, interval in field_ranges(type(obj)).items():
        value = getattr(obj, key)
        if value is not None and not in_range(value, interval):
            problems.append((key, f"must be in {interval}, got {value:g}"))
    return problems
