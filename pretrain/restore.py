"""Restoring state: which checkpoint a run continues from, whether it must be resharded, and
putting it back into the engine -- or a fresh start (optionally from checkpoint.init_from's weights).

    locate_resume()   before the engine exists: the checkpoint, refused if it belongs to another
                      model, converted to DeepSpeed's universal format if the layout changed
    restore()         after: engine, optimizer, LR schedule, RNG, guard and spike-detector state
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint import CheckpointError, read_meta
from pretrain.config import Config
from pretrain.job import Job, Run

# Keys that describe one invocation rather than the run; not compared on resume.
PER_INVOCATION = {("checkpoint", "resume"), ("train", "exit_at_step"), ("checkpoint", "allow_tokenizer_change")}
# Training keys that fix the optimizer's structure: a resume cannot change them.
STRUCTURAL = {("train", "embedding_weight_decay")}


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path | None = None  # None: a fresh start
    universal: Path | None = None  # the converted checkpoint when resuming on another layout

    @property
    def fresh(self) -> bool:
        return self.checkpoint is None


@dataclass
class TrainState:
    start_step: int
    resumed: bool
    meta: dict


def compare_configs(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(differences that forbid a resume -- the model's shape and STRUCTURAL keys --, other changed
    settings, which are allowed and logged)."""
    blocking, other = [], []
    for section, values in current.items():
        old = saved.get(section, {})
        for key, value in values.items():
            if key in old and old[key] != value:
                line = f"{section}.{key}: checkpoint {old[key]!r}, now {value!r}"
                (blocking if section == "model" or (section, key) in STRUCTURAL else other).append(line)
    return blocking, other


def schema_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Keys of a checkpoint's config written by another version of the code: (keys this version does
    not know, keys this version added). compare_configs sees neither."""
    unknown = [
        f"{section}.{key}" if isinstance(values, dict) else section
        for section, values in saved.items()
        for key in (values if isinstance(values, dict) else [None])
        if section not in current or (key is not None and key not in current[section])
    ]
    added = [
        f"{section}.{key}"
        for section, values in current.items()
        for key in values
        if isinstance(saved.get(section), dict) and key not in saved[section]
    ]
    return unknown, added


def check_tokenizer(saved: dict, tokenizer, cfg: Config, log) -> None:
    """The same token ids must mean the same text: a resume with another tokenizer would train on
    garbage, silently."""
    was = saved.get("tokenizer_sha256")
    if was is None or was == tokenizer.sha256:
        return
    what = (
        f"the checkpoint was trained with a tokenizer of sha256 {was[:12]}…, but data.tokenizer "
        f"({tokenizer.path}) has sha256 {tokenizer.sha256[:12]}…"
    )
    if cfg.checkpoint.allow_tokenizer_change:
        log(f"[checkpoint] warning: {what}; resuming anyway (checkpoint.allow_tokenizer_change=true)")
        return
    raise CheckpointError(
        f"{what}: resuming would train on token ids that mean other text. Use the data and "
        "tokenizer the run was trained on (the checkpoint keeps a copy in <checkpoint>/), "
        "or set checkpoint.allow_tokenizer_change=true if the ids are known to agree"
    )


def check_resumable(saved: dict, cfg: Config, layout, log, tokenizer=None) -> str | None:
    """Refuses a checkpoint of another model or tokenizer; logs changed settings. Returns why the
    resume needs a conversion to DeepSpeed's universal checkpoint (another layout or ZeRO stage), or None."""
    from pretrain.checkpoint.universal import needs_conversion

    if tokenizer is not None:
        check_tokenizer(saved, tokenizer, cfg, log)

    current = cfg.to_dict()
    for section, key in PER_INVOCATION:
        saved["config"].get(section, {}).pop(key, None)
        current[section].pop(key, None)
    unknown, added = schema_changes(saved["config"], current)
    model_unknown = [k for k in unknown if k.startswith("model.")]
    if model_unknown:  # a model setting this code cannot build: resuming would silently change the model
        raise CheckpointError(
            f"the checkpoint's model has settings this version of the code does not know: {', '.join(model_unknown)}; "
            "resume it with the version that wrote it, or start a new run from its weights (checkpoint.init_from)"
        )
    if unknown:
        log(f"[checkpoint] the checkpoint's config has keys this version does not know (ignored): {', '.join(unknown)}")
    if added:
        log(f"[checkpoint] keys added since the checkpoint was written (this run's values apply): {', '.join(added)}")
    blocking, other = compare_configs(saved["config"], current)
    if blocking:
        raise CheckpointError("the checkpoint's model differs from the config: " + "; ".join(blocking))
    for line in other:
        log(f"[checkpoint] setting changed since the checkpoint: {line}")
    now = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ulysses": layout.ulysses, "zero_stage": cfg.zero.stage}
    return needs_conversion(saved, now)


