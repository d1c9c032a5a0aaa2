#!/usr/bin/env python
"""Norm kernel micro-benchmarks (DESIGN.md §5, issue 5). Prints one JSON object on stdout.

On a CUDA GPU: for hidden 1024/2048/4096/8192 x rows 4K/16K/64K, forward and backward time of
rms_norm, layer_norm, add_norm (RMS) and the Peri junction (RMS) for our Triton kernels next to
torch eager (kernels.torch_ops, the torch backend), torch's native op in the input dtype,
torch.compile, Liger-Kernel and apex when importable, and the unfused compositions of the fused
ops. Each time comes with the achieved GB/s (ideal bytes of the op / time: every provider is
charged the same bytes) and its fraction of the device-to-device copy bandwidth measured in the
same run. Timing: triton.testing.do_bench (CUDA events, median, L2 flushed between runs).

Without CUDA it says so, runs a tiny smoke comparison of torch eager vs the Triton interpreter at
one small shape (so this script is exercised on CPU), and exits 0.

    python bench/kernels.py                 # full grid (a few minutes on one GPU)
    python bench/kernels.py --quick         # hidden 2048/8192, rows 16K only
    python bench/kernels.py --hidden 1024 2048 4096 8192 --rows 16384 --no-compile   # bench/gpu_check.sh
    python bench/kernels.py --cpu-dry-run   # no GPU: run the GPU harness on CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first import of the kernel modules (Triton decides at definition time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton

from kernels import resolve_backend, torch_ops

EPS = 1e-5
HIDDEN = (1024, 2048, 4096, 8192)
ROWS = (4096, 16384, 65536)
# Targets from issue 5, checked for our kernels at hidden >= 2048 and rows >= 16K.
TARGETS = {"fwd_frac_copy": 0.85, "bwd_frac_copy": 0.70, "peri_speedup_vs_unfused": 1.6}

# Ideal bytes moved per element of one [rows, hidden] activation, in units of the element size:
# reads + writes of full activations (gains, biases and per-row stats are negligible).
IDEAL_PASSES = {
    "rms_norm": (2, 3),  # fwd: x -> y;        bwd: x, dy -> dx
    "layer_norm": (2, 3),
    "add_norm": (4, 4),  # fwd: x, r -> s, y;  bwd: s, dy, ds -> dx (= dr, one tensor)
    "peri_junction": (4, 6),  # fwd: f, r -> s, y;  bwd: s, f, dy, ds -> dr, df
}


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------- providers
def optional_imports() -> tuple[dict, dict]:
    """Liger-Kernel and apex functional forms if importable; notes saying why not otherwise."""
    found, notes = {}, {}
    try:
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

        found["liger"] = (liger_rms_norm, liger_layer_norm)
    except Exception as e:
        notes["liger"] = f"skipped: liger_kernel not importable ({type(e).__name__}: {e})"
    try:
        ops, _ = resolve_backend("apex", "cuda")
        found["apex"] = ops
    except Exception as e:
        notes["apex"] = f"skipped: {e}"
    return found, notes


def providers_for(op: str, triton_ops, extra: dict) -> dict:
    """name -> fn(t) returning a tuple of outputs; t holds x/r/w/b/w2/b2 tensors."""
    compiled = {}

    def compiled_fn(fn):
        if fn not in compiled:
            compiled[fn] = torch.compile(fn)
        return compiled[fn]

    P = {}
    if op == "rms_norm":
        P["triton"] = lambda t: (triton_ops.rms_norm(t["x"], t["w"], EPS),)
        P["torch_eager"] = lambda t: (torch_ops.rms_norm(t["x"], t["w"], EPS),)
        P["torch_native"] = lambda t: (torch.nn.functional.rms_norm(t["x"], (t["x"].shape[-1],), t["w"], EPS),)
        P["torch_compile"] = lambda t: (compiled_fn(torch_ops.rms_norm)(t["x"], t["w"], EPS),)
        if "liger" in extra:
            rms = extra["liger"][0]
            # in_place=False: Liger would otherwise overwrite dy, which the benchmark reuses.
            P["liger"] = lambda t: (rms(t["x"], t["w"], EPS, offset=0.0, casting_mode="llama", in_place=False),)
        if "apex" in extra:
            P["apex"] = lambda t: (extra["apex"].rms_norm(t["x"], t["w"], EPS),)
    elif op == "layer_norm":
        P["triton"] = lambda t: (triton_ops.layer_norm(t["x"], t["w"], t["b"], EPS),)
        P["torch_eager"] = lambda t: (torch_ops.layer_norm(t["x"], t["w"], t["b"], EPS),)
        P["torch_native"] = lambda t: (
            torch.nn.functional.layer_norm(t["x"], (t["x"].shape[-1],), t["w"], t["b"], EPS),
        )
        P["torch_compile"] = lambda t: (compiled_fn(torch_ops.layer_norm)(t["x"], t["w"], t["b"], EPS),)
        if "liger" in extra:
            ln = extra["liger"][1]
            P["liger"] = lambda t: (ln(t["x"], t["w"], t["b"], EPS),)
        if "apex" in extra:
            P["apex"] = lambda t: (extra["apex"].layer_norm(t["x"], t["w"], t["b"], EPS),)
    elif op == "add_norm":
        P["triton"] = lambda t: triton_ops.add_norm(t["x"], t["r"], t["w"], None, EPS)

        def unfused(t):
            s = t["x"] + t["r"]
            return s, triton_ops.rms_norm(s, t["w"], EPS)

        P["triton_unfused"] = unfused
        P["torch_eager"] = lambda t: torch_ops.add_norm(t["x"], t["r"], t["w"], None, EPS)
        P["torch_compile"] = lambda t: compiled_fn(torch_ops.add_norm)(t["x"], t["r"], t["w"], None, EPS)
    elif op == "peri_junction":
        P["triton"] = lambda t: triton_ops.peri_junction(t["x"], t["r"], t["w"], None, t["w2"], None, EPS)

        def unfused(t):
            s = t["r"] + triton_ops.rms_norm(t["x"], t["w"], EPS)
            return s, triton_ops.rms_norm(s, t["w2"], EPS)

        P["triton_unfused"] = unfused
        P["torch_eager"] = lambda t: torch_ops.peri_junction(t["x"], t["r"], t["w"], None, t["w2"], None, EPS)
        P["torch_compile"] = lambda t: compiled_fn(torch_ops.peri_junction)(
            t["x"], t["r"], t["w"], None, t["w2"], None, EPS
        )
    return P


def make_tensors(rows, hidden, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def act():
        return torch.randn(rows, hidden, device=device, dtype=dtype, generator=g).requires_grad_(True)

    def par(mul=0.1, add=1.0):
        return (torch.randn(hidden, device=device, generator=g) * mul + add).to(dtype).requires_grad_(True)

    return {"x": act(), "r": act(), "w": par(), "b": par(add=0.0), "w2": par()}


# ------------------------------------------------------------------------------- GPU bench
def _wall_clock_bench(fn, warmup=1, rep=3, grad_to_none=None, **_):
    """Stand-in for do_bench in --cpu-dry-run (median wall time of a few calls, ms)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rep):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth(bench, rep, dev, numel) -> float:
    """GB/s of a device-to-device copy (bytes read + written); 1 GiB bf16 buffers on GPU, far
    larger than L2."""
    src = torch.empty(numel, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), **rep)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def time_fwd_bwd(bench, rep, fn, t, leaves) -> tuple[float, float]:
    """Forward time (building the autograd graph, as in training), then backward time of one
    retained graph with fresh .grad each run (no accumulation kernels)."""
    fwd_ms = bench(lambda: fn(t), **rep)
    outs = fn(t)
    grads = [torch.randn_like(o) for o in outs]
    bwd_ms = bench(lambda: torch.autograd.backward(outs, grads, retain_graph=True), grad_to_none=leaves, **rep)
    return fwd_ms, bwd_ms


