"""The GPT: token embedding (+ optional norm), L blocks, optional final norm, output layer.

Readable in one sitting on purpose; the placement registry decides the norms, the kernel
backend computes them, parallelism is applied by the training code, not here.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import NormOps
from model.attention import Attention
from model.block import Block
from model.loss import LossSpec, masked_mean, output_loss, token_losses
from model.mlp import MLPS
from model.norms import NormFactory
from model.placement import PLACEMENTS, layer_specs
from model.rope import Rotary
from model.tensor_parallel import gather_last_dim

__all__ = ["GPT", "build_model", "masked_mean", "token_losses"]  # the plain loss helpers, re-exported


class GPT(nn.Module):
    def __init__(self, cfg, ops: NormOps):
        """cfg: a resolved pretrain.config.ModelConfig; ops: the norm kernels to run on."""
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        norms = NormFactory(cfg.norm, cfg.norm_eps, ops, cfg.zero_centered_gain, cfg.norm_bias)
        self.rotary = rotary = Rotary(d // cfg.num_heads, cfg.rope_theta)  # one table cache, shared by the blocks
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
                    sigma_reparam=cfg.sigma_reparam,
                ),
                MLPS[cfg.mlp](d, cfg.ffn_hidden_size, cfg.bias, cfg.sigma_reparam),
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
        self.loss_spec = LossSpec()  # train.fused_loss / train.z_loss, set by the training job
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, std) everywhere; residual-output projections get std/sqrt(2L) (GPT-2,
        Megatron), except under a placement with an init gain (DeepNorm's beta), which scales the
        value, attention-output and MLP weights by beta instead. The steps are model/init.py's, which
        also replays them for a rank that builds only its own part of the model (same values)."""
        from model.init import parameter_names, reset_steps, run_steps

        names = parameter_names(self)
        run_steps(reset_steps(self), {names[id(p)]: p for p in self.parameters()})

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, T). Logits (B, T, V) without labels; with them the training loss (fp32): the mean token
        cross-entropy over the mask (+ z-loss), by default without building the logits (model/loss.py).
        Inside, activations are sequence-first (T, B, d), as in Megatron."""
        x, h = self.embed_norm(self.embed(tokens.t())), None
        # Fill the RoPE table cache here (eager), not first inside a recomputed (checkpointed) block, where
        # torch.compile cannot trace a mutation of it (a graph break). Compiled code computes its own.
        self.rotary.tables(tokens.shape[1], x.device, x.dtype)
        for block in self.blocks:
            x, h = block(x, h)
        # h: the final norm of x (or x), computed by the last junction
        if labels is not None:
            return output_loss(self.head, h, labels, loss_mask, self.loss_spec, self.vocab_parallel)
        logits = self.head(h)
        return (gather_last_dim(logits) if self.vocab_parallel else logits).transpose(0, 1)

    def register_zero3_external_parameters(self) -> None:
        """ZeRO-3 gathers a module's parameters when that module's forward runs; the junctions read
        norm gains inside the block's forward instead, so they are declared to DeepSpeed."""
        import deepspeed

        register_external_parameter = deepspeed.zero.register_external_parameter

        for block in self.blocks:
            for p in block.junction_norms():
                register_external_parameter(block, p)
        if self.loss_spec.fused:  # the fused loss reads the output layer's weight without calling it
            register_external_parameter(self, self.head.weight)

    def compile_blocks(self, memory_budget: float = 1.0, **compile_kwargs) -> None:
        """torch.compile each block (regional compilation): blocks of the same shape share one compiled
        graph, so compilation time does not grow with depth. The norm kernels and the fused loss are
        custom ops, opaque to the compiler (no graph breaks); compilation happens at the first call.

        Activation recomputation (model/recompute.py) checkpoints with a Python context that restores
        the tensor-parallel RNG stream, which the compiler cannot trace: the checkpoint call stays
        outside the compiled code (full: the block's inner forward is compiled; selective: everything
        around the attention core is). memory_budget < 1: see with_memory_budget(); not with recomputation."""
        if memory_budget < 1 and self._recomputes():
            raise ValueError("compile_blocks(memory_budget < 1) with activation recomputation: choose one")
        compiled = lambda fn: torch.compile(fn, **compile_kwargs)
        for block in self.blocks:
            attn = block.attn.fn
            if attn.recompute_core:
                attn.split_qkv = compiled(attn.split_qkv)
                attn.proj.compile(**compile_kwargs)
                block.mlp.fn.compile(**compile_kwargs)
                for junction in (block.attn_exit, block.mlp_exit):
                    junction.fn = compiled(junction.fn)
            elif block.recompute:
                block._forward = compiled(block._forward)
            else:
                block.compile(**compile_kwargs)
                with_memory_budget(block, memory_budget)

    def compile_model(self, memory_budget: float = 1.0, **compile_kwargs) -> None:
        """torch.compile the whole forward as one graph (train.compile_scope: model): inductor fuses
        across block boundaries, the embedding and the final norm, as torch.compile(model) does for a
        Hugging Face model. Compilation time grows with depth; pipeline stages and activation
        recomputation need compile_blocks(). memory_budget < 1: see with_memory_budget()."""
        if self._recomputes():
            raise ValueError("compile_model() with activation recomputation: use compile_blocks()")
        self.compile(**compile_kwargs)
        with_memory_budget(self, memory_budget)

    def _recomputes(self) -> bool:
        """Whether activation checkpointing (model/recompute.py) is on in any block."""
        return any(b.recompute or b.attn.fn.recompute_core for b in self.blocks)

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


def with_memory_budget(module: nn.Module, budget: float) -> None:
    """Runs module's compiled call (nn.Module.compile()) under inductor's activation memory budget
    (torch._functorch.config.activation_memory_budget, train.compile_memory_budget): below 1, the
    partitioner keeps about that fraction of what backward would read and recomputes the rest, choosing by
    FLOPs (pointwise ops and norms count as none; matmuls, attention and the fused loss by theirs).
    is_non_builtin_to_include puts custom ops among the choices priced in FLOPs: by default the partitioner
    takes them for free to recompute, and at budgets 0.5 and 0.1 recomputed the whole fused loss (about a
    quarter of a step at quickstart) and every attention. The settings are read when a graph is compiled,
    at the first call; they are set for this module's calls only, not for the process."""
    if budget >= 1:
        return
    compiled = getattr(module, "_compiled_call_impl", None)
    if compiled is None:
        raise ValueError(f"with_memory_budget({type(module).__name__}): call module.compile() first")
    from torch._functorch import config as functorch_config

    settings = {"activation_memory_budget": budget}
    if hasattr(functorch_config, "is_non_builtin_to_include"):  # a newer setting than the budget: not in every torch
        settings["is_non_builtin_to_include"] = True

    def call(*args, **kwargs):
        with functorch_config.patch(settings):
            return compiled(*args, **kwargs)

    module._compiled_call_impl = call


def build_model(
    cfg, backend: str = "auto", device: str | torch.device = "cpu", materialize: bool = True
) -> tuple[GPT, str]:
    """Builds the model on `device` with the norm backend resolved for it; returns (model, reason).
    materialize=False: parameters on the meta device (no memory, no random draws), for a rank that then
    materializes only its own part (model/init.py materialize)."""
    from kernels import resolve_backend

    ops, reason = resolve_backend(backend, device, hidden_size=cfg.hidden_size)
    with torch.device(device if materialize else "meta"):
        model = GPT(cfg, ops)
    return model, reason
