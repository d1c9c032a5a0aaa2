"""Weights and configs between our GPT and Hugging Face formats (pure functions, no files).

Formats:
  llama   LlamaForCausalLM       `pre` (or `lns`) + RMSNorm + SwiGLU, no QK-norm, no embedding norm
  olmo2   Olmo2ForCausalLM       `reordered` + RMSNorm + SwiGLU + QK-norm over the whole layer, no bias
  custom  PretrainGPTForCausalLM every placement and switch (model/hf_custom, trust_remote_code)

Llama and OLMo 2 have plain gains; a zero-centred gain (1 + w) and LNS's constant 1/sqrt(l) are
folded into them when one of those formats is asked for explicitly. `auto` picks them only when no
folding is needed, so the export keeps the training parameterisation.

Our fused QKV uses Megatron's grouped layout: viewed as (num_kv_heads, q_per_kv + 2, head_dim, d),
[:, :q_per_kv] are a group's query heads, then its key head, then its value head.
"""

from __future__ import annotations

import re

import torch

from kernels.errors import PretrainError
from model.placement import PLACEMENTS, layer_specs

FORMATS = ("llama", "olmo2", "custom")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "olmo2": "Olmo2ForCausalLM", "custom": "PretrainGPTForCausalLM"}


class ConversionError(PretrainError, ValueError):
    """A model that the requested format cannot represent, or an unsupported HF checkpoint."""

    exit_code = 2


# ----------------------------------------------------------------------------- choosing a format


def format_blockers(m, fmt: str) -> list[str]:
    """Settings of the resolved ModelConfig `m` that `fmt` cannot represent (empty: it can)."""
    if fmt == "custom":
        return []
    if fmt not in FORMATS:
        raise ConversionError(f"format '{fmt}': allowed: auto, {', '.join(FORMATS)}")
    need = []
    if fmt == "llama" and m.placement not in ("pre", "lns"):
        need.append(f"model.placement='{m.placement}' (llama needs pre, or lns with the scale folded)")
    if fmt == "olmo2" and m.placement != "reordered":
        need.append(f"model.placement='{m.placement}' (olmo2 needs reordered)")
    if m.norm != "rmsnorm":
        need.append(f"model.norm='{m.norm}' ({fmt} needs rmsnorm)")
    elif m.norm_bias:
        need.append(f"model.norm_bias=true ({fmt}'s RMSNorm has no shift)")
    if m.mlp != "swiglu":
        need.append(f"model.mlp='{m.mlp}' ({fmt} needs swiglu)")
    if m.embedding_norm:
        need.append(f"model.embedding_norm=true ({fmt} has no norm after the embedding)")
    if fmt == "llama" and m.qk_norm:
        need.append("model.qk_norm=true (llama has no QK-norm)")
    if fmt == "olmo2" and (not m.qk_norm or m.qk_norm_scope != "layer"):
        need.append(
            f"model.qk_norm={str(m.qk_norm).lower()}, qk_norm_scope='{m.qk_norm_scope}' "
            "(olmo2 needs qk_norm=true with qk_norm_scope=layer)"
        )
    if fmt == "olmo2" and m.bias:
        need.append("model.bias=true (olmo2 has no MLP biases)")
    return need


def folded_settings(m, fmt: str) -> list[str]:
    """What an explicit llama/olmo2 export folds into the gains (exact function, new parameterisation)."""
    if fmt == "custom":
        return []
    out = []
    if m.zero_centered_gain:
        out.append("model.zero_centered_gain=true: gains stored as 1 + w")
    if m.depth_scale == "inv_sqrt_layer":
        out.append("model.depth_scale=inv_sqrt_layer: input-norm gains of layer l multiplied by 1/sqrt(l)")
    return out


def reparam_folded(m) -> list[str]:
    """What every export folds into the weights whatever the format (the function is exact, the learned
    parameterisation is not kept)."""
    if not getattr(m, "sigma_reparam", False):
        return []
    return ["model.sigma_reparam=true: attention and MLP matrices stored as (gamma / sigma(W)) * W, sigma from u, v"]


