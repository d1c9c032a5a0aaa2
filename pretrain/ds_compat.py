"""Everything we patch or work around in DeepSpeed, in one place, with why.

Checked against deepspeed 0.19.8 (requirements.txt pins it). Each item names the DeepSpeed code it
works around; when the pin moves, re-check each one (the tests named here fail if one breaks).

1. `before_pipeline_step`: the pipeline engine steps the optimizer inside train_batch(), so there is
   no public point between "gradients reduced" and "weights updated". We wrap its private
   `PipelineEngine._take_model_step` for one train_batch() call, to run the bad-step guard and read
   per-layer gradient norms (tests/test_faults.py, tests/test_diagnostics.py, pp2 cases).
2. `unshare_step_counters`: after a ZeRO-3 universal-checkpoint load
   (runtime/zero/stage3.py `_load_universal_checkpoint`), every parameter group's Adam state holds
   the SAME `step` tensor; torch's Adam increments it in place once per group, so the second group's
   bias correction runs a step ahead (tests/test_reshard.py, ZeRO-3 dp2 -> dp1).
3. `alias_model_state_files`: `ds_to_universal` keeps the source's engine-state file name
   (`mp_rank_XX_model_states.pt` below ZeRO-3, `zero_pp_rank_0_mp_rank_XX_model_states.pt` under it),
   but the loading engine looks for the name of ITS stage; we link the other spelling so a resume may
   also change the ZeRO stage (ZeRO-1 -> ZeRO-2 reshard test).
4. `restore_group_hyperparameters`: the same ZeRO-3 universal load copies the first parameter
   group's hyperparameters (weight decay included) onto every group; we put ours back after any load
   (pretrain/engine.py apply_optimizer_settings).
5. `set_lr_after_skipped_step`: DeepSpeed's fp16/bf16 overflow path skips `lr_scheduler.step()`, so
   a skipped update would shift the schedule; we set the LambdaLR state to the step index directly.
6. `one_model_parallel_reduce_in_grad_norm`: ZeRO-1/2's `scaled_global_norm`
   (runtime/zero/stage_1_and_2.py) all-reduces over the model-parallel group once per NON-EMPTY
   parameter group (`get_grad_norm_direct`), and the engine drops empty groups. A pipeline stage that
   holds only the untied embedding has one group, the others two: the stages then disagree on the
   number of collectives and deadlock. We defer those all-reduces and do one over the sum of squares
   (the same norm); tests/test_parallel.py, untied embeddings under pp2-zero1.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

CHECKED_DEEPSPEED = ("0.19.8",)


def deepspeed_version_note() -> str | None:
    """A line for the run log when the installed DeepSpeed is not one these workarounds were checked on."""
    try:
        import deepspeed
    except ImportError:
        return None
    if deepspeed.__version__ in CHECKED_DEEPSPEED:
        return None
    return (
        f"deepspeed {deepspeed.__version__} is installed; pretrain/ds_compat.py was checked against "
        f"{', '.join(CHECKED_DEEPSPEED)}: run the resume and pipeline tests before trusting it"
    )


@contextmanager
def before_pipeline_step(engine, hook: Callable[[], None]):
    """Runs `hook()` inside the next train_batch(), after the gradients are reduced and before the
    optimizer step (item 1)."""
    original_step = engine._take_model_step

    def take_step(*args, **kwargs):
        hook()
        return original_step(*args, **kwargs)

    engine._take_model_step = take_step
    try:
        yield
    finally:
        engine.__dict__.pop("_take_model_step", None)


def unshare_step_counters(engine) -> None:
    """Gives every optimizer state its own `step` tensor (item 2)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen = set()
    for state in inner.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


_ZERO3_STATES = re.compile(r"^zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt$")
_PLAIN_STATES = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def alias_model_state_files(converted: Path) -> None:
    """Links the engine-state file under the other ZeRO family's name (item 3)."""
    for f in list(converted.iterdir()):
        if m := _ZERO3_STATES.match(f.name):
            alias = converted / f"mp_rank_{m.group(1)}_model_states.pt"
        elif m := _PLAIN_STATES.match(f.name):
            alias = converted / f"zero_pp_rank_0_mp_rank_{m.group(1)}_model_states.pt"
        else:
            continue
        if not alias.exists():
            os.symlink(f.name, alias)


def restore_group_hyperparameters(engine, per_group: list[dict]) -> None:
    """Sets each parameter group's hyperparameters to ours (item 4); per_group[i] for group i."""
    groups = engine.optimizer.param_groups
    if len(groups) != len(per_group):
        raise RuntimeError(f"expected {len(per_group)} optimizer parameter groups, DeepSpeed has {len(groups)}")
    for group, values in zip(groups, per_group):
        group.update(values)


def set_lr_schedule_step(engine, steps_done: int) -> None:
    """Sets the LambdaLR schedule to `steps_done` optimizer steps (the LR of the next update), as
    LambdaLR.step() computes it, whether or not DeepSpeed stepped the scheduler (item 5)."""
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = steps_done
    groups = engine.optimizer.param_groups
    for group, base_lr, lr_lambda in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * lr_lambda(steps_done)
    scheduler._last_lr = [group["lr"] for group in groups]


def one_model_parallel_reduce_in_grad_norm(engine) -> None:
    """Makes a ZeRO-1/2 optimizer's gradient norm do one model-parallel all-reduce, whatever the
    number of its parameter groups on this rank (item 6). Same value: the norm over groups is the
    root of the summed squares of the per-group norms, and summing over ranks commutes with that."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer):
        return
    per_rank_norm = zero.scaled_global_norm  # bound: this rank's groups, each reduced over data parallel

    def scaled_global_norm(norm_type=2):
        reduce = zero._model_parallel_all_reduce
        zero._model_parallel_all_reduce = lambda tensor, op: None
        try:
            local = per_rank_norm(norm_type)  # inf when a group's norm was not finite
        finally:
            del zero._model_parallel_all_reduce
        total = local.float().pow(2)
        reduce(tensor=total, op=torch.distributed.ReduceOp.SUM)
        return total.sqrt()

    zero.scaled_global_norm = scaled_global_norm
