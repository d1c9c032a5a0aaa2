"""Learning-rate schedules as multipliers of the peak LR: linear warmup, then cosine decay,
warmup-stable-decay (WSD), or constant."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int, *, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float, decay_fraction: float = 0.2
) -> float:
    """Multiplier for the update made at 0-based optimizer step `step`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"train.schedule: '{schedule}': allowed cosine, wsd, constant")


def make_lr_lambda(t) -> callable:
    """The multiplier function for a TrainConfig `t`."""
    return lambda step: lr_multiplier(
        step,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        schedule=t.schedule,
        min_lr_ratio=t.min_lr_ratio,
        decay_fraction=t.decay_fraction,
    )