def fold_sigma_reparam(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain (unsharded) state dict with every sigma-Reparam layer's W replaced by the matrix the model uses
    in eval mode, (gamma / u^T W v) * W (model/sigma_reparam.py computes it, with its own first-forward
    estimate if u, v were never set), and its gamma, u, v removed."""
    from model.sigma_reparam import SigmaReparam

    out = dict(state)
    for key in [k for k in state if k.endswith(".sigma.gamma")]:
        prefix = key.removesuffix(".sigma.gamma")
        weight = state.get(prefix + ".weight")
        if weight is None:
            raise ConversionError(f"{key}: sigma-Reparam without its weight {prefix}.weight; cannot fold it")
        reparam = SigmaReparam(*weight.shape).eval()
        with torch.no_grad():
            reparam.gamma.copy_(state[key])
            reparam.u.copy_(state[prefix + ".sigma.u"])
            reparam.v.copy_(state[prefix + ".sigma.v"])
            out[prefix + ".weight"] = reparam.to(weight.device)(weight.float()).to(weight.dtype)
        for leaf in ("gamma", "u", "v"):
            del out[f"{prefix}.sigma.{leaf}"]
    return out


def auto_format(m) -> str:
    """Llama for a plain Llama (pre, no bias), OLMo 2 for a plain OLMo 2, else custom: no folding."""
    if not format_blockers(m, "llama") and m.placement == "pre" and not m.bias and not folded_settings(m, "llama"):
        return "llama"
    if not format_blockers(m, "olmo2") and not folded_settings(m, "olmo2"):
        return "olmo2"
    return "custom"


def choose_format(m, requested: str = "auto") -> str:
    if requested == "auto":
        return auto_format(m)
    if requested not in FORMATS:
        raise ConversionError(f"--format '{requested}': allowed: auto, {', '.join(FORMATS)}")
    blockers = format_blockers(m, requested)
    if blockers:
        raise ConversionError(
            f"format '{requested}' cannot represent this model exactly: "
            + "; ".join(blockers)
            + ". Use --format custom (or auto) for a self-contained remote-code model."
        )
    return requested


# -------------------------------------------------------------------------------- QKV layout


def split_qkv(w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Our grouped QKV weight (or bias) -> Hugging Face's q, k, v (query head i = g*q_per_kv + j)."""
    q_per_kv = num_heads // num_kv_heads
    rest = w.shape[1:]  # (hidden,) for a weight, () for a bias
    g = w.reshape(num_kv_heads, q_per_kv + 2, head_dim, *rest)
    q = g[:, :q_per_kv].reshape(num_heads * head_dim, *rest)
    return q, g[:, q_per_kv].reshape(num_kv_heads * head_dim, *rest), g[:, q_per_kv + 1].reshape(-1, *rest)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of split_qkv."""
    q_per_kv = num_heads // num_kv_heads
    rest = q.shape[1:]
    qg = q.reshape(num_kv_heads, q_per_kv, head_dim, *rest)
    kg = k.reshape(num_kv_heads, 1, head_dim, *rest)
    vg = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


# ------------------------------------------------------------------------------- export: weights

# Where each of our norm slots goes, per format (None: the format has no such slot).
_NORM_NAMES = {
    "llama": {"attn.in_norm": "input_layernorm", "mlp.in_norm": "post_attention_layernorm"},
    "olmo2": {"attn.out_norm": "post_attention_layernorm", "mlp.out_norm": "post_feedforward_layernorm"},
    "custom": {f"{s}.{n}": f"{s}_{n}" for s in ("attn", "mlp") for n in ("in_norm", "out_norm", "post_norm")},
}

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def to_hf_state_dict(state: dict[str, torch.Tensor], m, fmt: str) -> dict[str, torch.Tensor]:
    """Our state dict (resolved ModelConfig `m`) -> the `fmt` model's state dict. Every one of our
    tensors must land somewhere, so a parameter added to the model later fails loudly here."""
    hd = m.hidden_size // m.num_heads
    specs = layer_specs(m)
    fold = fmt != "custom"
    state = fold_sigma_reparam(state)  # every format: none has sigma-Reparam's parameterisation
    out: dict[str, torch.Tensor] = {}

    def gain(key: str, scale: float = 1.0) -> torch.Tensor:
        w = state[key]
        if fold and m.zero_centered_gain:
            w = w + 1.0  # the same fp32 add the model does
        return w * scale if fold and scale != 1.0 else w

    for key, value in state.items():
        if key == "head.weight" and m.tie_embeddings:
            continue
        top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight"}
        if key in top:
            out[top[key]] = value
            continue
        if key.startswith(("embed_norm.", "final_norm.")):
            name = "model.embed_norm" if key.startswith("embed_norm.") else "model.norm"
            leaf = key.split(".", 1)[1]
            out[f"{name}.{leaf}"] = gain(key) if leaf == "weight" else value
            continue
        match = _BLOCK_KEY.fullmatch(key)
        if not match:
            raise ConversionError(f"{key}: no {fmt} equivalent (unknown parameter)")
        i, rest = int(match.group(1)), match.group(2)
        p = f"model.layers.{i}"
        leaf = rest.rsplit(".", 1)[1]
        if rest.startswith("attn.fn.qkv."):
            q, k, v = split_qkv(value, m.num_heads, m.num_kv_heads, hd)
            out.update(
                {
                    f"{p}.self_attn.q_proj.{leaf}": q,
                    f"{p}.self_attn.k_proj.{leaf}": k,
                    f"{p}.self_attn.v_proj.{leaf}": v,
                }
            )
        elif rest.startswith("attn.fn.proj."):
            out[f"{p}.self_attn.o_proj.{leaf}"] = value
        elif rest.startswith(("attn.fn.q_norm.", "attn.fn.k_norm.")):
            which = rest.split(".")[2]
            out[f"{p}.self_attn.{which}.{leaf}"] = gain(key) if leaf == "weight" else value
        elif rest.startswith("mlp.fn.fc1."):
            if m.mlp == "swiglu":
                gate, up = value.chunk(2, dim=0)
                out.update({f"{p}.mlp.gate_proj.{leaf}": gate, f"{p}.mlp.up_proj.{leaf}": up})
            else:
                out[f"{p}.mlp.up_proj.{leaf}"] = value
        elif rest.startswith("mlp.fn.fc2."):
            out[f"{p}.mlp.down_proj.{leaf}"] = value
        else:
            slot = rest.rsplit(".", 1)[0]  # e.g. attn.in_norm
            name = _NORM_NAMES[fmt].get(slot)
            if name is None:
                raise ConversionError(f"{key}: the {fmt} format has no slot for {slot}")
            sub = getattr(specs[i], slot.split(".")[0])
            scale = sub.in_scale if slot.endswith("in_norm") else 1.0
            out[f"{p}.{name}.{leaf}"] = gain(key, scale) if leaf == "weight" else value
    return out


# -------------------------------------------------------------------------------- export: config


def hf_config(m, fmt: str, token_ids: dict):
    """The transformers config of format `fmt` for the resolved ModelConfig `m`.
    token_ids: bos_token_id, eos_token_id, pad_token_id."""
    hd = m.hidden_size // m.num_heads
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.seq_len,
        initializer_range=m.init_std,
        tie_word_embeddings=m.tie_embeddings,
        architectures=[ARCHITECTURES[fmt]],
        **token_ids,
    )
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_theta)}}
    if fmt == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            **common,
            **rope,
            hidden_act="silu",
            rms_norm_eps=m.norm_eps,
            head_dim=hd,
            attention_bias=m.bias,
            mlp_bias=m.bias,
        )
    if fmt == "olmo2":
        from transformers import Olmo2Config

        return Olmo2Config(**common, **rope, hidden_act="silu", rms_norm_eps=m.norm_eps, attention_bias=False)
    from model.hf_custom.configuration_pretrain_gpt import PretrainGPTConfig

    cfg = PretrainGPTConfig(
        **common,
        mlp=m.mlp,
        norm=m.norm,
        norm_eps=m.norm_eps,
        norm_bias=m.norm == "layernorm" if m.norm_bias is None else m.norm_bias,
        zero_centered_gain=m.zero_centered_gain,
        placement=m.placement,
        layer_slots=custom_layer_slots(m),
        final_norm=PLACEMENTS[m.placement].final_norm,
        embedding_norm=bool(m.embedding_norm),
        depth_scale=m.depth_scale,
        mix_alpha=m.mix_alpha,
        qk_norm=m.qk_norm,
        qk_norm_scope=m.qk_norm_scope,
        bias=m.bias,
        rope_theta=float(m.rope_theta),
    )
    cfg.auto_map = {
        "AutoConfig": "configuration_pretrain_gpt.PretrainGPTConfig",
        "AutoModel": "modeling_pretrain_gpt.PretrainGPTModel",
        "AutoModelForCausalLM": "modeling_pretrain_gpt.PretrainGPTForCausalLM",
    }
    return cfg


def custom_layer_slots(m) -> list[dict]:
    """Our placement registry's per-layer slots, written into the custom config (so the remote code
    never needs the registry)."""

    def slot(s):
        return {
            "in_norm": s.in_norm,
            "out_norm": s.out_norm,
            "post_norm": s.post_norm,
            "in_scale": float(s.in_scale),
            "residual_alpha": float(s.residual_alpha),
        }

    return [{"attn": slot(spec.attn), "mlp": slot(spec.mlp)} for spec in layer_specs(m)]


# ------------------------------------------------------------------------------- import: Llama


def llama_model_section(hf) -> dict:
    """Our `model:` config section reproducing a transformers LlamaConfig `hf`; ConversionError for
    what our model cannot express."""
    arch = list(getattr(hf, "architectures", None) or [])
    if getattr(hf, "model_type", None) != "llama" or (arch and arch != ["LlamaForCausalLM"]):
        raise ConversionError(
            f"model_type '{getattr(hf, 'model_type', None)}', architectures {arch}: only Llama "
            "(model_type llama, LlamaForCausalLM) can be imported"
        )
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ConversionError(
            f"rope_parameters/rope_scaling: rope_type '{rope_type}' ({scaling or rope}) is not "
            "supported; our RoPE is the default (unscaled) one"
        )
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise ConversionError("rope_theta: missing from the config")
    if hf.hidden_act != "silu":
        raise ConversionError(f"hidden_act: '{hf.hidden_act}' is not supported; allowed: silu (SwiGLU)")
    attn_bias, mlp_bias = bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ConversionError(
            f"attention_bias={attn_bias}, mlp_bias={mlp_bias}: our model.bias switches every "
            "linear layer at once, so they must be equal"
        )
    heads = hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    if head_dim * heads != hf.hidden_size:
        raise ConversionError(
            f"head_dim: {head_dim} x {heads} heads != hidden_size {hf.hidden_size}; our model "
            "derives head_dim = hidden_size / num_heads"
        )
    return {
        "vocab_size": hf.vocab_size,
        "vocab_multiple": 1,
        "hidden_size": hf.hidden_size,
        "num_layers": hf.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": kv,
        "ffn_hidden_size": hf.intermediate_size,
        "mlp": "swiglu",
        "placement": "pre",
        "norm": "rmsnorm",
        "norm_eps": float(hf.rms_norm_eps),
        "qk_norm": False,
        "embedding_norm": False,
        "depth_scale": "none",
        "zero_centered_gain": False,
        "tie_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        # dropout 0: HF's attention_dropout is not our (attention + residual) dropout; set it when training
        "rope_theta": float(theta),
        "bias": attn_bias,
        "dropout": 0.0,
        "init_std": float(getattr(hf, "initializer_range", 0.02)),
    }


def from_llama_state_dict(sd: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict -> ours, for the resolved ModelConfig `m` (llama_model_section)."""
    hd = m.hidden_size // m.num_heads
    sd = dict(sd)
    take = sd.pop
    out = {"embed.weight": take("model.embed_tokens.weight"), "final_norm.weight": take("model.norm.weight")}
    head = take("lm_head.weight", None)
    if not m.tie_embeddings:
        if head is None:
            raise ConversionError("lm_head.weight: missing, and tie_word_embeddings is false")
        out["head.weight"] = head
    leaves = ("weight", "bias") if m.bias else ("weight",)
    for i in range(m.num_layers):
        p, b = f"model.layers.{i}", f"blocks.{i}"
        for leaf in leaves:
            q, k, v = (take(f"{p}.self_attn.{n}_proj.{leaf}") for n in "qkv")
            out[f"{b}.attn.fn.qkv.{leaf}"] = fuse_qkv(q, k, v, m.num_heads, m.num_kv_heads, hd)
            out[f"{b}.attn.fn.proj.{leaf}"] = take(f"{p}.self_attn.o_proj.{leaf}")
            gate, up = take(f"{p}.mlp.gate_proj.{leaf}"), take(f"{p}.mlp.up_proj.{leaf}")
            out[f"{b}.mlp.fn.fc1.{leaf}"] = torch.cat([gate, up], dim=0)
            out[f"{b}.mlp.fn.fc2.{leaf}"] = take(f"{p}.mlp.down_proj.{leaf}")
        out[f"{b}.attn.in_norm.weight"] = take(f"{p}.input_layernorm.weight")
        out[f"{b}.mlp.in_norm.weight"] = take(f"{p}.post_attention_layernorm.weight")
    left = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
    if left:
        raise ConversionError(f"weights with no equivalent in our model: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return {k: v.contiguous() for k, v in out.items()}
