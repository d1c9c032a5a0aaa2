"""Pipeline parallelism: the GPT as a DeepSpeed PipelineModule (1F1B schedule).

The plain (and, with tp > 1, already tensor-parallel) GPT is cut into a flat list of stages'
layers:

    EmbeddingStage  (tied with the output layer when embeddings are tied: TiedLayerSpec, so the
                     first and last pipeline stages share it and DeepSpeed sums its gradient)
    BlockStage x L  (each keeps its GLOBAL 1-based layer index: LNS and Mix-LN depend on it)
    FinalNormStage
    the output layer (the tied embedding's head, or HeadStage)

Inside a stage, blocks pass (x, h) = (residual stream, next normed input) so the fused junctions
work as in the plain model; at a stage boundary only x is sent and the next stage's first block
normalises its own input (`connect_stage_boundaries`).

Where the stage boundaries fall is DeepSpeed's decision (PipelineModule's partitioner);
`stage_boundaries` asks the same partitioner with the same per-layer weights, for the dry-run
planner, which has no process group to build a PipelineModule in.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch
from torch import nn

# parallel.pp_partition -> PipelineModule's partition_method
PARTITION_METHODS = {"parameters": "parameters", "layers": "type:BlockStage"}


class EmbeddingStage(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.embed, self.embed_norm, self.head = gpt.embed, gpt.embed_norm, gpt.head
        self.fused_loss = gpt.loss_spec.fused  # as the output layer (tied): see HeadStage

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(self.embed(tokens.t()))  # sequence-first, as in the plain model


class BlockStage(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.stage_end = False  # set for the last block of a stage that is not the last stage

    def forward(self, inputs):
        x, h = inputs if isinstance(inputs, tuple) else (inputs, None)
        x, h = self.block(x, h)
        return x if self.stage_end else (x, h)


class FinalNormStage(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.final_norm = gpt.final_norm

    def forward(self, inputs):
        # From a block on this stage h is already the final norm of x (the junction computed it).
        return inputs[1] if isinstance(inputs, tuple) else self.final_norm(inputs)


class HeadStage(nn.Module):
    """The output layer. With the fused loss it hands the hidden states on: the loss function applies
    the same weight chunk by chunk (model/loss.py) instead of building the logits here."""

    def __init__(self, gpt):
        super().__init__()
        self.head = gpt.head
        self.fused_loss = gpt.loss_spec.fused

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.fused_loss else self.head(h)


def tied_head_forward(stage: EmbeddingStage, h: torch.Tensor) -> torch.Tensor:
    return h if stage.fused_loss else stage.head(h)


def pipeline_loss(gpt):
    """The last stage's loss_fn: with the fused loss, from the final hidden states and the head's weight
    (the same Parameter as the last stage's own or tied head); otherwise from the head's logits."""
    from model.loss import masked_mean, output_loss, token_losses
    from model.tensor_parallel import vocab_parallel_token_losses

    spec, head, vocab_parallel = gpt.loss_spec, gpt.head, gpt.vocab_parallel

    def loss_fn(outputs: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, mask = targets
        if spec.fused:
            return output_loss(head, outputs, labels, mask, spec, vocab_parallel)
        if vocab_parallel:  # (z-loss with tp > 1 needs the fused loss: pretrain/config.py)
            return masked_mean(vocab_parallel_token_losses(outputs, labels.t()), mask.t())
        return masked_mean(token_losses(outputs, labels.t(), spec.z_loss), mask.t())

    return loss_fn


def stage_layers(gpt) -> list[nn.Module]:
    """The flat layer list, as the modules each layer holds. With tied embeddings the output layer
    is the EmbeddingStage again (DeepSpeed builds it from a TiedLayerSpec on each stage that has it)."""
    first = EmbeddingStage(gpt)
    last = first if gpt.cfg.tie_embeddings else HeadStage(gpt)
    return [first, *(BlockStage(b) for b in gpt.blocks), FinalNormStage(gpt), last]


def build_pipeline(gpt, layout, partition: str):
    """The PipelineModule of this rank's stage; `gpt` is the full plain (or tensor-parallel) model."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layers = stage_layers(gpt)
    if gpt.cfg.tie_embeddings:  # one module per stage that needs it; DeepSpeed sums the tied gradient
        layers[0] = TiedLayerSpec("embed", EmbeddingStage, gpt, tied_weight_attr="embed.weight")
        layers[-1] = TiedLayerSpec(
            "embed", EmbeddingStage, gpt, forward_fn=tied_head_forward, tied_weight_attr="embed.weight"
        )
    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    pipe = PipelineModule(
        layers=layers, topology=topology, loss_fn=pipeline_loss(gpt), partition_method=partition_method(partition)
    )
    connect_stage_boundaries(pipe)
    return pipe


def partition_method(partition: str) -> str:
    if partition not in PARTITION_METHODS:
        raise ValueError(f"parallel.pp_partition '{partition}': allowed {', '.join(PARTITION_METHODS)}")
    return PARTITION_METHODS[partition]


def stage_boundaries(layer_params: list[int], layer_types: list[str], pp: int, partition: str) -> list[int]:
    """parts[s]:parts[s+1] are stage s's layers, as PipelineModule(partition_method=...) computes them.

    layer_params: the trainable parameters each layer holds on one rank (its tp shard; a layer that
    holds a tied module counts all of it); layer_types: each layer's class name. The weights are
    those of PipelineModule._partition_layers (deepspeed/runtime/pipe/module.py): the parameter
    counts for "parameters", 1 for a layer whose type matches the regex (case-insensitive) and 0
    otherwise for "type:REGEX"; the partitioner is DeepSpeed's own. DeepSpeed must have its
    accelerator chosen before this first imports it (DS_ACCELERATOR=cpu without a GPU)."""
    method = partition_method(partition).lower()
    if method == "parameters":
        weights = list(layer_params)
    else:  # "type:REGEX"
        pattern = re.compile(method.split(":")[1], re.IGNORECASE)
        weights = [1 if pattern.search(name) else 0 for name in layer_types]
        if not any(weights):
            raise ValueError(f"partition method '{method}' matches none of the layers {sorted(set(layer_types))}")
    return list(_partition_balanced(tuple(weights), pp))


@lru_cache(maxsize=256)  # the planner's search asks for the same few partitions many times
def _partition_balanced(weights: tuple[int, ...], parts: int) -> tuple[int, ...]:
    from deepspeed.runtime.utils import partition_balanced

    return tuple(int(p) for p in partition_balanced(weights=list(weights), num_parts=parts))


def connect_stage_boundaries(pipe) -> None:
    """A block whose successor lives on another stage hands over x alone: its junction stops at the
    residual add (no norm from another rank's parameters)."""
    local = pipe.forward_funcs
    for i, layer in enumerate(local):
        if isinstance(layer, BlockStage):
            nxt = local[i + 1] if i + 1 < len(local) else None
            if not isinstance(nxt, (BlockStage, FinalNormStage)):
                layer.block.connect(None)
                layer.stage_end = True


def local_blocks(pipe) -> list:
    return [layer.block for layer in pipe.forward_funcs if isinstance(layer, BlockStage)]
