"""Compile report of the Triton kernels for the GPUs users have, on a machine without one.

Every Triton kernel of ours (model/ops/triton: LIF scan, gated RMSNorm, short conv, forward
and backward) and flash-linear-attention's KDA forward and backward kernels (what
`chunk_kda` launches), at the head sizes of the shipped presets (configs/*.json, hatchling
ones), compiled with `triton.compile(..., target=GPUTarget("cuda", arch, 32))` for
sm_80, sm_86, sm_89 and sm_90, each with ptxas' report. One JSON line per kernel, launch
configuration and arch:

    {"kernel", "module", "config", "arch", "registers", "spills", "shared", "shared_limit",
     "threads", "fits"}

`fits` is False when the kernel needs more shared memory than the arch allows a block
(opt-in maximum: 163 KB on sm_80, 99 KB on sm_86/sm_89, 227 KB on sm_90) or its block
cannot launch (registers x threads above the 64K register file, or more than 255
registers a thread). The command fails (exit 1) when one of ours does not fit, or when
none of an autotuned fla kernel's configurations does (its autotuner skips those that
cannot launch).

How the launches are found: a child process runs our ops (forced to Triton) and fla's
chunk_kda, forward and backward, on small problems at the presets' head sizes under
Triton's interpreter, recording every kernel launch (arguments' types, constexprs, every
autotune configuration); this process then compiles each for each arch.

    python bench/kernel_report.py                          # everything: ~30 min on 2 CPU cores
    python bench/kernel_report.py --max-configs 2          # fla's first two autotune configs a kernel
    python bench/kernel_report.py --arch 90 --only norm_fwd_kernel --no-fla
"""
from __future__ import annotations

import argparse
import glob
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = (80, 86, 89, 90)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes a block may opt into
REGISTER_FILE = 65536


