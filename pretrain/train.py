"""python -m pretrain.train --config configs/quickstart.yaml [--set KEY=VALUE ...] [--resume auto]

Trains a GPT under a DeepSpeed engine. Run it through a launcher for several processes:
    bash launch/local.sh 2 -m pretrain.train --config configs/tiny.yaml
The config is validated before any process group starts; see `--help-config` for every key.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.checkpoint import Checkpointer, CheckpointError, compare_configs
from pretrain.config import (Config, ConfigError, check_world, describe_keys, load_config, parse_blend, resolve,
                             tokenizer_path)
from pretrain.data import DataError, SampleStream, TokenStream, Tokenizer, build_train_dataset
from pretrain.data.indexed import open_indexed
from pretrain.engine import apply_optimizer_settings, deepspeed_config, sync_lr_schedule
from pretrain.guard import BadStepGuard, SpikeDetector, TrainingStopped
from pretrain.preemption import Preemption
from pretrain.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from pretrain.evaluate import evaluate_stream
from pretrain.parallel import (DeepSpeedMPU, data_parallel_group, initialize_groups, layout_for,
                               pipeline_parallel_group, tensor_parallel_group)
from pretrain.runner import EngineRunner, PipelineRunner
from pretrain.reshard import link_module_names, prepare_universal, universal_checkpoint_info
from pretrain.metrics import MetricsWriter, Progress, device_peak_tflops, format_duration, peak_memory_mb, say

# Keys that describe one invocation rather than the run; not compared on resume.
PER_INVOCATION = {("checkpoint", "resume"), ("train", "exit_at_step")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.placement=pre (repeatable)")
    p.add_argument("--resume", default=None, metavar="MODE",
                   help="never | auto (newest complete checkpoint, else fresh) | must | PATH")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if not args.help_config and not args.config:
        p.error("--config is required")
    return args


def prepare_config(args: argparse.Namespace) -> tuple[Config, Tokenizer]:
    """Everything that can be checked before a process group exists: config, data, batch sizes."""
    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: 'fp16' needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16); "
                          "allowed on CPU: fp32, bf16")
    tokenizer = Tokenizer(tokenizer_path(cfg.data))
    cfg = resolve(cfg, tokenizer.vocab_size)
    deepspeed_config(cfg, check_world(cfg, int(os.environ.get("WORLD_SIZE", "1"))))  # a user JSON that disagrees fails here
    for split in ("train", "valid"):
        for _, prefix in parse_blend(f"data.{split}", getattr(cfg.data, split)):
            open_indexed(prefix)
    return cfg, tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe_keys())
        return 0
    try:
        cfg, tokenizer = prepare_config(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed()
    try:
        train(cfg, tokenizer, dist)
    except CheckpointError as e:
        print(f"[rank {dist.rank}] checkpoint error: {e}", file=sys.stderr)
        return 3
    except TrainingStopped as e:
        print(f"[rank {dist.rank}] training stopped: {e}", file=sys.stderr)
        return 4
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: Config, tokenizer: Tokenizer, dist: DistInfo) -> None:
    from model import build_model
    from model.parallel_rng import TP_RNG
    from model.parallelize import apply_tensor_parallel
    from model.recompute import apply_activation_checkpointing
    from pretrain.engine import build_engine

    run_dir = Path(cfg.run.dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    log_file = run_dir / "train.log"
    log = lambda msg: say(msg, dist.is_main, log_file)  # noqa: E731
    t, m = cfg.train, cfg.model
    grad_accum = check_world(cfg, dist.world_size)
    layout = layout_for(cfg, dist.world_size)
    pp_rank, dp_rank, tp_rank = layout.coords(dist.rank)
    if layout.tp > 1 or layout.pp > 1:
        initialize_groups(layout)
    groups = {"dp": data_parallel_group(layout), "tp": tensor_parallel_group(layout),
              "pp": pipeline_parallel_group(layout)}

    # Every rank builds the same plain model from the same seed, whatever the layout; parallelism is
    # applied to it afterwards (model/parallelize.py, model/pipeline.py).
    seed_everything(cfg.run.seed)
    model, backend_reason = build_model(m, cfg.kernels.backend, dist.device)
    log(f"[model] placement={m.placement} norm={m.norm} d={m.hidden_size} L={m.num_layers} heads={m.num_heads}"
        f"/{m.num_kv_heads} ffn={m.ffn_hidden_size} vocab={m.vocab_size}: {model.num_params():,} parameters "
        f"({model.num_params(embedding=False):,} non-embedding)")
    kinds = model.junction_kinds()
    log(f"[kernels] norm backend {backend_reason}; sublayer junctions: "
        + ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds)))
    log(f"[parallel] world {dist.world_size} = pp {layout.pp} x dp {layout.dp} x tp {layout.tp} (tp fastest)"
        + (", sequence parallel" if layout.sequence_parallel else "") + "\n" + layout.rank_map())
    flops_per_token = model.flops_per_token()
    checkpointer = Checkpointer(run_dir / "checkpoints", dist.rank, cfg.checkpoint.keep_last,
                                cfg.checkpoint.verify, log)
    resume_from = checkpointer.resolve(cfg.checkpoint.resume)
    universal = None  # the converted checkpoint when resuming on another layout
    if resume_from is not None:
        reshard_reason = check_resumable(json.loads((resume_from / "meta.json").read_text()), cfg, layout, log)
        if reshard_reason:
            log(f"[checkpoint] {resume_from.name} was written on another layout ({reshard_reason}): resharding")
            universal = prepare_universal(resume_from, dist.rank, log)
    if resume_from is None and cfg.checkpoint.init_from:
        load_initial_weights(model, Path(cfg.checkpoint.init_from), log)
    apply_tensor_parallel(model, layout.tp, tp_rank, layout.sequence_parallel)
    apply_activation_checkpointing(model.blocks, t.activation_checkpointing, t.checkpoint_blocks)
    if layout.pp > 1:
        from model.pipeline import build_pipeline

        module = build_pipeline(model, layout, cfg.parallel.pp_partition)
        log(f"[parallel] pipeline stages (first layer of each; embedding=0, blocks 1..{m.num_layers}, final norm, "
            f"head): {[int(p) for p in module.parts]}")
    else:
        module = model
        if cfg.zero.stage == 3:
            model.register_zero3_external_parameters()
    local_params = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    # Saved in every checkpoint, so any checkpoint can later be resharded (pretrain/reshard.py).
    module.universal_checkpoint_info = universal_checkpoint_info(module, m.num_layers, m.mlp == "swiglu")
    engine, _ = build_engine(module, cfg, grad_accum, dist.device,
                             mpu=DeepSpeedMPU() if layout.tp > 1 and layout.pp == 1 else None,
                             load_universal=universal is not None)
    # Dropout streams: alike across tp (replicated activations), distinct across dp and pp; a second
    # stream, distinct across tp, for split data (model/parallel_rng.py). Restored on resume.
    seed_everything(cfg.run.seed + 1 + dp_rank + 1009 * pp_rank)
    if layout.tp > 1:
        TP_RNG.seed(cfg.run.seed + 2718 + tp_rank + 1009 * pp_rank + 100003 * dp_rank)

    start_step, resumed = 0, False
    if resume_from is not None:
        if universal is not None:
            link_module_names(universal, engine.module, m.num_layers)
            meta = checkpointer.load_universal(engine, universal, resume_from)
        else:
            meta = checkpointer.load(engine, resume_from)
        apply_optimizer_settings(engine, t)
        start_step, resumed = meta["step"], True
        log(f"[checkpoint] resumed from {resume_from} at step {start_step} "
            f"({meta['consumed_samples']:,} samples consumed)")
    elif cfg.checkpoint.resume == "auto":
        log(f"[checkpoint] --resume auto: no checkpoint under {checkpointer.root}; starting fresh")
    if dist.is_main:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    metrics = MetricsWriter(run_dir, dist.is_main, resume_step=start_step if resumed else None)
    metrics.text("config", cfg.to_yaml())
    stream = SampleStream(build_train_dataset(parse_blend("data.train", cfg.data.train), tokenizer, m.seq_len,
                                              cfg.run.seed, cfg.data.cache_dir), cfg.run.seed)
    valid = TokenStream([p for _, p in parse_blend("data.valid", cfg.data.valid)], m.seq_len,
                        max_tokens=t.eval_batches * t.global_batch_size * m.seq_len)
    token_bytes = tokenizer.token_bytes()
    tokens_per_step = t.global_batch_size * m.seq_len
    peak = device_peak_tflops(dist.device, t.peak_tflops)
    guard = BadStepGuard(engine, t.bad_step_policy, t.max_bad_steps, dist.device)
    spikes = SpikeDetector(t.spike_sigma, t.spike_window)
    if resumed:
        guard.load_state_dict(meta.get("bad_step_guard"))
        spikes.load_state_dict(meta.get("spike_detector"))
    runner = (PipelineRunner if layout.pp > 1 else EngineRunner)(engine, stream, cfg, layout, dp_rank, grad_accum,
                                                                 dist.device, groups, guard=guard)
    log(f"[run] {run_dir}: world {dist.world_size} ({dist.backend}); ZeRO-{cfg.zero.stage}, {t.precision}; "
        f"batch {t.global_batch_size} = micro {t.micro_batch_size} x dp {layout.dp} x accumulation {grad_accum}; "
        f"{tokens_per_step:,} tokens/step; steps {start_step}->{t.max_steps} "
        f"({(t.max_steps - start_step) * tokens_per_step:,} tokens); train epoch = {stream.epoch_size:,} samples")

    def validate(step: int) -> None:
        engine.eval()
        result = evaluate_stream(runner.eval_loss, valid, token_bytes, t.micro_batch_size, dp_rank, layout.dp,
                                 dist.device, tokenizer.pad, group=groups["dp"])
        engine.train()
        metrics.log({"step": step, "loss": result["loss"], "perplexity": result["perplexity"],
                     "bits_per_byte": result["bits_per_byte"], "tokens": result["tokens"]}, prefix="valid")
        log(f"[valid] step {step}: loss {result['loss']:.4f} | ppl {result['perplexity']:.2f} | "
            f"bpb {result['bits_per_byte']:.4f} ({result['tokens']:,} tokens)")

    def save(step: int) -> None:
        checkpointer.save(engine, step, {
            "step": step, "consumed_samples": step * t.global_batch_size, "tokens": step * tokens_per_step,
            "world_size": dist.world_size, "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
            "zero_stage": cfg.zero.stage, "config": cfg.to_dict(),
            "bad_step_guard": guard.state_dict(), "spike_detector": spikes.state_dict(),
            "tokenizer_sha256": tokenizer.sha256, "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
            extra_files={"tokenizer.model": tokenizer.path})

    probe = valid.batch(list(range(t.diagnostics_sequences)), tokenizer.pad).tokens.to(dist.device)

    def diagnose(step: int, grad_norms: list[float]) -> None:
        engine.eval()
        stats = runner.probe(probe)
        engine.train()
        metrics.log({"step": step, "layer_var": stats["var"], "layer_rms": stats["rms"],
                     "layer_max_abs": stats["max_abs"], "layer_attn_entropy": stats["attn_entropy"],
                     "layer_grad_norm": grad_norms}, prefix="diag")
        fmt = lambda xs: " ".join(f"{x:.3g}" for x in xs)  # noqa: E731
        log(f"[diag] step {step}: residual var by layer [{fmt(stats['var'])}] | max|x| [{fmt(stats['max_abs'])}] "
            f"| grad norm [{fmt(grad_norms)}] | attn entropy [{fmt(stats['attn_entropy'])}]")

    engine.train()
    progress = Progress(start_step, t.max_steps, tokens_per_step)
    loss_acc, steps_acc = 0.0, 0
    step = start_step
    preempt = Preemption(cfg.checkpoint.preempt_signals, cfg.checkpoint.grace_period_s, log).install()
    try:
        while step < t.max_steps:
            diagnose_now = bool(t.diagnostics_every) and (step + 1) % t.diagnostics_every == 0
            result = runner.train_step(step, diagnose_now)
            step += 1
            skipped = guard.after_step(step)  # raises TrainingStopped when the policy says so
            # One small collective per step: the global loss and whether any rank was asked to stop.
            local = float(result.loss)
            finite = math.isfinite(local)
            loss_sum, finite_ranks, stop_votes = all_reduce_sum(
                [local if finite else 0.0, float(finite), float(preempt.requested)], dist.device)
            step_loss = loss_sum / finite_ranks if finite_ranks else float("nan")
            if skipped:
                sync_lr_schedule(engine, step)  # the schedule follows the step index, skipped or not
                log(f"[bad step] step {step}: non-finite loss or gradient; the update was skipped "
                    f"({guard.count} in this run, at most train.max_bad_steps={t.max_bad_steps}; "
                    f"{dist.world_size - int(finite_ranks)} rank(s) had a non-finite loss)")
                metrics.log({"step": step, "skipped": 1, "bad_steps": guard.count}, prefix="bad_step")
            else:
                loss_acc += step_loss
                steps_acc += 1
                sigmas = spikes.observe(step_loss)
                if sigmas is not None:
                    mean, std = spikes.mean_std()
                    log(f"[spike] step {step}: loss {step_loss:.4f} is {sigmas:.1f} sigma above the mean of the last "
                        f"{len(spikes.history)} steps ({mean:.4f} +- {std:.4f})")
                    metrics.log({"step": step, "loss": step_loss, "sigma": sigmas}, prefix="spike")
            preempting = stop_votes > 0
            if preempting:
                preempt.start_grace()
            if step == start_step + 1:  # optimizer states exist once the first update has run
                with progress.excluded():
                    report_memory(engine, local_params, cfg, layout, run_dir, log)
            if result.layer_grad_norms is not None:
                with progress.excluded():
                    diagnose(step, result.layer_grad_norms)
            if step % t.log_every == 0 or step == t.max_steps:
                mean_loss = loss_acc / steps_acc if steps_acc else float("nan")
                timing = progress.interval(step)
                lr = engine.get_lr()[0]
                tps = timing["tokens_per_s"]
                grad_norm = result.grad_norm
                record = {"step": step, "tokens": step * tokens_per_step, "loss": mean_loss, "lr": lr,
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "tokens_per_s": tps, "step_time": timing["step_time"],
                          "mfu": flops_per_token * tps / (dist.world_size * peak * 1e12) if peak else None,
                          "mem_mb": peak_memory_mb(dist.device)}
                metrics.log(record)
                log(f"[train] step {step}/{t.max_steps} ({100 * step / t.max_steps:.0f}%) | loss {mean_loss:.4f} | "
                    f"lr {lr:.2e} | grad {'n/a' if grad_norm is None else f'{float(grad_norm):.3f}'} | "
                    f"{tps:,.0f} tok/s | {timing['step_time']:.2f} s/step | ETA {format_duration(timing['eta_s'])}")
                loss_acc, steps_acc = 0.0, 0
            if not preempting and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
                with progress.excluded():
                    validate(step)
            exiting = step == t.exit_at_step or preempting
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.max_steps or exiting:
                with progress.excluded():
                    save(step)
            if preempting:
                log(f"[preempt] {preempt.describe()}: saved step {step} and exiting 0; the same command with "
                    "--resume auto continues the run")
                break
            if exiting:
                log(f"[exit] train.exit_at_step={step} reached; continue with --resume auto")
                break
    finally:
        preempt.uninstall()
    metrics.close()
    if step == t.max_steps:
        log(f"[done] trained to step {t.max_steps}; run directory {run_dir}")


def report_memory(engine, local_params: int, cfg: Config, layout, run_dir: Path, log) -> None:
    """Parameter and optimizer-state bytes on every rank, against the ZeRO formula (memory.json)."""
    from pretrain.memory import expected_bytes, held_bytes

    held = held_bytes(engine)
    per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, {"held": held, "local_params": local_params})
    if torch.distributed.get_rank() != 0:
        return
    bytes_per_param = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.train.precision]
    report = {"zero_stage": cfg.zero.stage, "precision": cfg.train.precision, "dp": layout.dp,
              "ranks": [dict(r, expected=expected_bytes(r["local_params"], cfg.zero.stage, layout.dp))
                        for r in per_rank]}
    (run_dir / "memory.json").write_text(json.dumps(report, indent=1))
    r0 = report["ranks"][0]
    note = "" if bytes_per_param == 4 else " (formula for fp32; mixed precision adds fp32 masters)"
    log(f"[memory] rank 0 holds {r0['held']['parameters'] / 2**20:.2f} MiB of parameters and "
        f"{r0['held']['optimizer'] / 2**20:.2f} MiB of optimizer state; ZeRO-{cfg.zero.stage} over dp "
        f"{layout.dp} predicts {r0['expected']['parameters'] / 2**20:.2f} and "
        f"{r0['expected']['optimizer'] / 2**20:.2f}{note} (all ranks: memory.json)")


def load_initial_weights(model: torch.nn.Module, path: Path, log) -> None:
    """checkpoint.init_from: weights only (a fine-tune or an imported model), before ZeRO partitions them."""
    from pretrain.eval import consolidated_state_dict

    if path.is_dir():
        state = consolidated_state_dict(path)
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"checkpoint.init_from: '{path}' is neither a checkpoint directory nor a file")
    own = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - ({"head.weight"} if model.cfg.tie_embeddings else set()))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        raise CheckpointError(f"checkpoint.init_from: {path} does not fit the model: mismatched {mismatched}, "
                              f"missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    log(f"[checkpoint] initialised the model from {path} (weights only; optimizer and step start fresh)")


def check_resumable(saved: dict, cfg: Config, layout, log) -> str | None:
    """Refuses a checkpoint of another model; logs changed settings. Returns why the resume needs a
    conversion to DeepSpeed's universal checkpoint (another layout or ZeRO stage), or None."""
    from pretrain.reshard import needs_conversion

    current = cfg.to_dict()
    for section, key in PER_INVOCATION:
        saved["config"].get(section, {}).pop(key, None)
        current[section].pop(key, None)
    shape, other = compare_configs(saved["config"], current)
    if shape:
        raise CheckpointError("the checkpoint's model differs from the config: " + "; ".join(shape))
    for line in other:
        log(f"[checkpoint] setting changed since the checkpoint: {line}")
    return needs_conversion(saved, {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "zero_stage": cfg.zero.stage})


if __name__ == "__main__":
    sys.exit(main())