def locate_resume(run: Run) -> ResumePoint:
    """The checkpoint checkpoint.resume asks for (a collective: every rank gets the same answer)."""
    from pretrain.checkpoint.universal import prepare_universal

    ckpt = run.checkpointer.resolve(run.cfg.checkpoint.resume)
    if ckpt is None:
        if run.cfg.checkpoint.resume == "auto":
            run.log(f"[checkpoint] --resume auto: no checkpoint under {run.checkpointer.root}; starting fresh")
        return ResumePoint()
    meta = read_meta(ckpt)
    keep_annealing(meta, run)
    reshard_reason = check_resumable(meta, run.cfg, run.layout, run.log, run.tokenizer)
    if not reshard_reason:
        return ResumePoint(ckpt)
    run.log(f"[checkpoint] {ckpt.name} was written on another layout ({reshard_reason}): resharding")
    return ResumePoint(ckpt, prepare_universal(ckpt, run.dist.rank, run.log))


# ------------------------------------------------------------------------------ --anneal-from


def anneal_checkpoint(path: str) -> tuple[Path, int]:
    """--anneal-from PATH: the checkpoint (a checkpoint directory, or a run directory / checkpoints folder:
    its newest complete one) and its step, where the decay / annealing phase will start."""
    from pretrain.checkpoint import META, find_resumable, verify

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"--anneal-from {path}: no such directory")
    if (p / META).is_file():
        verify(p, "size")
        ckpt = p
    else:
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        ckpt = find_resumable(root, "size", print)
        if ckpt is None:
            raise CheckpointError(f"--anneal-from {path}: neither a checkpoint nor a run with a complete one")
    return ckpt, int(read_meta(ckpt)["step"])


def check_anneal_target(run_dir: Path, ckpt: Path, step: int) -> None:
    """An annealed run is a branch of the run it starts from: refuse a run directory whose checkpoints go
    past the branch point (its `latest` and --resume auto would mix the two)."""
    from pretrain.checkpoint import complete_checkpoints
    from pretrain.checkpoint.layout import STEP_DIR

    later = [c.name for c in complete_checkpoints(run_dir / "checkpoints") if int(STEP_DIR.match(c.name)[1]) > step]
    if later:
        raise CheckpointError(
            f"--anneal-from {ckpt}: the run directory {run_dir} already holds later checkpoints "
            f"({', '.join(later[-3:])}); "
            "the annealed run is a branch: give it its own directory (--set run.name=NAME or run.dir=DIR)"
        )


def keep_annealing(meta: dict, run: Run) -> None:
    """A run that --anneal-from started resumes as the same annealing run: train.decay_start comes from the
    checkpoint when this invocation leaves it at 0, so a plain --resume auto does not jump back to the
    stable phase."""
    import dataclasses

    saved = meta.get("config", {}).get("train", {}).get("decay_start", 0)
    t = run.cfg.train
    if saved and not t.decay_start and t.schedule == meta["config"]["train"].get("schedule"):
        from pretrain.config import TrainConfig
        from pretrain.schedule import check_schedule

        run.cfg.train = dataclasses.replace(t, decay_start=saved)
        check_schedule(run.cfg.train, TrainConfig())
        run.log(f"[checkpoint] train.decay_start={saved} (the annealing phase of the checkpoint's run) kept")


def load_initial_weights(model: torch.nn.Module, path: Path, log) -> None:
    """checkpoint.init_from: weights only (a fine-tune or an imported model), before ZeRO partitions them."""
    from pretrain.checkpoint.consolidate import consolidated_state_dict

    if path.is_dir():
        state = consolidated_state_dict(path)
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"checkpoint.init_from: '{path}' is neither a checkpoint directory nor a file")
    own = model.state_dict()
    mismatched = [
        f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(state) - ({"head.weight"} if model.cfg.tie_embeddings else set()))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        raise CheckpointError(
            f"checkpoint.init_from: {path} does not fit the model: mismatched {mismatched}, "
            f"missing {missing}, unexpected {unexpected}"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    log(f"[checkpoint] initialised the model from {path} (weights only; optimizer and step start fresh)")


def prepare_weights(run: Run, model, point: ResumePoint) -> None:
    """A fresh start may begin from other weights (checkpoint.init_from); a resume loads them later."""
    if point.fresh and run.cfg.checkpoint.init_from:
        load_initial_weights(model, Path(run.cfg.checkpoint.init_from), run.log)


def restore(job: Job, point: ResumePoint) -> TrainState:
    """Loads the checkpoint into the engine (or leaves the fresh one) and records the resolved config."""
    from pretrain.checkpoint.universal import link_module_names
    from pretrain.engine import apply_optimizer_settings

    run = job.run
    state = TrainState(0, False, {})
    if not point.fresh:
        if point.universal is not None:
            link_module_names(point.universal, job.engine.module, run.cfg.model.num_layers)
            meta = run.checkpointer.load_universal(job.engine, point.universal, point.checkpoint)
        else:
            meta = run.checkpointer.load(job.engine, point.checkpoint)
        apply_optimizer_settings(job.engine, run.cfg.train)
        job.guard.load_state_dict(meta.get("bad_step_guard"))
        job.spikes.load_state_dict(meta.get("spike_detector"))
        state = TrainState(meta["step"], True, meta)
        run.log(
            f"[checkpoint] resumed from {point.checkpoint} at step {state.start_step} "
            f"({meta['consumed_samples']:,} samples consumed)"
        )
    if run.dist.is_main:
        (run.run_dir / "config.yaml").write_text(run.cfg.to_yaml())
    return state
