"""The DeepSpeed engine: our config -> a DeepSpeed config, AdamW param groups, the LR schedule."""
from __future__ import annotations

import torch

from pretrain.schedule import make_lr_lambda


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
                from pretrain.config import ConfigError

                raise ConfigError(f"zero.ds_config: {where} sets {at}={theirs[key]!r} but this run's config implies "
                                  f"{value!r}; remove it from the JSON or change the config key that sets it")
        merged[key] = value
    return merged


def load_user_ds_config(path: str) -> dict:
    import json

    from pretrain.config import ConfigError

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
        "zero_optimization": {"stage": cfg.zero.stage},
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
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on norm gains and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg, grad_accum: int, device: torch.device, mpu=None,
                 load_universal: bool = False):
    """load_universal: the engine will load a universal checkpoint (a resume on another layout)."""
    import deepspeed

    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=t.adam_eps, fused=device.type == "cuda")
    # A callable, so the schedule is built on the optimizer DeepSpeed actually steps (its ZeRO wrapper).
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(t))  # noqa: E731
    ds_config = deepspeed_config(cfg, grad_accum)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    return engine, lr_scheduler


def apply_optimizer_settings(engine, t) -> None:
    """Puts this run's optimizer settings back after a checkpoint load, which restores the saved
    ones (torch's optimizer and LR scheduler state dicts carry lr, betas, eps, weight decay): a
    resume with a changed train.lr / schedule / weight decay then uses the new values (the run log
    lists them), and an unchanged resume gets bit-identical values back. Also undoes DeepSpeed's
    ZeRO-3 universal load, which copies the first parameter group's hyperparameters to all groups."""
    groups = engine.optimizer.param_groups
    if len(groups) != 2:
        raise RuntimeError(f"expected the 2 parameter groups of param_groups() (decay, no decay), found {len(groups)}")
    engine.lr_scheduler.base_lrs = [t.lr for _ in groups]
    for group, weight_decay in zip(groups, (t.weight_decay, 0.0)):
        group.update(weight_decay=weight_decay, betas=(t.beta1, t.beta2), eps=t.adam_eps, initial_lr=t.lr)
    sync_lr_schedule(engine, engine.lr_scheduler.last_epoch)


def sync_lr_schedule(engine, steps_done: int) -> None:
    """Sets the LR schedule to `steps_done` optimizer steps (the LR of the next update), as
    LambdaLR.step() computes it; also after a skipped step, which DeepSpeed's overflow path does not
    count."""
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = steps_done
    groups = engine.optimizer.param_groups
    for group, base_lr, lr_lambda in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * lr_lambda(steps_done)
    scheduler._last_lr = [group["lr"] for group in groups]
