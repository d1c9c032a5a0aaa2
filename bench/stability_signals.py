"""What the depth and stability diagnostics cost: a training step with diagnostics against one without, side by
side in one process (1 rank, the trainer's DeepSpeed engine and runner). Prints one JSON object.

    python bench/stability_signals.py                                   # configs/quickstart.yaml shape, CPU
    python bench/stability_signals.py --threads 1 --reps 10             # a CPU shared with others
    python bench/stability_signals.py --set model.num_layers=12 --set model.seq_len=512

A diagnostics step is what pretrain/loop.py runs every train.diagnostics_every steps: the training step with
the per-block gradient norms (runner.train_step(diagnose=True)) plus the probe (runner.probe: one no-grad
forward of train.diagnostics_sequences sequences with the residual, attention and output-logit statistics).
Plain and diagnostics steps alternate (plain, diag, plain, diag, ...) so machine noise hits both alike; the
figures are medians over --reps of each. Also timed alone: the probe, and the probe without the output-logit
statistics (what the probe cost before them), so the price of the new signals shows on its own.

    diag_over_plain          median diagnostics step / median plain step (diagnostics every step)
    cost_per_call_over_step  (median diagnostics step - median plain step) / median plain step
    cost_at_every_<k>        cost_per_call_over_step / k: the slowdown at train.diagnostics_every=k
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

PREPARE_DEFAULT_VOCAB = 8192  # python -m pretrain.data prepare --vocab-size default


def build(config: str, sets: list[str], vocab: int):
    """The trainer's single-rank engine and runner for `config`, fed fixed random batches (no corpus needed)."""
    from model import build_model
    from pretrain.config import load_config, resolve
    from pretrain.distributed import init_distributed
    from pretrain.engine import build_engine
    from pretrain.job import loss_spec, seed_everything
    from pretrain.parallel import layout_for
    from pretrain.runner import EngineRunner

    dist = init_distributed()
    cfg = load_config(config, sets)
    m = cfg.model
    micro = cfg.train.micro_batch_size
    cfg = resolve(load_config(config, [*sets, f"train.global_batch_size={micro}"]), m.vocab_size or vocab, 1)
    seed_everything(cfg.run.seed)
    model, _ = build_model(cfg.model, cfg.kernels.backend, dist.device)
    model.loss_spec = loss_spec(cfg)
    engine, _ = build_engine(model, cfg, 1)
    g = torch.Generator().manual_seed(0)
    v, t = cfg.model.vocab_size, cfg.model.seq_len
    tokens = torch.randint(0, v, (micro, t + 1), generator=g)
    batch = SimpleNamespace(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(micro, t))
    stream = SimpleNamespace(batch=lambda start, count: batch)
    runner = EngineRunner(engine, stream, cfg, layout_for(cfg, 1), 0, 1, dist.device, {})
    probe = torch.randint(0, v, (cfg.train.diagnostics_sequences, t), generator=g).to(dist.device)
    return cfg, dist.device, engine, runner, probe


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--vocab", type=int, default=PREPARE_DEFAULT_VOCAB, help="vocabulary when the config says 0")
    p.add_argument("--reps", type=int, default=8, help="measured steps of each kind")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps of each kind first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pretrain.diagnostics import activation_stats

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's start-up notes: stdout carries only the JSON
        cfg, device, engine, runner, probe_tokens = build(args.config, args.set, args.vocab)
    engine.train()
    step = 0

    def train(diagnose: bool):
        nonlocal step
        runner.train_step(step, diagnose)
        step += 1
        if diagnose:  # what TrainLoop.diagnose adds to the step (its metrics write aside)
            engine.eval()
            runner.probe(probe_tokens)
            engine.train()

    def probe(output_stats: bool):
        engine.eval()
        module = engine.module
        activation_stats(
            lambda x: engine(x), module.blocks, probe_tokens, None, False, model=module if output_stats else None
        )
        engine.train()

    times = {"plain": [], "diag": [], "probe": [], "probe_without_output_stats": []}
    for i in range(args.warmup + args.reps):
        measured = {
            "plain": timed(lambda: train(False), device),
            "diag": timed(lambda: train(True), device),
            "probe": timed(lambda: probe(True), device),
            "probe_without_output_stats": timed(lambda: probe(False), device),
        }
        if i >= args.warmup:
            for k, v in measured.items():
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    plain = med["plain"]
    cost = (med["diag"] - plain) / plain
    every = cfg.train.diagnostics_every
    m = cfg.model
    print(
        json.dumps(
            {
                "config": os.path.relpath(args.config, ROOT),
                "overrides": args.set,
                "device": str(device) if device.type != "cpu" else f"cpu ({platform.machine()})",
                "threads": torch.get_num_threads(),
                "model": {
                    "hidden_size": m.hidden_size,
                    "num_layers": m.num_layers,
                    "num_heads": m.num_heads,
                    "seq_len": m.seq_len,
                    "vocab_size": m.vocab_size,
                    "micro_batch_size": cfg.train.micro_batch_size,
                    "probe_sequences": cfg.train.diagnostics_sequences,
                    "precision": cfg.train.precision,
                    "zero_stage": cfg.zero.stage,
                },
                "reps": args.reps,
                "median_s": {k: round(v, 5) for k, v in med.items()},
                "diag_over_plain": round(med["diag"] / plain, 4),
                "cost_per_call_over_step": round(cost, 4),
                "probe_over_step": round(med["probe"] / plain, 4),
                "output_stats_over_step": round((med["probe"] - med["probe_without_output_stats"]) / plain, 4),
                f"cost_at_every_{every}": round(cost / every, 5),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
