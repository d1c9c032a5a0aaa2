"""Learning-rate schedules against independent references (torch's own schedulers, the papers' formulas
written out here), through a resume (LambdaLR state, DeepSpeed's set step) and past the planned end."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from kernels.errors import ConfigError
from pretrain.config import TrainConfig, load_config, resolve
from pretrain.ds_compat import set_lr_schedule_step
from pretrain.schedule import Schedule, check_schedule, schedule_from_config
from tests.conftest import ROOT


def sched(kind: str, max_steps: int = 100, warmup: int = 10, min_ratio: float = 0.1, decay_start: int = 0, **kw):
    if not decay_start:  # the default: the last 20% of max_steps
        decay_start = max(warmup + kw.get("cooldown_steps", 0), max_steps - round(0.2 * max_steps))
    return Schedule(kind, max_steps, warmup, min_ratio, decay_start, **kw)


def make_lr_lambda_of(schedule: Schedule):
    return lambda step: schedule(step)


def exp_decay(start: float, end: float, p: float) -> float:
    """dolomite-engine's ExponentialScheduler: a * e^(-p) + b with a, b chosen so that f(0)=start, f(1)=end."""
    a = (start - end) * math.e / (math.e - 1)
    b = end - (start - end) / (math.e - 1)
    return a * math.exp(-p) + b


def test_warmup_then_cosine_matches_torch_cosine_annealing():
    s = sched("cosine")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=90, eta_min=0.1)
    for step in range(10):
        assert s(step) == pytest.approx((step + 1) / 10)
    for step in range(10, 100):
        assert s(step) == pytest.approx(cosine.get_last_lr()[0], abs=1e-12)
        opt.step()
        cosine.step()


def test_wsd_is_flat_then_linear_to_the_floor():
    s = sched("wsd", min_ratio=0.0)
    assert [s(i) for i in (10, 50, 79)] == [1.0, 1.0, 1.0]
    for i in range(80, 100):  # decay over steps 80..99: 1 - (s - 80) / 20
        assert s(i) == pytest.approx(1 - (i - 80) / 20)
    assert s(100) == s(250) == 0.0  # past the planned end: the final value


def test_wsd_decay_started_at_a_stable_checkpoint():
    """--anneal-from a step-40 checkpoint: the same curve up to 40, then linear to the floor at max_steps."""
    planned, early = sched("wsd"), sched("wsd", decay_start=40)
    assert [early(i) for i in range(41)] == [planned(i) for i in range(41)]
    for i in range(40, 100):
        assert early(i) == pytest.approx(1 - 0.9 * (i - 40) / 60)


def test_constant_and_unknown():
    assert sched("constant", max_steps=10, warmup=0)(500) == 1.0
    with pytest.raises(ValueError, match="allowed cosine, wsd, constant, power, infinite"):
        sched("linear", max_steps=10, warmup=0)(1)


def test_power_schedule_against_the_power_law():
    """lr = min(lr_max, a n^b), n = tokens seen; warmup to the law's value; exponential decay at the end."""
    a, b, lr_max, T = 4.0, -0.51, 3e-3, 8 * 256  # 8 sequences of 256 tokens per step
    s = sched("power", max_steps=1000, warmup=10, min_ratio=0.0, peak_lr=lr_max, tokens_per_step=T)
    s = dataclasses.replace(s, power_a=a, power_b=b)

    def law(step):  # the LR after `step` updates have been seen, n = (step + 1) T tokens
        return min(lr_max, a * ((step + 1) * T) ** b)

    for step in range(10):
        assert s(step) * lr_max == pytest.approx((step + 1) / 10 * law(9))
    for step in (10, 11, 100, 500, 799):
        assert s(step) * lr_max == pytest.approx(law(step))
    assert law(10) == lr_max and law(799) < lr_max  # both regimes are visited: capped, then the law
    start = law(799)  # the decay starts at step 800 from the law's value at 800 x T tokens
    for step in (800, 850, 900, 999):
        assert s(step) * lr_max == pytest.approx(exp_decay(start, 0.0, (step - 800) / 200))
    assert s(1000) == s(5000) == pytest.approx(0.0, abs=1e-15)  # extended past the planned end: the floor


