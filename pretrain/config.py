"""The job's configuration: dataclasses, YAML loading, `--set` overrides and validation.

Everything a run can be told lives here, so that "which keys exist?" has one answer. A config is
loaded from YAML (optionally on top of a `base:` file), overridden from the command line, then
validated ONCE, before any process group starts: unknown keys get a did-you-mean error, bad
values name the field, the value and what is allowed. `resolve()` fills every default that
depends on other fields (vocabulary size from the tokenizer, per-placement switches, ...) so the
config written to the run directory is complete.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kernels.errors import ConfigError, did_you_mean
from model.config import ModelConfig, config_field, divisors, resolve_model, validate_model

# ConfigError is the project's (kernels/errors.py); the model section is the model's (model/config.py).
_f = config_field


# ----------------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = _f("default", "run name; the run directory defaults to runs/<name>")
    dir: str = _f("", "run directory (config, metrics, TensorBoard, checkpoints, eval)")
    seed: int = _f(1234, "seed for model init, data order and every rank's RNG", min=0)


@dataclass
class DataConfig:
    dir: str = _f("data/bundled", "prepared dataset directory (python -m pretrain.data prepare)")
    tokenizer: str = _f(
        "", "sentencepiece .model or Hugging Face tokenizer.json; empty = <dir>/tokenizer.model (or tokenizer.json)"
    )
    train: list = _f([], "Megatron .bin/.idx prefixes (optionally 'WEIGHT PREFIX') to train on; empty = <dir>/train")
    valid: list = _f([], "validation prefixes; empty = <dir>/valid")
    test: list = _f([], "held-out test prefixes; empty = <dir>/test")
    cache_dir: str = _f("", "where sample indices are cached; empty = <dir>/cache")


@dataclass
class TrainConfig:
    max_steps: int = _f(1000, "optimizer steps to train", min=1)
    micro_batch_size: int = _f(8, "sequences per rank per forward/backward", min=1)
    global_batch_size: int = _f(
        16,
        "sequences per optimizer step (micro * data-parallel * accumulation); auto = the Step Law's batch for "
        "train.tokens (pretrain/scaling/hparam_laws.py), resolved at start-up",
        min=1,
        auto=True,
    )
    lr: float = _f(
        1e-3,
        "peak learning rate (the cap of the power schedule); auto = the Step Law's for this model and train.tokens "
        "(pretrain/scaling/hparam_laws.py), resolved at start-up",
        gt=0,
        auto=True,
    )
    tokens: int = _f(
        0,
        "planned training tokens (the Step Law's D); set it to plan by tokens (max_steps = tokens / (batch x "
        "seq_len) with global_batch_size: auto or max_steps left at its default, else max_steps decides); "
        "0 = max_steps x global_batch_size x seq_len (filled in)",
        min=0,
    )
    derived: list = _f(
        [], "filled in by resolve(): how the `auto` values (the law, N, D) and max_steps / tokens were derived"
    )
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak", min=0, max=1)
    warmup_steps: int = _f(100, "linear warmup steps", min=0)
    schedule: Literal["cosine", "wsd", "constant", "power", "infinite"] = _f(
        "cosine",
        "after warmup: cosine decay, warmup-stable-decay, constant, the Power scheduler (a power law of tokens) "
        "or the infinite schedule (cool-down, constant, annealing); formulas in pretrain/schedule.py",
    )
    decay_fraction: float = _f(
        0.2, "wsd, infinite, power: fraction of max_steps spent in the final decay / annealing", gt=0, max=1
    )
    decay_start: int = _f(
        0,
        "wsd, infinite, power: step where the final decay / annealing starts; 0 = max_steps - decay_fraction x "
        "max_steps. --anneal-from CHECKPOINT sets it to the checkpoint's step",
        min=0,
    )
    power_a: float = _f(4.0, "power: a in lr = min(train.lr, a * tokens^b) (Shen et al. 2024)", gt=0)
    power_b: float = _f(-0.51, "power: b in lr = min(train.lr, a * tokens^b) (Shen et al. 2024)", max=0)
    cooldown_steps: int = _f(
        0,
        "infinite: steps of the cosine cool-down from train.lr to constant_lr_ratio x lr after warmup (0 = straight "
        "to the constant LR)",
        min=0,
    )
    constant_lr_ratio: float = _f(0.5, "infinite: the constant phase's LR as a fraction of train.lr", gt=0, max=1)
    weight_decay: float = _f(
        0.1,
        "AdamW weight decay on matrices (never on norm gains and biases); its meaning depends on weight_decay_mode",
        min=0,
    )
    weight_decay_mode: Literal["coupled", "independent"] = _f(
        "coupled",
        "coupled: each step decays p by lr_t * weight_decay * p (torch AdamW; typical weight_decay 0.1). "
        "independent: by weight_decay * (lr_t / lr_peak) * p, so the total decay does not change with the peak "
        "LR (Loshchilov & Hutter's AdamW; Wortsman et al. 2023 sec. 3.2.2, who use weight_decay 1e-4; at most "
        "0.01); against the instability of high learning rates",
    )
    embedding_weight_decay: bool = _f(
        True,
        "decay the token embedding (and a tied output layer) too, as Megatron-LM "
        "and GPT-NeoX do; false = OLMo 2's choice. Fixed for the life of a run",
    )
    beta1: float = _f(0.9, "AdamW beta1", min=0, max=1)
    beta2: float = _f(0.95, "AdamW beta2", min=0, max=1)
    adam_eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = no clipping", min=0)
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "training precision (DeepSpeed)")
    log_every: int = _f(10, "steps between progress lines and metrics.jsonl records", min=1)
    eval_every: int = _f(200, "steps between validation passes; 0 = only at the end", min=0)
    eval_batches: int = _f(8, "validation batches (of global_batch_size sequences) per pass", min=1)
    activation_checkpointing: Literal["none", "full", "selective"] = _f(
        "none", "recompute activations in backward: whole blocks (full) or the attention core (selective)"
    )
    checkpoint_blocks: int = _f(0, "apply activation checkpointing to the first N blocks only; 0 = all", min=0)
    diagnostics_every: int = _f(
        100,
        "steps between depth diagnostics (per-layer variance, max activation, "
        "gradient norm, attention entropy); 0 = off",
        min=0,
    )
    diagnostics_sequences: int = _f(4, "validation sequences in the fixed probe batch of the diagnostics", min=1)
    exit_at_step: int = _f(
        0, "stop after this step with a checkpoint, schedule unchanged (0 = run to max_steps)", min=0
    )
    peak_tflops: float = _f(0.0, "device dense peak for MFU; 0 = known GPUs auto, else MFU not reported", min=0)
    bad_step_policy: Literal["skip", "stop"] = _f(
        "skip", "a step whose loss or gradient is not finite is never applied: skip it (see max_bad_steps) or stop"
    )
    max_bad_steps: int = _f(20, "with bad_step_policy=skip: stop once more steps than this were skipped", min=0)
    spike_sigma: float = _f(
        6.0,
        "log a loss spike when a step's loss exceeds the mean of the last spike_window "
        "steps by this many standard deviations; 0 = off",
        min=0,
    )
    spike_window: int = _f(128, "steps of loss history the spike detector compares against", min=2)
    inject_nonfinite_at: list = _f(
        [], "fault injection for testing the bad-step policy: make rank 0's loss NaN at these (1-based) steps"
    )
    fused_loss: bool = _f(
        True,
        "compute the output layer and cross-entropy in chunks of tokens, never building the "
        "[tokens x vocab] logits (model/loss.py); false = the plain logits + cross-entropy",
    )
    z_loss: float = _f(
        0.0,
        "coefficient of the z-loss term z_loss * logsumexp(logits)^2 added per token (to the training and the "
        "logged loss); keeps the output logits from diverging (PaLM; Wortsman et al. 2023 use 1e-4); 0 = off",
        min=0,
    )
    compile: bool = _f(
        False, "torch.compile the model (the norm kernels and the fused loss are custom ops: no graph breaks)"
    )
    compile_scope: Literal["blocks", "model"] = _f(
        "blocks",
        "what train.compile compiles: blocks = each transformer block (regional: blocks share one graph, so "
        "compilation time does not grow with depth; works with every layout); model = the whole model as one "
        "graph, as torch.compile(model) does (fuses across block boundaries, the embedding and the final norm: "
        "about 2% faster steps at quickstart on CPU, bench/RESULTS.md; compilation grows with depth; "
        "needs parallel.pp=1 and train.activation_checkpointing=none)",
    )
    compile_memory_budget: float = _f(
        1.0,
        "train.compile only: inductor's activation memory budget (torch._functorch.config."
        "activation_memory_budget, torchtitan's memory_budget mode). Below 1 the compiler keeps about that "
        "fraction of the activations backward reads and recomputes the rest, choosing by FLOPs (pointwise ops "
        "and norms first). Quickstart on CPU, whole-model scope: what backward keeps falls from 219 MiB to 150 "
        "at 0.9 (steps 2% longer), 105 at 0.5 (6%) and 20 at 0.1 (22%), the process's peak by 6-8% "
        "(bench/RESULTS.md). Not with train.activation_checkpointing (choose one); 1 = off",
        min=0,
        max=1,
    )


@dataclass
class CheckpointConfig:
    every: int = _f(0, "steps between checkpoints; 0 = only at the end", min=0)
    keep_last: int = _f(3, "complete checkpoints to keep; 0 = keep all", min=0)
    resume: str = _f("never", "never | auto (newest complete, else fresh) | must (fail if none) | PATH")
    verify: Literal["sha256", "size", "none"] = _f("sha256", "check checkpoint files against the manifest on load")
    init_from: str = _f(
        "",
        "start a fresh run from these weights: a checkpoint directory or a .pt state dict "
        "(e.g. written by python -m pretrain.import_hf); ignored when resuming",
    )
    preempt_signals: list = _f(
        ["SIGTERM", "SIGUSR1"],
        "signals that make every rank save a checkpoint at the end "
        "of the current step and exit 0 (SLURM: --signal=B:USR1@120)",
    )
    allow_tokenizer_change: bool = _f(
        False,
        "resume although data.tokenizer differs from the checkpoint's (its "
        "sha256): only when the token ids are known to mean the same",
    )
    grace_period_s: float = _f(
        120.0,
        "after a preemption signal, exit (without a new checkpoint) if saving has not "
        "finished within this many seconds",
        gt=0,
    )


@dataclass
class ParallelConfig:
    tp: int = _f(1, "tensor-parallel size (data parallelism fills the rest of the world)", min=1)
    pp: int = _f(1, "pipeline-parallel size", min=1)
    sequence_parallel: bool = _f(False, "with tp > 1: norms and dropout on sequence shards (Megatron SP)")
    pp_partition: Literal["parameters", "layers"] = _f(
        "parameters", "how layers are divided between pipeline stages: balance parameters or transformer blocks"
    )
    ulysses: int = _f(
        1,
        "DeepSpeed-Ulysses sequence parallelism: each sequence is split over this many ranks and attention "
        "exchanges heads for sequence by all-to-all (model.num_heads and num_kv_heads must divide by tp x ulysses)",
        min=1,
    )


@dataclass
class ZeroConfig:
    stage: int = _f(1, "DeepSpeed ZeRO stage", min=0, max=3)
    ds_config: str = _f(
        "", "a DeepSpeed JSON merged under ours (e.g. ZeRO bucket sizes); a key we also set must agree with ours"
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = _f(
        "none",
        "ZeRO-Offload: keep the fp32 master weights and Adam states in CPU memory (cpu, ZeRO 1-3) or on NVMe "
        "(nvme, ZeRO-Infinity, ZeRO-3) and step them with DeepSpeed's CPU Adam",
    )
    offload_params: Literal["none", "cpu", "nvme"] = _f(
        "none", "ZeRO-3 only: keep the 16-bit parameter partitions in CPU memory (cpu) or on NVMe (nvme, ZeRO-Infinity)"
    )
    nvme_path: str = _f("", "a folder on a fast local NVMe drive for the offloaded states (nvme offload)")
    pin_memory: bool = _f(
        True, "offload into page-locked CPU memory (faster transfers; needs enough locked memory, ulimit -l)"
    )
    nvme_params_in_cpu: int = _f(
        1_000_000_000,
        "offload_params: nvme: parameter elements per rank kept in CPU memory, the rest on the drive (DeepSpeed's "
        "offload_param.max_in_cpu: a model below it never touches the drive)",
        min=0,
    )
    nvme_param_buffers: int = _f(5, "offload_params: nvme: CPU buffers for parameters in flight", min=1)
    nvme_param_buffer_size: int = _f(
        0, "offload_params: nvme: elements per buffer; 0 = this rank's largest parameter (DeepSpeed's minimum)", min=0
    )
    aio_block_size: int = _f(1048576, "nvme: bytes per async-io request (DeepSpeed's aio.block_size)", min=4096)
    aio_queue_depth: int = _f(8, "nvme: async-io requests in flight per thread (aio.queue_depth)", min=1)
    aio_intra_op_parallelism: int = _f(1, "nvme: async-io threads per read or write (aio.intra_op_parallelism)", min=1)
    aio_single_submit: bool = _f(False, "nvme: submit requests one by one instead of in batches (aio.single_submit)")
    aio_overlap_events: bool = _f(True, "nvme: overlap submission and completion of requests (aio.overlap_events)")


@dataclass
class KernelsConfig:
    backend: str = _f("auto", "norm implementation (kernels/backend.py)")


@dataclass
class EvalConfig:
    split: Literal["test", "valid"] = _f("test", "split evaluated by python -m pretrain.eval")
    max_tokens: int = _f(0, "evaluate at most this many tokens; 0 = the whole split", min=0)
    batch_size: int = _f(8, "sequences per evaluation forward pass", min=1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------- loading and overrides


_did_you_mean = did_you_mean  # the name the sweep spec imports
AUTO = "auto"  # train.lr / train.global_batch_size: resolved from the Step Law by resolve()


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _integral(value: Any) -> Any:
    """A float or numeric string with an integral value (2.5e9) as an int; anything else unchanged."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_value(path: str, value: Any, tp: Any, meta: dict) -> Any:
    """Type-check (with lossless coercion int->float) and range-check one leaf value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if meta.get("auto") and value == AUTO:
        return value  # train.lr / global_batch_size: a number once resolve() has run
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            hint = _did_you_mean(str(value), [str(a) for a in args])
            raise ConfigError(f"{path}: '{value}' is not allowed; allowed: {allowed}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        value = _integral(value)  # 2.5e9 tokens: YAML gives a float or (no dot) a string
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    elif tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{path}: {value} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{path}: {value} is above the maximum {meta['max']}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{path}: {value} must be greater than {meta['gt']}")
    return value


def _build(cls: type, data: dict, path: str) -> Any:
    """Builds dataclass `cls` from a dict, rejecting unknown keys with a did-you-mean hint."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            kind = "section" if not path else "key"
            raise ConfigError(
                f"{where}: unknown {kind}{_did_you_mean(str(key), list(fields))} (known: {', '.join(fields)})"
            )
        tp = types[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where)
        else:
            kwargs[key] = _check_value(where, value, tp, dict(fields[key].metadata))
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml_mapping(path: Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping, or a ConfigError that names the file and the fault."""
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as e:  # one line: where and what, not PyYAML's multi-line report
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} '{path}' is not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}': expected a mapping at the top level")
    return data


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Reads a config file; `base: other.yaml` (relative to this file) is loaded underneath."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"config file '{path}': 'base' chain loops back to itself")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), data)
    return data


def apply_override(data: dict, assignment: str) -> dict:
    """Applies one `section.key=value` assignment; the value is parsed as YAML (3, 1e-3, true, [a])."""
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}': expected KEY=VALUE, e.g. model.placement=pre")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set '{assignment}': keys are SECTION.KEY, e.g. train.max_steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    section, name = parts
    out = dict(data)
    out[section] = dict(out.get(section) or {})
    out[section][name] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Loads, overrides and validates a config. Does not touch the filesystem beyond the YAML."""
    data = read_yaml(path) if path else {}
    for assignment in overrides:
        data = apply_override(data, assignment)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_from_saved(data: dict, log=None) -> Config:
    """The config saved with a checkpoint, read by this version of the code (which may have another
    schema): keys this version does not know are dropped and said, keys it added take their
    defaults, and the result is validated as usual."""
    sections = _field_types(Config)
    kept, dropped = {}, []
    for section, values in data.items():
        if section not in sections:
            dropped.append(section)
        elif isinstance(values, dict):
            known = {f.name for f in dataclasses.fields(sections[section])}
            dropped += [f"{section}.{k}" for k in values if k not in known]
            kept[section] = {k: v for k, v in values.items() if k in known}
        else:
            kept[section] = values
    if dropped and log is not None:
        log(f"[config] the saved config has keys this version does not know (dropped): {', '.join(dropped)}")
    return config_from_dict(kept)


# --------------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Cross-field checks that a single field's type and range cannot express."""
    from kernels import BACKEND_CHOICES

    m, t = cfg.model, cfg.train
    validate_model(m)
    if cfg.kernels.backend not in BACKEND_CHOICES:
        raise ConfigError(
            f"kernels.backend: '{cfg.kernels.backend}' is not allowed; allowed: "
            f"{', '.join(BACKEND_CHOICES)}{_did_you_mean(cfg.kernels.backend, list(BACKEND_CHOICES))}"
        )
    _validate_parallel(cfg)
    _validate_offload(cfg.zero)
    if not t.tokens:  # with train.tokens set, max_steps is derived and resolve() checks these
        _validate_steps(t)
    if t.z_loss > 0 and not t.fused_loss and cfg.parallel.tp > 1:
        raise ConfigError(
            f"train.z_loss: {t.z_loss} with parallel.tp={cfg.parallel.tp} needs train.fused_loss: true "
            "(the plain vocab-parallel loss is megatron-core's, which has no z-loss term)"
        )
    _validate_weight_decay_mode(t)
    _validate_compile_scope(cfg)
    if t.precision == "fp16" and m.norm_eps < 1e-5:
        raise ConfigError(f"model.norm_eps: {m.norm_eps} underflows in fp16; use >= 1e-5 with train.precision=fp16")
    r = cfg.checkpoint.resume
    if r not in ("never", "auto", "must") and not r:
        raise ConfigError("checkpoint.resume: empty; allowed: never, auto, must, or a checkpoint path")
    for name in ("train", "valid", "test"):
        for item in getattr(cfg.data, name):
            _parse_blend_item(f"data.{name}", item)
    _validate_faults_and_signals(cfg)


def _validate_compile_scope(cfg: Config) -> None:
    t = cfg.train
    if t.compile_memory_budget < 1 and not t.compile:
        raise ConfigError(
            f"train.compile_memory_budget: {t.compile_memory_budget} is the compiler's; it needs train.compile: true"
        )
    if t.compile_memory_budget < 1 and t.activation_checkpointing != "none":
        raise ConfigError(
            f"train.compile_memory_budget: {t.compile_memory_budget} with train.activation_checkpointing="
            f"{t.activation_checkpointing}: both decide what backward recomputes; choose one (set the budget to 1 "
            "or activation_checkpointing to none)"
        )
    if t.compile_scope != "model":
        return
    if not t.compile:
        raise ConfigError("train.compile_scope: 'model' is set but train.compile is false; set train.compile: true")
    if cfg.parallel.pp > 1:
        raise ConfigError(
            f"train.compile_scope: 'model' with parallel.pp={cfg.parallel.pp}: pipeline stages run blocks, not the "
            "whole model; use compile_scope: blocks"
        )
    if t.activation_checkpointing != "none":
        raise ConfigError(
            f"train.compile_scope: 'model' with train.activation_checkpointing={t.activation_checkpointing}: the "
            "recomputed region restores the tensor-parallel RNG stream, which stays outside compiled code; use "
            "compile_scope: blocks"
        )


INDEPENDENT_DECAY_MAX = 0.01  # a decay per step above this shrinks the matrices to nothing within a few hundred steps


def _validate_weight_decay_mode(t: TrainConfig) -> None:
    if t.weight_decay_mode == "independent" and t.weight_decay > INDEPENDENT_DECAY_MAX:
        raise ConfigError(
            f"train.weight_decay: {t.weight_decay} with train.weight_decay_mode: independent is the decay per step "
            f"at the peak LR (not multiplied by the LR); allowed: at most {INDEPENDENT_DECAY_MAX} (Wortsman et al. "
            "2023 use 1e-4), or weight_decay_mode: coupled"
        )


def _validate_steps(t: TrainConfig) -> None:
    from pretrain.schedule import check_schedule

    if t.warmup_steps >= t.max_steps and t.schedule != "constant":
        raise ConfigError(f"train.warmup_steps: {t.warmup_steps} must be smaller than train.max_steps={t.max_steps}")
    check_schedule(t, TrainConfig())


def _validate_faults_and_signals(cfg: Config) -> None:
    import signal

    for name in cfg.checkpoint.preempt_signals:
        if (
            not isinstance(name, str)
            or not name.startswith("SIG")
            or not hasattr(signal, name)
            or name in ("SIGKILL", "SIGSTOP")
        ):
            catchable = ["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT"]
            raise ConfigError(
                f"checkpoint.preempt_signals: {name!r} is not a signal that can be caught; use names "
                f"such as {', '.join(catchable)}{_did_you_mean(str(name), catchable)}"
            )
    for step in cfg.train.inject_nonfinite_at:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError(f"train.inject_nonfinite_at: {step!r} is not a step number (1-based integers)")
    if cfg.train.inject_nonfinite_at and cfg.parallel.pp > 1:
        raise ConfigError(
            "train.inject_nonfinite_at: fault injection runs in the data/tensor-parallel step only; use parallel.pp=1"
        )


def _validate_parallel(cfg: Config) -> None:
    """Sizes that tensor / pipeline parallelism must divide, and the combinations DeepSpeed refuses."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tp, p.pp
    kv = m.num_kv_heads or m.num_heads
    ffn = m.ffn_hidden_size  # 0 = derived later; re-checked in resolve()
    for name, value in (
        ("model.num_heads", m.num_heads),
        ("model.num_kv_heads", kv),
        ("model.hidden_size", m.hidden_size),
        ("model.ffn_hidden_size", ffn),
    ):
        if value and value % tp:
            raise ConfigError(
                f"parallel.tp: {tp} does not divide {name}={value}; tensor-parallel sizes that "
                f"would: {_divisors(value, limit=64)}"
            )
    if p.sequence_parallel and tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel: true needs parallel.tp > 1 (it splits the sequence over "
            "the tensor-parallel ranks)"
        )
    if p.sequence_parallel and m.seq_len % tp:
        raise ConfigError(
            f"parallel.sequence_parallel: model.seq_len={m.seq_len} is not divisible by parallel.tp="
            f"{tp}; sizes that would: {_divisors(m.seq_len, limit=64)}"
        )
    if tp > 1 and m.qk_norm and m.qk_norm_scope == "layer":
        raise ConfigError(
            "model.qk_norm_scope: 'layer' (one norm over all heads) is not supported with "
            "parallel.tp > 1, where heads are split across ranks; use qk_norm_scope: head"
        )
    if pp > m.num_layers:
        raise ConfigError(
            f"parallel.pp: {pp} stages for model.num_layers={m.num_layers}; at most one stage per "
            f"layer: allowed 1..{m.num_layers}"
        )
    if pp > 1 and cfg.zero.stage > 1:
        raise ConfigError(
            f"zero.stage: {cfg.zero.stage} cannot be combined with pipeline parallelism "
            f"(parallel.pp={pp}): DeepSpeed's pipeline engine supports ZeRO stages 0 and 1"
        )
    if p.ulysses > 1:
        _validate_ulysses(m, p)


def _validate_ulysses(m, p: ParallelConfig) -> None:
    """DeepSpeed-Ulysses scatters heads over tp x ulysses ranks and the sequence over ulysses ranks."""
    u, split = p.ulysses, p.tp * p.ulysses
    kv = m.num_kv_heads or m.num_heads
    for name, heads in (("model.num_heads", m.num_heads), ("model.num_kv_heads", kv)):
        if heads % split:
            sizes = [d for d in range(2, heads + 1) if heads % (p.tp * d) == 0]
            raise ConfigError(
                f"parallel.ulysses: {u} x parallel.tp {p.tp} = {split} does not divide {name}={heads} (the all-to-all "
                f"gives each rank whole heads); ulysses sizes that would: {', '.join(map(str, sizes)) or 'none'}"
            )
    shards = u * (p.tp if p.sequence_parallel else 1)
    if m.seq_len % shards:
        what = (
            f"parallel.ulysses x parallel.tp (sequence parallel) = {shards}" if shards != u else f"parallel.ulysses={u}"
        )
        raise ConfigError(
            f"parallel.ulysses: model.seq_len={m.seq_len} is not divisible by {what}; sequence lengths must split "
            f"evenly; ulysses sizes that would: {_divisors(m.seq_len // (shards // u), limit=64)}"
        )
    if p.pp > 1:
        raise ConfigError(
            f"parallel.ulysses: {u} with parallel.pp={p.pp} is not supported: DeepSpeed's pipeline engine reduces "
            "gradients over its own data-parallel group, which cannot include the Ulysses ranks; use parallel.pp=1 "
            "(tensor parallelism and ZeRO 0-3 compose with Ulysses)"
        )


def _validate_offload(z: ZeroConfig) -> None:
    """ZeRO-Offload / ZeRO-Infinity: what DeepSpeed can offload at which stage, and no setting left unused.
    What the machine must offer (DeepSpeed's CPU Adam and async-io ops, a writable NVMe folder) is checked by
    pretrain/preflight.py."""
    if z.offload_params != "none" and z.stage != 3:
        raise ConfigError(
            f"zero.offload_params: '{z.offload_params}' needs zero.stage=3 (only ZeRO-3 partitions the parameters "
            f"it could offload); zero.stage is {z.stage}"
        )
    if z.offload_optimizer != "none" and z.stage == 0:
        raise ConfigError(
            f"zero.offload_optimizer: '{z.offload_optimizer}' needs zero.stage 1, 2 or 3 (ZeRO-0 has no ZeRO "
            "optimizer to offload)"
        )
    if z.offload_optimizer == "nvme" and z.stage != 3:
        raise ConfigError(
            f"zero.offload_optimizer: 'nvme' needs zero.stage=3 (ZeRO-Infinity; DeepSpeed's ZeRO-{z.stage} would "
            "keep the states in CPU memory instead); use offload_optimizer: cpu, or zero.stage: 3"
        )
    nvme = "nvme" in (z.offload_optimizer, z.offload_params)
    if nvme and not z.nvme_path:
        raise ConfigError(
            "zero.nvme_path: empty, but zero.offload_optimizer/offload_params is 'nvme'; set a folder on "
            "a local NVMe drive"
        )
    defaults = ZeroConfig()
    unused = [] if nvme else [k for k in _NVME_KEYS if getattr(z, k) != getattr(defaults, k)]
    if z.offload_params != "nvme":
        params_keys = ("nvme_params_in_cpu", "nvme_param_buffers", "nvme_param_buffer_size")
        unused += [k for k in params_keys if getattr(z, k) != getattr(defaults, k)]
    if z.offload_optimizer == z.offload_params == "none" and z.pin_memory != defaults.pin_memory:
        unused.append("pin_memory")
    if unused:
        raise ConfigError(
            f"zero.{unused[0]}: set, but nothing it applies to is offloaded (zero.offload_optimizer="
            f"{z.offload_optimizer}, zero.offload_params={z.offload_params}); remove "
            + ", ".join(f"zero.{k}" for k in dict.fromkeys(unused))
        )


_NVME_KEYS = (
    "nvme_path",
    "aio_block_size",
    "aio_queue_depth",
    "aio_intra_op_parallelism",
    "aio_single_submit",
    "aio_overlap_events",
)


def check_world(cfg: Config, world_size: int) -> int:
    """Checks the batch arithmetic for a world size; returns the gradient-accumulation steps."""
    t, p = cfg.train, cfg.parallel
    model_parallel = p.tp * p.pp * p.ulysses  # the ranks one sample's computation spans
    if world_size % model_parallel:
        valid = [n for n in range(model_parallel, 8 * model_parallel + 1, model_parallel)]
        names = "parallel.tp x parallel.pp" + (" x parallel.ulysses" if p.ulysses > 1 else "")
        sizes = f"{p.tp} x {p.pp}" + (f" x {p.ulysses}" if p.ulysses > 1 else "")
        raise ConfigError(
            f"world size {world_size} is not a multiple of {names} = {sizes} = {model_parallel}; world sizes that "
            f"work: {', '.join(map(str, valid))}, ..."
        )
    dp = world_size // model_parallel
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        valid = sorted({t.micro_batch_size * dp * k for k in range(1, 9)})
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size x "
            f"data-parallel size = {t.micro_batch_size} x {dp} = {per_step}; valid sizes include "
            f"{', '.join(map(str, valid))}"
        )
    return t.global_batch_size // per_step


def _parse_blend_item(where: str, item: Any) -> tuple[float, str]:
    if not isinstance(item, str) or not item.strip():
        raise ConfigError(f"{where}: entries are 'PREFIX' or 'WEIGHT PREFIX' strings, got {item!r}")
    parts = item.split()
    if len(parts) == 1:
        return 1.0, parts[0]
    if len(parts) == 2:
        try:
            weight = float(parts[0])
        except ValueError:
            raise ConfigError(f"{where}: '{item}': the weight '{parts[0]}' is not a number") from None
        if weight <= 0:
            raise ConfigError(f"{where}: '{item}': the weight must be positive")
        return weight, parts[1]
    raise ConfigError(f"{where}: '{item}': expected 'PREFIX' or 'WEIGHT PREFIX'")


def parse_blend(where: str, items: list) -> list[tuple[float, str]]:
    return [_parse_blend_item(where, item) for item in items]


_divisors = divisors


# ---------------------------------------------------------------------------------- resolution


def resolve(cfg: Config, vocab_size: int | None = None, world_size: int | None = None) -> Config:
    """Returns a copy with every derived default filled in (what config.yaml records). world_size (else
    $WORLD_SIZE, else 1) only rounds an `auto` batch to the data-parallel size."""
    cfg = dataclasses.replace(cfg)
    cfg.run = dataclasses.replace(cfg.run, dir=run_directory(cfg))
    d = cfg.data
    cfg.data = dataclasses.replace(
        d,
        tokenizer=tokenizer_path(d),
        train=d.train or [os.path.join(d.dir, "train")],
        valid=d.valid or [os.path.join(d.dir, "valid")],
        test=d.test or [os.path.join(d.dir, "test")],
        cache_dir=d.cache_dir or os.path.join(d.dir, "cache"),
    )
    m = resolve_model(cfg.model, vocab_size, cfg.parallel.tp)
    if m.vocab_size % cfg.parallel.tp:
        raise ConfigError(
            f"model.vocab_size: {m.vocab_size} is not divisible by parallel.tp={cfg.parallel.tp}; "
            f"use 0 (the tokenizer's, padded) or a multiple of {cfg.parallel.tp}"
        )
    if m.ffn_hidden_size % cfg.parallel.tp:
        raise ConfigError(
            f"model.ffn_hidden_size: {m.ffn_hidden_size} is not divisible by parallel.tp="
            f"{cfg.parallel.tp}; set it, or model.ffn_multiple, to a multiple of the tp size"
        )
    cfg.model = m
    cfg.train = _resolve_train(cfg, world_size)
    return cfg


def _resolve_train(cfg: Config, world_size: int | None) -> TrainConfig:
    """train.global_batch_size / lr `auto` from the Step Law (pretrain/scaling/hparam_laws.py), max_steps
    from train.tokens when it is set, and train.tokens = max_steps x batch x seq_len (the planned D)."""
    from pretrain.scaling.hparam_laws import STEP_LAW, non_embedding_parameters, round_batch

    t, m, p = cfg.train, cfg.model, cfg.parallel
    law, notes = STEP_LAW, []
    batch_auto = t.global_batch_size == AUTO
    if batch_auto:
        if not t.tokens:
            raise ConfigError(
                "train.global_batch_size: auto needs the planned token budget: set train.tokens (the Step Law's "
                "batch depends on D, and D = max_steps x batch would make it circular)"
            )
        world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        dp = max(1, world // (p.tp * p.pp * p.ulysses))
        batch = law.batch(non_embedding_parameters(m) if law.batch.alpha else 1, t.tokens)
        gbs, how = round_batch(batch, m.seq_len, t.micro_batch_size, dp)
        notes.append(
            f"global_batch_size = {gbs}: {law.name} ({law.source}) {law.batch.formula('B*')} with D={t.tokens:,}: {how}"
        )
        t = dataclasses.replace(t, global_batch_size=gbs)
    step_tokens = t.global_batch_size * m.seq_len
    if t.tokens and (batch_auto or t.max_steps == TrainConfig().max_steps):
        steps = max(1, round(t.tokens / step_tokens))
        notes.append(
            f"max_steps = {steps:,}: train.tokens {t.tokens:,} / {step_tokens:,} tokens per step"
            + (
                f" (replaces the configured {t.max_steps:,})"
                if t.max_steps not in (steps, TrainConfig().max_steps)
                else ""
            )
        )
        t = dataclasses.replace(t, max_steps=steps)
    elif t.tokens and t.tokens != t.max_steps * step_tokens:
        notes.append(f"tokens: {t.tokens:,} asked, but train.max_steps={t.max_steps:,} is set and decides")
    t = dataclasses.replace(t, tokens=t.max_steps * step_tokens)
    if t.lr == AUTO:
        n = non_embedding_parameters(m)
        lr = law.lr(n, t.tokens)
        notes.append(
            f"lr = {lr:.4g}: {law.name} ({law.source}) {law.lr.formula('lr*')} with N={n:,} (non-embedding), "
            f"D={t.tokens:,}"
        )
        t = dataclasses.replace(t, lr=lr)
    if notes:
        t = dataclasses.replace(t, derived=notes)
    _validate_steps(t)
    return t


def describe_keys() -> str:
    """Every key with its default and help, for `--help-config`."""
    lines = []
    for f in dataclasses.fields(Config):
        lines.append(f"{f.name}:")
        section = f.default_factory()
        for sf in dataclasses.fields(section):
            lines.append(f"  {sf.name} = {getattr(section, sf.name)!r}  # {sf.metadata.get('help', '')}")
    return "\n".join(lines)


def tokenizer_path(data: DataConfig) -> str:
    """data.tokenizer, or the prepared directory's tokenizer (tokenizer.model, else tokenizer.json)."""
    if data.tokenizer:
        return data.tokenizer
    json_only = not os.path.isfile(os.path.join(data.dir, "tokenizer.model")) and os.path.isfile(
        os.path.join(data.dir, "tokenizer.json")
    )
    return os.path.join(data.dir, "tokenizer.json" if json_only else "tokenizer.model")


def run_directory(cfg: Config) -> str:
    return cfg.run.dir or os.path.join("runs", cfg.run.name)


def main(argv: list[str] | None = None) -> int:
    """python -m pretrain.config --config FILE [--set KEY=VALUE ...] [--get SECTION.KEY]

    Validates a config (as training would, before any process starts) and prints it, or one key."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pretrain.config", description=main.__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--get", help="print only this key, e.g. run.dir")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    cfg.run = dataclasses.replace(cfg.run, dir=run_directory(cfg))
    if args.get:
        section, _, key = args.get.partition(".")
        try:
            print(getattr(getattr(cfg, section), key))
        except AttributeError:
            raise ConfigError(f"--get {args.get}: no such key") from None
    else:
        print(cfg.to_yaml(), end="")
    return 0


if __name__ == "__main__":
    from pretrain.cli import run

    raise SystemExit(run(main))
