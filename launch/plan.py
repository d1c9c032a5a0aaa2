"""python -m launch.plan --config FILE --nodes N --gpus-per-node G [--gpu-memory 80GB] [--set K=V ...]

A dry run of a cluster launch, before any GPU hour is spent: validates the config against the
world size (nodes x GPUs per node), prints the rank -> (node, pp, dp, tp) map, tokens per step and
the per-GPU memory for the chosen ZeRO stage -- parameters, gradients, optimizer states and
activations with and without activation checkpointing -- against the GPU's memory, with a
verdict. When a size does not divide, it says which sizes would; when the job does not fit, it
lists the changes that would make it fit (more tensor/pipeline parallelism, a higher ZeRO stage,
activation checkpointing, a smaller micro-batch), each with its estimate.

How the figures are made (formulas in pretrain/memory.py):
  * parameters are counted on the real model, built on PyTorch's meta device (no memory) by the
    trainer's own code (model/inventory.py), split the way model/parallelize.py shards them over
    tensor-parallel ranks, and over pipeline stages by DeepSpeed's own partitioner with the weights
    PipelineModule gives it (model/pipeline.py; tested against a real PipelineModule);
  * model states follow DeepSpeed's allocation per ZeRO stage and precision (checked against the
    bytes a live engine holds, tests/test_plan.py);
  * activations follow Korthikanti et al. (2022) term by term for this model's blocks; under 1F1B
    pipeline parallelism stage s holds min(pp - s, accumulation steps) micro-batches in flight.
Not counted: the CUDA context and NCCL buffers, DeepSpeed's communication buckets, allocator
fragmentation. The verdict keeps --headroom (default 10%) of the GPU for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field

from kernels.errors import PretrainError, UsageError
from model.inventory import Inventory, model_inventory
from pretrain.cli import run
from pretrain.config import Config, ConfigError, check_world, config_from_dict, load_config, resolve, tokenizer_path
from pretrain.distributed import prefer_cpu_accelerator_if_no_gpu
from pretrain.memory import (
    BYTES,
    ZERO3_PERSISTENCE_DEFAULT,
    BlockShape,
    activation_bytes,
    output_layer_bytes,
    zero_state_bytes,
)
from pretrain.parallel import Layout

GIB = 2**30
DEFAULT_GPU_MEMORY = "80GB"
DEFAULT_HEADROOM = 0.10
MODES = ("none", "selective", "full")


class PlanError(PretrainError):
    """The layout cannot run; `problems` lists every reason, each with the sizes that would work."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# ------------------------------------------------------------------------------------ inputs