def preset_head_sizes() -> list[int]:
    heads = set()
    for f in sorted(glob.glob(str(ROOT / "configs" / "*.json"))):
        try:
            m = json.loads(Path(f).read_text()).get("model", {})
        except (OSError, ValueError):
            continue
        if m.get("arch") == "hatchling":
            heads.add(int(m.get("d_model", 256)) // int(m.get("n_heads", 4)))
    return sorted(heads) or [64]


# ------------------------------------------------------------------ capture (child process, interpreter)

_TORCH_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int64": "i64",
                "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _arg_type(v):
    import torch

    if isinstance(v, torch.Tensor):
        return "*" + _TORCH_TYPES[str(v.dtype).replace("torch.", "")]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return None


def _plain(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def capture(heads: list[int], fla: bool, conv_size: int = 4) -> list[dict]:
    """Run the kernels under the interpreter and return their launches, de-duplicated."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import torch.nn.functional as F
    from triton.runtime import autotuner
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    tuned: dict[int, list[dict]] = {}
    run = InterpretedFunction.run
    tune = autotuner.Autotuner.run

    def record(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        values = dict(zip(self.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        rec = {"module": fn.__module__, "kernel": fn.__name__,
               "args": {k: {"type": _arg_type(v), "value": _plain(v)} for k, v in values.items()},
               "options": {k: _plain(v) for k, v in kwargs.items() if k not in self.arg_names},
               "configs": tuned.get(id(self), [])}
        key = json.dumps([rec["module"], rec["kernel"], {k: a["type"] if a["type"] and a["type"][0] == "*" else
                                                          a["value"] for k, a in rec["args"].items()}],
                         sort_keys=True, default=str)
        launches.setdefault(key, rec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def first_config(self, *args, **kwargs):
        inner = self.fn
        while not isinstance(inner, InterpretedFunction):
            inner = inner.fn
        tuned[id(inner)] = [{k: _plain(v) for k, v in c.all_kwargs().items()} for c in self.configs]
        self.configs = self.configs[:1]
        return tune(self, *args, **kwargs)

    InterpretedFunction.run = record
    autotuner.Autotuner.run = first_config

    from model import ops
    from model.ops import dispatch

    g = torch.Generator().manual_seed(0)
    for D in heads:
        H = 2
        drive = (torch.randn(2, 8, H, D, generator=g) * 0.6 + 0.3).requires_grad_()
        a, bl = torch.rand(2, 8, H, D, generator=g).requires_grad_(), torch.randn(2, 8, H, generator=g)
        reset = torch.zeros(2, 8, dtype=torch.bool)
        reset[0, 3] = True
        with dispatch.forcing("lif_modulate", "triton"):
            for aa in (a, None):
                s, m, la, beta = ops.lif_modulate(drive, aa, bl.requires_grad_(), 0.9, 1.0, reset=reset)
                sum(t.sum() for t in (s, m, beta) + (() if la is None else (la,))).backward()
        o = torch.randn(2, H, 8, D, generator=g).transpose(1, 2).requires_grad_()
        gate = torch.randn(2, 8, H, D, generator=g).requires_grad_()
        with dispatch.forcing("gated_rmsnorm", "triton"):
            for dt in (torch.float32, torch.bfloat16):
                ops.gated_rmsnorm(o.to(dt), gate.to(dt), torch.ones(D, requires_grad=True), 1e-6).sum().backward()
        xx = torch.randn(2, 8 + conv_size - 1, 3 * H * D, generator=g, requires_grad=True)
        with dispatch.forcing("short_conv", "triton"):
            for dt in (torch.float32, torch.bfloat16):
                ops.short_conv(xx.to(dt), torch.randn(3 * H * D, conv_size, requires_grad=True)).sum().backward()
        if fla:
            import sys as _sys

            from fla.ops.kda import chunk_kda

            from model.ops import fla as glue

            class LoopInt(int):  # the interpreter leaves loop variables as Python ints (fla calls .to on them)
                def to(self, *a, **k):
                    return self

            def loop_range(*a):
                return (LoopInt(i) for i in range(*a))

            for name, module in list(_sys.modules.items()):
                if name.startswith("fla.") and module is not None:
                    module.range = loop_range
            T = 64
            q, k = (F.normalize(torch.randn(2, H, T, D, generator=g), dim=-1) for _ in range(2))
            v = torch.randn(2, H, T, D, generator=g)
            la = -torch.rand(2, H, T, D, generator=g) * 0.5
            beta = torch.rand(2, H, T, generator=g)
            s0 = torch.randn(2, H, D, D, generator=g) * 0.1
            for dt in (torch.float32, torch.bfloat16):
                ins = [x.to(dt).requires_grad_() if i in (0, 1, 2, 4) else x.requires_grad_()
                       for i, x in enumerate((q, k, v, la, beta, s0))]
                o, s = glue.kda_varlen(*ins[:5], ins[5], None, reset=torch.zeros(2, T, dtype=torch.bool),
                                       kernel=chunk_kda)
                (o.float().sum() + s.sum()).backward()
    return list(launches.values())


# ------------------------------------------------------------------ compile (this process, no interpreter)


def _jit_function(module: str, name: str):
    from triton.runtime.jit import JITFunction

    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    used = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if used is None:
        raise RuntimeError(f"ptxas -v said no register count: {text[-500:]}")
    return int(used.group(1)), (int(spill.group(1)) + int(spill.group(2))) if spill else 0


def compile_launch(rec: dict, arch: int, config: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(rec["module"], rec["kernel"])
    values = {k: a["value"] for k, a in rec["args"].items()}
    values.update({k: v for k, v in config.items() if k in values or k in fn.arg_names})
    signature, constexprs = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = values.get(p.name, None if p.default is inspect.Parameter.empty else p.default)
        else:
            t = rec["args"].get(p.name, {}).get("type")
            if t is None:  # None passed for an optional pointer: a constexpr None
                signature[p.name], constexprs[p.name] = "constexpr", None
            else:
                signature[p.name] = t
    options = {k: v for k, v in {**rec["options"], **config}.items()
               if k in ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")}
    options.setdefault("num_warps", 4)
    t0 = time.time()
    ck = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                        target=GPUTarget("cuda", arch, 32), options=options)
    regs, spills = _ptxas_report(ck.asm["ptx"], arch)
    threads = 32 * ck.metadata.num_warps
    shared = ck.metadata.shared
    reg_alloc = -(-max(regs, 1) * 32 // 256) * 256 * ck.metadata.num_warps  # per-warp granularity of 256
    fits = shared <= SHARED_LIMIT[arch] and regs <= 255 and reg_alloc <= REGISTER_FILE
    tunables = {k: v for k, v in config.items() if k not in ("num_ctas", "ir_override", "maxnreg")}
    return {"kernel": rec["kernel"], "module": rec["module"], "config": tunables or options, "arch": f"sm_{arch}",
            "registers": regs, "spills": spills, "shared": shared, "shared_limit": SHARED_LIMIT[arch],
            "threads": threads, "fits": fits, "seconds": round(time.time() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated, e.g. 80,86,89,90")
    ap.add_argument("--heads", default=None, help="head sizes (default: the shipped presets')")
    ap.add_argument("--only", default=None, help="kernel names to compile (comma-separated)")
    ap.add_argument("--no-fla", action="store_true", help="our kernels only")
    ap.add_argument("--max-configs", type=int, default=0,
                    help="compile at most this many autotune configs a kernel (0: all; all at 4 archs takes ~30 min)")
    ap.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    heads = [int(h) for h in args.heads.split(",")] if args.heads else preset_head_sizes()
    if args.capture:
        print(json.dumps(capture(heads, fla=not args.no_fla)))
        return 0
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, __file__, "--capture", "--heads", ",".join(map(str, heads)),
                            *(["--no-fla"] if args.no_fla else [])], capture_output=True, text=True, env=env,
                           timeout=1800)
    if child.returncode != 0:
        print(json.dumps({"error": "capture failed", "stderr": child.stderr[-3000:]}))
        return 2
    launches = json.loads(child.stdout.strip().splitlines()[-1])
    only = set(args.only.split(",")) if args.only else None
    archs = [int(a) for a in args.arch.split(",")]
    failed = []
    for rec in launches:
        if only and rec["kernel"] not in only:
            continue
        ours = rec["module"].startswith("model.")
        configs = rec["configs"] or [{}]
        if args.max_configs:
            configs = configs[:args.max_configs]
        for arch in archs:
            results = []
            for config in configs:
                try:
                    r = compile_launch(rec, arch, config)
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a finding
                    r = {"kernel": rec["kernel"], "module": rec["module"], "config": config, "arch": f"sm_{arch}",
                         "fits": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                r["heads"] = heads
                print(json.dumps(r), flush=True)
                results.append(r)
            if (ours and not all(r["fits"] for r in results)) or not any(r["fits"] for r in results):
                failed.append(f"{rec['kernel']} sm_{arch}")
    print(json.dumps({"summary": "kernel_report", "launches": len(launches), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
