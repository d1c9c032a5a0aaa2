"""The model's configuration: the `model:` section of a run config, its checks and its derived
defaults. It lives with the model because only the model reads it; the trainer's config
(pretrain/config.py) embeds it as one section.

Which switches a placement needs or allows is said by its registry entry (model/placement.py);
`validate_model` only applies those rules, so a new placement brings its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from kernels.errors import ConfigError, did_you_mean
from model.placement import PLACEMENTS, check_placement_switches


def config_field(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a help text and optional range checks (min, max, gt), read by the
    config loader (pretrain/config.py) when it validates a value."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


_f = config_field


@dataclass
class ModelConfig:
    vocab_size: int = _f(0, "vocabulary size; 0 = the tokenizer's, padded to vocab_multiple", min=0)
    vocab_multiple: int = _f(128, "pad the vocabulary to a multiple of this (Megatron style)", min=1)
    hidden_size: int = _f(256, "model width d", min=1)
    num_layers: int = _f(6, "number of transformer blocks L", min=1)
    num_heads: int = _f(4, "attention heads", min=1)
    num_kv_heads: int = _f(0, "key/value heads for GQA; 0 = num_heads (plain multi-head)", min=0)
    ffn_hidden_size: int = _f(0, "MLP width; 0 = 8/3*d rounded up to ffn_multiple (SwiGLU) or 4d (GELU)", min=0)
    ffn_multiple: int = _f(64, "round the automatic MLP width up to a multiple of this", min=1)
    seq_len: int = _f(256, "training sequence length (tokens per sample)", min=2)
    mlp: Literal["swiglu", "gelu"] = _f("swiglu", "MLP type")
    placement: str = _f("peri", "norm placement (model/placement.py registry)")
    norm: Literal["rmsnorm", "layernorm", "crmsnorm"] = _f(
        "rmsnorm", "normalization function; crmsnorm = RMSNorm of the zero-mean stream (Pre-LN only; model/norms.py)"
    )
    norm_bias: Optional[bool] = _f(
        None, "a learnable shift after every norm's gain; null = LayerNorm has one, RMSNorm / CRMSNorm do not"
    )
    norm_eps: float = _f(1e-5, "epsilon of every norm", gt=0)
    qk_norm: bool = _f(
        False,
        "normalize queries and keys before RoPE and attention; against attention-logit growth at high learning "
        "rates (Dehghani et al. 2023; Wortsman et al. 2023)",
    )
    qk_norm_scope: Literal["head", "layer"] = _f(
        "head", "qk_norm over each head's dimensions (Gemma 3, Qwen 3) or over all heads at once (OLMo 2)"
    )
    sigma_reparam: bool = _f(
        False,
        "sigma-Reparam (Zhai et al. 2023): attention qkv/proj and MLP fc1/fc2 use (gamma / sigma(W)) * W, sigma the "
        "spectral norm by one power-iteration step per training forward, gamma learned (initialised to sigma(W)); "
        "against attention entropy collapse and loss spikes. Not on the embedding / output layer "
        "(model/sigma_reparam.py)",
    )
    embedding_norm: Optional[bool] = _f(None, "norm after the token embedding; null = the placement's default")
    depth_scale: Optional[Literal["none", "inv_sqrt_layer"]] = _f(
        None, "scale on the input norms: inv_sqrt_layer = LayerNorm Scaling; null = the placement's default"
    )
    zero_centered_gain: bool = _f(False, "parameterise norm gains as (1 + w) with w initialised to 0")
    mix_alpha: float = _f(0.25, "Mix-LN: fraction of blocks (from the bottom) that use Post-LN", min=0, max=1)
    tie_embeddings: bool = _f(True, "share the token embedding with the output layer")
    rope_theta: float = _f(10000.0, "RoPE base", gt=0)
    bias: bool = _f(False, "biases in the linear layers")
    dropout: float = _f(0.0, "dropout on attention probabilities and residual branches", min=0, max=1)
    init_std: float = _f(0.02, "std of the normal init; output projections get std/sqrt(2L)", gt=0)


MODEL_DEFAULTS = ModelConfig()


def divisors(n: int, limit: int | None = None) -> str:
    """'1, 2, 4, ...': the sizes that divide n, for error messages."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit))


def validate_model(m: ModelConfig) -> None:
    """Cross-field checks of the model section alone (the layout's are pretrain/config.py's)."""
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
            f"head counts that divide it: {divisors(m.hidden_size, limit=64)}"
        )
    head_dim = m.hidden_size // m.num_heads
    if head_dim % 2:
        raise ConfigError(f"model.hidden_size/num_heads = {head_dim} must be even for RoPE")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(
            f"model.num_kv_heads: {kv} does not divide model.num_heads={m.num_heads}; allowed: {divisors(m.num_heads)}"
        )
    if m.placement not in PLACEMENTS:
        raise ConfigError(
            f"model.placement: '{m.placement}' is not a placement; allowed: "
            f"{', '.join(PLACEMENTS)}{did_you_mean(m.placement, PLACEMENTS)}"
        )
    if m.qk_norm_scope != MODEL_DEFAULTS.qk_norm_scope and not m.qk_norm:
        raise ConfigError(
            f"model.qk_norm_scope: '{m.qk_norm_scope}' is set but model.qk_norm is false; "
            "set model.qk_norm: true or remove the scope"
        )
    check_placement_switches(m, MODEL_DEFAULTS)
    from model.norms import check_norm_switches  # here: model/norms.py imports torch, this module does not

    check_norm_switches(m)


def resolve_model(m: ModelConfig, vocab_size: int | None, tp: int = 1) -> ModelConfig:
    """A copy with every derived default filled in: the vocabulary (the tokenizer's, padded to a
    multiple of vocab_multiple and of the tensor-parallel size), KV heads, MLP width, and the
    switches the placement decides when left null."""
    import math

    if m.vocab_size == 0:
        if vocab_size is None:
            raise ConfigError("model.vocab_size: 0 (from the tokenizer) but no tokenizer was given")
        mult = math.lcm(m.vocab_multiple, tp)  # the vocabulary is split over tp ranks
        m = dataclasses.replace(m, vocab_size=-(-vocab_size // mult) * mult)
    elif vocab_size is not None and m.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size})")
    if m.num_kv_heads == 0:
        m = dataclasses.replace(m, num_kv_heads=m.num_heads)
    if m.ffn_hidden_size == 0:
        if m.mlp == "swiglu":
            m = dataclasses.replace(
                m, ffn_hidden_size=-(-int(8 * m.hidden_size / 3) // m.ffn_multiple) * m.ffn_multiple
            )
        else:
            m = dataclasses.replace(m, ffn_hidden_size=4 * m.hidden_size)
    p = PLACEMENTS[m.placement]
    return dataclasses.replace(
        m,
        embedding_norm=p.embedding_norm if m.embedding_norm is None else m.embedding_norm,
        depth_scale=p.depth_scale if m.depth_scale is None else m.depth_scale,
        norm_bias=m.norm == "layernorm" if m.norm_bias is None else m.norm_bias,
    )