def test_power_schedule_resumes_and_extends_without_a_jump():
    """A LambdaLR resumed from its state dict with a longer plan (max_steps 1000 -> 3000) gives the same LRs up
    to the old plan's decay: the power law depends on the tokens seen, not on the planned length."""
    T = 2048
    short = sched("power", max_steps=1000, peak_lr=1e-2, tokens_per_step=T)
    longer = dataclasses.replace(short, max_steps=3000, decay_start=2400)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1e-2)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda_of(short))
    for _ in range(500):
        opt.step()
        sch.step()
    state = sch.state_dict()
    opt2 = torch.optim.SGD([p], lr=1e-2)
    sch2 = torch.optim.lr_scheduler.LambdaLR(opt2, make_lr_lambda_of(longer))
    sch2.load_state_dict(state)
    engine = SimpleNamespace(lr_scheduler=sch2, optimizer=opt2)
    set_lr_schedule_step(engine, 500)  # what a resume does (pretrain/engine.py apply_optimizer_settings)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    for step in range(500, 800):
        assert longer(step) == short(step)
    assert longer(2399) == pytest.approx(min(1.0, 4.0 * (2400 * T) ** -0.51 / 1e-2))


def test_infinite_schedule_against_its_phases():
    """warmup, cosine cool-down to the constant LR, constant, exponential annealing to min_lr_ratio."""
    s = sched("infinite", max_steps=200, warmup=10, min_ratio=0.05, cooldown_steps=30, constant_lr_ratio=0.4)
    for step in range(10):
        assert s(step) == pytest.approx((step + 1) / 10)
    for step in range(10, 40):
        assert s(step) == pytest.approx(0.4 + 0.6 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 30)))
    assert [s(i) for i in (40, 100, 159)] == [0.4, 0.4, 0.4]
    for step in range(160, 200):  # the last 20%: 160..199
        assert s(step) == pytest.approx(exp_decay(0.4, 0.05, (step - 160) / 40))
    assert s(10_000) == pytest.approx(0.05)


def test_infinite_anneal_triggered_from_a_checkpoint_and_extended():
    """Annealing from step 70 (--anneal-from) of a run planned for 200 steps, ending at 100."""
    s = sched("infinite", max_steps=100, warmup=10, min_ratio=0.0, cooldown_steps=20, decay_start=70)
    assert s(69) == 0.5 and s(70) == 0.5
    for step in range(70, 100):
        assert s(step) == pytest.approx(exp_decay(0.5, 0.0, (step - 70) / 30))
    assert s(100) == s(130) == pytest.approx(0.0, abs=1e-15)
    planned = sched("infinite", max_steps=200, warmup=10, min_ratio=0.0, cooldown_steps=20)
    assert [planned(i) for i in range(70)] == [s(i) for i in range(70)]


def test_schedule_from_a_resolved_config():
    cfg = resolve(
        load_config(
            ROOT / "configs" / "tiny.yaml",
            ["train.schedule=power", "train.max_steps=50", "train.power_a=2.0", "model.vocab_size=256"],
        )
    )
    s = schedule_from_config(cfg.train)
    assert s.tokens_per_step == 8 * 64 and cfg.train.tokens == 50 * 8 * 64
    assert s(20) == pytest.approx(min(1.0, 2.0 * (21 * 512) ** -0.51 / 3e-3))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(schedule="cosine", decay_start=50), "needs a schedule with a final decay"),
        (dict(schedule="wsd", decay_start=100), "must be larger than train.decay_start=100"),
        (dict(schedule="wsd", decay_start=5), "inside the warmup"),
        (dict(schedule="wsd", power_a=3.0), "only applies to train.schedule: power"),
        (dict(schedule="power", cooldown_steps=3), "only applies to train.schedule: infinite"),
    ],
)
def test_schedule_keys_are_checked(changes, message):
    t = dataclasses.replace(TrainConfig(), max_steps=100, warmup_steps=10, **changes)
    with pytest.raises(ConfigError, match=message):
        check_schedule(t, TrainConfig())


def test_a_resumed_lambdalr_keeps_this_runs_schedule():
    """DeepSpeed saves the LambdaLR state and loads it back on resume: the checkpoint's schedule (here a WSD
    decay planned at step 80) must not come back over this run's (decay from step 40, --anneal-from)."""
    from pretrain.schedule import make_lr_lambda

    planned = dataclasses.replace(TrainConfig(), schedule="wsd", max_steps=100, warmup_steps=10, tokens=100)
    annealed = dataclasses.replace(planned, decay_start=40)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    saved = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(planned)).state_dict()
    resumed = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(annealed))
    resumed.load_state_dict(saved)
    assert resumed.lr_lambdas[0](70) == pytest.approx(1 - 0.9 * 30 / 60)


# ------------------------------------------------------------------------- --anneal-from, end to end


def _optimizer_moments(ckpt) -> dict:
    """Adam's per-group state of a ZeRO-1 world-1 checkpoint (DeepSpeed's own pickle: weights_only=False)."""
    state = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
    return state["optimizer_state_dict"]["base_optimizer_state"]["state"]


