"""What the model holds, without holding it: the parameter inventory for the dry-run planner.

The GPT is built on PyTorch's meta device (shapes, no memory) by the trainer's own `build_model`,
and cut into the pipeline layer list the trainer hands DeepSpeed (model/pipeline.py), so the
planner's counts cannot drift from the model: a new parameter, norm or layer shows up here by
construction. Tensor-parallel shards follow model/parallelize.py's sharding table.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Inventory:
    """The model's parameters and the pipeline layer list, independent of the layout."""

    numel: dict  # parameter name -> elements (plain, unsharded model)
    kind: dict  # parameter name -> tensor-parallel sharding (model/parallelize.py)
    layers: tuple  # the pipeline's layer list: per layer, the names of the parameters it holds
    layer_names: tuple  # "embed", "block 1", ..., "final norm", "head"
    layer_types: tuple  # each layer's class name (what PipelineModule's "type:" partitioning matches)
    block_norms: int  # residual-path norms per block (their inputs are stored)
    qk_norm: bool

    @property
    def total(self) -> int:
        return sum(self.numel.values())

    def shard(self, name: str, tp: int) -> int:
        """Elements of one tensor-parallel rank's share of the parameter."""
        n = self.numel[name]
        return n if self.kind[name] == "replicated" or tp == 1 else n // tp

    def layer_params(self, tp: int) -> list[int]:
        """Parameters each pipeline layer holds on one rank (what PipelineModule counts per layer)."""
        return [sum(self.shard(n, tp) for n in names) for names in self.layers]

    def stage_boundaries(self, tp: int, pp: int, partition: str) -> list[int]:
        """parts[s]:parts[s+1] are stage s's layers, as the trainer's PipelineModule cuts them (DeepSpeed
        imports on the first call: its accelerator must be chosen by then)."""
        from model.pipeline import stage_boundaries

        return stage_boundaries(self.layer_params(tp), list(self.layer_types), pp, partition)


_INVENTORIES: dict = {}


def model_inventory(model_cfg) -> Inventory:
    """The inventory of the model a resolved model config describes (cached per config)."""
    key = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True)
    if key not in _INVENTORIES:
        _INVENTORIES[key] = _build(model_cfg)
    return _INVENTORIES[key]


def _build(model_cfg) -> Inventory:
    from model.gpt import build_model
    from model.norms import Norm
    from model.parallelize import sharding_of
    from model.pipeline import stage_layers

    gpt, _ = build_model(model_cfg, "torch", "meta")
    names = {id(p): n for n, p in gpt.named_parameters()}
    layers = stage_layers(gpt)
    held = [tuple(dict.fromkeys(names[id(p)] for p in layer.parameters())) for layer in layers]
    blocks = len(gpt.blocks)
    layer_names = ("embed", *(f"block {i}" for i in range(1, blocks + 1)), "final norm", "head")
    first = gpt.blocks[0]
    norms = sum(
        isinstance(getattr(sub, slot), Norm)
        for sub in (first.attn, first.mlp)
        for slot in ("in_norm", "out_norm", "post_norm")
    )
    numel = {n: p.numel() for n, p in gpt.named_parameters()}
    return Inventory(
        numel=numel,
        kind={n: sharding_of(n) for n in numel},
        layers=tuple(held),
        layer_names=layer_names,
        layer_types=tuple(type(layer).__name__ for layer in layers),
        block_norms=norms,
        qk_norm=bool(model_cfg.qk_norm),
    )