_UNITS = {
    "": GIB,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_memory(text: str) -> int:
    """'80GB', '80G', '80GiB', '81559MiB', '80' (GiB) -> bytes. GB means GiB here, as GPU vendors use it
    (an "80GB" H100 reports 81559 MiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"--gpu-memory: '{text}' is not a memory size; use e.g. 80GB, 40GiB, 81559MiB")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UsageError(f"--gpu-memory: '{text}' must be positive")
    return int(value)


def load_plan_config(path: str, overrides: list[str], vocab_size: int | None = None) -> Config:
    """The config as training resolves it. The vocabulary comes from model.vocab_size, else --vocab-size,
    else the tokenizer the config points at."""
    cfg = load_config(path, overrides)
    if cfg.model.vocab_size == 0 and vocab_size is None:
        tok = tokenizer_path(cfg.data)
        try:
            from pretrain.data import Tokenizer

            vocab_size = Tokenizer(tok).vocab_size
        except Exception as e:
            raise ConfigError(
                f"model.vocab_size: 0 (the tokenizer's) but the tokenizer '{tok}' cannot be read "
                f"({type(e).__name__}: {e}); pass --vocab-size N or --set model.vocab_size=N"
            ) from None
    return resolve(cfg, vocab_size)


# ----------------------------------------------------------------------------- estimation


@dataclass
class StageEstimate:
    stage: int
    layers: list  # layer names on this stage
    blocks: list  # global 1-based block indices on this stage
    params: int  # unique parameters on one rank of this stage (its tp shard)
    in_flight: int  # micro-batches whose activations are held at once
    parameters: float
    gradients: float
    optimizer: float
    gathered: float  # ZeRO-3: full weights gathered for compute (a block and the prefetched next)
    activations: dict  # "none" / "selective" / "full" (every block so) and "chosen" (the config's)

    @property
    def states(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.gathered

    @property
    def total(self) -> float:
        return self.states + self.activations["chosen"]

    def total_with(self, mode: str) -> float:
        return self.states + self.activations[mode]


def _ds_zero_settings(cfg: Config) -> dict:
    if not cfg.zero.ds_config:
        return {}
    from pretrain.engine import load_user_ds_config

    return load_user_ds_config(cfg.zero.ds_config).get("zero_optimization", {}) or {}


def estimate(cfg: Config, world: int, inv: Inventory | None = None) -> list[StageEstimate]:
    """Per-GPU memory of one rank of every pipeline stage (tp ranks of a stage hold the same amount)."""
    inv = inv or model_inventory(cfg.model)
    m, t, p = cfg.model, cfg.train, cfg.parallel
    tp, pp = p.tp, p.pp
    dp = world // (tp * pp)
    accumulation = t.global_batch_size // (t.micro_batch_size * dp)
    zero = cfg.zero.stage
    ds = _ds_zero_settings(cfg)
    threshold = int(ds.get("stage3_param_persistence_threshold", ZERO3_PERSISTENCE_DEFAULT))
    offload_optimizer = (ds.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    act_b = BYTES[t.precision]
    shape = BlockShape(
        hidden=m.hidden_size,
        heads=m.num_heads,
        kv_heads=m.num_kv_heads,
        ffn=m.ffn_hidden_size,
        mlp=m.mlp,
        norms=inv.block_norms,
        qk_norm=inv.qk_norm,
        dropout=m.dropout > 0,
    )
    per_block = activation_bytes(
        shape, m.seq_len, t.micro_batch_size, tp=tp, sequence_parallel=p.sequence_parallel, act_bytes=act_b
    )
    tokens = m.seq_len * t.micro_batch_size
    embed_out = tokens * act_b * m.hidden_size / (tp if p.sequence_parallel else 1)
    head = output_layer_bytes(m.seq_len, t.micro_batch_size, m.vocab_size, tp, act_b)
    chosen = [
        t.activation_checkpointing if (t.checkpoint_blocks == 0 or i < t.checkpoint_blocks) else "none"
        for i in range(m.num_layers)
    ]
    if pp > 1:
        prefer_cpu_accelerator_if_no_gpu()  # DeepSpeed cuts the stages; it picks its accelerator at import
        parts = inv.stage_boundaries(tp, pp, p.pp_partition)
    else:
        parts = [0, len(inv.layers)]
    out = []
    for s in range(pp):
        idx = list(range(parts[s], parts[s + 1]))
        if pp == 1:
            names = list(inv.numel)  # the plain model: every parameter once (a tied head is the embedding)
        else:
            names = list(dict.fromkeys(n for i in idx for n in inv.layers[i]))
        shards = [inv.shard(n, tp) for n in names]
        n_params = sum(shards)
        z3_part = sum(-(-n // dp) for n in shards)
        z3_persist = sum(n for n in shards if n <= threshold)
        st = zero_state_bytes(
            n_params, zero, dp, t.precision, zero3_partition=z3_part, zero3_persistent=z3_persist, pipeline=pp > 1
        )
        blocks = [int(inv.layer_names[i].split()[1]) for i in idx if inv.layer_names[i].startswith("block")]
        block_params = [sum(inv.shard(n, tp) for n in inv.layers[b]) for b in blocks]  # layer index == block index
        gathered = 2 * BYTES[t.precision] * max(block_params, default=0) if zero == 3 else 0.0
        in_flight = min(pp - s, accumulation) if pp > 1 else 1
        ends = (embed_out if 0 in idx else 0.0, head if len(inv.layers) - 1 in idx else 0.0)
        activations = {
            mode: _stage_activations(per_block, blocks, [mode] * m.num_layers, in_flight, *ends) for mode in MODES
        }
        activations["chosen"] = _stage_activations(per_block, blocks, chosen, in_flight, *ends)
        out.append(
            StageEstimate(
                stage=s,
                layers=[inv.layer_names[i] for i in idx],
                blocks=blocks,
                params=n_params,
                in_flight=in_flight,
                parameters=st["parameters"],
                gradients=st["gradients"],
                optimizer=0.0 if offload_optimizer else st["optimizer"],
                gathered=gathered,
                activations=activations,
            )
        )
    return out


def _stage_activations(
    per_block: dict, blocks: list[int], modes: list[str], in_flight: int, embed_out: float, head: float
) -> float:
    """Activation bytes of a stage: what its blocks store (modes[l - 1] is block l's checkpointing) and the
    embedding output, per micro-batch in flight; one block's full set while a checkpointed block is
    recomputed; the logits and loss of the last stage."""
    stored = sum(per_block[modes[b - 1]] for b in blocks) + embed_out
    working = per_block["none"] if any(modes[b - 1] == "full" for b in blocks) else 0.0
    return in_flight * stored + working + head


# ------------------------------------------------------------------ validation and search


def layout_problems(cfg: Config, world: int, gpus_per_node: int, allow_uneven: bool = False) -> list[str]:
    """Everything about this layout on this world that cannot run, each with the sizes that would."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    problems = []
    mp = p.tp * p.pp
    if world % mp:
        fit = ", ".join(f"tp {a} x pp {b}" for a, b in valid_layouts(cfg, world, gpus_per_node, allow_uneven))
        problems.append(
            f"world size {world} is not a multiple of parallel.tp x parallel.pp = {p.tp} x {p.pp} = {mp}; "
            f"world sizes that work with this layout: {', '.join(str(mp * k) for k in range(1, 9))}, ...; "
            f"layouts that divide {world} GPUs for this model: {fit or 'none'}"
        )
    elif t.global_batch_size % (t.micro_batch_size * (world // mp)):
        try:
            check_world(cfg, world)
        except ConfigError as e:
            dp = world // mp
            micros = [b for b in range(1, t.micro_batch_size * 2 + 1) if t.global_batch_size % (b * dp) == 0]
            nodes = [
                n
                for n in range(1, 65)
                if (n * gpus_per_node) % mp == 0
                and t.global_batch_size % (t.micro_batch_size * (n * gpus_per_node // mp)) == 0
            ]
            problems.append(
                f"{e}"
                + (
                    f"; or train.micro_batch_size in {', '.join(map(str, micros))} keeps "
                    f"global_batch_size {t.global_batch_size} over dp {dp}"
                    if micros
                    else f"; no micro-batch size makes {t.global_batch_size} divide over dp {dp}"
                )
                + (
                    f"; node counts of {gpus_per_node} GPUs that work as configured: {', '.join(map(str, nodes))}"
                    if nodes
                    else ""
                )
            )
    if p.pp > 1 and m.num_layers % p.pp and not allow_uneven:
        pps = [d for d in range(1, m.num_layers + 1) if m.num_layers % d == 0]
        problems.append(
            f"parallel.pp: {p.pp} does not divide model.num_layers={m.num_layers}: stages would hold "
            f"unequal numbers of blocks; pipeline sizes that divide it: {', '.join(map(str, pps))} "
            f"(--allow-uneven-stages to plan it anyway)"
        )
    return problems


def layout_warnings(cfg: Config, world: int, gpus_per_node: int) -> list[str]:
    p = cfg.parallel
    out = []
    if p.tp > gpus_per_node:
        out.append(
            f"parallel.tp={p.tp} spans nodes ({gpus_per_node} GPUs per node): tensor parallelism all-reduces "
            f"every layer and should stay inside a node's NVLink domain; use tp <= {gpus_per_node} and pp for the rest"
        )
    elif gpus_per_node % p.tp:
        out.append(
            f"parallel.tp={p.tp} does not divide the {gpus_per_node} GPUs per node: some tensor-parallel groups "
            f"will span two nodes"
        )
    if p.tp > 1 and not p.sequence_parallel:
        out.append(
            "parallel.sequence_parallel is off with tp > 1: norm and dropout activations are replicated on every "
            "tensor-parallel rank (sequence_parallel: true divides them by tp)"
        )
    return out


def with_changes(cfg: Config, changes: dict) -> Config:
    """A copy of a resolved config with SECTION.KEY values replaced, validated as training would."""
    data = cfg.to_dict()
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    return resolve(config_from_dict(data))


def valid_layouts(cfg: Config, world: int, gpus_per_node: int, allow_uneven: bool = False) -> list[tuple[int, int]]:
    """(tp, pp) pairs that run this model on `world` GPUs (tp inside a node; ZeRO capped at 1 under pp;
    the micro-batch left as configured, so the batch arithmetic must hold)."""
    out = []
    for tp in _divisors(min(world, gpus_per_node)):
        for pp in _divisors(world // tp):
            if pp > cfg.model.num_layers:
                continue
            cand = _candidate(
                cfg,
                {
                    "parallel.tp": tp,
                    "parallel.pp": pp,
                    "parallel.sequence_parallel": cfg.parallel.sequence_parallel and tp > 1,
                    "zero.stage": min(cfg.zero.stage, 1) if pp > 1 else cfg.zero.stage,
                },
            )
            if cand is not None and not layout_problems(cand, world, gpus_per_node, allow_uneven):
                out.append((tp, pp))
    return out


def _candidate(cfg: Config, changes: dict) -> Config | None:
    changes = {k: v for k, v in changes.items() if _get(cfg, k) != v}
    if not changes:
        return cfg
    try:
        return with_changes(cfg, changes)
    except ConfigError:
        return None


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_CKPT_ORDER = {"none": 0, "selective": 1, "full": 2}


def suggestions(
    cfg: Config,
    world: int,
    gpus_per_node: int,
    usable: float,
    inv: Inventory | None = None,
    allow_uneven: bool = False,
    limit: int = 6,
) -> list[tuple[dict, float]]:
    """Changes that make the job fit in `usable` bytes per GPU, fewest changes first (then less model
    parallelism, bigger micro-batches, less recomputation): [(changes, worst-stage bytes)]."""
    inv = inv or model_inventory(cfg.model)
    t, p = cfg.train, cfg.parallel
    ckpts = [c for c in MODES if _CKPT_ORDER[c] >= _CKPT_ORDER[t.activation_checkpointing]]
    micros = [b for b in _divisors(t.micro_batch_size)]
    found = []
    for tp in _divisors(min(world, gpus_per_node)):
        for pp in _divisors(world // tp):
            if pp > cfg.model.num_layers:
                continue
            for zero in range(cfg.zero.stage, 4):
                if pp > 1 and zero > 1:
                    continue
                for ckpt in ckpts:
                    for micro in micros:
                        changes = {
                            "parallel.tp": tp,
                            "parallel.pp": pp,
                            "zero.stage": zero,
                            "train.activation_checkpointing": ckpt,
                            "train.micro_batch_size": micro,
                            "parallel.sequence_parallel": tp > 1 and (p.sequence_parallel or tp != p.tp),
                        }
                        changes = {k: v for k, v in changes.items() if _get(cfg, k) != v}
                        if not changes:
                            continue
                        cand = _candidate(cfg, changes)
                        if cand is None or layout_problems(cand, world, gpus_per_node, allow_uneven):
                            continue
                        worst = max(s.total for s in estimate(cand, world, inv))
                        if worst <= usable:
                            found.append((changes, worst, tp * pp, -micro, _CKPT_ORDER[ckpt], zero))
    found.sort(key=lambda f: (len(f[0]), f[2], f[3], f[4], f[5], f[1]))
    return [(f[0], f[1]) for f in found[:limit]]


# --------------------------------------------------------------------------------- report


@dataclass
class Plan:
    cfg: Config
    nodes: int
    gpus_per_node: int
    gpu_memory: int
    headroom: float
    stages: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    suggestions: list = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def layout(self) -> Layout:
        p = self.cfg.parallel
        return Layout(tp=p.tp, pp=p.pp, dp=self.world // (p.tp * p.pp), sequence_parallel=p.sequence_parallel)

    @property
    def accumulation(self) -> int:
        return check_world(self.cfg, self.world)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_len

    @property
    def usable(self) -> float:
        return self.gpu_memory * (1 - self.headroom)

    @property
    def worst(self) -> StageEstimate:
        return max(self.stages, key=lambda s: s.total)

    @property
    def verdict(self) -> str:
        total = self.worst.total
        if total <= self.usable:
            return "fits"
        if total <= self.gpu_memory:
            return "tight"
        return "does not fit"

    def rank_map(self, limit: int = 64) -> list[str]:
        lay, g = self.layout, self.gpus_per_node
        lines = []
        ranks = list(range(self.world))
        if len(ranks) > limit:  # the first and the last ranks, so both ends of the layout show
            tail = max(limit // 2, 1)
            head = max(limit - tail, 1)
            ranks = ranks[:head] + [None] + ranks[-tail:]
        for r in ranks:
            if r is None:
                lines.append(f"  ... ({self.world - head - tail} more ranks; --map-limit N prints more)")
                continue
            pp, dp, tp = lay.coords(r)
            lines.append(f"  rank {r:>5}: node {r // g:>3} gpu {r % g} -> pp {pp} dp {dp:>3} tp {tp}")
        return lines

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "world": self.world,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "sequence_parallel": lay.sequence_parallel},
            "zero_stage": self.cfg.zero.stage,
            "precision": self.cfg.train.precision,
            "activation_checkpointing": self.cfg.train.activation_checkpointing,
            "global_batch_size": self.cfg.train.global_batch_size,
            "micro_batch_size": self.cfg.train.micro_batch_size,
            "accumulation": self.accumulation,
            "tokens_per_step": self.tokens_per_step,
            "gpu_memory_bytes": self.gpu_memory,
            "usable_bytes": self.usable,
            "verdict": self.verdict,
            "ranks": [
                dict(
                    zip(
                        ("node", "gpu", "pp", "dp", "tp"),
                        (r // self.gpus_per_node, r % self.gpus_per_node, *lay.coords(r)),
                        strict=True,
                    )
                )
                for r in range(self.world)
            ],
            "stages": [dict(dataclasses.asdict(s), states=s.states, total=s.total) for s in self.stages],
            "warnings": self.warnings,
            "suggestions": [{"changes": c, "total_bytes": b} for c, b in self.suggestions],
        }


def make_plan(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    gpu_memory: int = parse_memory(DEFAULT_GPU_MEMORY),
    headroom: float = DEFAULT_HEADROOM,
    allow_uneven: bool = False,
    search: bool = True,
) -> Plan:
    """Validates and estimates; raises PlanError listing every problem with the sizes that would work."""
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError([f"--nodes {nodes} / --gpus-per-node {gpus_per_node}: both must be >= 1"])
    world = nodes * gpus_per_node
    problems = layout_problems(cfg, world, gpus_per_node, allow_uneven)
    if problems:
        raise PlanError(problems)
    inv = model_inventory(cfg.model)
    plan = Plan(
        cfg,
        nodes,
        gpus_per_node,
        gpu_memory,
        headroom,
        stages=estimate(cfg, world, inv),
        warnings=layout_warnings(cfg, world, gpus_per_node),
    )
    if search and plan.verdict != "fits":
        plan.suggestions = suggestions(cfg, world, gpus_per_node, plan.usable, inv, allow_uneven)
    return plan


def _g(x: float) -> str:
    return f"{x:>17,.0f} B {x / GIB:8.2f} GiB"


def format_plan(plan: Plan, config_path: str = "", map_limit: int = 64) -> str:
    cfg, lay = plan.cfg, plan.layout
    m, t = cfg.model, cfg.train
    inv = model_inventory(m)
    lines = [
        f"plan: {config_path or cfg.run.name} on {plan.nodes} node(s) x {plan.gpus_per_node} GPUs = "
        f"{plan.world} ranks, {plan.gpu_memory / GIB:.0f} GiB each",
        f"model   : d={m.hidden_size} L={m.num_layers} heads={m.num_heads}/{m.num_kv_heads} ffn={m.ffn_hidden_size} "
        f"({m.mlp}) vocab={m.vocab_size} seq={m.seq_len} placement={m.placement}: {inv.total:,} parameters",
        f"layout  : tp {lay.tp} x pp {lay.pp} x dp {lay.dp} (tp fastest)"
        + (", sequence parallel" if lay.sequence_parallel else "")
        + (f", stages by {cfg.parallel.pp_partition}" if lay.pp > 1 else "")
        + f"; ZeRO-{cfg.zero.stage}; {t.precision}; activation checkpointing {t.activation_checkpointing}"
        + (f" (first {t.checkpoint_blocks} blocks)" if t.checkpoint_blocks else ""),
        f"batch   : global {t.global_batch_size} = micro {t.micro_batch_size} x dp {lay.dp} x accumulation "
        f"{plan.accumulation}; {plan.tokens_per_step:,} tokens per step; "
        f"{t.max_steps * plan.tokens_per_step / 1e9:,.1f}B tokens in {t.max_steps:,} steps",
        "",
        "rank map (rank: node gpu -> pp dp tp):",
        *plan.rank_map(map_limit),
        "",
    ]
    if lay.pp > 1:
        lines.append(
            "pipeline stages (one rank of each; DeepSpeed's partition of "
            f"{'parameters' if cfg.parallel.pp_partition == 'parameters' else 'blocks'}):"
        )
        for s in plan.stages:
            span = f"{s.layers[0]} .. {s.layers[-1]}" if len(s.layers) > 1 else s.layers[0]
            lines.append(
                f"  stage {s.stage}: {span:<26} {s.params:>15,} params  {s.in_flight} micro-batch(es) in "
                f"flight  total {s.total / GIB:7.2f} GiB"
            )
        lines.append("")
    w = plan.worst
    n = w.params
    b = BYTES[t.precision]
    zero = cfg.zero.stage
    where = f"pp stage {w.stage}, " if lay.pp > 1 else ""
    lines += [
        f"memory per GPU ({where}{n:,} parameters on this rank = its tp 1/{lay.tp} shard"
        + (" of its stage" if lay.pp > 1 else "")
        + f"; ZeRO-{zero} over dp {lay.dp}):",
        f"  parameters   {_g(w.parameters)}   {t.precision} weights"
        + (", 1/dp partition" if zero == 3 else ", full copy"),
        f"  gradients    {_g(w.gradients)}   {t.precision}" + (", 1/dp partition" if zero >= 2 else ", full"),
        f"  optimizer    {_g(w.optimizer)}   "
        + (
            "offloaded (zero.ds_config offload_optimizer)"
            if w.optimizer == 0 and n
            else ("fp32 Adam m, v" if t.precision == "fp32" and zero in (0, 3) else "fp32 master + Adam m, v")
            + (" on the full model" if zero == 0 and not (lay.pp > 1 and t.precision == "bf16") else ", 1/dp partition")
        ),
    ]
    if w.gathered:
        lines.append(f"  gathered     {_g(w.gathered)}   ZeRO-3: full weights of a block and the prefetched next one")
    lines.append(
        f"  activations  {_g(w.activations['chosen'])}   micro-batch {t.micro_batch_size} x seq {m.seq_len}, "
        f"{len(w.blocks)} blocks, {w.in_flight} micro-batch(es) in flight, "
        f"checkpointing {t.activation_checkpointing}" + (", + logits/loss" if "head" in w.layers else "")
    )
    lines.append(
        f"  total        {_g(w.total)}   of {plan.gpu_memory / GIB:.0f} GiB "
        f"({plan.usable / GIB:.1f} GiB usable, {plan.headroom:.0%} kept for CUDA/NCCL/fragmentation): "
        f"{plan.verdict.upper()}"
    )
    lines.append("  activation checkpointing (the same rank):")
    for mode, what in (
        ("none", "everything stored"),
        ("selective", "attention core recomputed"),
        ("full", "block inputs only, blocks recomputed"),
    ):
        lines.append(f"    {mode:<10}{_g(w.activations[mode])} activations -> total {_g(w.total_with(mode))}  ({what})")
    lines.append(
        f"  (the activations of one block: Korthikanti et al. 2022 term by term for this block with fused SDPA "
        f"attention; {b}-byte activations)"
    )
    for warn in plan.warnings:
        lines.append(f"warning: {warn}")
    if plan.verdict != "fits":
        lines.append("")
        if plan.suggestions:
            lines.append(f"does not fit in {plan.usable / GIB:.1f} GiB; changes that would (estimated total per GPU):")
            for changes, total in plan.suggestions:
                sets = " ".join(f"--set {k}={_yaml(v)}" for k, v in changes.items())
                lines.append(f"  {total / GIB:7.2f} GiB  {sets}")
        else:
            states = sum(s.states for s in plan.stages) / len(plan.stages)
            lines.append(
                f"no layout of {plan.world} GPUs with the configured batch fits; more GPUs (ZeRO-3 divides the "
                f"model states by dp), CPU offload (zero.ds_config offload_optimizer) or a smaller model "
                f"(model states alone: {states / GIB:.1f} GiB per GPU now)"
            )
    return "\n".join(lines)


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.plan",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config (configs/gpt-*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    p.add_argument(
        "--gpu-memory",
        default=DEFAULT_GPU_MEMORY,
        help=f"memory of one GPU, e.g. 80GB, 40GiB, 81559MiB (GB = GiB; default {DEFAULT_GPU_MEMORY})",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=DEFAULT_HEADROOM,
        help="fraction of the GPU kept for what is not estimated (default 0.10)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary when model.vocab_size is 0 and the tokenizer is not at hand",
    )
    p.add_argument("--allow-uneven-stages", action="store_true", help="plan pp sizes that do not divide num_layers")
    p.add_argument("--map-limit", type=int, default=64, help="rank-map lines to print (default 64)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    gpu_memory = parse_memory(args.gpu_memory)
    if not 0 <= args.headroom < 1:
        raise UsageError(f"--headroom: {args.headroom} must be in [0, 1)")
    cfg = load_plan_config(args.config, args.set, args.vocab_size)
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, gpu_memory, args.headroom, args.allow_uneven_stages)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan, args.config, args.map_limit))
    return 0 if plan.verdict != "does not fit" else 1


if __name__ == "__main__":
    raise SystemExit(run(main))
