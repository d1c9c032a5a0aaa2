#!/usr/bin/env python
"""The learning-rate schedules of pretrain/schedule.py, drawn from the code itself: bench/schedules.png, and
the LR at a few steps as JSON on stdout.

One run of 10,000 steps planned, 100 warmup steps, peak 3e-3, 0.5M tokens per step, min_lr_ratio 0.1:
cosine; WSD with its planned decay (last 20%) and the same run annealed from its step-5,000 checkpoint
(--anneal-from); the infinite schedule (cool-down over 1,000 steps to 0.5 of the peak, constant, annealing
over the last 20%) and annealed from step 5,000; the Power scheduler (a = 4, b = -0.51 per token) extended
to 15,000 steps (its stable phase does not depend on the planned length). Each curve goes on past its
planned end, where it holds its final value.

    python bench/schedules.py [--out bench/schedules.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import TrainConfig
from pretrain.schedule import schedule_from_config

PEAK, STEPS, TOKENS_PER_STEP = 3e-3, 10_000, 256 * 2048


def curves() -> dict:
    base = dataclasses.replace(
        TrainConfig(), lr=PEAK, max_steps=STEPS, warmup_steps=100, min_lr_ratio=0.1, tokens=STEPS * TOKENS_PER_STEP
    )
    inf = dict(schedule="infinite", cooldown_steps=1000, constant_lr_ratio=0.5)
    return {
        "cosine": base,
        "wsd": dataclasses.replace(base, schedule="wsd"),
        "wsd, annealed from step 5000": dataclasses.replace(base, schedule="wsd", decay_start=5000),
        "infinite": dataclasses.replace(base, **inf),
        "infinite, annealed from step 5000 to 7000": dataclasses.replace(base, **inf, decay_start=5000, max_steps=7000),
        "power (a=4, b=-0.51)": dataclasses.replace(base, schedule="power"),
        "power, extended to 15000 steps": dataclasses.replace(
            base, schedule="power", max_steps=15_000, tokens=15_000 * TOKENS_PER_STEP
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).with_name("schedules.png")))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(0, 16_000, 10))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    table = {}
    for name, t in curves().items():
        s = schedule_from_config(t)
        lrs = [PEAK * s(i) for i in steps]
        style = "--" if "annealed" in name or "extended" in name else "-"
        for ax in axes:
            ax.plot(steps, lrs, style, label=name, linewidth=1.4)
        table[name] = {str(i): PEAK * s(i) for i in (0, 99, 500, 2000, 5000, 6000, 7999, 9999, 12000, 14999)}
    for ax, scale in zip(axes, ("linear", "log"), strict=True):
        ax.set_yscale(scale)
        ax.axvline(STEPS, color="grey", linewidth=0.8, linestyle=":")
        ax.text(STEPS, PEAK, " planned end", color="grey", fontsize=8)
        ax.set_xlabel("optimizer step (0.5M tokens per step)")
        ax.set_ylabel(f"learning rate ({scale} scale)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("pretrain/schedule.py: peak (power: cap) 3e-3, 100 warmup steps, min_lr_ratio 0.1")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(json.dumps({"png": args.out, "peak_lr": PEAK, "tokens_per_step": TOKENS_PER_STEP, "lr_at_step": table}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
