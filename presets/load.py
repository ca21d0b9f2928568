"""Loading and validating JSON presets.

The schema is the dataclasses themselves (Preset and the configs it holds): type hints
say what each key must be, defaults say what it is when absent. Every problem is reported
as `file: key.path: what was expected, what was found`, all of them at once, before
anything heavy starts."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from data import HFSourceSpec, PdfSourceSpec, check_format

from .rules import range_problems
from .schema import IGNORED_KEYS, Preset
from .vocabulary import resolve_aliases

MAX_PRESET_BYTES = 2**20  # a preset file larger than this is refused


class PresetError(Exception):
    """A preset that cannot be used. str() is the full, user-facing message."""

    def __init__(self, origin: str, problems: list[str]):
        self.origin, self.problems = origin, problems
        super().__init__("\n".join(f"{origin}: {p}" for p in problems))


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    shown = json.dumps(value) if not isinstance(value, (dict, list)) else ""
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{shown} ({kind})" if shown else kind


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = [_type_name(a) for a in args]
        return " or ".join(names) + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if dataclasses.is_dataclass(tp):
        return "an object"
    return getattr(tp, "__name__", str(tp))


def _type_tag(cls) -> tuple | None:
    """The allowed values of a dataclass's `type: Literal[...]` field, if it has one."""
    hint = typing.get_type_hints(cls).get("type")
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