def bench_gpu(args, dry_run: bool = False) -> dict:
    """The GPU grid. dry_run: same code path on CPU (interpreter, tiny shapes, wall clock, no
    torch.compile) to check the harness itself where no GPU is available; numbers meaningless."""
    dev = "cpu" if dry_run else "cuda"
    dtype = getattr(torch, args.dtype)
    triton_ops, reason = resolve_backend("triton", dev)
    extra, notes = optional_imports()
    if dry_run:
        bench, rep = _wall_clock_bench, {}
    else:
        from triton.testing import do_bench as bench

        rep = {"warmup": 25, "rep": args.rep}

    # Device-to-device copy bandwidth, measured now, on this device (read + write bytes).
    copy_gbps = copy_bandwidth(bench, rep, dev, (1 << 20) if dry_run else (1 << 29))

    if dry_run:
        hiddens, rowss = (123,), (5,)
    elif args.quick:
        hiddens, rowss = (2048, 8192), (16384,)
    else:
        hiddens, rowss = tuple(args.hidden or HIDDEN), tuple(args.rows or ROWS)
    results, peri = [], []
    for hidden in hiddens:
        for rows in rowss:
            t = make_tensors(rows, hidden, dtype, dev)
            leaves = list(t.values())
            act_bytes = rows * hidden * t["x"].element_size()
            for op in args.ops:
                times = {}
                for name, fn in providers_for(op, triton_ops, extra).items():
                    if name == "torch_compile" and (dry_run or args.no_compile):
                        continue
                    rec = {"op": op, "hidden": hidden, "rows": rows, "dtype": args.dtype, "provider": name}
                    try:
                        fwd_ms, bwd_ms = time_fwd_bwd(bench, rep, fn, t, leaves)
                    except Exception as e:
                        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        results.append(rec)
                        continue
                    pf, pb = IDEAL_PASSES[op]
                    fwd_gbps = pf * act_bytes / fwd_ms / 1e6
                    bwd_gbps = pb * act_bytes / bwd_ms / 1e6
                    rec.update(
                        fwd_ms=round(fwd_ms, 4),
                        bwd_ms=round(bwd_ms, 4),
                        fwd_gbps=round(fwd_gbps, 3),
                        bwd_gbps=round(bwd_gbps, 3),
                        fwd_frac_copy=round(fwd_gbps / copy_gbps, 4),
                        bwd_frac_copy=round(bwd_gbps / copy_gbps, 4),
                    )
                    times[name] = fwd_ms + bwd_ms
                    results.append(rec)
                if op == "peri_junction" and "triton" in times:
                    peri.append(
                        {
                            "hidden": hidden,
                            "rows": rows,
                            **{
                                f"speedup_fwd_bwd_vs_{k}": round(v / times["triton"], 3)
                                for k, v in times.items()
                                if k != "triton"
                            },
                        }
                    )
                if not dry_run:
                    torch.cuda.empty_cache()
            del t, leaves
            if not dry_run:
                torch.cuda.empty_cache()

    return {
        "gpu": not dry_run,
        "backend": reason,
        "copy_bandwidth_gbps": round(copy_gbps, 1),
        "results": results,
        "peri_junction_vs_unfused": peri,
        "targets": check_targets(results, peri),
        "notes": notes,
    }


