"""The device check: one command, on a fresh CUDA machine after `pip install -r requirements.txt`,
that proves (or disproves) the GPU path in under 8 minutes. Prints JSON lines, each with a "check":

  device      the GPU, torch, CUDA, Triton and fla versions
  dispatch    a hatchling training step (the tier A model, model.kernels = "auto") and what the
              dispatcher chose per op (model.ops.report()), with the first-call check's
              verdicts: each implementation it turned off, and why
  kernels     each Triton kernel of ours and fla's chunk_kda (through our glue) against the
              reference, forward and backward, float32 and bf16 (the LIF: float32, as the layer
              runs it), at head sizes 64, 128 and a ragged 40 (model/ops/check.py's problems,
              the implementation forced)
  timing      kernel times vs the references and fla's chunk_kda vs our PyTorch chunked KDA
              at T = 1k, 2k, 4k, 8k (bench/kernels.py)
  train       the tier A model (configs/00_best_general.json's model section, synthetic tokens:
              no data is loaded, so the machine needs no network) training step with the fast
              paths off (reference) and on, on + torch.compile, and our transformer at equal
              size: tokens/s, MFU against the device's bf16 peak, peak memory
  summary     the issue's targets, met or not

    python bench/gpu_check.py                       # everything, ~5-7 min on an H100/H200
    python bench/gpu_check.py --only kernels,train  # a subset
    python bench/gpu_check.py --deadline 300        # sections that would start after 300 s are skipped

On a machine with no CUDA device it prints one "no CUDA device" line, then runs its
CPU-side part: the dispatcher's report of a CPU training step (compiled C loops) and the
first-call check of each CPU implementation, and exits 0. Compile figures for the GPUs
(registers, spills, shared memory) come from bench/kernel_report.py, which needs no GPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SECTIONS = ("dispatch", "kernels", "timing", "train")
T0 = time.time()
RESULTS: dict = {}


def emit(check: str, **rec) -> None:
    print(json.dumps({"check": check, **rec}, default=str), flush=True)


def first_line(e: BaseException) -> str:
    return next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:400]


def version(name: str) -> str:
    try:
        module = __import__(name)
        return getattr(module, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        return f"not importable: {first_line(e)}"


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def tier_a():
    """(model section without arch, d_model, n_layers, n_heads, seq_length, batch) of 00_best_general."""
    preset = json.loads((ROOT / "configs" / "00_best_general.json").read_text())
    m = dict(preset["model"])
    d, layers, heads = m.pop("d_model"), m.pop("n_layers"), m.pop("n_heads")
    m.pop("arch", None)
    return m, d, layers, heads, preset["train"]["seq_length"], preset["train"]["batch_size"]


# ------------------------------------------------------------------------------ dispatch


def check_dispatch(dev: torch.device):
    """One training step of a hatchling (the tier A model on CUDA; a small one on CPU) with
    model.kernels = "auto", then the dispatcher's report and every line it logged."""
    from model import ModelConfig, build_model, ops

    handler = _Lines()
    log = logging.getLogger("model.ops")
    log.addHandler(handler)
    try:
        if dev.type == "cuda":
            m, d, layers, heads, seq, batch = tier_a()
            batch = min(batch, 4)
        else:
            m, d, layers, heads, seq, batch = {}, 128, 2, 2, 128, 2
        cfg = ModelConfig(arch="hatchling", d_model=d, n_layers=layers, n_heads=heads,
                          **{k: v for k, v in m.items() if k in ModelConfig.__dataclass_fields__})
        model = build_model(cfg, 50257 if dev.type == "cuda" else 512).to(dev)
        x = torch.randint(0, 512, (batch, seq), device=dev)
        t = time.time()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(x)
        out.logits.float().logsumexp(-1).mean().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        report = ops.report()
        RESULTS["dispatch"] = report
        emit("dispatch", ok=True, device=dev.type, seconds=round(time.time() - t, 1), report=report,
             turned_off=[ln for ln in handler.lines if "turned off" in ln])
        for line in ops.report_lines():
            print(line, flush=True)
    finally:
        log.removeHandler(handler)


