"""Learning-rate schedules against independent references (torch's own schedulers, closed forms)."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.schedule import lr_multiplier


def test_warmup_then_cosine_matches_torch_cosine_annealing():
    max_steps, warmup, min_ratio = 100, 10, 0.1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps - warmup, eta_min=min_ratio)
    for step in range(warmup):
        assert lr_multiplier(
            step, max_steps=max_steps, warmup_steps=warmup, schedule="cosine", min_lr_ratio=min_ratio
        ) == pytest.approx((step + 1) / warmup)
    for step in range(warmup, max_steps):
        assert lr_multiplier(
            step, max_steps=max_steps, warmup_steps=warmup, schedule="cosine", min_lr_ratio=min_ratio
        ) == pytest.approx(cosine.get_last_lr()[0], abs=1e-12)
        opt.step()
        cosine.step()


def test_wsd_is_flat_then_linear_to_the_floor():
    kw = dict(max_steps=100, warmup_steps=10, schedule="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    assert [lr_multiplier(s, **kw) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    # decay over steps 80..99: 1 - (s - 80) / 20
    for s in range(80, 100):
        assert lr_multiplier(s, **kw) == pytest.approx(1 - (s - 80) / 20)


def test_constant_and_unknown():
    assert lr_multiplier(500, max_steps=10, warmup_steps=0, schedule="constant", min_lr_ratio=0.1) == 1.0
    with pytest.raises(ValueError, match="allowed cosine, wsd, constant"):
        lr_multiplier(1, max_steps=10, warmup_steps=0, schedule="linear", min_lr_ratio=0.1)
    assert math.isclose(
        lr_multiplier(99, max_steps=100, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1),
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)),
    )