def check_targets(results, peri) -> dict:
    ours = [
        r
        for r in results
        if r["provider"] == "triton"
        and "error" not in r
        and r["hidden"] >= 2048
        and r["rows"] >= 16384
        and r["op"] in ("rms_norm", "layer_norm")
    ]
    out = dict(TARGETS)
    if ours:
        out["worst_fwd_frac_copy"] = min(r["fwd_frac_copy"] for r in ours)
        out["worst_bwd_frac_copy"] = min(r["bwd_frac_copy"] for r in ours)
        out["fwd_met"] = out["worst_fwd_frac_copy"] >= TARGETS["fwd_frac_copy"]
        out["bwd_met"] = out["worst_bwd_frac_copy"] >= TARGETS["bwd_frac_copy"]
    sp = [
        p["speedup_fwd_bwd_vs_triton_unfused"]
        for p in peri
        if "speedup_fwd_bwd_vs_triton_unfused" in p and p["hidden"] >= 2048 and p["rows"] >= 16384
    ]
    if sp:
        out["worst_peri_speedup_vs_unfused"] = min(sp)
        out["peri_met"] = min(sp) >= TARGETS["peri_speedup_vs_unfused"]
    return out


# ------------------------------------------------------------------------------- CPU smoke
def smoke_cpu() -> dict:
    """torch eager vs the Triton interpreter at one small shape: agreement and (slow) timings."""
    rows, hidden, dtype = 8, 256, torch.float32
    triton_ops, _ = resolve_backend("triton", "cpu")  # interpreter: TRITON_INTERPRET set above
    out = {"shape": [rows, hidden], "dtype": "float32", "ops": {}}
    for op in IDEAL_PASSES:
        res = {}
        for name, ops in (("torch_eager", resolve_backend("torch", "cpu")[0]), ("triton_interpreter", triton_ops)):
            fn = providers_for(op, ops, {})["triton"]  # "triton" entry = the given backend's fused op
            warm = fn(make_tensors(rows, hidden, dtype, "cpu"))  # first calls pay for setup
            torch.autograd.backward(list(warm), [torch.ones_like(o) for o in warm])
            t = make_tensors(rows, hidden, dtype, "cpu")
            t0 = time.perf_counter()
            outs = fn(t)
            t1 = time.perf_counter()
            torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
            t2 = time.perf_counter()
            res[name] = (outs, [t[k].grad for k in ("x", "r", "w", "b", "w2")], (t1 - t0) * 1e3, (t2 - t1) * 1e3)
        (o_ref, g_ref, f_ref, b_ref), (o_tri, g_tri, f_tri, b_tri) = res["torch_eager"], res["triton_interpreter"]
        out["ops"][op] = {
            "max_abs_diff_fwd": max((a - b).abs().max().item() for a, b in zip(o_tri, o_ref)),
            "max_abs_diff_bwd": max(
                (a - b).abs().max().item() for a, b in zip(g_tri, g_ref) if a is not None and b is not None
            ),
            "torch_eager_fwd_ms": round(f_ref, 3),
            "torch_eager_bwd_ms": round(b_ref, 3),
            "interpreter_fwd_ms": round(f_tri, 3),
            "interpreter_bwd_ms": round(b_tri, 3),
        }
    out["agree"] = all(v["max_abs_diff_fwd"] < 1e-4 and v["max_abs_diff_bwd"] < 1e-3 for v in out["ops"].values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--ops", nargs="+", default=list(IDEAL_PASSES), choices=list(IDEAL_PASSES))
    ap.add_argument("--quick", action="store_true", help="hidden 2048/8192 and 16K rows only")
    ap.add_argument("--rep", type=int, default=100, help="do_bench measuring time per point, ms")
    ap.add_argument("--hidden", type=int, nargs="+", help=f"hidden sizes (default {' '.join(map(str, HIDDEN))})")
    ap.add_argument("--rows", type=int, nargs="+", help=f"rows (default {' '.join(map(str, ROWS))})")
    ap.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile provider (compiles per shape)"
    )
    ap.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="without a GPU: run the GPU harness on CPU at a tiny shape (interpreter) to "
        "check the script; its numbers mean nothing",
    )
    args = ap.parse_args(argv)

    report = {
        "bench": "norm_kernels",
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    if HAS_CUDA:
        report.update(bench_gpu(args))
    elif args.cpu_dry_run:
        report.update(bench_gpu(args, dry_run=True))
        report["note"] = "--cpu-dry-run: harness check on CPU; timings are meaningless"
    else:
        report.update(
            {
                "gpu": False,
                "note": (
                    "no CUDA GPU present: no timings or bandwidth figures; ran a CPU smoke comparison "
                    "of torch eager vs the Triton interpreter instead. Run `python bench/kernels.py` "
                    "on a GPU for the figures."
                ),
                "cpu_smoke": smoke_cpu(),
            }
        )
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