class _Validator:
    def __init__(self):
        self.problems: list[str] = []
        self.notices: list[str] = []

    def fail(self, path: str, message: str):
        self.problems.append(f"{path or '(top level)'}: {message}")

    def convert(self, value: Any, tp, path: str):
        """value checked against tp; returns the converted value, or None after a fail()."""
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            return self.dataclass(value, tp, path)
        if origin in (Union, types.UnionType):
            return self.union(value, tp, path)
        if origin is Literal:
            if value in typing.get_args(tp) and not isinstance(value, bool):
                return value
            return self.fail(path, f"expected {_type_name(tp)}, got {_describe(value)}")
        if origin is list:
            if not isinstance(value, list):
                return self.fail(path, f"expected {_type_name(tp)}, got {_describe(value)}")
            (item,) = typing.get_args(tp)
            return [self.convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        if tp in (int, float) and isinstance(value, float) and not math.isfinite(value):
            return self.fail(path, f"expected a finite number, got {_describe(value)}")
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():  # 1e6 written in JSON
                return int(value)
        elif tp in (str, bool):
            if isinstance(value, tp):
                return value
        else:
            raise TypeError(f"unsupported schema type {tp!r} at {path}")
        return self.fail(path, f"expected {_type_name(tp)}, got {_describe(value)}")

    def union(self, value, tp, path):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            return self.fail(path, f"expected {_type_name(tp)}, got null")
        tagged = [a for a in args if dataclasses.is_dataclass(a) and _type_tag(a)]
        if tagged and isinstance(value, dict):
            choices = [t for a in tagged for t in _type_tag(a)]
            kind = value.get("type")
            for cls in tagged:
                if kind in _type_tag(cls):
                    return self.dataclass(value, cls, path)
            return self.fail(f"{path}.type", f"expected one of {', '.join(json.dumps(c) for c in choices)}, "
                                             f"got {_describe(kind) if 'type' in value else 'nothing'}")
        for arg in args:  # first plain type that accepts the value without complaint
            if arg is type(None) or dataclasses.is_dataclass(arg):
                continue
            trial = _Validator()
            result = trial.convert(value, arg, path)
            if not trial.problems:
                return result
        return self.fail(path, f"expected {_type_name(tp)}, got {_describe(value)}")

    def dataclass(self, value, cls, path):
        if not isinstance(value, dict):
            return self.fail(path, f"expected an object, got {_describe(value)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, item in value.items():
            shown = key if key.isprintable() and key.strip() == key and key else json.dumps(key)
            where = f"{path}.{shown}" if path else shown
            if key in IGNORED_KEYS:
                self.notices.append(f"{where}: {IGNORED_KEYS[key]}")
                continue
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                section = path.split(".")[0].split("[")[0] or "top level"
                self.fail(where, f"unknown key{hint} (the valid keys are in README.md, `{section}` table)")
                continue
            kwargs[key] = self.convert(item, hints[key], where)
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if name not in value:
                    self.fail(f"{path}.{name}" if path else name, f"missing (expected {_type_name(hints[name])})")
        if self.problems:
            return None
        obj = cls(**kwargs)
        for key, problem in range_problems(obj):
            self.fail(f"{path}.{key}" if path else key, problem)
        return None if self.problems else obj


def _cross_checks(p: Preset) -> list[str]:
    """Rules that involve more than one key, or the filesystem."""
    p.apply_phase()
    model_problems = p.model.check()  # model/config.py's rules, the memories-need-hatchling one among them
    if p.train.phase != "A" and any(key == "arch" for key, _ in model_problems):  # the phase turned them on
        return [f'train.phase: phase {p.train.phase} (memories) needs model.arch "hatchling"']
    problems = [f"model.{k}: {msg}" for k, msg in model_problems]
    tok = p.tokenizer
    if tok.type == "hf" and not tok.name:
        problems.append('tokenizer.name: required when tokenizer.type is "hf" (e.g. "gpt2")')
    if tok.type == "file":
        if not tok.path:
            problems.append('tokenizer.path: required when tokenizer.type is "file"')
        elif not Path(tok.path).is_file():
            problems.append(f"tokenizer.path: file {tok.path!r} does not exist")
    d = p.data
    if not d.sources:
        problems.append("data.sources: expected at least one source")
    if d.source_weights is not None:
        if len(d.source_weights) != len(d.sources):
            problems.append(f"data.source_weights: expected {len(d.sources)} weights (one per source), "
                            f"got {len(d.source_weights)}")
        elif any(w < 0 for w in d.source_weights) or sum(d.source_weights) <= 0:
            problems.append("data.source_weights: weights must be >= 0 and not all zero")
    if d.mix_strategy == "weighted" and d.source_weights is None:
        problems.append('data.source_weights: required when data.mix_strategy is "weighted"')
    for i, s in enumerate(d.sources):
        fmt = s.format if isinstance(s, HFSourceSpec) else None
        if fmt is not None:
            fields = getattr(s, "fields", None) or []
            problem = check_format(fmt, fields)
            if problem:
                problems.append(f"data.sources[{i}].format: {problem}")
    for i, s in enumerate(d.sources):
        if isinstance(s, PdfSourceSpec) and s.min_chunk_chars > s.max_chunk_chars:
            problems.append(f"data.sources[{i}].min_chunk_chars: must be at most max_chunk_chars ({s.max_chunk_chars})")
    a = p.auxiliary
    problems += [f"auxiliary.{k}: {m}" for k, m in a.check_heads(p.model.n_layers)]
    if not 0 < a.adaptive_min_weight <= a.adaptive_max_weight:
        problems.append("auxiliary.adaptive_min_weight: must be > 0 and <= adaptive_max_weight")
    return problems


def preset_from_dict(raw: Any, origin: str) -> tuple[Preset, list[str]]:
    """(Preset, notices) from an already-parsed JSON object; raises PresetError."""
    v = _Validator()
    if not isinstance(raw, dict):
        raise PresetError(origin, [f"(top level): expected a JSON object, got {_describe(raw)}"])
    raw, v.notices, alias_problems = resolve_aliases(raw)
    v.problems += alias_problems
    preset = v.dataclass(raw, Preset, "")
    if v.problems:
        raise PresetError(origin, v.problems)
    problems = _cross_checks(preset)
    if problems:
        raise PresetError(origin, problems)
    return preset, v.notices


def load_preset(path: str | Path) -> tuple[Preset, list[str]]:
    """(Preset, notices) from a JSON file; raises PresetError naming file, key, expectation."""
    path = Path(path)
    origin = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_PRESET_BYTES:  # it would be read, validated and copied into every checkpoint
            raise PresetError(origin, [f"the file is {size / 2**20:.1f} MB; a preset is at most "
                                       f"{MAX_PRESET_BYTES // 2**20} MB (a long description or an inline list of "
                                       "documents does not belong in it)"])
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PresetError(origin, [f"cannot read the file: {e}"]) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PresetError(origin, [f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]) from None
    return preset_from_dict(raw, origin)
