"""Fixtures shared by the model tests.

TRITON_INTERPRET=1 is set here, before anything imports triton (torch._dynamo does, and
model/ops uses it): triton.jit reads it when it decorates, triton.language's own jit
functions (tl.sum, ...) included, so it must precede triton's import for the
test_triton_*.py files to run the kernels under the interpreter. It changes nothing else
on CPU (no other test launches a Triton kernel; inductor's CPU backend is C++)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from model import ops  # noqa: E402
from model.ops import cpu, dispatch  # noqa: E402
from model.ops.reference.kda import kda_chunk  # noqa: E402


@pytest.fixture(params=["compiled", "pytorch"])
def kda_path(request):
    """kda_chunk's contract run two ways: the op `kda` with the compiled CPU loop forced
    (model/ops/cpu/kda.py), and the PyTorch chunked form (the reference). Returns a
    function with kda_chunk's signature."""
    if request.param == "pytorch":
        return kda_chunk
    if not cpu.available():
        pytest.skip("no C compiler here: kda_chunk runs its PyTorch form")

    def compiled(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None, chunk_size=64):
        with dispatch.forcing("kda", "cpu"):
            return ops.kda(q, k, v, log_alpha, beta, initial_state, scale, reset, chunk_size)

    return compiled