# ------------------------------------------------------------------------------ kernels


def check_kernels(dev: torch.device):
    """Each fast implementation forced through check.py's problem, against the reference."""
    from model.ops import check, dispatch

    impls = {"cuda": [("lif_modulate", "triton"), ("gated_rmsnorm", "triton"), ("short_conv", "triton"),
                      ("kda", "fla")],
             "cpu": [("lif_modulate", "cpu"), ("gated_rmsnorm", "cpu"), ("short_conv", "cpu"),
                     ("split_heads", "cpu"), ("kda", "cpu")]}[dev.type]
    dtypes = (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,)
    counts = {"passed": 0, "failed": 0}
    for op, impl in impls:
        for dtype in dtypes:
            if dtype != torch.float32 and op == "lif_modulate":  # the layer runs its LIF in float32
                continue
            for head in ((4, 3) if op == "short_conv" else (64, 128, 40)):
                t = time.time()
                try:
                    dispatch._first_call_check(op, impl, dev, dtype, head)
                    ok, err = True, None
                except Exception as e:  # noqa: BLE001 - a failure is the finding
                    ok, err = False, f"{type(e).__name__}: {first_line(e)}"
                counts["passed" if ok else "failed"] += 1
                emit("kernels", op=op, impl=impl, dtype=str(dtype).replace("torch.", ""), head=head, ok=ok,
                     seconds=round(time.time() - t, 2), **({"error": err} if err else {}),
                     tolerance=check.TOL[dtype])
    RESULTS["kernels"] = counts
    emit("kernels", summary=True, **counts)


# ------------------------------------------------------------------------------ timing


def check_timing(seqs, reps):
    import bench.kernels as bk

    bk.emit = lambda **rec: (emit("timing", **rec), RESULTS.setdefault("timing", []).append(rec))
    fla = None
    try:
        from fla.ops.kda import chunk_kda as fla
    except Exception as e:  # noqa: BLE001
        emit("timing", op="kda", impl="fla", skipped=first_line(e))
    torch.manual_seed(0)
    for T in seqs:
        for dtype in (torch.bfloat16, torch.float32):
            bk.bench_kda(4, 8, T, 64, dtype, reps, fla)
        bk.bench_lif(4, T, 8, 64, reps)
        bk.bench_rmsnorm(4, T, 8, 64, reps)
        bk.bench_conv(4, T, 3 * 8 * 64, 4, reps)


# ------------------------------------------------------------------------------ training step


def check_train(steps, warmup):
    import bench.train_throughput as tt

    m, d, layers, heads, seq, batch = tier_a()
    vocab = 50257  # the preset's GPT-2 tokenizer
    dims = (d, layers, heads, seq, batch, vocab)
    dev = torch.device("cuda")
    peak = tt.peak_flops(torch.cuda.get_device_name())
    variants = [  # (label, runner name, extra model config, torch.compile)
        ("hatchling reference", "hatchling", {"kernels": "reference"}, False),
        ("hatchling fast paths", "hatchling", {"kernels": "auto"}, False),
        ("hatchling fast paths + compile", "hatchling", {"kernels": "auto"}, True),
        ("transformer", "transformer", {}, False),
    ]
    rows = {}
    for label, rname, extra, compiled in variants:
        try:
            ex = {**m, **extra} if rname == "hatchling" else {k: v for k, v in m.items() if k not in (
                "global_every", "wm_window", "chunk_size", "kernels")}
            r = tt.Runner(rname, dims, dev, ex, compiled)
            r.steps(warmup)
            r.peak_mb = 0.0
            sec = r.steps(steps) / steps
            tps = batch * seq / sec
            flops_per_token = 6 * r.params + 6 * layers * d * seq
            row = dict(model=label, params=r.params, d_model=d, n_layers=layers, seq_length=seq, batch=batch,
                       step_ms=round(sec * 1e3, 1), tokens_per_s=round(tps), peak_mem_mb=round(r.peak_mb),
                       mfu=round(flops_per_token * tps / peak, 4) if peak else None, peak_flops=peak)
            rows[label] = row
            emit("train", ok=True, **row)
            del r
        except Exception as e:  # noqa: BLE001
            emit("train", model=label, ok=False, error=f"{type(e).__name__}: {first_line(e)}")
        finally:
            torch.cuda.empty_cache()
    RESULTS["train"] = rows


