"""Building the job: the run directory, the parallel layout and its process groups, the model
(the same plain GPT on every rank, then parallelized), the DeepSpeed engine and what feeds it.

    open_run()   run directory, log, layout, groups, checkpointer   (before the resume is located)
    build_job()  model, parallelism, engine, data, runner           (after: the engine may have to load
                                                                     a checkpoint of another layout)
Nothing here trains or restores state: that is pretrain/restore.py and pretrain/loop.py.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pretrain.checkpoint import Checkpointer
from pretrain.config import Config, check_world, parse_blend
from pretrain.data import SampleStream, Tokenizer, TokenStream, build_train_dataset
from pretrain.distributed import DistInfo, barrier
from pretrain.ds_compat import deepspeed_version_note
from pretrain.guard import BadStepGuard, SpikeDetector
from pretrain.metrics import say
from pretrain.parallel import (
    DeepSpeedMPU,
    Layout,
    data_parallel_group,
    initialize_groups,
    layout_for,
    needs_mpu,
    pipeline_parallel_group,
    tensor_parallel_group,
    ulysses_group,
    zero_group,
)


@dataclass
class Run:
    """What exists before the model: where the run lives and how the ranks are laid out."""

    cfg: Config
    tokenizer: Tokenizer
    dist: DistInfo
    run_dir: Path
    log: Callable[[str], None]
    layout: Layout
    coords: tuple[int, int, int]  # this rank's (pp, dp, tp)
    groups: dict  # "dp" / "tp" / "pp" / "sp" (Ulysses) / "zero" (dp x sp) process groups (None = every rank / not used)
    grad_accum: int
    checkpointer: Checkpointer

    @property
    def dp_rank(self) -> int:
        return self.coords[1]


@dataclass
class Job:
    """A run with its model built: everything the loop needs."""

    run: Run
    model: Any  # the plain GPT (its blocks are the engine module's, sharded in place)
    module: Any  # what the engine wraps: the GPT, or this rank's PipelineModule stage
    engine: Any
    runner: Any  # pretrain/runner.py: one step / eval batch / probe on either engine kind
    stream: SampleStream
    valid: TokenStream
    guard: BadStepGuard
    spikes: SpikeDetector
    local_params: int
    flops_per_token: float

    @property
    def cfg(self) -> Config:
        return self.run.cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_run(cfg: Config, tokenizer: Tokenizer, dist: DistInfo) -> Run:
    run_dir = Path(cfg.run.dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    log_file = run_dir / "train.log"

    def log(msg: str) -> None:
        say(msg, dist.is_main, log_file)

    layout = layout_for(cfg, dist.world_size)
    if layout.needs_groups:
        initialize_groups(layout)
    groups = {
        "dp": data_parallel_group(layout),
        "tp": tensor_parallel_group(layout),
        "pp": pipeline_parallel_group(layout),
        "sp": ulysses_group(layout),
        "zero": zero_group(layout),
    }
    if note := deepspeed_version_note():
        log(f"[warning] {note}")
    checkpointer = Checkpointer(
        run_dir / "checkpoints", dist.rank, cfg.checkpoint.keep_last, cfg.checkpoint.verify, log
    )
    return Run(
        cfg,
        tokenizer,
        dist,
        run_dir,
        log,
        layout,
        layout.coords(dist.rank),
        groups,
        check_world(cfg, dist.world_size),
        checkpointer,
    )


def cpu_kernels_line(cfg: Config) -> str:
    """Loads (building on first use) the fused CPU kernels now rather than in the first step, and says which
    this run uses; builds nothing for a run that would use none (not fp32, or compiled with dropout and without the
    fused loss)."""
    from kernels import cpu_kernels
    from kernels.cpu_attention import MAX_SEQ_LEN

    used = []
    if cfg.train.precision == "fp32":
        if not cfg.train.compile:  # compiled, inductor fuses these itself
            used += ["RMSNorm", "junction", "SwiGLU", "RoPE"]
        if cfg.model.dropout == 0 and cfg.model.seq_len <= MAX_SEQ_LEN:  # cpu_attention's op, compiled or not
            used.append("attention")
        if cfg.train.fused_loss and cfg.parallel.tp == 1:  # inside the fused loss's custom op, compiled or not
            used.append("cross-entropy")
    if not used:
        return "[kernels] CPU: fused kernels not used (they serve fp32 steps; inductor fuses compiled ones)"
    t0 = time.perf_counter()
    loaded = cpu_kernels.load() is not None
    took = time.perf_counter() - t0
    if loaded:
        return f"[kernels] CPU: fused {', '.join(used)} kernels loaded in {took:.1f} s (fp32)"
    return f"[kernels] CPU: fused kernels off ({cpu_kernels.status()}); torch's ops run"


def build_model(run: Run):
    """The plain GPT, identical on every rank whatever the layout (same seed, same init)."""
    from model import build_model as build_gpt

    m = run.cfg.model
    seed_everything(run.cfg.run.seed)
    # Each rank materializes only its own part later (pretrain/sharded_init.py); checkpoint.init_from loads a
    # whole state dict into the plain model, which is then built whole.
    whole = bool(run.cfg.checkpoint.init_from)
    model, backend_reason = build_gpt(m, run.cfg.kernels.backend, run.dist.device, materialize=whole)
    model.loss_spec = loss_spec(run.cfg)
    run.log(
        f"[model] placement={m.placement} norm={m.norm} d={m.hidden_size} L={m.num_layers} heads={m.num_heads}"
        f"/{m.num_kv_heads} ffn={m.ffn_hidden_size} vocab={m.vocab_size}: {model.num_params():,} parameters "
        f"({model.num_params(embedding=False):,} non-embedding)"
    )
    kinds = model.junction_kinds()
    run.log(
        f"[kernels] norm backend {backend_reason}; sublayer junctions: "
        + ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds))
    )
    if run.dist.device.type == "cpu":
        run.log(cpu_kernels_line(run.cfg))
    layout = run.layout
    run.log(
        f"[parallel] world {run.dist.world_size} = pp {layout.pp} x dp {layout.dp} x "
        + (f"sp {layout.ulysses} (Ulysses) x " if layout.ulysses > 1 else "")
        + f"tp {layout.tp} (tp fastest)"
        + (", sequence parallel" if layout.sequence_parallel else "")
        + "\n"
        + layout.rank_map()
    )
    run.log(
        "[init] the whole model on every rank (checkpoint.init_from loads its weights into it)"
        if whole
        else "[init] sharded: built on the meta device; each rank materializes only its own parameters, with the "
        "values of the full build"
    )
    return model


def loss_spec(cfg: Config):
    from model.loss import LossSpec

    return LossSpec(fused=cfg.train.fused_loss, z_loss=cfg.train.z_loss)


def parallelize(run: Run, model):
    """Tensor parallelism and activation checkpointing in place; the pipeline stage under pp > 1.
    Returns the module the engine wraps."""
    from model.parallelize import apply_tensor_parallel
    from model.recompute import apply_activation_checkpointing
    from pretrain.checkpoint.universal import universal_checkpoint_info
    from pretrain.sharded_init import plan_init

    cfg, layout = run.cfg, run.layout
    plan = plan_init(model, cfg.run.seed)  # None: built whole (checkpoint.init_from)
    with torch.device("meta") if plan is not None else nullcontext():  # new TP layers stay unmaterialized
        apply_tensor_parallel(model, layout.tp, run.coords[2], layout.sequence_parallel)
    if layout.ulysses > 1:
        from model.ulysses import apply_ulysses

        apply_ulysses(model, run.groups["sp"])
    apply_activation_checkpointing(model.blocks, cfg.train.activation_checkpointing, cfg.train.checkpoint_blocks)
    budget = cfg.train.compile_memory_budget
    budget_note = f", activation memory budget {budget:g}" if budget < 1 else ""
    if cfg.train.compile and cfg.train.compile_scope == "model":  # after TP, which changes what runs
        model.compile_model(memory_budget=budget)
        run.log(
            f"[compile] torch.compile on the whole model{budget_note} (compiled at the first step; the time it "
            "took is logged after the second)"
        )
    elif cfg.train.compile:  # after TP and recomputation, which change what each block runs
        model.compile_blocks(memory_budget=budget)
        run.log(
            f"[compile] torch.compile on each of the {len(model.blocks)} blocks{budget_note} (compiled at the "
            "first step; the time it took is logged after the second)"
        )
    if layout.pp > 1:
        from model.pipeline import build_pipeline
        from pretrain.sharded_init import check_stage, stage_modules

        if plan is not None:  # before DeepSpeed's PipelineModule, which moves and broadcasts its layers
            layers, parts = stage_modules(model, cfg, layout, run.coords[0])
            materialize_local(run, model, plan, layers)
        module = build_pipeline(model, layout, cfg.parallel.pp_partition)
        if plan is not None:
            check_stage(module, parts)
        run.log(
            f"[parallel] pipeline stages (first layer of each; embedding=0, blocks 1..{cfg.model.num_layers}, "
            f"final norm, head): {[int(p) for p in module.parts]}"
        )
    else:
        module = model
        if plan is not None:
            materialize_local(run, model, plan, [model])
        if cfg.zero.stage == 3:
            model.register_zero3_external_parameters()
    # Saved in every checkpoint, so any checkpoint can later be resharded (pretrain/checkpoint/universal.py).
    module.universal_checkpoint_info = universal_checkpoint_info(
        module, cfg.model.num_layers, cfg.model.mlp == "swiglu"
    )
    return module


def materialize_local(run: Run, model, plan, modules) -> None:
    """This rank's parameters of `modules`, with the full build's values; under ZeRO-3 each is partitioned
    over dp x ulysses as soon as it is made (pretrain/sharded_init.py)."""
    from pretrain.engine import deepspeed_config
    from pretrain.sharded_init import Zero3Partitioner, local_parameters, materialize_parameters

    partition = None
    if run.cfg.zero.stage == 3:
        mpu = DeepSpeedMPU() if needs_mpu(run.layout) else None
        partition = Zero3Partitioner(deepspeed_config(run.cfg, run.grad_accum), run.groups["zero"], mpu)
    params = local_parameters(model, modules)
    materialize_parameters(plan, params, run.dist.device, run.layout.tp, run.coords[2], partition)
    run.log(
        f"[init] rank 0 materialized {len(params)} parameters"
        + (", each partitioned by ZeRO-3 as it was made" if partition is not None else "")
    )


def seed_rank_streams(run: Run) -> None:
    """Dropout streams: alike across tp (replicated activations), distinct across dp and pp; a second
    stream, distinct across tp, for split data (model/parallel_rng.py). Restored on resume."""
    from model.parallel_rng import TP_RNG

    pp_rank, dp_rank, tp_rank = run.coords
    dp_rank = dp_rank * run.layout.ulysses + run.layout.sp_rank(run.dist.rank)  # Ulysses slices: their own masks
    seed = run.cfg.run.seed
    seed_everything(seed + 1 + dp_rank + 1009 * pp_rank)
    if run.layout.tp > 1:
        TP_RNG.seed(seed + 2718 + tp_rank + 1009 * pp_rank + 100003 * dp_rank)


def build_job(run: Run, model, load_universal: bool) -> Job:
    """`model`: the plain GPT from build_model (already holding checkpoint.init_from's weights on a
    fresh start). load_universal: the engine will load a checkpoint of another layout."""
    from pretrain.engine import build_engine
    from pretrain.runner import EngineRunner, PipelineRunner
    from pretrain.zero import offload_summary

    cfg, layout, dist = run.cfg, run.layout, run.dist
    m, t = cfg.model, cfg.train
    flops_per_token = model.flops_per_token()
    module = parallelize(run, model)
    # ds_numel: a parameter ZeRO-3 partitioned at start-up (pretrain/sharded_init.py) holds no data of its own
    local_params = sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in module.parameters()}.values())
    engine, _ = build_engine(
        module, cfg, run.grad_accum, mpu=DeepSpeedMPU() if needs_mpu(layout) else None, load_universal=load_universal
    )
    if note := offload_summary(cfg):
        run.log(note)
    seed_rank_streams(run)
    stream = SampleStream(
        build_train_dataset(
            parse_blend("data.train", cfg.data.train), run.tokenizer, m.seq_len, cfg.run.seed, cfg.data.cache_dir
        ),
        cfg.run.seed,
    )
    valid = TokenStream(
        [p for _, p in parse_blend("data.valid", cfg.data.valid)],
        m.seq_len,
        max_tokens=t.eval_batches * t.global_batch_size * m.seq_len,
    )
    guard = BadStepGuard(engine, t.bad_step_policy, t.max_bad_steps, dist.device)
    runner = (PipelineRunner if layout.pp > 1 else EngineRunner)(
        engine, stream, cfg, layout, run.dp_rank, run.grad_accum, dist.device, run.groups, guard=guard
    )
    return Job(
        run,
        model,
        module,
        engine,
        runner,
        stream,
        valid,
        guard,
        SpikeDetector(t.spike_sigma, t.spike_window),
        local_params,
        flops_per_token,
    )
