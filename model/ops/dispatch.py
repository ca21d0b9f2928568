"""The dispatcher: the one place that picks, per op, the reference, the compiled C loop, a
Triton kernel or flash-linear-attention's chunk_kda, under the preset's `model.kernels`.

Ops (the Spike-KDA layer's fast paths): `lif_modulate`, `kda` (training sequence),
`kda_step` (one token: PyTorch, O(1) per token), `gated_rmsnorm`, `short_conv`,
`split_heads`. Each public function here has its reference's contract
(model/ops/reference/).

- `mode="reference"` (`model.kernels = "reference"`): the PyTorch references, nothing else.
- `mode="auto"`: the custom ops of library.py, whose kernel asks `kernel()` for the
  implementation: on CPU the compiled C loop (model/ops/cpu), on CUDA the Triton kernel
  (model/ops/triton), where it serves the dtype and head size; else the PyTorch kernel form
  (model/ops/reference/forms.py). Training KDA on CUDA is fla's `chunk_kda` (fla.py).

The first-call check: the first time a process would use a fast implementation for an
(op, device, dtype, head size), it runs it forward and backward on a small problem of that
head size and dtype against the reference (check.py), in a worker thread (autograd is off
inside a custom op's kernel); on an exception or a mismatch beyond the dtype's tolerance
it turns that implementation off for the run, says so in one line naming it and why, and
the op runs the next one. One line per op says what runs; `report()` returns it for the
run's metrics. The choice happens when the op's kernel runs, not when it is traced, so
`torch.compile` traces through the ops without a graph break (except fla's, on CUDA).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from . import check, fla as fla_glue, library
from .boundary import outside_compile
from .reference import forms
from .reference.kda import kda_chunk, kda_recurrent, kda_step, prepare_inputs
from .reference.layer import (
    depthwise_conv_reference,
    gated_rmsnorm_reference,
    lif_modulate_reference,
    split_heads_reference,
)

MODES = ("auto", "reference")
OPS = ("lif_modulate", "kda", "gated_rmsnorm", "short_conv", "split_heads")
# the fast implementations of each op, by device type, in order of preference (then "reference")
FAST = {
    "lif_modulate": {"cpu": ("cpu",), "cuda": ("triton",)},
    "short_conv": {"cpu": ("cpu",), "cuda": ("triton",)},
    "gated_rmsnorm": {"cpu": ("cpu",), "cuda": ("triton",)},
    "split_heads": {"cpu": ("cpu",)},
    "kda": {"cpu": ("cpu",), "cuda": ("fla",)},
}
LABEL = {"cpu": "compiled C loop", "triton": "Triton kernel", "fla": "fla chunk_kda",
         "reference": "PyTorch reference"}

_log = logging.getLogger("model.ops")
_lock = threading.Lock()
_forced: dict[str, str] = {}  # op -> implementation forced (under test), process-wide: autograd may run
# a backward on another thread (CUDA's device threads)
_verdicts: dict[tuple, str] = {}  # (op, device type, dtype, head) -> implementation
_off: dict[tuple, str] = {}  # (op, implementation, device type, dtype, head) -> why it is off
_ran: dict[str, dict[str, None]] = {}  # op -> what ran (ordered set of descriptions)
_said: set = set()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------ implementations


def _why_not(name: str, op: str, device: torch.device, dtype: torch.dtype, head: int) -> Optional[str]:
    """None when implementation `name` can run `op` for these tensors, else why not."""
    if name == "cpu":
        if device.type != "cpu":
            return "not CPU tensors"
        if dtype not in (torch.float32, torch.float64) or (op == "gated_rmsnorm" and dtype != torch.float32):
            return f"no {_dtype_name(dtype)} loop"
        from . import cpu

        if not cpu.available():
            return "no C compiler (see the log)"
        if op == "gated_rmsnorm" and head > cpu.library("gated_norm").gated_norm_max_dim():
            return f"head size {head} above the loop's limit"
        if op == "kda":
            from .cpu import kda as cpu_kda

            if head > cpu_kda.max_dim():
                return f"head size {head} above the loop's limit"
        return None
    if name == "triton":
        if device.type != "cuda":
            return "not CUDA tensors"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"no {_dtype_name(dtype)} kernel"
        from . import triton as triton_ops

        return triton_ops.unavailable()
    if name == "fla":
        if device.type != "cuda":
            return "not CUDA tensors"
        return fla_glue.available()
    return None


def _module(name: str, op: str):
    """The kernel forms of implementation `name` for a custom op."""
    if name == "cpu":
        from .cpu import kda as cpu_kda, loops

        return cpu_kda if op == "kda" else loops
    if name == "triton":
        from .triton import conv, lif, norm

        return {"lif_modulate": lif, "short_conv": conv, "gated_rmsnorm": norm}[op]
    return forms


def _decide(op: str, device: torch.device, dtype: torch.dtype, head: int) -> str:
    """The first fast implementation that serves and passes its first-call check, else "reference"."""
    for name in FAST[op].get(device.type, ()):
        key = (op, name, device.type, dtype, head)
        why = _off.get(key) or _why_not(name, op, device, dtype, head)
        if why is None:
            try:
                _first_call_check(op, name, device, dtype, head)
                return name
            except Exception as e:  # noqa: BLE001 - any failure turns this implementation off, never the run
                why = f"failed its first-call check: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}" \
                    if str(e).strip() else f"failed its first-call check: {type(e).__name__}"
                _off[key] = why
                _log.warning("model.ops: %s: %s turned off for this run (%s, %s, head size %d): %s", op, LABEL[name],
                             device.type, _dtype_name(dtype), head, why)
                continue
        _off.setdefault(key, why)
    return "reference"


@contextlib.contextmanager
def forcing(op: str, name: str):
    """Within this block `op` runs implementation `name` ("cpu", "triton", "fla" or
    "reference": the PyTorch kernel form) unchecked: the first-call check's way of running
    the one under test, and the tests' (Triton's under its interpreter too)."""
    before = _forced.get(op)
    _forced[op] = name
    try:
        yield
    finally:
        if before is None:
            _forced.pop(op, None)
        else:
            _forced[op] = before


def _first_call_check(op: str, name: str, device, dtype, head: int) -> None:
    """check.PROBLEMS[op] with `name` forced, in a worker thread (fresh autograd state)."""
    def work():
        with forcing(op, name):
            check.PROBLEMS[op](_PUBLIC[op], device, dtype, head)

    with ThreadPoolExecutor(1, thread_name_prefix="model.ops.check") as pool:
        pool.submit(work).result()


def _record(op: str, name: str, device_type: str, dtype: torch.dtype, why: Optional[str] = None) -> None:
    desc = f"{LABEL[name]} ({device_type}, {_dtype_name(dtype)})"
    if name == "reference" and why:
        desc = f"{LABEL[name]} ({device_type}, {_dtype_name(dtype)}; {why})"
    seen = _ran.setdefault(op, {})
    if desc not in seen:
        seen[desc] = None
        if (op, desc) not in _said:
            _said.add((op, desc))
            _log.info("model.ops: %s runs the %s", op, desc)  # the trainer prints report_lines() once


def _why_reference(op: str, device_type: str, dtype, head: int) -> Optional[str]:
    reasons = [f"{LABEL[n]}: {_off[(op, n, device_type, dtype, head)]}" for n in FAST[op].get(device_type, ())
               if (op, n, device_type, dtype, head) in _off]
    return "; ".join(reasons) or None


def kernel(op: str, device: torch.device, dtype: torch.dtype, head: int):
    """The kernel forms a custom op of library.py runs for these tensors (called at run time)."""
    forced = _forced.get(op)
    if forced is not None:
        return _module(forced, op)
    key = (op, device.type, dtype, head)
    name = _verdicts.get(key)
    if name is None:  # no lock held while checking (two threads may both check: harmless)
        name = _verdicts[key] = _decide(op, device, dtype, head)
    _record(op, name, device.type, dtype, _why_reference(op, device.type, dtype, head) if name == "reference" else None)
    return _module(name, op)


library.provider = kernel


@outside_compile
def _kda_training(q: torch.Tensor, dtype: torch.dtype) -> str:
    """"fla" or "reference" for KDA training on these CUDA tensors, `dtype` the one chunk_kda
    computes in (v's): decided once per key, after the first-call check."""
    forced = _forced.get("kda")
    if forced is not None:
        return forced
    key = ("kda", q.device.type, dtype, q.shape[-1])
    name = _verdicts.get(key)
    if name is None:
        name = _verdicts[key] = _decide("kda", q.device, dtype, q.shape[-1])
    _record("kda", name, q.device.type, dtype, _why_reference("kda", q.device.type, dtype, q.shape[-1]))
    return name


def _reference(mode: str, op: str, x: torch.Tensor) -> bool:
    if mode == "reference":
        if op not in _ran or not _ran[op]:
            _record(op, "reference", x.device.type, x.dtype, 'model.kernels = "reference"')
        return True
    if mode not in MODES:
        raise ValueError(f"model.kernels must be one of {MODES}, got {mode!r}")
    return False


# ------------------------------------------------------------------ the public ops


def lif_modulate(drive, a, beta_logit, decay, threshold, membrane=None, reset=None, slope: float = 5.0,
                 mode: str = "auto"):
    """drive, a [B, T, H, N]; beta_logit [B, T, H]; membrane [B, H, N] or None; reset [B, T] bool
    or None. Returns (spikes, final membrane, log_alpha = -a * spikes, beta = sigmoid(beta_logit)
    * mean(spikes)), as reference/layer.py's lif_modulate_reference. a = None: no alpha
    modulation wanted (log_alpha comes back None, and no fast form computes it)."""
    if _reference(mode, "lif_modulate", drive) or drive.dim() != 4 or drive.shape[1] == 0:
        spikes, m, log_alpha, beta = lif_modulate_reference(drive, torch.zeros_like(drive) if a is None else a,
                                                            beta_logit, decay, threshold, membrane, reset, slope)
        return spikes, m, None if a is None else log_alpha, beta
    B, T, H, D = drive.shape
    m = drive.new_zeros(B, H, D) if membrane is None else membrane.to(drive.dtype)
    keep = None if reset is None else (~reset.bool()).to(drive.dtype)
    spikes, m, log_alpha, beta, _ = library.lif_fwd(drive, None if a is None else a.to(drive.dtype),
                                                    beta_logit.to(drive.dtype), m, keep, float(decay),
                                                    float(threshold), float(slope))
    return spikes, m, None if a is None else log_alpha, beta


def kda(q, k, v, log_alpha, beta, initial_state=None, scale=None, reset=None, chunk_size: int = 64,
        impl: str = "chunk", mode: str = "auto"):
    """KDA over a sequence, as reference/kda.py's kda_chunk (impl "chunk") or kda_recurrent
    (impl "recurrent", always the reference): q, k, log_alpha [B, H, T, dk]; v [B, H, T, dv];
    beta [B, H, T]; initial_state [B, H, dk, dv] or None; reset [B, T] / [B, H, T] bool or None.
    Returns (o [B, H, T, dv] in v's dtype, final state float32)."""
    if impl == "recurrent":
        if mode not in MODES:
            raise ValueError(f"model.kernels must be one of {MODES}, got {mode!r}")
        return kda_recurrent(q, k, v, log_alpha, beta, initial_state, scale, reset)
    if _reference(mode, "kda", q) or q.shape[2] == 0:
        return kda_chunk(q, k, v, log_alpha, beta, initial_state, scale, reset, chunk_size)
    if q.is_cuda:
        if fla_glue.unsupported(q, reset) is None and _kda_training(q, v.dtype) == "fla":
            return fla_glue.kda_varlen(q, k, v, log_alpha, beta, initial_state, scale, reset)
        return kda_chunk(q, k, v, log_alpha, beta, initial_state, scale, reset, chunk_size)
    with torch.autocast(device_type=q.device.type, enabled=False):
        o, S, _, _ = library.kda_fwd(*prepare_inputs(q, k, v, log_alpha, beta, initial_state, scale, reset),
                                     chunk_size)
    return o.to(v.dtype), S


def kda_step_op(q, k, v, log_alpha, beta, state=None, scale=None, reset=None, mode: str = "auto"):
    """One KDA token (generation), reference/kda.py's kda_step: plain PyTorch, O(1) per token."""
    return kda_step(q, k, v, log_alpha, beta, state, scale, reset)


def gated_rmsnorm(o, gate, weight, eps: float, mode: str = "auto"):
    """RMSNorm(o) * weight * silu(gate) over the last dim, float32 out; o, gate [B, T, H, D]
    (o may be a strided view) for the fast forms, any shape for the reference."""
    if _reference(mode, "gated_rmsnorm", o) or o.dim() != 4:
        return gated_rmsnorm_reference(o, gate, weight, eps)
    return library.norm_fwd(o, gate, weight, float(eps))[0]


def short_conv(xx, weight, mode: str = "auto"):
    """y [B, T, D] = sum_j weight[:, j] * xx[:, t + j]: ShortConv's causal depthwise convolution
    of xx [B, T+K-1, D] (its carried tail prepended), weight [D, K], in xx's dtype."""
    if _reference(mode, "short_conv", xx):
        return depthwise_conv_reference(xx, weight)
    return library.conv_fwd(xx, weight)


def split_heads(qkv, heads: int, mode: str = "auto"):
    """qkv [B, T, 3 H D] -> q, k, v [B, H, T, D], q and k L2-normalised over D (float32).
    Where no fast form exists for the device (CUDA: a view, a norm and a transpose, which
    torch.compile fuses itself), the reference, outside any custom op."""
    if _reference(mode, "split_heads", qkv):
        return split_heads_reference(qkv, heads)
    if not FAST["split_heads"].get(qkv.device.type):
        if not _ran.get("split_heads"):
            _record("split_heads", "reference", qkv.device.type, qkv.dtype)
        return split_heads_reference(qkv, heads)
    q, k, v, _ = library.split_fwd(qkv, heads)
    return q, k, v


_PUBLIC = {"lif_modulate": lif_modulate, "kda": kda, "gated_rmsnorm": gated_rmsnorm, "short_conv": short_conv,
           "split_heads": split_heads}


def report() -> dict[str, str]:
    """What ran per op in this process so far: {op: "compiled C loop (cpu, float32)", ...}
    (several entries joined by "; " where an op ran on several devices or dtypes)."""
    return {op: "; ".join(_ran[op]) for op in OPS if _ran.get(op)}


def report_lines() -> list[str]:
    """report() as one line per op, for the run's log."""
    return [f"[kernels] {op}: {what}" for op, what in report().items()]
