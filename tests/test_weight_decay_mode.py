"""train.weight_decay_mode (pretrain/engine.py group_weight_decay): one optimizer step, parameter by parameter,
against the hand formula

    p <- p - lr_t * adam_update - decay * p,   decay = lr_t * wd (coupled) or wd * lr_t / lr_peak (independent)

at two peak LRs, with the LR schedule (LambdaLR, as the engine builds it) setting lr_t; and the config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.errors import ConfigError
from pretrain.config import TrainConfig, load_config
from pretrain.engine import group_weight_decay, param_groups
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")
SCHEDULE_FACTOR = 0.5  # lr_t = 0.5 * lr_peak at the step taken


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def _adam_update(g: torch.Tensor, t: TrainConfig) -> torch.Tensor:
    """The first Adam step's update m_hat / (sqrt(v_hat) + eps), from its definition."""
    m_hat = (1 - t.beta1) * g / (1 - t.beta1)
    v_hat = (1 - t.beta2) * g * g / (1 - t.beta2)
    return m_hat / (v_hat.sqrt() + t.adam_eps)


def _step_and_expect(t: TrainConfig, make_optimizer) -> tuple[dict, dict]:
    model = _model()
    groups = param_groups(model, group_weight_decay(t))
    optimizer = make_optimizer(groups, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: SCHEDULE_FACTOR)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(5, 8)).square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    scheduler.step()
    lr_t = t.lr * SCHEDULE_FACTOR
    decay_per_step = t.weight_decay * lr_t / t.lr if t.weight_decay_mode == "independent" else lr_t * t.weight_decay
    expected = {}
    for n, p0 in before.items():
        decayed = p0.ndim >= 2  # matrices; biases and the norm's gain never
        expected[n] = p0 - lr_t * _adam_update(grads[n], t) - (decay_per_step * p0 if decayed else 0)
    return {n: p.detach() for n, p in model.named_parameters()}, expected


def _torch_adamw(groups, t):
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)


@pytest.mark.parametrize("mode, weight_decay", [("coupled", 0.1), ("independent", 1e-2)])
@pytest.mark.parametrize("lr_peak", [3e-3, 3e-4])
def test_one_adamw_step_matches_the_hand_formula(mode, weight_decay, lr_peak):
    t = TrainConfig(lr=lr_peak, weight_decay=weight_decay, weight_decay_mode=mode)
    got, expected = _step_and_expect(t, _torch_adamw)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-7, msg=n)


def test_independent_decay_does_not_depend_on_the_peak_lr():
    """The decay part of the step (the step without it subtracted) is the same at both peak LRs."""
    decays = []
    for lr_peak in (3e-3, 3e-4):
        t = TrainConfig(lr=lr_peak, weight_decay=1e-2, weight_decay_mode="independent")
        with_decay, _ = _step_and_expect(t, _torch_adamw)
        without, _ = _step_and_expect(dataclasses.replace(t, weight_decay=0.0), _torch_adamw)
        decays.append(without["0.weight"] - with_decay["0.weight"])
    torch.testing.assert_close(decays[0], decays[1], rtol=1e-5, atol=1e-9)
    assert decays[0].abs().max() > 0


@pytest.mark.slow  # builds DeepSpeed's CPU Adam op (C++) on first use
@pytest.mark.parametrize("lr_peak", [3e-3, 3e-4])
def test_deepspeed_cpu_adam_in_adamw_mode_matches_the_hand_formula(lr_peak):
    """ZeRO-Offload steps the decayed group with DeepSpeed's CPU Adam (pretrain/zero.py offload_adam)."""
    from pretrain.zero import offload_adam

    t = TrainConfig(lr=lr_peak, weight_decay=1e-2, weight_decay_mode="independent")
    got, expected = _step_and_expect(t, offload_adam)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_group_weight_decay_is_the_decay_over_the_peak_lr():
    assert group_weight_decay(TrainConfig(lr=2e-3, weight_decay=0.1)) == 0.1
    assert group_weight_decay(TrainConfig(lr=2e-3, weight_decay=1e-4, weight_decay_mode="independent")) == 1e-4 / 2e-3


def test_config_rejects_a_bad_mode_and_a_coupled_sized_independent_decay():
    with pytest.raises(ConfigError, match=r"train.weight_decay_mode: 'indep' is not allowed; allowed: coupled, "):
        load_config(TINY, ["train.weight_decay_mode=indep"])
    with pytest.raises(ConfigError, match=r"train.weight_decay: 0.1 with train.weight_decay_mode: independent"):
        load_config(TINY, ["train.weight_decay_mode=independent"])  # the default 0.1 is a coupled value
    cfg = load_config(TINY, ["train.weight_decay_mode=independent", "train.weight_decay=1e-4"])
    assert cfg.train.weight_decay == 1e-4


def test_a_resume_from_a_foreach_adamw_checkpoint_steps_fused_again():
    """The optimizer state dict carries each group's `fused` flag: a checkpoint saved by foreach AdamW (the
    CPU default before fused) would load it as off; apply_optimizer_settings turns the fused kernel back on,
    and the resumed step equals a step of torch's fused AdamW from the same state."""
    import copy
    from types import SimpleNamespace

    from pretrain.engine import apply_optimizer_settings

    t = TrainConfig(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    old = torch.optim.AdamW([w], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, foreach=True)
    w.grad = torch.randn(4, 3)
    old.step()
    state, w0, g = old.state_dict(), w.detach().clone(), torch.randn(4, 3)

    resumed = torch.optim.AdamW([w], lr=t.lr, fused=True)
    resumed.load_state_dict(copy.deepcopy(state))  # loading shares the saved tensors, which a step updates
    assert not resumed.param_groups[0]["fused"]  # what the checkpoint said
    sched = torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: 1.0)
    apply_optimizer_settings(SimpleNamespace(optimizer=resumed, lr_scheduler=sched, param_group_decayed=[True]), t)
    assert resumed.param_groups[0]["fused"] is True
    w.grad = g.clone()
    resumed.step()

    reference_w = torch.nn.Parameter(w0.clone())
    reference = torch.optim.AdamW(
        [reference_w], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, weight_decay=t.weight_decay, fused=True
    )
    reference.load_state_dict(copy.deepcopy(state))
    reference.param_groups[0].update(fused=True, foreach=None, weight_decay=t.weight_decay)
    reference_w.grad = g.clone()
    reference.step()
    torch.testing.assert_close(w.detach(), reference_w.detach(), rtol=0, atol=0)
