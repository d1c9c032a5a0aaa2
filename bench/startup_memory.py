"""Peak memory while a job starts: the model built by the trainer's own code (pretrain/job.py build_model +
parallelize: tensor parallelism, pipeline stage, ZeRO-3 partitioning), on N real processes, sharded (each rank
materializes only its own part, pretrain/sharded_init.py) and whole (every rank builds the whole fp32 model
first, as a run with checkpoint.init_from does), next to the planner's estimates (launch/plan.py). Prints JSON.

    python bench/startup_memory.py --config configs/gpt-1.3b.yaml --set zero.stage=3 --processes 2
    python bench/startup_memory.py --config configs/tiny.yaml --set model.hidden_size=1024 --processes 2 --engine

Measured per rank: the resident set (VmRSS) before the build and its peak (getrusage ru_maxrss) after it --
the peak increase is what building the model took; on a GPU also torch.cuda.max_memory_allocated. --engine
also builds the DeepSpeed engine (its optimizer states too; that is the training step's memory, which the
planner already estimates). glibc is told to serve allocations of 1 MiB and more with mmap
(MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set and the peak is the build's, not the
allocator's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose kernels.py would shadow the kernels package

MODES = ("sharded", "whole")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load(args, run_dir: str, mode: str):
    from launch.plan import load_plan_config

    sets = [*args.set, f"run.dir={run_dir}"]
    if mode == "whole":  # what a run that loads weights does: the whole plain model first (never read here)
        sets.append("checkpoint.init_from=/whole-model-build")
    return load_plan_config(args.config, sets, args.vocab_size, args.processes)


def worker(args) -> None:
    from pretrain.distributed import init_distributed

    dist = init_distributed()
    import torch

    from pretrain.job import build_model, open_run, parallelize

    cfg = load(args, args.run_dir, args.mode)
    warm_up(args, dist, cfg)  # imports and one-time set-up outside the measurement (~150 MB of modules on CPU)
    torch.distributed.barrier()
    before = rss_bytes()
    run = open_run(cfg, None, dist)
    model = build_model(run)
    module = parallelize(run, model)
    if args.engine:
        from pretrain.engine import build_engine
        from pretrain.parallel import DeepSpeedMPU, needs_mpu

        build_engine(module, cfg, run.grad_accum, mpu=DeepSpeedMPU() if needs_mpu(run.layout) else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {
        "rank": dist.rank,
        "rss_before_bytes": before,
        "rss_peak_bytes": peak,
        "peak_increase_bytes": peak - before,
        "rss_after_bytes": rss_bytes(),
    }
    if torch.cuda.is_available():
        record["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    records = [None] * dist.world_size
    torch.distributed.all_gather_object(records, record)
    if dist.rank == 0:
        Path(args.out).write_text(json.dumps(records))
    torch.distributed.destroy_process_group()


def warm_up(args, dist, cfg) -> None:
    """The same build for a model of a few KB (head size 8, one block per pipeline stage, vocabulary 256): every
    module the real build imports is imported, DeepSpeed's communication ops are built, and nothing of it stays."""
    import gc

    import torch
    from megatron.core import parallel_state

    from pretrain.job import build_model, open_run, parallelize

    small = argparse.Namespace(**vars(args))
    small.set = [*args.set, f"model.hidden_size={8 * cfg.model.num_heads}", f"model.num_layers={cfg.parallel.pp}"]
    small.set += [f"model.vocab_size={args.vocab_size or 256}", "model.ffn_hidden_size=0", "model.seq_len=64"]
    cfg = load(small, args.run_dir + "-warm-up", args.mode)
    run = open_run(cfg, None, dist)
    parallelize(run, build_model(run))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    gc.collect()
    torch.distributed.barrier()


def planner(args, mode: str) -> dict:
    from launch.plan import estimate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(args, tmp, mode)
    stages = estimate(cfg, args.processes)
    return {
        "planner_build_bytes": max(s.startup_build for s in stages),
        "planner_startup_bytes": max(s.startup for s in stages),
        "planner_whole_bytes": max(s.startup_whole for s in stages),
        "planner_step_bytes": max(s.total for s in stages),
    }


def run_mode(args, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}"]
        cmd += [__file__, "--worker", mode, "--out", str(out), "--run-dir", str(Path(tmp) / "run")]
        cmd += ["--config", args.config, "--processes", str(args.processes)] + [f"--set={s}" for s in args.set]
        cmd += (["--vocab-size", str(args.vocab_size)] if args.vocab_size else []) + (
            ["--engine"] if args.engine else []
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{mode} build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return {"ranks": json.loads(out.read_text()), **planner(args, mode)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--processes", type=int, default=2, help="ranks to start (torchrun)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--vocab-size", type=int, default=None, help="when model.vocab_size is 0")
    p.add_argument("--engine", action="store_true", help="also build the DeepSpeed engine")
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vocab_size is None and "tiny" in Path(args.config).name:
        args.vocab_size = 2048
    if args.worker:
        args.mode = args.worker
        worker(args)
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    report = {"config": args.config, "sets": args.set, "processes": args.processes, "engine": args.engine}
    for mode in args.modes:
        report[mode] = run_mode(args, mode)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
