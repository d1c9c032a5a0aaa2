"""The GPT against independent references: Hugging Face's Llama for `pre`, and for every placement
the formula of DESIGN.md §4 written out here in plain torch (same weights, same sublayers F)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.placement import PLACEMENTS
from pretrain.config import Config, ModelConfig, resolve


def make_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, seq_len=16, tie_embeddings=False
    )
    base.update(kw)
    cfg = Config()
    cfg.model = ModelConfig(**base)
    return resolve(cfg).model


def perturbed(model):
    """Random gains and biases so a misplaced or missing norm shows in the output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------- the formulas, independently


def ref_norm(norm_module, x, kind, eps):
    w = norm_module.weight
    if kind == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.layer_norm(x, (x.shape[-1],), w, norm_module.bias, eps)


def reference_forward(model, tokens, placement, cfg):
    """DESIGN.md §4, one line per placement; F = the model's attention / MLP modules."""
    N = lambda mod, x: ref_norm(mod, x, cfg.norm, cfg.norm_eps)
    L = cfg.num_layers
    x = model.embed(tokens.t())  # the model's sublayers work sequence-first, (T, B, d)
    if cfg.embedding_norm:
        x = N(model.embed_norm, x)
    for l, block in enumerate(model.blocks, start=1):
        for sub in (block.attn, block.mlp):
            F_ = sub.fn
            if placement == "pre":
                x = x + F_(N(sub.in_norm, x))
            elif placement == "post":
                x = N(sub.post_norm, x + F_(x))
            elif placement == "peri":
                x = x + N(sub.out_norm, F_(N(sub.in_norm, x)))
            elif placement == "lns":
                x = x + F_(N(sub.in_norm, x) / math.sqrt(l))
            elif placement == "mix":
                if l <= round(0.25 * L):
                    x = N(sub.post_norm, x + F_(x))
                else:
                    x = x + F_(N(sub.in_norm, x))
            elif placement == "deepnorm":
                x = N(sub.post_norm, (2 * L) ** 0.25 * x + F_(x))
            elif placement == "reordered":
                x = x + N(sub.out_norm, F_(x))
            else:
                raise AssertionError(f"no reference for placement {placement}: add one")
    if placement in ("pre", "peri", "lns", "mix", "reordered"):
        x = N(model.final_norm, x)
    return model.head(x).transpose(0, 1)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placement_matches_formula_outputs_and_gradients(placement, norm):
    cfg = make_cfg(placement=placement, norm=norm)
    torch.manual_seed(0)
    model, _ = build_model(cfg, "torch")
    perturbed(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    out = model(tokens)
    ref = reference_forward(model, tokens, placement, cfg)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    params = [p for p in model.parameters()]
    g_model = torch.autograd.grad(out.square().mean(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.square().mean(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_model, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_lns_layer_one_equals_pre():
    outs = []
    for placement in ("pre", "lns"):
        torch.manual_seed(0)
        model, _ = build_model(make_cfg(placement=placement, num_layers=1), "torch")
        outs.append(model(torch.arange(16).view(1, 16)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_lns_scale_is_plain_float_not_state():
    model, _ = build_model(make_cfg(placement="lns"), "torch")
    scales = [b.attn.in_norm.scale for b in model.blocks]
    assert scales == pytest.approx([1 / math.sqrt(l) for l in range(1, 5)])
    assert all(type(s) is float for s in scales)
    assert not any("scale" in k for k in model.state_dict())
    assert model.final_norm.scale == 1.0


def test_mix_switches_after_round_alpha_L():
    model, _ = build_model(make_cfg(placement="mix", num_layers=8, mix_alpha=0.25), "torch")
    post = [isinstance(b.attn.post_norm, torch.nn.Identity) is False for b in model.blocks]
    assert post == [True, True] + [False] * 6


def test_parameter_counts_by_formula():
    d, L, V, h, kv, f = 32, 4, 96, 4, 2, 96
    hd = d // h
    per_layer = d * (h + 2 * kv) * hd + d * d + d * 2 * f + f * d
    pre, _ = build_model(make_cfg(placement="pre", ffn_hidden_size=f), "torch")
    peri, _ = build_model(make_cfg(placement="peri", ffn_hidden_size=f), "torch")
    assert pre.num_params() == 2 * V * d + L * (per_layer + 2 * d) + d
    assert peri.num_params() == 2 * V * d + L * (per_layer + 4 * d) + d + d  # + out norms, + embedding norm
    tied, _ = build_model(make_cfg(placement="pre", ffn_hidden_size=f, tie_embeddings=True), "torch")
    assert tied.num_params() == pre.num_params() - V * d


def test_state_dict_keys_equal_for_placements_with_the_same_norms():
    keys = {p: set(build_model(make_cfg(placement=p), "torch")[0].state_dict()) for p in PLACEMENTS}
    assert keys["pre"] == keys["lns"]
    assert keys["post"] == keys["deepnorm"]
    assert keys["peri"] - keys["pre"] == {
        f"blocks.{i}.{s}.out_norm.weight" for i in range(4) for s in ("attn", "mlp")
    } | {"embed_norm.weight"}


def test_pre_equals_huggingface_llama():
    import transformers  # a dependency: its absence must fail, not skip

    cfg = make_cfg(
        placement="pre", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=32
    )
    torch.manual_seed(0)
    model, _ = build_model(cfg, "torch")
    perturbed(model)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    ).eval()
    hd, g = 16, 2
    sd = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.final_norm.weight,
        "lm_head.weight": model.head.weight,
    }
    for i, b in enumerate(model.blocks):
        w = b.attn.fn.qkv.weight.view(2, g + 2, hd, 64)  # Megatron grouped layout -> q, k, v
        gate, up = b.mlp.fn.fc1.weight.chunk(2, 0)
        sd.update(
            {
                f"model.layers.{i}.self_attn.q_proj.weight": w[:, :g].reshape(-1, 64),
                f"model.layers.{i}.self_attn.k_proj.weight": w[:, g].reshape(-1, 64),
                f"model.layers.{i}.self_attn.v_proj.weight": w[:, g + 1].reshape(-1, 64),
                f"model.layers.{i}.self_attn.o_proj.weight": b.attn.fn.proj.weight,
                f"model.layers.{i}.mlp.gate_proj.weight": gate,
                f"model.layers.{i}.mlp.up_proj.weight": up,
                f"model.layers.{i}.mlp.down_proj.weight": b.mlp.fn.fc2.weight,
                f"model.layers.{i}.input_layernorm.weight": b.attn.in_norm.weight,
                f"model.layers.{i}.post_attention_layernorm.weight": b.mlp.in_norm.weight,
            }
        )
    result = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    tokens = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_loss_is_masked_mean_cross_entropy():
    cfg = make_cfg(placement="peri")
    model, _ = build_model(cfg, "torch")
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    labels = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    mask = torch.ones(2, cfg.seq_len)
    mask[1, 5:] = 0
    logits = model(tokens)
    ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="none")
    expected = (ce * mask.reshape(-1)).sum() / mask.sum()
    torch.testing.assert_close(model(tokens, labels, mask), expected)


def test_deepnorm_beta_init_and_alpha():
    torch.manual_seed(0)
    cfg = make_cfg(placement="deepnorm", num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=4)
    model, _ = build_model(cfg, "torch")
    beta = (8 * 6) ** -0.25
    b = model.blocks[0]
    assert b.attn.alpha == pytest.approx((2 * 6) ** 0.25)
    w = b.attn.fn.qkv.weight.view(4, 3, 16, 64)
    assert w[:, 0].std().item() == pytest.approx(0.02, rel=0.1)  # queries: plain init
    assert w[:, 2].std().item() == pytest.approx(0.02 * beta, rel=0.1)  # values: beta-scaled
    assert b.mlp.fn.fc2.weight.std().item() == pytest.approx(0.02 * beta, rel=0.1)


@pytest.mark.parametrize("mode, first_n", [("full", 0), ("selective", 0), ("full", 2)])
def test_activation_checkpointing_gives_the_same_gradients(mode, first_n):
    from model.recompute import apply_activation_checkpointing

    cfg = make_cfg(placement="peri", dropout=0.1)
    grads = []
    for m in ("none", mode):
        torch.manual_seed(0)
        model, _ = build_model(cfg, "torch")
        apply_activation_checkpointing(model.blocks, m, first_n)
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)  # the same dropout masks in both runs (recomputation must redraw them)
        model(tokens, tokens).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sum(b.recompute for b in model.blocks) == (0 if mode == "selective" else (first_n or 4))
