"""python -m launch.plan --config FILE --nodes N --gpus-per-node G [--gpu-memory 80GB] [--set K=V ...]
                       [--cpu-memory 1TB] [--nvme-capacity 28TB]

A dry run of a cluster launch, before any GPU hour is spent: validates the config against the
world size (nodes x GPUs per node), prints the rank -> (node, pp, dp, sp, tp) map, tokens per step and
the per-GPU memory for the chosen ZeRO stage -- parameters, gradients, optimizer states and
activations with and without activation checkpointing, and the peak while the job starts -- against
the GPU's memory, with what offloading (ZeRO-Offload / ZeRO-Infinity) puts in each node's CPU memory and
on its NVMe, and a verdict. When a size does not divide, it says which sizes would; when the job does not
fit, it lists the changes that would make it fit (more tensor/pipeline parallelism, a higher ZeRO stage,
activation checkpointing, a smaller micro-batch; offloading when nothing else does), each with its estimate.

How the figures are made (formulas in pretrain/memory.py):
  * parameters are counted on the real model, built on PyTorch's meta device (no memory) by the
    trainer's own code (model/inventory.py), split the way model/parallelize.py shards them over
    tensor-parallel ranks, and over pipeline stages by DeepSpeed's own partitioner with the weights
    PipelineModule gives it (model/pipeline.py; tested against a real PipelineModule);
  * model states follow DeepSpeed's allocation per ZeRO stage and precision (checked against the
    bytes a live engine holds, tests/test_plan.py), partitioned over dp x ulysses; offloaded states as
    DeepSpeed 0.19 allocates them in CPU memory and on NVMe (not measured: the GPU-side figures are);
  * activations follow Korthikanti et al. (2022) term by term for this model's blocks, divided by the
    Ulysses size (each rank holds seq/ulysses tokens); under 1F1B pipeline parallelism stage s holds
    min(pp - s, accumulation steps) micro-batches in flight;
  * start-up: the sharded init's share and in-flight tensors (model/init.py replays the init, the same
    code that runs), then the engine's set-up; bench/startup_memory.py measures it (tests/test_sharded_init.py).
Not counted: the CUDA context and NCCL buffers, DeepSpeed's communication buckets, allocator
fragmentation. The verdict keeps --headroom (default 10%) of the GPU for them.
Accuracy: the model states within 0.2% of a live engine's (padding); activations and offloaded states
follow the formulas and DeepSpeed's code, unmeasured here; the papers' own figures, where they state any,
are reproduced in tests/test_presets.py.
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
    offloaded,
    output_layer_bytes,
    startup_bytes,
    zero_state_bytes,
)
from pretrain.parallel import Layout, layout_for

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


def parse_memory(text: str, flag: str = "--gpu-memory") -> int:
    """'80GB', '80G', '80GiB', '81559MiB', '80' (GiB) -> bytes. GB means GiB here, as GPU vendors use it
    (an "80GB" H100 reports 81559 MiB); TB means TiB likewise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"{flag}: '{text}' is not a memory size; use e.g. 80GB, 40GiB, 81559MiB, 1.5TB")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UsageError(f"{flag}: '{text}' must be positive")
    return int(value)


def load_plan_config(
    path: str, overrides: list[str], vocab_size: int | None = None, world_size: int | None = None
) -> Config:
    """The config as training resolves it (world_size rounds an `auto` batch to the data-parallel size). The
    vocabulary comes from model.vocab_size, else --vocab-size, else the tokenizer the config points at."""
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
    return resolve(cfg, vocab_size, world_size)


# ----------------------------------------------------------------------------- estimation


