"""`outside_compile`: torch.compiler.disable, put in place when a compile is asked for
rather than at import.

`torch.compiler.disable` imports torch._dynamo (and with it Triton): about 1.5 s that every
`python main.py` paid before its first line, for a boundary only a torch.compile'd run needs.
A function marked `@outside_compile` runs as itself until `arm()` swaps in its disabled
form, after which a compiled graph breaks there and calls it eagerly. `compile_model` (arm,
then torch.compile) is how the trainer and the benches compile."""
from __future__ import annotations

import functools
from typing import Callable

_marked: list[tuple[list[Callable], Callable]] = []  # (the wrapper's target cell, the function)


def outside_compile(fn: Callable) -> Callable:
    """Mark `fn` as kept out of torch.compile's graphs (a data-dependent choice)."""
    target = [fn]  # a list cell dynamo can read through: the wrapper calls whatever it holds

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return target[0](*args, **kwargs)

    _marked.append((target, fn))
    return call


def arm() -> None:
    """Every marked function from now on runs under torch.compiler.disable (idempotent)."""
    import torch

    for target, fn in _marked:
        if target[0] is fn:
            target[0] = torch.compiler.disable(fn)


def armed() -> bool:
    return bool(_marked) and all(target[0] is not fn for target, fn in _marked)


def compile_model(module, **kwargs):
    """torch.compile(module, **kwargs) with the boundaries armed first."""
    import torch

    arm()
    return torch.compile(module, **kwargs)
