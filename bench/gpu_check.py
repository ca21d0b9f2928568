"""The device check: one command, on a fresh CUDA machine after `pip install -r requirements.txt`,
that proves (or disproves) the GPU path in under 8 minutes. Prints JSON lines, each with a "check":

  device      the GPU, torch, CUDA, and which toolchains exist (nvcc, NVRTC, fla, compute-sanitizer)
  build       each build rung tried (NVRTC always; nvcc where it exists): ok, seconds, its one line
  op_build    which build each fused op runs on under the default ladder (kda training: fla or ours)
  tests       the kernel test suite (tests/model/test_kernels*.py) on each build: every fused op
              against its float64 reference, several shapes incl. ragged ones, forward and all
              gradients, float32 and bf16 tolerances; one line per failure and a summary per build
  timing      kernel times vs the references and vs fla's chunk_kda at T = 1k, 2k, 4k, 8k (bench/kernels.py)
  train       tier A (configs/00_best_general.json's model) training step with the fused kernels
              off (reference) and on (ours; ours + chunk_kda), and our transformer at equal size:
              tokens/s, MFU against the device's bf16 peak, peak memory
  sanitizer   compute-sanitizer memcheck over small cases of every op (where the tool exists)
  summary     the issue's targets, met or not

    python bench/gpu_check.py                       # everything, ~5-7 min on an H100/H200
    python bench/gpu_check.py --only build,tests    # a subset
    python bench/gpu_check.py --deadline 300        # sections that would start after 300 s are skipped

On a machine with no CUDA device it prints one "no CUDA device" line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SECTIONS = ("build", "tests", "sanitizer", "timing", "train")
T0 = time.time()
RESULTS: dict = {}


def emit(check: str, **rec) -> None:
    print(json.dumps({"check": check, **rec}, default=str), flush=True)


def first_line(e: BaseException) -> str:
    return next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:400]


def find_sanitizer():
    cands = [shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "compute-sanitizer"))
    return next((c for c in cands if c and os.path.exists(c)), None)


def fla_version():
    try:
        import fla

        return getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        return f"not importable: {first_line(e)}"


# ------------------------------------------------------------------------------ device, builds


def check_device():
    from model.kernels import build, chunked, nvrtc

    props = torch.cuda.get_device_properties(0)
    try:
        rtc = nvrtc.version(nvrtc.library())
    except Exception as e:  # noqa: BLE001
        rtc = f"unavailable: {first_line(e)}"
    emit("device", ok=True, name=props.name, capability=f"sm_{props.major}{props.minor}",
         memory_gb=round(props.total_memory / 2 ** 30, 1), count=torch.cuda.device_count(), torch=torch.__version__,
         cuda=torch.version.cuda, nvcc=build.missing_nvcc() or "present", nvrtc=rtc, fla=fla_version(),
         fla_usable=chunked.available() or "yes", compute_sanitizer=find_sanitizer())


def check_builds():
    """Every rung that can be built here, then the default ladder's choice and each op's build."""
    from model.kernels import build, chunked, nvrtc

    rungs = ["nvrtc"] + ([] if build.missing_nvcc() else ["nvcc"])
    ok = {}
    for rung in rungs:
        t = time.time()
        try:
            be = nvrtc.NvrtcBackend() if rung == "nvrtc" else build._build_nvcc()
            if rung == "nvrtc":
                be.load(torch.cuda.current_device())
            ok[rung] = be
            emit("build", build=rung, ok=True, seconds=round(time.time() - t, 1), line=build._describe(be))
        except Exception as e:  # noqa: BLE001
            emit("build", build=rung, ok=False, seconds=round(time.time() - t, 1), error=first_line(e))
    build._reset_for_tests()
    t = time.time()
    be = build.backend()
    emit("build", build="ladder (default)", ok=be is not None, seconds=round(time.time() - t, 1),
         chose=build.build_in_use(), line=build.line(), reason=build.reason())
    ours = build.build_in_use() or f"reference ({build.reason()})"
    fla = chunked.available()
    for op, used in (("lif_modulate", ours), ("gated_rmsnorm", ours), ("kda_step (generation)", ours),
                     ("kda (training, impl=chunk)", "fla chunk_kda" if fla is None else f"{ours} (fla: {fla})"),
                     ("kda (impl=recurrent)", ours)):
        emit("op_build", op=op, build=used)
    RESULTS["builds"] = list(ok)
    return ok


# ------------------------------------------------------------------------------ tests, sanitizer


def check_tests(builds, timeout, deadline):
    for rung in sorted(builds, key=lambda b: b != "nvrtc"):  # the user's path (no toolkit) first
        if time.time() - T0 > deadline:
            emit("tests", build=rung, skipped="past the deadline")
            continue
        xml = Path(f"/tmp/gpu_check_{rung}_{os.getpid()}.xml")
        env = dict(os.environ, SPIKE_KERNELS_BUILD=rung, PYTHONPATH=str(ROOT))
        t = time.time()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               "tests/model/test_kernels.py", "tests/model/test_kernels_gpu_path.py"]
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc = res.returncode
        except subprocess.TimeoutExpired:
            emit("tests", build=rung, ok=False, error=f"timed out after {timeout} s")
            continue
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        try:
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is not None:
                    counts["failed"] += 1
                    emit("tests", build=rung, test=name, ok=False, error=(bad.get("message") or "")[:600])
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                    if "cuda" in case.get("name", "") or "fla" in case.get("name", ""):
                        emit("tests", build=rung, test=name, skipped=(case.find("skipped").get("message") or "")[:200])
                else:
                    counts["passed"] += 1
        except (OSError, ET.ParseError) as e:
            emit("tests", build=rung, ok=False, error=f"no junit report ({e}); pytest said: {res.stdout[-800:]}")
            continue
        RESULTS.setdefault("tests", {})[rung] = counts
        emit("tests", build=rung, ok=rc == 0 and counts["failed"] == 0, rc=rc, seconds=round(time.time() - t, 1),
             **counts)


def sanitize_cases() -> None:
    """Small cases of every op, forward and backward, float32 and bf16 (run under compute-sanitizer)."""
    import torch.nn.functional as F

    from model import kernels

    dev = "cuda"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for B, H, T, dk, dv in ((1, 2, 37, 64, 24), (2, 1, 5, 100, 8), (1, 1, 17, 256, 40)):
            q = F.normalize(torch.randn(B, H, T, dk, device=dev), dim=-1).to(dtype).requires_grad_()
            k = F.normalize(torch.randn(B, H, T, dk, device=dev), dim=-1).to(dtype).requires_grad_()
            v = torch.randn(B, H, T, dv, device=dev, dtype=dtype, requires_grad=True)
            g = (-torch.rand(B, H, T, dk, device=dev) * 0.2).to(dtype).requires_grad_()
            beta = torch.rand(B, H, T, device=dev, dtype=dtype, requires_grad=True)
            s0 = torch.randn(B, H, dk, dv, device=dev, requires_grad=True)
            reset = torch.rand(B, T, device=dev) < 0.1
            o, s = kernels.kda(q, k, v, g, beta, s0, reset=reset, mode="fused")
            (o.float().sum() + s.sum()).backward()
            kernels.kda_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], s0.detach(), mode="fused")
        drive = torch.randn(2, 19, 3, 40, device=dev, dtype=dtype, requires_grad=True)
        a = torch.rand(2, 19, 3, 40, device=dev, dtype=dtype, requires_grad=True)
        bl = torch.randn(2, 19, 3, device=dev, dtype=dtype, requires_grad=True)
        m = torch.rand(2, 3, 40, device=dev, requires_grad=True)
        sp, mo, la, b = kernels.lif_modulate(drive, a, bl, 0.9, 1.0, m, torch.rand(2, 19, device=dev) < 0.2, mode="fused")
        (sp.float().sum() + mo.sum() + la.float().sum() + b.sum()).backward()
        o = torch.randn(3, 7, 5, 48, device=dev, dtype=dtype, requires_grad=True)
        gate = torch.randn(3, 7, 5, 48, device=dev, dtype=dtype, requires_grad=True)
        w = torch.rand(48, device=dev, requires_grad=True)
        kernels.gated_rmsnorm(o, gate, w, 1e-6, mode="fused").sum().backward()
    torch.cuda.synchronize()
    print(json.dumps({"sanitize_cases": "done"}), flush=True)


def check_sanitizer(builds, timeout):
    tool = find_sanitizer()
    if tool is None:
        emit("sanitizer", skipped="compute-sanitizer not found (it comes with the CUDA toolkit, not with pip's torch)")
        return
    for rung in builds:
        env = dict(os.environ, SPIKE_KERNELS_BUILD=rung, PYTHONPATH=str(ROOT))
        cmd = [tool, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20",
               sys.executable, str(Path(__file__).resolve()), "--sanitize-cases"]
        t = time.time()
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            emit("sanitizer", build=rung, ok=False, error=f"timed out after {timeout} s")
            continue
        out = res.stdout + res.stderr
        summary = next((ln.strip() for ln in out.splitlines() if "ERROR SUMMARY" in ln), None)
        ok = res.returncode == 0 and '"sanitize_cases": "done"' in out
        RESULTS.setdefault("sanitizer", {})[rung] = ok
        emit("sanitizer", build=rung, ok=ok, rc=res.returncode, summary=summary, seconds=round(time.time() - t, 1),
             **({} if ok else {"tail": out[-1500:]}))


# ------------------------------------------------------------------------------ timing


def check_timing(seqs, reps):
    import bench.kernels as bk
    from model.kernels import build

    bk.emit = lambda **rec: (emit("timing", **rec), RESULTS.setdefault("timing", []).append(rec))
    if build.backend() is None:
        emit("timing", skipped=f"no fused build: {build.reason()}")
        return
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
    bk.bench_kda_step(16, 8, 64, reps)


# ------------------------------------------------------------------------------ training step


def check_train(steps, warmup):
    import bench.train_throughput as tt

    preset = json.loads((ROOT / "configs" / "00_best_general.json").read_text())
    m = dict(preset["model"])
    d, layers, heads = m.pop("d_model"), m.pop("n_layers"), m.pop("n_heads")
    m.pop("arch", None)
    seq, batch = preset["train"]["seq_length"], preset["train"]["batch_size"]
    vocab = 50257  # the preset's GPT-2 tokenizer
    dims = (d, layers, heads, seq, batch, vocab)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = tt.peak_flops(name)
    variants = [  # (label, runner name, extra model config, env)
        ("hatchling reference", "hatchling", {"kernels": "reference"}, {"SPIKE_KERNELS_FLA": "0"}),
        ("hatchling fused (ours)", "hatchling", {"kernels": "auto"}, {"SPIKE_KERNELS_FLA": "0"}),
        ("hatchling fused + chunk_kda", "hatchling", {"kernels": "auto"}, {"SPIKE_KERNELS_FLA": "1"}),
        ("transformer", "transformer", {}, {}),
    ]
    rows = {}
    for label, rname, extra, env in variants:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ex = {**m, **extra} if rname == "hatchling" else {k: v for k, v in m.items() if k not in ("global_every",
                                                                                                   "wm_window", "chunk_size")}
            r = tt.Runner(rname, dims, dev, ex, False)
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
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            torch.cuda.empty_cache()
    RESULTS["train"] = rows


def summary():
    tr = RESULTS.get("train", {})
    ref = tr.get("hatchling reference", {}).get("tokens_per_s")
    best = max((tr[k] for k in ("hatchling fused (ours)", "hatchling fused + chunk_kda") if k in tr),
               key=lambda r: r["tokens_per_s"], default=None)
    trf = tr.get("transformer", {}).get("tokens_per_s")
    out = {}
    if best and ref:
        out["fused_speedup_vs_reference"] = round(best["tokens_per_s"] / ref, 2)
        out["target_2x_met"] = out["fused_speedup_vs_reference"] >= 2
    if best and trf:
        out["ratio_vs_transformer"] = round(best["tokens_per_s"] / trf, 3)
        out["target_0.8x_transformer_met"] = out["ratio_vs_transformer"] >= 0.8
    if best and best.get("mfu") is not None:
        out["mfu"] = best["mfu"]
        out["target_mfu_30pct_met"] = best["mfu"] >= 0.3
    kda = [r for r in RESULTS.get("timing", []) if r.get("op") == "kda" and r.get("pass") == "fwd+bwd" and "ms" in r]
    vs = {}
    for r in kda:
        if r["impl"] == "fused":
            f = next((x for x in kda if x["impl"] == "fla" and x["T"] == r["T"] and x["dtype"] == r["dtype"]), None)
            if f:
                vs[f"T{r['T']}_{r['dtype']}"] = round(f["ms"] / r["ms"], 3)
    if vs:
        out["kda_fused_speed_vs_chunk_kda"] = vs  # > 1: ours faster
    out["tests"] = RESULTS.get("tests")
    out["sanitizer"] = RESULTS.get("sanitizer")
    emit("summary", seconds=round(time.time() - T0, 1), **out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--deadline", type=float, default=450.0, help="seconds after which no new section starts")
    ap.add_argument("--seq", default="1024,2048,4096,8192", help="T values for the timing section")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--sanitize-cases", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if not torch.cuda.is_available():
        emit("device", ok=False, reason="no CUDA device", torch=torch.__version__, cuda=torch.version.cuda,
             note="nothing to check here; run this on a machine with an NVIDIA GPU")
        return 0
    if args.sanitize_cases:
        sanitize_cases()
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {SECTIONS}")
    check_device()
    builds = {}
    plan = [("build", lambda: builds.update(check_builds())),
            ("tests", lambda: check_tests(builds or ["nvrtc"], 240, args.deadline / 2)),
            ("timing", lambda: check_timing([int(x) for x in args.seq.split(",")], args.reps)),
            ("train", lambda: check_train(args.train_steps, 2)),
            ("sanitizer", lambda: check_sanitizer(builds or ["nvrtc"], timeout=120))]
    for name, fn in plan:
        if name != "build" and name not in only:  # the builds always run: the other sections use them
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