@dataclass
class StageEstimate:
    stage: int
    layers: list  # layer names on this stage
    blocks: list  # global 1-based block indices on this stage
    params: int  # unique parameters on one rank of this stage (its tp shard)
    in_flight: int  # micro-batches whose activations are held at once
    parameters: float  # on the GPU (what ZeRO-Offload / ZeRO-Infinity moves away is in `cpu` / `nvme`)
    gradients: float
    optimizer: float
    gathered: float  # ZeRO-3: full weights gathered for compute (see _zero3_gathered)
    activations: dict  # "none" / "selective" / "full" (every block so) and "chosen" (the config's)
    cpu: float = 0.0  # CPU memory this rank's offloaded states take
    nvme: float = 0.0  # NVMe bytes this rank's offloaded states take
    startup: float = 0.0  # peak bytes on the GPU while the job starts (sharded init, then the engine's set-up)
    startup_build: float = 0.0  # of which the sharded init (the model built, before DeepSpeed's engine)
    startup_whole: float = 0.0  # the same when the whole model is built first (checkpoint.init_from)

    @property
    def states(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.gathered

    @property
    def total(self) -> float:
        """GPU bytes during a training step."""
        return self.states + self.activations["chosen"]

    @property
    def peak(self) -> float:
        """GPU bytes at the worst moment: a training step, or start-up if that is more."""
        return max(self.total, self.startup)

    def total_with(self, mode: str) -> float:
        return self.states + self.activations[mode]


def _ds_zero_settings(cfg: Config) -> dict:
    if not cfg.zero.ds_config:
        return {}
    from pretrain.engine import load_user_ds_config

    return load_user_ds_config(cfg.zero.ds_config).get("zero_optimization", {}) or {}


def _offload_devices(cfg: Config, ds: dict) -> tuple[str, str]:
    """(optimizer, parameters) offload devices: zero.offload_*, or the user's DeepSpeed JSON's."""
    z = cfg.zero
    opt = z.offload_optimizer if z.offload_optimizer != "none" else (ds.get("offload_optimizer") or {}).get("device")
    par = z.offload_params if z.offload_params != "none" else (ds.get("offload_param") or {}).get("device")
    return opt or "none", par or "none"


# DeepSpeed's ZeRO-3 defaults (zero_optimization.stage3_*): elements gathered at most, and prefetched ahead
ZERO3_MAX_LIVE_DEFAULT = 1_000_000_000
ZERO3_PREFETCH_DEFAULT = 50_000_000


def _zero3_gathered(block_params: list[int], largest: int, ds: dict) -> int:
    """Elements ZeRO-3 holds whole at once: it fetches each layer's weights as the layer runs and the next
    ones up to stage3_prefetch_bucket_size ahead, keeping at most stage3_max_live_parameters (but always a whole
    parameter) -- for small models two blocks' worth, for large ones the cap --, and in backward the full
    gradient of the layer being differentiated until it is reduce-scattered (the largest parameter's)."""
    live = int(ds.get("stage3_max_live_parameters", ZERO3_MAX_LIVE_DEFAULT))
    prefetch = int(ds.get("stage3_prefetch_bucket_size", ZERO3_PREFETCH_DEFAULT))
    return min(2 * max(block_params, default=0), max(live, largest + prefetch)) + largest


_TRANSIENT: dict = {}


def init_transient(cfg: Config, copy_bytes: int) -> int:
    """The sharded init's in-flight bytes (model/init.py transient_peak) for this model (cached)."""
    import json

    from model.gpt import build_model
    from model.init import init_steps, parameter_names

    key = (json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), copy_bytes)
    if key not in _TRANSIENT:
        from model.init import transient_peak

        gpt, _ = build_model(cfg.model, "torch", "cpu", materialize=False)
        names = parameter_names(gpt)
        shapes = {names[id(p)]: (p.shape, p.dtype) for p in gpt.parameters()}
        _TRANSIENT[key] = transient_peak(init_steps(gpt), shapes, copy_bytes)
    return _TRANSIENT[key]


