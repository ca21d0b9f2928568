"""The fast paths of the Spike-KDA layer, in one room (as flash-linear-attention's `ops`
beside its `layers`): the rest of model/ is the network.

    reference/   the PyTorch references, the specification (import nothing fast):
                 kda.py (KDA: recurrent, chunked, one step), lif.py (LIF scan), layer.py
                 (the layer's ops), forms.py (each custom op's kernel form in PyTorch)
    cpu/         the compiled C loops for CPU tensors (csrc/, built with the system compiler)
    triton/      the Triton kernels for CUDA tensors (LIF scan, gated RMSNorm, short conv)
    fla.py       the glue to flash-linear-attention's chunk_kda (training KDA on CUDA)
    library.py   the `spike_ops` torch.library custom ops (fakes, autograd, boundary checks)
    check.py     the first-call check's problems
    dispatch.py  the one place that picks an implementation per op, under `model.kernels`

Public: the ops (`lif_modulate`, `kda`, `kda_step`, `gated_rmsnorm`, `short_conv`,
`split_heads`, each taking `mode` = the preset's `model.kernels`), `report()` (what ran,
per op) and `report_lines()`.
"""
from .cpu.build import source_hash
from .dispatch import (
                       MODES,
                       gated_rmsnorm,
                       kda,
                       kda_step_op as kda_step,
                       lif_modulate,
                       report,
                       report_lines,
                       short_conv,
                       split_heads,
)

__all__ = ["MODES", "gated_rmsnorm", "kda", "kda_step", "lif_modulate", "report", "report_lines", "short_conv",
           "split_heads", "source_hash"]
