"""Learning-rate schedules, as multipliers of train.lr for the update made at 0-based step s.

Every schedule but `power` starts with a linear warmup, (s + 1) / W over W = warmup_steps. Then:

    constant   1
    cosine     min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2, p = (s - W) / (max_steps - W)
    wsd        warmup-stable-decay: 1 until the decay starts at s0, then linear to min_lr_ratio
    infinite   the infinite schedule ("Simple and Scalable Strategies to Continually Pre-train LLMs",
               Ibrahim et al. 2024; "Beyond Cosine Decay: On the effectiveness of Infinite Learning Rate
               Schedule for Continual Pre-training", 2025): warmup, a cool-down over cooldown_steps from
               1 to constant_lr_ratio, a constant phase for as long as the run goes on, and a short
               annealing phase from s0 to min_lr_ratio. The shapes are ours (a cosine cool-down, the
               exponential annealing below); the phase lengths and ratios are keys, not the papers' values
    power      the Power scheduler (Shen et al., 2024): the LR is a power law of the tokens seen,
               n = (s + 1) * tokens per step, capped at train.lr (their eta_max):

                   lr(n) = min(train.lr, a * n^b)          a = power_a, b = power_b

               warmup: (s + 1) / W * lr(n at the end of warmup); from s0 on, an exponential decay of
               lr(n at s0) to min_lr_ratio of it. a = 4, b = -0.51 are the paper's, found with muP
               (with standard parametrisation, set them from your own sweep). This is the form of the
               authors' code (IBM dolomite-engine,
               optimization/scheduler.py PowerScheduler: min(lr, a * (steps * tokens per step)^b));
               the paper writes the law with a batch-size factor in front of a, which that code folds
               into a. n counts (s + 1) x the current tokens per step: a resume with another batch
               size moves the curve (the LR jumps to the law's value at the new token count).

The final decay (wsd, infinite, power) starts at s0 = train.decay_start, or, when it is 0, over the
last round(decay_fraction * max_steps) steps. `--anneal-from CHECKPOINT` sets decay_start to the
checkpoint's step: the decay / annealing phase then runs from any checkpoint of the stable phase to
max_steps (pretrain/restore.py). The decay progress is p = (s - s0) / (max_steps - s0), clamped at 1:
past the planned end (a run extended beyond max_steps) every schedule holds its final value, and a
run extended before its decay (a larger max_steps on resume) continues without a jump: the stable,
constant and power phases do not depend on max_steps.

The exponential decay from `start` to `end` is the normalised one of dolomite-engine's
ExponentialScheduler, which reaches `end` exactly (also 0):
    end + (start - end) * (e^(1 - p) - 1) / (e - 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kernels.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant", "power", "infinite")
WITH_FINAL_DECAY = ("wsd", "infinite", "power")
# Keys that only one schedule reads: (key, schedule). Set for another schedule, they are an error.
SCHEDULE_KEYS = (
    ("power_a", "power"),
    ("power_b", "power"),
    ("cooldown_steps", "infinite"),
    ("constant_lr_ratio", "infinite"),
)


def exponential_decay(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1 (see the module docstring)."""
    return end + (start - end) * (math.exp(1.0 - progress) - 1.0) / (math.e - 1.0)


