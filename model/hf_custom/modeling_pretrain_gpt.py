"""A GPT exported from the `pretrain` stack, for every norm placement (transformers remote code).

Self-contained: plain torch + transformers base classes, no import of the training code, so an
exported directory loads anywhere with `trust_remote_code=True`. The math is the training model's
(model/ in the project), one sublayer shape with optional slots read from the config:

    y = post_norm(alpha * x + out_norm(F(in_norm(x) * in_scale)))

with an optional norm after the embedding and an optional final norm before the output layer.
Norms compute their statistics in fp32; `zero_centered_gain` stores w for the gain (1 + w); the
in_scale (LayerNorm Scaling's 1/sqrt(l)) is a plain float applied after the gain (and bias).
`norm` is rmsnorm, layernorm or crmsnorm (Jiang et al. 2023: RMSNorm of the zero-mean vector stored in
the first d - 1 coordinates, the last being minus their sum); `norm_bias` adds a shift after the gain
(null: LayerNorm has one, the others do not).
Attention: RoPE (rotate-half), grouped-query heads, optional QK-norm (before RoPE) per head or over
all heads of the layer; SwiGLU or tanh-GELU MLP. Weight names follow Llama where there is one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers >= 5: init functions that skip weights already loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init as _init

try:
    from transformers.cache_utils import DynamicCache
except ImportError:  # pragma: no cover
    DynamicCache = None

from .configuration_pretrain_gpt import PretrainGPTConfig

_TRANSFORMERS_V5 = int(__import__("transformers").__version__.split(".")[0]) >= 5


class PretrainGPTNorm(nn.Module):
    """RMSNorm, LayerNorm or CRMSNorm with fp32 statistics, optional (1 + w) gain, optional shift and a
    constant output scale."""

    def __init__(
        self,
        kind: str,
        dim: int,
        eps: float,
        zero_centered_gain: bool = False,
        scale: float = 1.0,
        bias: bool | None = None,
    ):
        super().__init__()
        self.kind, self.eps, self.zero_centered_gain, self.scale = kind, eps, zero_centered_gain, float(scale)
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered_gain else torch.ones(dim))
        has_bias = kind == "layernorm" if bias is None else bias
        self.bias = nn.Parameter(torch.zeros(dim)) if has_bias else None

    def gain(self) -> torch.Tensor:
        return self.weight + 1.0 if self.zero_centered_gain else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.kind == "crmsnorm":  # the first d - 1 coordinates hold the zero-mean vector
            xf = torch.cat([xf[..., :-1], -xf[..., :-1].sum(-1, keepdim=True)], dim=-1)
        if self.kind in ("rmsnorm", "crmsnorm"):
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain().float()
            if self.bias is not None:
                y = y + self.bias.float()
        else:
            bias = None if self.bias is None else self.bias.float()
            y = F.layer_norm(xf, (x.shape[-1],), self.gain().float(), bias, self.eps)
        if self.scale != 1.0:
            y = y * self.scale
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, dim={self.weight.shape[0]}, eps={self.eps}, scale={self.scale:.4g}"
            + (", zero_centered" if self.zero_centered_gain else "")
            + (", bias" if self.bias is not None else "")
        )


def _norm(config: PretrainGPTConfig, dim: int, scale: float = 1.0) -> PretrainGPTNorm:
    return PretrainGPTNorm(
        config.norm, dim, config.norm_eps, config.zero_centered_gain, scale, getattr(config, "norm_bias", None)
    )


# ------------------------------------------------------------------------------------- RoPE


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T); computed in fp32, no buffers
    (nothing to lose when a model is materialised from the meta device)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); rotate-half convention (Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# ------------------------------------------------------------------------------- sublayers


class PretrainGPTAttention(nn.Module):
    def __init__(self, config: PretrainGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta = config.rope_theta
        d, hd, b = config.hidden_size, self.head_dim, config.bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=b)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=b)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=b)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=b)
        # "head": one norm over head_dim shared by the heads; "layer": over all heads at once (OLMo 2).
        self.qk_norm_per_layer = config.qk_norm_scope == "layer"
        if config.qk_norm:
            self.q_norm = _norm(config, self.num_heads * hd if self.qk_norm_per_layer else hd)
            self.k_norm = _norm(config, self.num_kv_heads * hd if self.qk_norm_per_layer else hd)
        else:
            self.q_norm = self.k_norm = None

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return q, k
        if self.qk_norm_per_layer:
            return self.q_norm(q.flatten(2)).view_as(q), self.k_norm(k.flatten(2)).view_as(k)
        return self.q_norm(q), self.k_norm(k)

    def forward(self, x, positions, mask, past_key_values=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k = self._qk_norm(q, k)  # before RoPE, as in training
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope_tables(positions, self.head_dim, self.theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.num_kv_heads != self.num_heads:  # head i reads KV group i // (H / Hkv), as in training
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:  # no cache, no padding: the plain causal path (what training ran)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class PretrainGPTMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GELU: down(gelu_tanh(up(x)))."""

    def __init__(self, config: PretrainGPTConfig):
        super().__init__()
        d, f, b = config.hidden_size, config.intermediate_size, config.bias
        self.swiglu = config.mlp == "swiglu"
        self.gate_proj = nn.Linear(d, f, bias=b) if self.swiglu else None
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class PretrainGPTDecoderLayer(nn.Module):
    """Two residual sublayers; the slots come from config.layer_slots[layer_idx]."""

    def __init__(self, config: PretrainGPTConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PretrainGPTAttention(config, layer_idx)
        self.mlp = PretrainGPTMLP(config)
        slots = config.layer_slots[layer_idx]
        self.alpha = {}
        for sub in ("attn", "mlp"):
            s = slots[sub]
            d = config.hidden_size
            setattr(self, f"{sub}_in_norm", _norm(config, d, s["in_scale"]) if s["in_norm"] else None)
            setattr(self, f"{sub}_out_norm", _norm(config, d) if s["out_norm"] else None)
            setattr(self, f"{sub}_post_norm", _norm(config, d) if s["post_norm"] else None)
            self.alpha[sub] = float(s["residual_alpha"])

    def _residual(self, sub: str, x: torch.Tensor, fn) -> torch.Tensor:
        in_norm, out_norm, post_norm = (getattr(self, f"{sub}_{n}_norm") for n in ("in", "out", "post"))
        f = fn(in_norm(x) if in_norm is not None else x)
        if out_norm is not None:
            f = out_norm(f)
        y = torch.add(f, x, alpha=self.alpha[sub])  # f + alpha * x (alpha != 1 only for DeepNorm)
        return post_norm(y) if post_norm is not None else y

    def forward(self, x, positions, mask, past_key_values=None):
        x = self._residual("attn", x, lambda h: self.self_attn(h, positions, mask, past_key_values))
        return self._residual("mlp", x, self.mlp)


# ----------------------------------------------------------------------------------- models


class PretrainGPTPreTrainedModel(PreTrainedModel):
    config_class = PretrainGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["PretrainGPTDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Normal(0, initializer_range) for matrices; gains at their identity (1, or 0 for (1 + w))."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, PretrainGPTNorm):
            (_init.zeros_ if module.zero_centered_gain else _init.ones_)(module.weight)
            if module.bias is not None:
                _init.zeros_(module.bias)


class PretrainGPTModel(PretrainGPTPreTrainedModel):
    def __init__(self, config: PretrainGPTConfig):
        super().__init__(config)
        if config.layer_slots is None or config.final_norm is None or config.embedding_norm is None:
            raise ValueError(
                "this config has no layer_slots / final_norm / embedding_norm: they are written by "
                "`python -m pretrain.export` from the project's placement registry"
            )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_norm = _norm(config, config.hidden_size) if config.embedding_norm else None
        self.layers = nn.ModuleList(PretrainGPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config, config.hidden_size) if config.final_norm else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training and DynamicCache is not None:
            past_key_values = DynamicCache()
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        b, t = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device).unsqueeze(0).expand(b, t)
        mask = _attention_mask(attention_mask, b, t, past, x.device)
        hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden is not None:
                hidden.append(x)
            x = layer(x, position_ids, mask, past_key_values)
        if self.norm is not None:
            x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=past_key_values,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )


def _attention_mask(attention_mask, b: int, t: int, past: int, device) -> torch.Tensor | None:
    """None for the plain causal case (no cache, no padding); else a boolean (B, 1, T, past+T) mask:
    causal, without padded keys, and always the query's own position (a fully masked row would
    give NaN; padded queries' outputs are ignored anyway)."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded:
        return None
    total = past + t
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(b, 1, t, total)
    if attention_mask is not None:
        keys = attention_mask[:, -total:].to(torch.bool)[:, None, None, :]
        mask = (mask & keys) | (k_pos == q_pos)[None, None]
    return mask


class PretrainGPTForCausalLM(PretrainGPTPreTrainedModel, GenerationMixin):
    # transformers 5 names the tie as target -> source; 4.x as a list of tied keys.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_V5 else ["lm_head.weight"]

    def __init__(self, config: PretrainGPTConfig):
        super().__init__(config)
        self.model = PretrainGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:  # Hugging Face's convention: position t predicts labels[t + 1]
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )


__all__ = ["PretrainGPTForCausalLM", "PretrainGPTModel", "PretrainGPTPreTrainedModel"]