def estimate(cfg: Config, world: int, inv: Inventory | None = None) -> list[StageEstimate]:
    """Per-GPU memory of one rank of every pipeline stage (tp and Ulysses ranks of a stage hold the same
    amount), with what offloading moves to CPU memory and NVMe, and the start-up peak."""
    inv = inv or model_inventory(cfg.model)
    m, t, p = cfg.model, cfg.train, cfg.parallel
    tp, pp, u = p.tp, p.pp, p.ulysses
    dp = world // (tp * pp * u)
    partitions = dp * u  # ZeRO partitions over dp x ulysses (pretrain/parallel.py)
    accumulation = t.global_batch_size // (t.micro_batch_size * dp)
    zero = cfg.zero.stage
    ds = _ds_zero_settings(cfg)
    threshold = int(ds.get("stage3_param_persistence_threshold", ZERO3_PERSISTENCE_DEFAULT))
    offload_optimizer, offload_params = _offload_devices(cfg, ds)
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
        shape, m.seq_len, t.micro_batch_size, tp=tp, sequence_parallel=p.sequence_parallel, act_bytes=act_b, ulysses=u
    )
    tokens = m.seq_len * t.micro_batch_size / u
    embed_out = tokens * act_b * m.hidden_size / (tp if p.sequence_parallel else 1)
    head = output_layer_bytes(m.seq_len // u, t.micro_batch_size, m.vocab_size, tp, act_b)
    chosen = [
        t.activation_checkpointing if (t.checkpoint_blocks == 0 or i < t.checkpoint_blocks) else "none"
        for i in range(m.num_layers)
    ]
    if pp > 1:
        prefer_cpu_accelerator_if_no_gpu()  # DeepSpeed cuts the stages; it picks its accelerator at import
        parts = inv.stage_boundaries(tp, pp, p.pp_partition)
    else:
        parts = [0, len(inv.layers)]
    largest = max(inv.shard(n, tp) for n in inv.numel)
    # sharded init: a finished parameter is copied out in fp32, or cast to 16 bits and copied for ZeRO-3
    transient = init_transient(cfg, 4 if zero < 3 or act_b == 4 else 2 * act_b)
    out = []
    for s in range(pp):
        idx = list(range(parts[s], parts[s + 1]))
        if pp == 1:
            names = list(inv.numel)  # the plain model: every parameter once (a tied head is the embedding)
        else:
            names = list(dict.fromkeys(n for i in idx for n in inv.layers[i]))
        shards = [inv.shard(n, tp) for n in names]
        n_params = sum(shards)
        z3_part = sum(-(-n // partitions) for n in shards)
        z3_persist = sum(n for n in shards if n <= threshold)
        st = zero_state_bytes(
            n_params,
            zero,
            partitions,
            t.precision,
            zero3_partition=z3_part,
            zero3_persistent=z3_persist,
            pipeline=pp > 1,
        )
        part = z3_part if zero == 3 else n_params / partitions
        buffers = 0
        if offload_params == "nvme":
            size = cfg.zero.nvme_param_buffer_size or -(-largest // partitions)
            buffers = cfg.zero.nvme_param_buffers * size
        placed = offloaded(
            st,
            part,
            zero,
            t.precision,
            offload_optimizer,
            offload_params,
            persistent=z3_persist,
            param_buffers=buffers,
            params_in_cpu=cfg.zero.nvme_params_in_cpu,
        )
        gpu = placed["gpu"]
        blocks = [int(inv.layer_names[i].split()[1]) for i in idx if inv.layer_names[i].startswith("block")]
        block_params = [sum(inv.shard(n, tp) for n in inv.layers[b]) for b in blocks]  # layer index == block index
        gathered = act_b * _zero3_gathered(block_params, largest, ds) if zero == 3 else 0.0
        in_flight = min(pp - s, accumulation) if pp > 1 else 1
        ends = (embed_out if 0 in idx else 0.0, head if len(inv.layers) - 1 in idx else 0.0)
        activations = {
            mode: _stage_activations(per_block, blocks, [mode] * m.num_layers, in_flight, *ends) for mode in MODES
        }
        activations["chosen"] = _stage_activations(per_block, blocks, chosen, in_flight, *ends)
        # Start-up: this rank's share is materialized (fp32; ZeRO-3: its partition, cast as it is made, unless
        # the parameters are offloaded) next to the init's in-flight tensors; then DeepSpeed sets up the engine
        # (ZeRO-1/2 flatten the 16-bit weights into one buffer: a second copy for a moment).
        share = 4 * n_params if zero < 3 else (0.0 if offload_params != "none" else act_b * z3_part)
        engine = gpu["parameters"] + gpu["gradients"] + gpu["optimizer"]
        engine += act_b * n_params if zero in (1, 2) else 0.0
        build = startup_bytes(share, transient)
        startup = max(build, engine, 4 * n_params if zero < 3 else 0.0)
        whole = 4 * inv.total + (4 * n_params if tp > 1 else 0)  # the whole fp32 model (+ its tp shards copied out)
        out.append(
            StageEstimate(
                stage=s,
                layers=[inv.layer_names[i] for i in idx],
                blocks=blocks,
                params=n_params,
                in_flight=in_flight,
                parameters=gpu["parameters"],
                gradients=gpu["gradients"],
                optimizer=gpu["optimizer"],
                gathered=gathered,
                activations=activations,
                cpu=placed["cpu"],
                nvme=placed["nvme"],
                startup=startup,
                startup_build=build,
                startup_whole=max(whole, engine),
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
    mp = p.tp * p.pp * p.ulysses
    if world % mp:
        fit = ", ".join(f"tp {a} x pp {b}" for a, b in valid_layouts(cfg, world, gpus_per_node, allow_uneven))
        names = "parallel.tp x parallel.pp" + (" x parallel.ulysses" if p.ulysses > 1 else "")
        sizes = f"{p.tp} x {p.pp}" + (f" x {p.ulysses}" if p.ulysses > 1 else "")
        problems.append(
            f"world size {world} is not a multiple of {names} = {sizes} = {mp}; "
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
    if p.ulysses > 1 and (p.tp * p.ulysses > gpus_per_node or gpus_per_node % (p.tp * p.ulysses)):
        out.append(
            f"parallel.ulysses={p.ulysses} x tp {p.tp} spans nodes ({gpus_per_node} GPUs per node): each attention "
            "layer all-to-alls its queries, keys, values and output across the Ulysses group; keep tp x ulysses "
            "inside a node"
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
    out, u = [], cfg.parallel.ulysses
    for tp in _divisors(min(world, gpus_per_node)):
        for pp in _divisors(world // tp):
            if pp > cfg.model.num_layers or (world // tp) % (pp * u):
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
    cpu_memory: int | None = None,
) -> list[tuple[dict, float]]:
    """Changes that make the job fit in `usable` bytes per GPU, fewest changes first (then less model
    parallelism, bigger micro-batches, less recomputation): [(changes, worst-stage bytes)]. Offloading to
    CPU memory is tried only when nothing fits without it (and must fit `cpu_memory` per node, if given)."""
    inv = inv or model_inventory(cfg.model)
    z = cfg.zero
    found = _search(cfg, world, gpus_per_node, usable, inv, allow_uneven, [(z.offload_optimizer, z.offload_params)])
    if not found:
        offloads = [("cpu", z.offload_params), ("cpu", "cpu")]
        found = _search(cfg, world, gpus_per_node, usable, inv, allow_uneven, offloads, cpu_memory)
    found.sort(key=lambda f: (len(f[0]), f[2], f[3], f[4], f[5], f[1]))
    return [(f[0], f[1]) for f in found[:limit]]


def _search(cfg, world, gpus_per_node, usable, inv, allow_uneven, offloads, cpu_memory=None) -> list[tuple]:
    t, p = cfg.train, cfg.parallel
    ckpts = [c for c in MODES if _CKPT_ORDER[c] >= _CKPT_ORDER[t.activation_checkpointing]]
    micros = [b for b in _divisors(t.micro_batch_size)]
    found, u = [], p.ulysses
    for tp in _divisors(min(world, gpus_per_node)):
        for pp in _divisors(world // tp):
            if pp > cfg.model.num_layers or (world // tp) % (pp * u):
                continue
            for zero in range(cfg.zero.stage, 4):
                if pp > 1 and zero > 1:
                    continue
                for optimizer, params in offloads:
                    if (optimizer != "none" and zero == 0) or (params != "none" and zero != 3):
                        continue
                    for ckpt in ckpts:
                        for micro in micros:
                            changes = {
                                "parallel.tp": tp,
                                "parallel.pp": pp,
                                "zero.stage": zero,
                                "zero.offload_optimizer": optimizer,
                                "zero.offload_params": params,
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
                            stages = estimate(cand, world, inv)
                            worst = max(s.peak for s in stages)
                            node_cpu = gpus_per_node * max(s.cpu for s in stages)  # at most
                            if worst <= usable and (cpu_memory is None or node_cpu <= cpu_memory):
                                found.append((changes, worst, tp * pp, -micro, _CKPT_ORDER[ckpt], zero))
    return found


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
    cpu_memory: int | None = None  # per node, for offloaded states (None: not checked)
    nvme_memory: int | None = None  # per node

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def layout(self) -> Layout:
        return layout_for(self.cfg, self.world)

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
        return max(self.stages, key=lambda s: s.peak)

    def node_bytes(self, what: str) -> float:
        """The most CPU memory ("cpu") or NVMe ("nvme") the ranks of one node take for offloaded states."""
        lay, g = self.layout, self.gpus_per_node
        by_node = [0.0] * self.nodes
        for r in range(self.world):
            by_node[r // g] += getattr(self.stages[lay.place(r)[0]], what)
        return max(by_node)

    @property
    def node_problems(self) -> list[str]:
        """What does not fit in a node's CPU memory or on its NVMe (when --cpu-memory / --nvme-capacity say)."""
        out = []
        for what, have, name in (("cpu", self.cpu_memory, "CPU memory"), ("nvme", self.nvme_memory, "NVMe")):
            need = self.node_bytes(what)
            if need and have is not None and need > have:
                out.append(
                    f"offloaded states need {need / GIB:,.1f} GiB of {name} per node, {have / GIB:,.1f} GiB there"
                )
        return out

    @property
    def gpu_verdict(self) -> str:
        total = self.worst.peak
        if total > self.gpu_memory:
            return "does not fit"
        return "fits" if total <= self.usable else "tight"

    @property
    def verdict(self) -> str:
        """The GPU verdict, unless offloaded states do not fit a node's CPU memory or NVMe."""
        return "does not fit" if self.node_problems else self.gpu_verdict

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
            pp, dp, sp, tp = lay.place(r)
            ulysses = f" sp {sp}" if lay.ulysses > 1 else ""
            lines.append(f"  rank {r:>5}: node {r // g:>3} gpu {r % g} -> pp {pp} dp {dp:>3}{ulysses} tp {tp}")
        return lines

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "world": self.world,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "layout": {
                "tp": lay.tp,
                "pp": lay.pp,
                "dp": lay.dp,
                "ulysses": lay.ulysses,
                "sequence_parallel": lay.sequence_parallel,
            },
            "zero_stage": self.cfg.zero.stage,
            "offload": {"optimizer": self.cfg.zero.offload_optimizer, "params": self.cfg.zero.offload_params},
            "precision": self.cfg.train.precision,
            "activation_checkpointing": self.cfg.train.activation_checkpointing,
            "global_batch_size": self.cfg.train.global_batch_size,
            "micro_batch_size": self.cfg.train.micro_batch_size,
            "accumulation": self.accumulation,
            "tokens_per_step": self.tokens_per_step,
            "gpu_memory_bytes": self.gpu_memory,
            "usable_bytes": self.usable,
            "verdict": self.verdict,
            "node": {
                "cpu_bytes": self.node_bytes("cpu"),
                "nvme_bytes": self.node_bytes("nvme"),
                "cpu_memory_bytes": self.cpu_memory,
                "nvme_memory_bytes": self.nvme_memory,
                "problems": self.node_problems,
            },
            "ranks": [
                dict(
                    zip(
                        ("node", "gpu", "pp", "dp", "sp", "tp"),
                        (r // self.gpus_per_node, r % self.gpus_per_node, *lay.place(r)),
                        strict=True,
                    )
                )
                for r in range(self.world)
            ],
            "stages": [dict(dataclasses.asdict(s), states=s.states, total=s.total, peak=s.peak) for s in self.stages],
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
    cpu_memory: int | None = None,
    nvme_memory: int | None = None,
) -> Plan:
    """Validates and estimates; raises PlanError listing every problem with the sizes that would work.
    cpu_memory / nvme_memory: per node, to check offloaded states against (None: reported, not checked)."""
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
        cpu_memory=cpu_memory,
        nvme_memory=nvme_memory,
    )
    if search and plan.gpu_verdict != "fits":
        plan.suggestions = suggestions(cfg, world, gpus_per_node, plan.usable, inv, allow_uneven, cpu_memory=cpu_memory)
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
        f"layout  : tp {lay.tp} x pp {lay.pp} x dp {lay.dp}"
        + (
            f" x sp {lay.ulysses} (DeepSpeed-Ulysses, seq {m.seq_len // lay.ulysses} per rank)"
            if lay.ulysses > 1
            else ""
        )
        + " (tp fastest)"
        + (", sequence parallel" if lay.sequence_parallel else "")
        + (f", stages by {cfg.parallel.pp_partition}" if lay.pp > 1 else "")
        + f"; ZeRO-{cfg.zero.stage}; {t.precision}; activation checkpointing {t.activation_checkpointing}"
        + (f" (first {t.checkpoint_blocks} blocks)" if t.checkpoint_blocks else ""),
        f"batch   : global {t.global_batch_size} = micro {t.micro_batch_size} x dp {lay.dp} x accumulation "
        f"{plan.accumulation}; {plan.tokens_per_step:,} tokens per step; "
        f"{t.max_steps * plan.tokens_per_step / 1e9:,.1f}B tokens in {t.max_steps:,} steps",
        f"hparams : lr {t.lr:.3g}, schedule {t.schedule}" + "".join(f"; {line}" for line in t.derived),
        "",
        "rank map (rank: node gpu -> pp dp " + ("sp " if lay.ulysses > 1 else "") + "tp):",
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
    over = f"dp {lay.dp}" + (f" x sp {lay.ulysses}" if lay.ulysses > 1 else "")
    part = "1/" + ("dp" if lay.ulysses == 1 else "(dp x sp)") + " partition"
    opt_off, par_off = _offload_devices(cfg, _ds_zero_settings(cfg))
    lines += [
        f"memory per GPU ({where}{n:,} parameters on this rank = its tp 1/{lay.tp} shard"
        + (" of its stage" if lay.pp > 1 else "")
        + f"; ZeRO-{zero} over {over}):",
        f"  parameters   {_g(w.parameters)}   {t.precision} weights"
        + (
            f", offloaded to {par_off} (the GPU keeps the small persistent ones)"
            if par_off != "none"
            else (f", {part}" if zero == 3 else ", full copy")
        ),
        f"  gradients    {_g(w.gradients)}   {t.precision}"
        + (f", {part}" if zero >= 2 else ", full")
        + (", reduced into the offloaded partition" if opt_off != "none" and zero >= 2 else ""),
        f"  optimizer    {_g(w.optimizer)}   "
        + (
            f"offloaded to {opt_off} (zero.offload_optimizer; stepped by DeepSpeed's CPU Adam)"
            if opt_off != "none"
            else ("fp32 Adam m, v" if t.precision == "fp32" and zero in (0, 3) else "fp32 master + Adam m, v")
            + (" on the full model" if zero == 0 and not (lay.pp > 1 and t.precision == "bf16") else f", {part}")
        ),
    ]
    if w.gathered:
        lines.append(
            f"  gathered     {_g(w.gathered)}   ZeRO-3: weights in use and prefetched, and a layer's full gradient"
        )
    lines.append(
        f"  activations  {_g(w.activations['chosen'])}   micro-batch {t.micro_batch_size} x seq {m.seq_len}, "
        f"{len(w.blocks)} blocks, {w.in_flight} micro-batch(es) in flight, "
        f"checkpointing {t.activation_checkpointing}" + (", + logits/loss" if "head" in w.layers else "")
    )
    lines.append(
        f"  total        {_g(w.total)}   of {plan.gpu_memory / GIB:.0f} GiB "
        f"({plan.usable / GIB:.1f} GiB usable, {plan.headroom:.0%} kept for CUDA/NCCL/fragmentation): "
        f"{plan.gpu_verdict.upper()}"
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
        f"attention; {b}-byte activations"
        + (
            f"; Ulysses: {m.seq_len // lay.ulysses} tokens per rank, all heads' attention over all {m.seq_len})"
            if lay.ulysses > 1
            else ")"
        )
    )
    lines.append(
        f"  start-up     {_g(w.startup)}   peak while building: this rank's share materialized next to the "
        "full parameters in flight (sharded init), then DeepSpeed's engine set-up"
    )
    lines.append(
        f"               {_g(w.startup_whole)}   the same if every rank built the whole model first "
        "(checkpoint.init_from)"
    )
    cpu, nvme = plan.node_bytes("cpu"), plan.node_bytes("nvme")
    if cpu or nvme:
        lines.append(f"offloaded states per node ({plan.gpus_per_node} ranks):")
        for name, need, have, flag in (
            ("CPU memory", cpu, plan.cpu_memory, "--cpu-memory"),
            ("NVMe      ", nvme, plan.nvme_memory, "--nvme-capacity"),
        ):
            if not need:
                continue
            verdict = (
                f"of {have / GIB:,.0f} GiB: " + ("fits" if need <= have else "DOES NOT FIT")
                if have is not None
                else f"(not checked: pass {flag})"
            )
            lines.append(f"  {name}  {_g(need)}   {verdict}")
        lines.append(
            "  (as DeepSpeed 0.19 allocates them, pretrain/memory.py offloaded(): an offloaded optimizer keeps the "
            "fp32 master weights and Adam moments in CPU memory, or on NVMe with the fp32 gradients, and the gradient "
            "partitions in CPU memory; offloaded parameters keep their 16-bit partition there, with pinned buffers)"
        )
    for problem in plan.node_problems:
        lines.append(f"DOES NOT FIT: {problem}")
    lines.append(f"verdict : {plan.verdict.upper()}")
    for warn in plan.warnings:
        lines.append(f"warning: {warn}")
    if plan.verdict != "fits":
        lines.append("")
        if plan.gpu_verdict == "fits":
            lines.append(
                "the GPUs fit; give the offloaded states more room (more nodes, larger CPU memory or NVMe) or offload "
                "less (zero.offload_optimizer / zero.offload_params)"
            )
        elif plan.suggestions:
            lines.append(f"does not fit in {plan.usable / GIB:.1f} GiB; changes that would (estimated total per GPU):")
            for changes, total in plan.suggestions:
                sets = " ".join(f"--set {k}={_yaml(v)}" for k, v in changes.items())
                lines.append(f"  {total / GIB:7.2f} GiB  {sets}")
        else:
            states = sum(s.states for s in plan.stages) / len(plan.stages)
            lines.append(
                f"no layout of {plan.world} GPUs with the configured batch fits; more GPUs (ZeRO-3 divides the "
                f"model states by dp), offload (zero.offload_optimizer / zero.offload_params: cpu or nvme) or a "
                "smaller model "
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
    p.add_argument(
        "--cpu-memory", default=None, help="CPU memory of one node, to check offloaded states against (e.g. 1TB)"
    )
    p.add_argument(
        "--nvme-capacity", default=None, help="NVMe space of one node at zero.nvme_path (e.g. 28TB), for nvme offload"
    )
    p.add_argument("--allow-uneven-stages", action="store_true", help="plan pp sizes that do not divide num_layers")
    p.add_argument("--map-limit", type=int, default=64, help="rank-map lines to print (default 64)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    gpu_memory = parse_memory(args.gpu_memory)
    if not 0 <= args.headroom < 1:
        raise UsageError(f"--headroom: {args.headroom} must be in [0, 1)")
    cfg = load_plan_config(args.config, args.set, args.vocab_size, args.nodes * args.gpus_per_node)
    cpu = parse_memory(args.cpu_memory, "--cpu-memory") if args.cpu_memory else None
    nvme = parse_memory(args.nvme_capacity, "--nvme-capacity") if args.nvme_capacity else None
    plan = make_plan(
        cfg,
        args.nodes,
        args.gpus_per_node,
        gpu_memory,
        args.headroom,
        args.allow_uneven_stages,
        cpu_memory=cpu,
        nvme_memory=nvme,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan, args.config, args.map_limit))
    return 0 if plan.verdict != "does not fit" else 1


if __name__ == "__main__":
    raise SystemExit(run(main))