@dataclass(frozen=True)
class Schedule:
    """The LR multiplier of one run (its resolved train section and tokens per step)."""

    kind: str
    max_steps: int
    warmup_steps: int
    min_lr_ratio: float
    decay_start: int  # s0, resolved
    peak_lr: float = 1.0  # train.lr: the power law's cap
    tokens_per_step: int = 0
    power_a: float = 4.0
    power_b: float = -0.51
    cooldown_steps: int = 0
    constant_lr_ratio: float = 0.5

    def __call__(self, step: int) -> float:
        return self.multiplier(step)  # for plotting and tests; LambdaLR gets make_lr_lambda's plain function

    def multiplier(self, step: int) -> float:
        if self.kind == "power":
            return self._power(step)
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            if step < self.decay_start:
                return 1.0
            return 1.0 - (1 - self.min_lr_ratio) * self._decay_progress(step)
        if self.kind == "infinite":
            return self._infinite(step)
        raise ValueError(f"train.schedule: '{self.kind}': allowed {', '.join(SCHEDULES)}")

    def _decay_progress(self, step: int) -> float:
        return min(1.0, (step - self.decay_start) / max(1, self.max_steps - self.decay_start))

    def _infinite(self, step: int) -> float:
        cooled = self.warmup_steps + self.cooldown_steps
        if step >= self.decay_start:
            return exponential_decay(self.constant_lr_ratio, self.min_lr_ratio, self._decay_progress(step))
        if step >= cooled:
            return self.constant_lr_ratio
        # cosine cool-down from 1 (step W) towards constant_lr_ratio (step W + C)
        progress = (step - self.warmup_steps) / self.cooldown_steps
        return self.constant_lr_ratio + (1 - self.constant_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def power_law(self, step: int) -> float:
        """min(1, a * n^b / lr) with n the tokens seen after the update of step `step`."""
        tokens = (step + 1) * self.tokens_per_step
        return min(1.0, self.power_a * tokens**self.power_b / self.peak_lr)

    def _power(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps * self.power_law(self.warmup_steps - 1)
        if step < self.decay_start:
            return self.power_law(step)
        start = self.power_law(self.decay_start - 1)  # the power law at the tokens seen when the decay starts
        return exponential_decay(start, self.min_lr_ratio * start, self._decay_progress(step))


def default_decay_start(t) -> int:
    """s0 when train.decay_start is 0: the last round(decay_fraction * max_steps) steps, after warmup
    (and the infinite schedule's cool-down)."""
    decay_steps = max(1, round(t.decay_fraction * t.max_steps))
    first = t.warmup_steps + (t.cooldown_steps if t.schedule == "infinite" else 0)
    return max(first, t.max_steps - decay_steps)


def tokens_per_step(t) -> int:
    """Tokens per optimizer step of a resolved train section (train.tokens = max_steps x tokens per
    step: pretrain/config.py resolve())."""
    if t.tokens <= 0 or t.tokens % t.max_steps:
        raise ConfigError(
            f"train.tokens: {t.tokens} is not a resolved token budget (max_steps x global_batch_size x seq_len, "
            f"max_steps={t.max_steps}); the power schedule needs the config as pretrain.config.resolve() returns it"
        )
    return t.tokens // t.max_steps


def schedule_from_config(t) -> Schedule:
    """The Schedule of a resolved TrainConfig `t`."""
    return Schedule(
        kind=t.schedule,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        min_lr_ratio=t.min_lr_ratio,
        decay_start=t.decay_start or default_decay_start(t),
        peak_lr=t.lr,
        tokens_per_step=tokens_per_step(t) if t.schedule == "power" else 0,
        power_a=t.power_a,
        power_b=t.power_b,
        cooldown_steps=t.cooldown_steps,
        constant_lr_ratio=t.constant_lr_ratio,
    )


def make_lr_lambda(t):
    """The multiplier function (step -> factor of train.lr) for LambdaLR, from a resolved TrainConfig. A plain
    function on purpose: LambdaLR.state_dict() saves the __dict__ of a callable OBJECT and load_state_dict()
    writes it back, which would put a checkpoint's schedule over this run's (an extension, --anneal-from)."""
    schedule = schedule_from_config(t)
    return lambda step: schedule.multiplier(step)


def check_schedule(t, defaults) -> None:
    """The schedule keys of a TrainConfig `t` against each other (after max_steps is final).
    `defaults`: a TrainConfig with every default, to tell a key that was set from one that was not."""
    for key, owner in SCHEDULE_KEYS:
        if t.schedule != owner and getattr(t, key) != getattr(defaults, key):
            raise ConfigError(
                f"train.{key}: {getattr(t, key)} is set but only applies to train.schedule: {owner} "
                f"(schedule is '{t.schedule}'); remove it or use schedule {owner}"
            )
    if t.decay_start and t.schedule not in WITH_FINAL_DECAY:
        raise ConfigError(
            f"train.decay_start: {t.decay_start} (set by --anneal-from, or by hand) needs a schedule with a final "
            f"decay; train.schedule is '{t.schedule}'; allowed: {', '.join(WITH_FINAL_DECAY)}"
        )
    if t.decay_start and t.decay_start >= t.max_steps:
        raise ConfigError(
            f"train.max_steps: {t.max_steps} must be larger than train.decay_start={t.decay_start} (where the "
            f"decay / annealing starts, e.g. the step of --anneal-from's checkpoint): set train.max_steps to "
            f"{t.decay_start} + the number of decay steps"
        )
    first = t.warmup_steps + (t.cooldown_steps if t.schedule == "infinite" else 0)
    if t.decay_start and t.decay_start < first:
        raise ConfigError(
            f"train.decay_start: {t.decay_start} is inside the warmup"
            + (" and cool-down" if t.schedule == "infinite" else "")
            + f" (which end at step {first}); anneal from a checkpoint of the stable phase"
        )
    if t.schedule == "infinite" and t.decay_start == 0 and default_decay_start(t) >= t.max_steps:
        raise ConfigError(
            f"train.cooldown_steps: warmup {t.warmup_steps} + cool-down {t.cooldown_steps} leave no room for "
            f"the annealing phase before train.max_steps={t.max_steps}"
        )
