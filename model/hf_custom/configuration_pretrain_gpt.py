"""Configuration of a GPT exported from the `pretrain` stack, for any norm placement.

Self-contained on purpose (torch-free, no import of the training code): this file and
modeling_pretrain_gpt.py are copied next to the weights, so an exported checkpoint loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` without the project.

Every placement is one sublayer shape with optional slots (DESIGN.md §4, §9):

    y = post_norm(alpha * x + out_norm(F(in_norm(x) * in_scale)))

The exporter writes the slots of every layer into `layer_slots` (and `final_norm`, `embedding_norm`),
generated from the project's placement registry (model/placement.py) at export time, so this code
never needs to know a placement's rules and there is one registry, not two; `placement` is
informational. A config without `layer_slots` (e.g. transformers' default instance) is valid but
cannot build a model.
"""

from __future__ import annotations

from transformers import PretrainedConfig

SLOT_KEYS = ("in_norm", "out_norm", "post_norm", "in_scale", "residual_alpha")


class PretrainGPTConfig(PretrainedConfig):
    model_type = "pretrain_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 704,
        mlp: str = "swiglu",
        norm: str = "rmsnorm",
        norm_eps: float = 1e-5,
        norm_bias: bool | None = None,
        zero_centered_gain: bool = False,
        placement: str = "peri",
        layer_slots: list | None = None,
        final_norm: bool | None = None,
        embedding_norm: bool | None = None,
        depth_scale: str | None = None,
        mix_alpha: float = 0.25,
        qk_norm: bool = False,
        qk_norm_scope: str = "head",
        bias: bool = False,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = 3,
        **kwargs,
    ):
        _check_choice("mlp", mlp, ("swiglu", "gelu"))
        _check_choice("norm", norm, ("rmsnorm", "layernorm", "crmsnorm"))
        _check_choice("qk_norm_scope", qk_norm_scope, ("head", "layer"))
        num_key_value_heads = num_key_value_heads or num_attention_heads
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} must divide hidden_size={hidden_size} "
                f"and be a multiple of num_key_value_heads={num_key_value_heads}"
            )
        if layer_slots is not None:
            _check_slots(layer_slots, num_hidden_layers)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.mlp = mlp
        self.norm = norm
        self.norm_eps = norm_eps
        self.norm_bias = norm_bias  # a shift after every norm's gain; None: LayerNorm yes, the others no
        self.zero_centered_gain = zero_centered_gain
        self.placement = placement
        self.layer_slots = layer_slots
        self.final_norm = final_norm
        self.embedding_norm = embedding_norm
        self.depth_scale = depth_scale
        self.mix_alpha = mix_alpha
        self.qk_norm = qk_norm
        self.qk_norm_scope = qk_norm_scope
        self.bias = bias
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: '{value}' is not allowed; allowed: {', '.join(allowed)}")


def _check_slots(layer_slots: list, num_layers: int) -> None:
    if len(layer_slots) != num_layers:
        raise ValueError(f"layer_slots: {len(layer_slots)} entries for num_hidden_layers={num_layers}")
    for i, layer in enumerate(layer_slots):
        for sub in ("attn", "mlp"):
            slot = layer.get(sub) if isinstance(layer, dict) else None
            if not isinstance(slot, dict) or set(slot) != set(SLOT_KEYS):
                raise ValueError(f"layer_slots[{i}].{sub}: expected the keys {', '.join(SLOT_KEYS)}, got {slot!r}")


__all__ = ["PretrainGPTConfig"]
