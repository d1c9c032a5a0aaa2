"""The model trained for a few steps on the Triton kernels (interpreted on CPU, compiled on a GPU)
matches the same model on the plain torch backend, for placements that exercise every junction
kind (peri_junction, add_norm, add_norm on a post norm, the plain composition)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from model import build_model
from pretrain.config import Config, ModelConfig, resolve


def train_losses(placement: str, norm: str, backend: str, steps: int = 3) -> tuple[list[float], list[str]]:
    cfg = Config()
    cfg.model = ModelConfig(
        vocab_size=64,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        seq_len=12,
        placement=placement,
        norm=norm,
        qk_norm=True,
    )
    m = resolve(cfg).model
    torch.manual_seed(0)
    model, reason = build_model(m, backend, DEVICE)
    assert reason.startswith(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (1, 3, 13), generator=g).to(DEVICE).expand(steps, 3, 13)  # memorise one batch
    losses = []
    for batch in data:
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.junction_kinds()


@pytest.mark.parametrize(
    "placement, norm",
    [
        ("peri", "rmsnorm"),
        ("peri", "layernorm"),  # peri_junction
        ("lns", "rmsnorm"),  # add_norm with the 1/sqrt(l) scale
        ("post", "layernorm"),  # add_norm on the post norm
        ("reordered", "rmsnorm"),  # the plain composition
    ],
)
def test_triton_backend_trains_like_torch(placement, norm):
    reference, kinds = train_losses(placement, norm, "torch")
    fused, kinds_fused = train_losses(placement, norm, "triton")
    assert kinds == kinds_fused
    assert reference[-1] < reference[0]
    assert fused == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_every_junction_kind_is_exercised():
    seen = set()
    for placement in ("peri", "pre", "post", "deepnorm", "reordered"):
        seen.update(train_losses(placement, "rmsnorm", "torch", steps=1)[1])
    assert seen == {"peri_junction", "add_norm", "add_norm(post)", "composed"}
