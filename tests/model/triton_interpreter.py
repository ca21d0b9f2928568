"""Triton's interpreter for the tests/model/test_triton_*.py files. `TRITON_INTERPRET=1` must be
set before triton itself is imported (triton.jit reads it when it decorates, tl.sum and the
other jit functions of triton.language included): tests/model/conftest.py sets it, and this
module fails loudly where triton came first. Also the two bridges fla's kernels need under the
interpreter (a test fixture's business, never the product's):

- `@triton.autotune` benchmarks every config through a GPU driver: `first_config_only`
  makes an Autotuner run its first config, unbenchmarked;
- the interpreter runs a kernel's `for i in range(n)` as Python, so `i` is a Python int
  and fla's `i_t.to(tl.int64)` fails: `loop_ints_with_to` gives fla's modules a `range`
  whose ints have a `.to()` that returns them unchanged (Python ints do not overflow).
"""
from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
    import triton.language as tl
    from triton.runtime import autotuner
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - the tests skip
    triton = None
else:
    if not isinstance(tl.standard.sum, InterpretedFunction):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (tests/model/conftest.py sets it "
                           "first); run with TRITON_INTERPRET=1 in the environment")


class LoopInt(int):
    def to(self, *args, **kwargs):
        return self


def _range(*args):
    return (LoopInt(i) for i in range(*args))


def first_config_only(monkeypatch) -> None:
    run = autotuner.Autotuner.run

    def first(self, *args, **kwargs):
        self.configs = self.configs[:1]
        return run(self, *args, **kwargs)

    monkeypatch.setattr(autotuner.Autotuner, "run", first)


def loop_ints_with_to(monkeypatch, prefix: str = "fla.") -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and module is not None:
            monkeypatch.setattr(module, "range", _range, raising=False)
