"""Fixtures shared by the model tests."""
import pytest
import torch

from model import kda_cpu


@pytest.fixture(params=["compiled", "pytorch"])
def kda_path(request, monkeypatch):
    """Run the test with kda_chunk's usual case on the compiled CPU loops (model/kda_cpu.py)
    and again on the PyTorch form (_KDAChunkFn)."""
    if request.param == "compiled" and not kda_cpu.takes(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)):
        pytest.skip("no C compiler here: kda_chunk runs its PyTorch form")
    if request.param == "pytorch":
        monkeypatch.setattr(kda_cpu, "takes", lambda *t: False)
    return request.param
