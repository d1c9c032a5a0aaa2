"""The DeepSpeed engine: our config -> a DeepSpeed config, AdamW param groups, the LR schedule."""

from __future__ import annotations

import torch

from kernels.errors import ConfigError
from model.tensor_parallel import VocabParallelEmbedding
from pretrain.ds_compat import (
    one_model_parallel_reduce_in_grad_norm,
    restore_group_hyperparameters,
    set_lr_schedule_step,
)
from pretrain.schedule import make_lr_lambda
from pretrain.zero import aio_section, offload_adam, zero_optimization

# Keys of a user's DeepSpeed JSON that our own machinery replaces: refused, with where to go instead.
_OWNED_ELSEWHERE = {
    "optimizer": "the optimizer is torch AdamW built from train.lr / train.beta1 / train.beta2 / train.weight_decay",
    "scheduler": "the LR schedule comes from train.schedule / train.warmup_steps / train.min_lr_ratio",
}


def _merge_user_config(ours: dict, theirs: dict, where: str, path: str = "") -> dict:
    """theirs with ours on top; a key both set to different values is an error naming both."""
    merged = dict(theirs)
    for key, value in ours.items():
        at = f"{path}.{key}" if path else key
        if key in theirs:
            if isinstance(value, dict) and isinstance(theirs[key], dict):
                merged[key] = _merge_user_config(value, theirs[key], where, at)
                continue
            if theirs[key] != value:
                raise ConfigError(
                    f"zero.ds_config: {where} sets {at}={theirs[key]!r} but this run's config implies "
                    f"{value!r}; remove it from the JSON or change the config key that sets it"
                )
        merged[key] = value
    return merged


def load_user_ds_config(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"zero.ds_config: '{path}' does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"zero.ds_config: '{path}' is not valid JSON ({e})") from None
    for key, why in _OWNED_ELSEWHERE.items():
        if key in data:
            raise ConfigError(f"zero.ds_config: '{path}' sets '{key}', which this stack owns: {why}")
    return data


def deepspeed_config(cfg, grad_accum: int) -> dict:
    """The DeepSpeed JSON for this run: our config's values, over the user's zero.ds_config if any."""
    ours = _our_deepspeed_config(cfg, grad_accum)
    if not cfg.zero.ds_config:
        return ours
    return _merge_user_config(ours, load_user_ds_config(cfg.zero.ds_config), cfg.zero.ds_config)


def _our_deepspeed_config(cfg, grad_accum: int) -> dict:
    t = cfg.train
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero_optimization(cfg),  # the stage, ZeRO-Offload / ZeRO-Infinity (pretrain/zero.py)
        **aio_section(cfg),
        # We pass torch's AdamW: DeepSpeed supports it under ZeRO but asks for this opt-in.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if t.grad_clip > 0:
        ds["gradient_clipping"] = t.grad_clip
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return ds


EMBEDDING_TYPES = (torch.nn.Embedding, VocabParallelEmbedding)


def embedding_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the token-embedding weights (also the output layer's when tied), under any layout."""
    return {id(p) for m in model.modules() if isinstance(m, EMBEDDING_TYPES) for p in m.parameters(recurse=False)}


def param_groups(model: torch.nn.Module, weight_decay: float, embedding_weight_decay: bool = True) -> list[dict]:
    """Two AdamW groups: [decayed, not decayed]. Matrices are decayed; norm gains and biases never are;
    the token embedding (and a tied output layer) is decayed unless embedding_weight_decay is false
    (Megatron-LM, GPT-NeoX and nanoGPT decay it; OLMo 2 does not)."""
    embeddings = set() if embedding_weight_decay else embedding_parameters(model)
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # a tied weight is listed once
        if p.requires_grad:
            # a ZeRO-3 parameter made by zero.Init (sharded initialization) is a [0] placeholder: its
            # real shape is ds_shape
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def group_weight_decay(t) -> float:
    """The decayed group's weight_decay for train.weight_decay_mode. AdamW (torch's, and DeepSpeed's CPU /
    fused Adam with adamw_mode) decays p by lr_t * group_wd * p each step, and the LR schedule (LambdaLR)
    changes only lr_t: coupled is group_wd = weight_decay; independent is group_wd = weight_decay / lr_peak,
    so the step's decay is weight_decay * lr_t / lr_peak whatever the peak LR (tests/test_weight_decay_mode.py)."""
    if t.weight_decay_mode == "independent":
        return t.weight_decay / t.lr
    return t.weight_decay


def build_engine(model: torch.nn.Module, cfg, grad_accum: int, mpu=None, load_universal: bool = False):
    """load_universal: the engine will load a universal checkpoint (a resume on another layout)."""
    import deepspeed

    t = cfg.train
    # DeepSpeed drops empty groups (a pipeline stage holding only the untied embedding has no undecayed
    # parameter); drop them here so we know which of ours each remaining group is.
    both = param_groups(model, group_weight_decay(t), t.embedding_weight_decay)
    decayed = [i == 0 for i, g in enumerate(both) if g["params"]]  # [decayed, not decayed], as param_groups
    groups = [g for g in both if g["params"]]
    if cfg.zero.offload_optimizer != "none":  # offloaded states are stepped on the CPU by DeepSpeed's CPU Adam
        optimizer = offload_adam(groups, t)
    else:
        # torch's fused AdamW on every device: on CPU one fused pass per tensor steps 4x faster than the
        # foreach ops (6 ms against 23-29 ms per step at quickstart; bench/RESULTS.md, issue 19)
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=True)
    # A callable, so the schedule is built on the optimizer DeepSpeed actually steps (its ZeRO wrapper).
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(t))
    ds_config = deepspeed_config(cfg, grad_accum)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    engine.param_group_decayed = decayed  # for apply_optimizer_settings
    one_model_parallel_reduce_in_grad_norm(engine)
    return engine, lr_scheduler


def apply_optimizer_settings(engine, t) -> None:
    """Puts this run's optimizer settings back after a checkpoint load, which restores the saved
    ones (torch's optimizer and LR scheduler state dicts carry lr, betas, eps, weight decay): a
    resume with a changed train.lr / schedule / weight decay then uses the new values (the run log
    lists them), and an unchanged resume gets bit-identical values back. Also undoes DeepSpeed's
    ZeRO-3 universal load, which copies the first group's hyperparameters to all groups (ds_compat)."""
    engine.lr_scheduler.base_lrs = [t.lr for _ in engine.optimizer.param_groups]
    common = dict(betas=(t.beta1, t.beta2), eps=t.adam_eps, initial_lr=t.lr)
    per_group = [dict(common, weight_decay=group_weight_decay(t) if d else 0.0) for d in engine.param_group_decayed]
    restore_group_hyperparameters(engine, per_group)
    for group in engine.optimizer.param_groups:  # a checkpoint saved by foreach AdamW restores fused off
        if "fused" in group:
            group.update(fused=True, foreach=None)
    set_lr_schedule_step(engine, engine.lr_scheduler.last_epoch)
