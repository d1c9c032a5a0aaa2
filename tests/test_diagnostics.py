"""Depth diagnostics against direct computations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model import build_model
from pretrain.config import Config, ModelConfig, resolve
from pretrain.diagnostics import activation_stats, attention_entropy, layer_grad_norms
from tests.conftest import run_module, tiny_args


def test_attention_entropy_hand_built():
    b, t, h, d = 1, 5, 2, 4
    # q = 0: every query attends uniformly to the t' <= t keys it may see: entropy log(t')
    q, k = torch.zeros(b, t, h, d), torch.randn(b, t, h, d)
    assert attention_entropy(q, k) == pytest.approx(sum(math.log(i) for i in range(1, t + 1)) / t, rel=1e-6)
    # one key far ahead of the rest: every query that can see key 0 puts (almost) all mass on it
    q = torch.ones(b, t, h, d)
    k = torch.zeros(b, t, h, d)
    k[:, 0] = 100.0
    assert attention_entropy(q, k) == pytest.approx(0.0, abs=1e-6)
    # grouped-query: 1 kv head shared by 2 query heads equals the same head repeated
    q, k1 = torch.randn(2, 6, 2, 4), torch.randn(2, 6, 1, 4)
    assert attention_entropy(q, k1) == pytest.approx(attention_entropy(q, k1.expand(2, 6, 2, 4)), rel=1e-6)


def tiny_model(placement="pre"):
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, seq_len=8, placement=placement)
    torch.manual_seed(0)
    return build_model(resolve(cfg).model, "torch")[0]


@pytest.mark.parametrize("placement", ["pre", "peri", "post"])
def test_activation_stats_equal_a_direct_computation(placement):
    model = tiny_model(placement).eval()
    tokens = torch.randint(0, 50, (2, 8))
    stats = activation_stats(model, model.blocks, tokens)
    with torch.no_grad():  # the residual stream, block by block, by hand
        xs = [model.embed_norm(model.embed(tokens.t()))]  # sequence-first, as inside the model
        x, h = xs[0], None
        for block in model.blocks:
            x, h = block(x, h)
            xs.append(x)
        direct_entropy = []
        for block, x_in in zip(model.blocks, xs[:-1]):
            hin = block.attn.in_norm(x_in)
            q, k, _ = block.attn.fn.split_qkv(hin)  # (T, B, H, hd)
            q, k = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3)  # (B, H, T, hd)
            att = torch.softmax(
                (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + torch.full((8, 8), float("-inf")).triu(1), dim=-1
            )
            direct_entropy.append(float(-(att * att.clamp_min(1e-30).log()).sum(-1).mean()))
    assert stats["var"] == pytest.approx([float(x.var()) for x in xs], rel=1e-5)
    assert stats["rms"] == pytest.approx([float(x.pow(2).mean().sqrt()) for x in xs], rel=1e-5)
    assert stats["max_abs"] == pytest.approx([float(x.abs().max()) for x in xs], rel=1e-6)
    assert stats["attn_entropy"] == pytest.approx(direct_entropy, rel=1e-5)


def test_layer_grad_norms_equal_a_direct_computation():
    model = tiny_model("peri")
    tokens = torch.randint(0, 50, (2, 8))
    model(tokens, tokens).backward()
    expected = [torch.cat([p.grad.flatten() for p in b.parameters()]).norm().item() for b in model.blocks]
    assert layer_grad_norms(model.blocks) == pytest.approx(expected, rel=1e-6)


@pytest.mark.distributed
@pytest.mark.slow  # 95 s: four layouts; the default suite keeps the direct-computation checks
def test_diagnostics_do_not_depend_on_the_layout(bundled_dir, tmp_path):
    """Per-layer gradient norms and activation stats of a 2-rank ZeRO-2 run equal the 1-rank run's
    (same global batch: the 1-rank run accumulates 2 micro-batches)."""
    records = {}
    for name, nproc, stage in (("one", 1, 0), ("two", 2, 2)):
        run_dir = tmp_path / name
        proc = run_module(
            tiny_args(
                bundled_dir,
                run_dir,
                "train.max_steps=5",
                "train.warmup_steps=1",
                "train.eval_every=0",
                "checkpoint.every=0",
                f"zero.stage={stage}",
            ),
            nproc=nproc,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records[name] = [
            r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "layer_grad_norm" in r
        ]
    (one,), (two,) = records["one"], records["two"]
    assert one["step"] == two["step"] == 5 and len(one["layer_grad_norm"]) == 2 and len(one["layer_var"]) == 3
    for key in ("layer_grad_norm", "layer_var", "layer_max_abs", "layer_attn_entropy"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
