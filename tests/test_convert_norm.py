"""Pre-LN LayerNorm -> Pre-RMSNorm / Pre-CRMSNorm conversion (pretrain/convert_norm.py): the converted model's
logits against the source model's, CRMSNorm against the paper's formula, refusals, and a real TP=2
checkpoint converted, evaluated, resumed and exported."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kernels.torch_ops import crms_norm
from model import build_model
from pretrain.config import load_config, resolve
from pretrain.convert_norm import NormConversionError, convert_state_dict, converted_model_section
from tests.conftest import ROOT, check, run_module, tiny_args


def model_config(*sets: str):
    base = ["model.placement=pre", "model.norm=layernorm", "model.vocab_size=256", "model.hidden_size=64"]
    return resolve(load_config(ROOT / "configs" / "tiny.yaml", base + list(sets))).model


@torch.no_grad()
def trained_looking(m, seed: int = 0):
    """A source model whose LayerNorm gains and shifts, biases and stream means are far from their init: every
    writer to the stream gets a large per-output offset, so a conversion that missed one would show."""
    torch.manual_seed(seed)
    model, _ = build_model(m, "torch", "cpu")
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5) if not m.zero_centered_gain else p.uniform_(-0.5, 0.5)
        elif p.ndim == 1:
            p.normal_(0.0, 0.3)
    # Each token's vector gets its own mean, and every writer a mean over its output dim: as large as the
    # variation around it (larger ones only measure the source's own fp32 cancellation in LayerNorm).
    model.embed.weight.add_(0.05 * torch.randn(m.vocab_size, 1))
    for block in model.blocks:
        for lin in (block.attn.fn.proj, block.mlp.fn.fc2):
            lin.weight.add_(0.05 * torch.randn(1, lin.weight.shape[1]))
    return model.eval()


def converted(source, m, to: str):
    new = converted_model_section(m, to)
    model, _ = build_model(new, "torch", "cpu")
    model.load_state_dict(convert_state_dict(source.state_dict(), m), strict=True)
    return model.eval(), new


TOKENS = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("to", ["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize(
    "sets",
    [
        ("model.bias=false", "model.tie_embeddings=true"),
        ("model.bias=true", "model.tie_embeddings=true"),
        ("model.bias=false", "model.tie_embeddings=false"),
        ("model.bias=true", "model.tie_embeddings=false", "model.mlp=gelu", "model.num_kv_heads=2"),
        ("model.placement=lns", "model.zero_centered_gain=true"),
    ],
    ids=["no-bias-tied", "bias-tied", "no-bias-untied", "bias-untied-gelu-gqa", "lns-zero-centered"],
)
def test_converted_logits_equal_the_layernorm_models(sets, to):
    m = model_config(*sets)
    source = trained_looking(m)
    model, new = converted(source, m, to)
    assert new.norm == to and new.norm_bias and not new.tie_embeddings
    with torch.no_grad():
        want, got = source(TOKENS), model(TOKENS)
        naive = build_model(dataclasses_replace(m, norm=to, norm_bias=True), "torch", "cpu")[0]
        naive.load_state_dict(source.state_dict(), strict=False)
        unconverted = naive.eval()(TOKENS)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (unconverted - want).abs().max() > 1e-2  # swapping the norm without centring is not the same model


def dataclasses_replace(m, **kw):
    import dataclasses

    return dataclasses.replace(m, **kw)


def test_converted_stream_is_zero_mean_and_crmsnorm_reads_d_minus_1_coordinates():
    m = model_config()
    model, _ = converted(trained_looking(m), m, "crmsnorm")
    with torch.no_grad():
        x = model.embed(TOKENS.t())
        assert x.mean(-1).abs().max() < 1e-6
        for block in model.blocks:
            x, _ = block(x)
            assert x.mean(-1).abs().max() < 1e-5
        n = model.final_norm
        y = n(x)
        x2 = x.clone()
        x2[..., -1] += 100.0  # the d-th coordinate is never read
        torch.testing.assert_close(n(x2), y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "sets, message",
    [
        (("model.placement=peri",), "placement='peri'.*sublayer outputs, which are not zero-mean"),
        (("model.placement=post",), "placement='post'.*write the stream"),
        (("model.placement=mix",), "placement='mix'.*Post-LN"),
        (("model.placement=reordered",), "placement='reordered'"),
        (("model.qk_norm=true",), "qk_norm=true: .*queries and keys"),
        (("model.embedding_norm=true",), "embedding_norm=true"),
        (("model.norm=rmsnorm",), "model.norm='rmsnorm': only a LayerNorm model"),
        (("model.dropout=0.1",), "model.dropout=0.1"),
    ],
)
def test_what_the_identity_does_not_cover_is_refused(sets, message):
    with pytest.raises(NormConversionError, match=message):
        converted_model_section(model_config(*sets), "rmsnorm")


# ------------------------------------------------------------------------------------------ CRMSNorm


def test_crmsnorm_is_the_papers_formula_on_the_compressed_vector():
    """Jiang et al.: CRMSNorm(x_hat) = x_hat / sqrt((sum x_hat^2 + (sum x_hat)^2) / d + eps) for the d - 1
    stored coordinates x_hat; the d-th output is minus the sum of the others (the decompressed vector)."""
    d, eps = 48, 1e-5
    x = torch.randn(5, 7, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(d, dtype=torch.float64) + 0.5
    xh = x[..., :-1]
    ms = (xh.pow(2).sum(-1, keepdim=True) + xh.sum(-1, keepdim=True).pow(2)) / d
    yh = xh / torch.sqrt(ms + eps)
    want = torch.cat([yh, -yh.sum(-1, keepdim=True)], dim=-1) * w * 0.5
    got = crms_norm(x, w, eps, 0.5)  # statistics in fp32 (kernels/torch_ops.py), hence fp32 tolerances
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(got, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
    assert gx[..., -1].abs().max() == 0  # the last stored coordinate does not matter


def test_crmsnorm_model_trains():
    m = resolve(
        load_config(
            ROOT / "configs" / "tiny.yaml", ["model.placement=pre", "model.norm=crmsnorm", "model.vocab_size=64"]
        )
    ).model
    torch.manual_seed(0)
    model, _ = build_model(m, "torch", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 16, (4, 33), generator=torch.Generator().manual_seed(0))  # a 16-token language
    losses = []
    for _ in range(12):
        loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize(
    "sets, message",
    [
        (("model.placement=peri", "model.norm=crmsnorm"), "crmsnorm' with placement 'peri'"),
        (("model.placement=pre", "model.norm=crmsnorm", "model.qk_norm=true"), "qk_norm: true with model.norm"),
        (("model.placement=peri", "model.norm=rmsnorm", "model.norm_bias=true"), "norm_bias: true .* 'peri'"),
    ],
)
def test_crmsnorm_and_norm_shift_rules(sets, message):
    from kernels.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", list(sets))


# ------------------------------------------------------------------------------------ a real checkpoint


@pytest.mark.slow  # about 3.5 minutes on 2 busy cores: six processes
def test_tp2_checkpoint_converts_evaluates_resumes_and_exports(bundled_dir, tmp_path):
    """A Pre-LN LayerNorm run trained with tensor parallelism 2 -> Pre-CRMSNorm: `pretrain.eval` gives the
    source's test loss, training resumes from it (--resume auto, resharded back to tp 2), and the HF export
    (which compares its logits with ours) accepts it."""
    src, out = tmp_path / "src", tmp_path / "converted"
    sets = ["model.placement=pre", "model.norm=layernorm", "model.bias=true", "parallel.tp=2",
            "train.max_steps=3", "train.warmup_steps=1", "train.eval_every=0", "train.diagnostics_every=0",
            "eval.max_tokens=4096"]  # fmt: skip
    check(run_module(tiny_args(bundled_dir, src, *sets), nproc=2))
    proc = check(
        run_module(["-m", "pretrain.convert_norm", "--checkpoint", str(src), "--to", "crmsnorm", "--out", str(out)])
    )
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["max_abs_logit_diff"] < 2e-5 and summary["untied"], proc.stdout
    assert "validation tokens" in summary["probe"]

    for run in (src, out):
        check(run_module(["-m", "pretrain.eval", "--run", str(run), "--out", str(tmp_path / f"{run.name}.json")]))
    before, after = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("src", "converted"))
    assert after["tokens"] == before["tokens"] > 0
    assert after["loss"] == pytest.approx(before["loss"], abs=2e-6)

    resumed = check(  # on the source's layout (tp 2): the one-process checkpoint is resharded
        run_module(
            ["-m", "pretrain.train", "--config", str(out / "config.yaml"), "--resume", "auto"]
            + ["--set", "train.max_steps=4", "--set", "parallel.tp=2"],
            nproc=2,
        )
    )
    log = resumed.stdout + resumed.stderr
    assert "resharding" in log and "resumed from" in log and (out / "checkpoints" / "step_000004").is_dir()
    exported = check(run_module(["-m", "pretrain.export", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]))
    assert "custom" in exported.stdout and "verified" in exported.stdout
