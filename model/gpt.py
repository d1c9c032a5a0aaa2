"""The GPT: token embedding (+ optional norm), L blocks, optional final norm, output layer.

Readable in one sitting on purpose; the placement registry decides the norms, the kernel
backend computes them, parallelism is applied by the training code, not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import NormOps
from model.attention import Attention
from model.block import Block
from model.mlp import MLPS
from model.norms import NormFactory
from model.placement import PLACEMENTS, layer_specs
from model.rope import Rotary
from model.tensor_parallel import gather_last_dim, vocab_parallel_token_losses


class GPT(nn.Module):
    def __init__(self, cfg, ops: NormOps):
        """cfg: a resolved pretrain.config.ModelConfig; ops: the norm kernels to run on."""
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        norms = NormFactory(cfg.norm, cfg.norm_eps, ops, cfg.zero_centered_gain)
        rotary = Rotary(d // cfg.num_heads, cfg.rope_theta)
        self.specs = layer_specs(cfg)

        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.embed_norm = norms.optional(cfg.embedding_norm, d)
        self.blocks = nn.ModuleList(
            Block(
                layer,
                Attention(
                    d,
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    bias=cfg.bias,
                    dropout=cfg.dropout,
                    qk_norm=cfg.qk_norm,
                    norms=norms,
                    rotary=rotary,
                    qk_norm_scope=cfg.qk_norm_scope,
                ),
                MLPS[cfg.mlp](d, cfg.ffn_hidden_size, cfg.bias),
                spec,
                d,
                norms,
                cfg.dropout,
            )
            for layer, spec in enumerate(self.specs, start=1)
        )
        self.final_norm = norms.optional(PLACEMENTS[cfg.placement].final_norm, d)
        for block, nxt in zip(self.blocks, list(self.blocks)[1:] + [None]):
            block.connect(nxt.attn.in_norm if nxt is not None else self.final_norm)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.vocab_parallel = False  # set by model.parallelize.apply_tensor_parallel
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, std) everywhere; residual-output projections get std/sqrt(2L) (GPT-2,
        Megatron), except under a placement with an init gain (DeepNorm's beta), which scales the
        value, attention-output and MLP weights by beta instead."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for block, spec in zip(self.blocks, self.specs):
            attn, mlp = block.attn.fn, block.mlp.fn
            for lin in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            if spec.init_gain != 1.0:
                beta = spec.init_gain
                w = attn.qkv.weight.view(attn.num_kv_heads, attn.q_per_kv + 2, attn.head_dim, -1)
                w[:, attn.q_per_kv + 1].mul_(beta)  # values
                for lin in (attn.proj, mlp.fc1, mlp.fc2):
                    lin.weight.mul_(beta)
            else:
                nn.init.normal_(attn.proj.weight, std=out_std)
                nn.init.normal_(mlp.fc2.weight, std=out_std)

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, T). Logits (B, T, V) without labels; the mean token cross-entropy (fp32) with them.
        Inside, activations are sequence-first (T, B, d), as in Megatron."""
        x, h = self.embed_norm(self.embed(tokens.t())), None
        for block in self.blocks:
            x, h = block(x, h)
        logits = self.head(h)  # h: the final norm of x (or x), computed by the last junction
        if labels is None:
            return (gather_last_dim(logits) if self.vocab_parallel else logits).transpose(0, 1)
        losses = (vocab_parallel_token_losses if self.vocab_parallel else token_losses)(logits, labels.t())
        return masked_mean(losses, None if loss_mask is None else loss_mask.t())

    def register_zero3_external_parameters(self) -> None:
        """ZeRO-3 gathers a module's parameters when that module's forward runs; the junctions read
        norm gains inside the block's forward instead, so they are declared to DeepSpeed."""
        import deepspeed

        register_external_parameter = deepspeed.zero.register_external_parameter

        for block in self.blocks:
            for p in block.junction_norms():
                register_external_parameter(block, p)

    def junction_kinds(self) -> list[str]:
        """Which op leaves each sublayer (for the run log)."""
        return [j.kind for b in self.blocks for j in (b.attn_exit, b.mlp_exit)]

    def num_params(self, embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embedding:
            n -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.head.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6N + 12*L*H*Q*T (PaLM appendix B), N = every parameter used in a
        matmul (all but the embedding lookup, the output layer included)."""
        c = self.cfg
        n = self.num_params(embedding=False) + c.vocab_size * c.hidden_size
        head_dim = c.hidden_size // c.num_heads
        return 6 * n + 12 * c.num_layers * c.num_heads * head_dim * c.seq_len


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32, shaped like labels."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view_as(
        labels
    )


def masked_mean(losses: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def build_model(cfg, backend: str = "auto", device: str | torch.device = "cpu") -> tuple[GPT, str]:
    """Builds the model on `device` with the norm backend resolved for it; returns (model, reason)."""
    from kernels import resolve_backend

    ops, reason = resolve_backend(backend, device, hidden_size=cfg.hidden_size)
    with torch.device(device):
        model = GPT(cfg, ops)
    return model, reason
