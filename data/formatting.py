"""Safe record formatting for multi-field datasets (`"fields"` + `"format"`).

A preset may join several fields of a record into one training document, e.g.
`"Q: {question}\\nA: {answer}"`. The format string comes from a config file, so it is
treated as data, never as code: it is parsed with `string.Formatter().parse` and only
plain `{name}` placeholders naming one of the declared `fields` are accepted. Attribute
access (`{question.__class__}`), indexing (`{question[0]}`), positional fields (`{}`,
`{0}`), conversions (`{question!r}`) and format specs (`{question:>10}`, `{q:{w}}`) are
rejected. Rendering never calls `str.format`: the parsed literal pieces and the field
values are simply concatenated, so no formatting machinery ever touches a value.
"""
from __future__ import annotations

import string
from typing import Any, Optional, Sequence

# (literal text, field name or None): the compiled form of a format string
Template = list[tuple[str, Optional[str]]]


def check_format(fmt: str, fields: Sequence[str]) -> Optional[str]:
    """None if `fmt` is a safe format over `fields`, else a one-line problem."""
    if not isinstance(fmt, str):
        return f"format must be a string, got {type(fmt).__name__}"
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as e:  # unbalanced braces
        return f"format {fmt!r} is malformed: {e} (write literal braces as {{{{ and }}}})"
    used = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            return f"format {fmt!r}: positional placeholder {{{name}}} is not allowed; name a field"
        if not name.isidentifier():
            return (f"format {fmt!r}: {{{name}}} is not a plain field name "
                    "(attribute access and indexing are not allowed)")
        if conversion is not None:
            return f"format {fmt!r}: conversion !{conversion} in {{{name}}} is not allowed"
        if spec:
            return f"format {fmt!r}: format spec :{spec} in {{{name}}} is not allowed"
        if name not in fields:
            return f"format {fmt!r}: {{{name}}} is not one of fields {list(fields)}"
        used.append(name)
    if not used:
        return f"format {fmt!r} uses none of fields {list(fields)}"
    return None


def compile_format(fmt: str, fields: Sequence[str]) -> Template:
    """The template for `fmt`; raises ValueError with check_format's problem if unsafe."""
    problem = check_format(fmt, fields)
    if problem:
        raise ValueError(problem)
    return [(literal, name) for literal, name, _, _ in string.Formatter().parse(fmt)]


def field_text(value: Any) -> Optional[str]:
    """A record value as text, or None when it counts as missing (absent, None, empty,
    or a structure such as a dict that has no obvious text form)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int, float)) for v in value):
        return "\n".join(str(v).strip() for v in value) or None
    return None


def render(template: Template, record: dict) -> tuple[Optional[str], Optional[str]]:
    """(text, None), or (None, name of the first missing field)."""
    out = []
    for literal, name in template:
        out.append(literal)
        if name is not None:
            value = field_text(record.get(name))
            if value is None:
                return None, name
            out.append(value)
    return "".join(out), None