def test_anneal_from_resumes_the_optimizer_exactly_and_changes_only_the_lr(bundled_dir, tmp_path):
    """A WSD run (8 steps planned, decay from step 6) trained straight to step 6, and an annealed branch started
    with --anneal-from at its step-4 checkpoint (decay from step 4): step 5 (update 4, LR multiplier 1 in
    both) is bit for bit the same run; at step 6 the Adam moments are still identical and the weights differ
    only by the learning rate: (w5 - w6) / lr is the same AdamW update in both runs."""
    from pretrain.checkpoint.consolidate import consolidated_state_dict
    from pretrain.metrics import read_metrics
    from tests.conftest import check, run_module, tiny_args

    sets = [
        "train.schedule=wsd",
        "train.max_steps=8",
        "train.warmup_steps=2",
        "train.exit_at_step=6",
        "train.eval_every=0",
        "train.diagnostics_every=0",
        "checkpoint.every=1",
        "checkpoint.keep_last=0",
    ]
    base, branch = tmp_path / "base", tmp_path / "annealed"
    check(run_module(tiny_args(bundled_dir, base, *sets)))
    proc = check(
        run_module(tiny_args(bundled_dir, branch, *sets) + ["--anneal-from", str(base / "checkpoints" / "step_000004")])
    )
    assert "train.decay_start: checkpoint 0, now 4" in proc.stdout + proc.stderr
    ckpt = lambda run, step: run / "checkpoints" / f"step_{step:06d}"

    for name, tensor in consolidated_state_dict(ckpt(base, 5)).items():
        assert torch.equal(tensor, consolidated_state_dict(ckpt(branch, 5))[name]), name
    for step in (5, 6):
        ours, theirs = _optimizer_moments(ckpt(base, step)), _optimizer_moments(ckpt(branch, step))
        for group in ours:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(ours[group][key], theirs[group][key]), (step, group, key)

    lr = {run: {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl", "train")} for run in (base, branch)}
    peak = 3e-3  # configs/tiny.yaml; the logged lr at step k is the one of update k (0-based)
    assert lr[base][5] == pytest.approx(peak)  # WSD planned: decay from update 6
    assert lr[branch][5] == pytest.approx(peak * (1 - 0.9 * 1 / 4))  # decay from update 4 over 4 updates
    w5 = consolidated_state_dict(ckpt(base, 5))
    w6 = {run: consolidated_state_dict(ckpt(run, 6)) for run in (base, branch)}
    for name in w5:
        update_base = (w5[name] - w6[base][name]) / lr[base][5]
        update_branch = (w5[name] - w6[branch][name]) / lr[branch][5]
        assert not torch.equal(w6[base][name], w6[branch][name]), name
        torch.testing.assert_close(update_branch, update_base, rtol=2e-3, atol=1e-4, msg=name)


def test_anneal_from_finds_the_checkpoint_and_refuses_a_directory_past_it(tmp_path):
    import json

    from pretrain.checkpoint import CheckpointError
    from pretrain.restore import anneal_checkpoint, check_anneal_target

    for step in (100, 200):
        d = tmp_path / "run" / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step, "config": {}, "world_size": 1, "zero_stage": 1}))
        (d / "manifest.json").write_text(json.dumps({"files": {}}))
    ckpt, step = anneal_checkpoint(str(tmp_path / "run"))
    assert (ckpt.name, step) == ("step_000200", 200)
    assert anneal_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_000100"))[1] == 100
    check_anneal_target(tmp_path / "elsewhere", ckpt, 100)  # a new directory: fine
    with pytest.raises(CheckpointError, match="already holds later checkpoints .*step_000200"):
        check_anneal_target(tmp_path / "run", ckpt, 100)


def test_a_plain_resume_of_an_annealing_run_keeps_annealing():
    """--resume auto on a run that --anneal-from started (its checkpoint's config has decay_start=4) does not
    fall back to the planned decay; an explicit decay_start wins."""
    from pretrain.config import Config
    from pretrain.restore import keep_annealing

    logged = []
    saved = {"config": {"train": {"schedule": "wsd", "decay_start": 4}}}
    train = dataclasses.replace(TrainConfig(), schedule="wsd", max_steps=8, warmup_steps=2)
    run = SimpleNamespace(cfg=dataclasses.replace(Config(), train=train), log=logged.append)
    keep_annealing(saved, run)
    assert run.cfg.train.decay_start == 4 and "decay_start=4" in logged[0]
    run.cfg.train = dataclasses.replace(train, decay_start=6)
    keep_annealing(saved, run)
    assert run.cfg.train.decay_start == 6 and len(logged) == 1