def summary():
    tr = RESULTS.get("train", {})
    ref = tr.get("hatchling reference", {}).get("tokens_per_s")
    best = max((tr[k] for k in ("hatchling fast paths", "hatchling fast paths + compile") if k in tr),
               key=lambda r: r["tokens_per_s"], default=None)
    trf = tr.get("transformer", {}).get("tokens_per_s")
    out = {}
    if best and ref:
        out["fast_speedup_vs_reference"] = round(best["tokens_per_s"] / ref, 2)
        out["target_2x_met"] = out["fast_speedup_vs_reference"] >= 2
    if best and trf:
        out["ratio_vs_transformer"] = round(best["tokens_per_s"] / trf, 3)
        out["target_0.8x_transformer_met"] = out["ratio_vs_transformer"] >= 0.8
    if best and best.get("mfu") is not None:
        out["mfu"] = best["mfu"]
        out["target_mfu_30pct_met"] = best["mfu"] >= 0.3
    kda = [r for r in RESULTS.get("timing", []) if r.get("op") == "kda" and r.get("pass") == "fwd+bwd" and "ms" in r]
    vs = {}
    for r in kda:
        if r["impl"] == "fla-glue":
            f = next((x for x in kda if x["impl"] == "reference" and x["T"] == r["T"] and x["dtype"] == r["dtype"]),
                     None)
            if f:
                vs[f"T{r['T']}_{r['dtype']}"] = round(f["ms"] / r["ms"], 3)
    if vs:
        out["kda_chunk_kda_speedup_vs_reference"] = vs
    out["dispatch"] = RESULTS.get("dispatch")
    out["kernels"] = RESULTS.get("kernels")
    emit("summary", seconds=round(time.time() - T0, 1), **out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds after which no new section starts")
    ap.add_argument("--seq", default="1024,2048,4096,8192", help="T values for the timing section")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=4)
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {SECTIONS}")

    if not torch.cuda.is_available():
        emit("device", ok=False, reason="no CUDA device", torch=torch.__version__, cuda=torch.version.cuda,
             triton=version("triton"), note="no GPU here: running the CPU-side parts only (dispatch, kernels on "
                                            "the compiled C loops); run this on a machine with an NVIDIA GPU")
        dev = torch.device("cpu")
        plan = [("dispatch", lambda: check_dispatch(dev)), ("kernels", lambda: check_kernels(dev))]
    else:
        props = torch.cuda.get_device_properties(0)
        emit("device", ok=True, name=props.name, capability=f"sm_{props.major}{props.minor}",
             memory_gb=round(props.total_memory / 2 ** 30, 1), count=torch.cuda.device_count(),
             torch=torch.__version__, cuda=torch.version.cuda, triton=version("triton"), fla=version("fla"))
        dev = torch.device("cuda")
        plan = [("dispatch", lambda: check_dispatch(dev)), ("kernels", lambda: check_kernels(dev)),
                ("timing", lambda: check_timing([int(x) for x in args.seq.split(",")], args.reps)),
                ("train", lambda: check_train(args.train_steps, 2))]
    for name, fn in plan:
        if name not in only:
            continue
        if time.time() - T0 > args.deadline:
            emit(name, skipped=f"past the {args.deadline:.0f} s deadline")
            continue
        t = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            emit(name, ok=False, error=f"{type(e).__name__}: {first_line(e)}")
        emit("section", name=name, seconds=round(time.time() - t, 1))
    summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
