"""Start-up without the whole model on any rank: the plain GPT is built on the meta device, parallelized
there (tensor-parallel layers, Ulysses, the pipeline stage's layer list), and only then does each rank
materialize its own parameters -- its tensor-parallel shards, of its pipeline stage's layers, and under
ZeRO-3 only its 1/(dp x ulysses) partition (each parameter is handed to deepspeed.zero.Init's partitioner
as soon as its value is final, the way zero.Init partitions a module as soon as it is built).

The values are the full build's, bit for bit (model/init.py replays the full build's random draws, one
parameter at a time), so a run starts from the same weights on any layout. At any moment a rank holds its
share plus at most two full parameters (the one being drawn and its shard being copied out): that is the
start-up peak the planner reports (launch/plan.py, pretrain/memory.py startup_bytes).

checkpoint.init_from (weights loaded from a state dict) still builds the whole model: the state dict is
whole anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.init import InitStep, init_steps, materialize, parameter_names


@dataclass
class InitPlan:
    """What materialization needs to know about the plain model before parallelism changes its modules."""

    steps: list[InitStep]
    shapes: dict  # name -> (shape, dtype) of the plain (unsharded) parameter
    swiglu: bool
    seed: int


def plan_init(gpt, seed: int) -> InitPlan | None:
    """The init plan of a plain GPT built on the meta device (None for a materialized one)."""
    if not any(p.is_meta for p in gpt.parameters()):
        return None
    names = parameter_names(gpt)
    shapes = {names[id(p)]: (p.shape, p.dtype) for p in gpt.parameters()}
    return InitPlan(init_steps(gpt), shapes, gpt.cfg.mlp == "swiglu", seed)


def fill_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """Gives a meta parameter real storage in place: the same Python object, so ties (the output layer's
    weight is the embedding's), gradient hooks and the attributes tensor parallelism set on it stay valid.
    swap_tensors swaps the tensors' __dict__ and their autograd state; the hooks (registered by
    model/tensor_parallel.py all_reduce_grad_over_tp) stay listed on the object but would no longer fire:
    assigning the list back registers them on the new storage."""
    attributes, hooks = dict(param.__dict__), param._backward_hooks
    torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=param.requires_grad))
    param.__dict__.update(attributes)
    if hooks:
        param._backward_hooks = hooks


class Zero3Partitioner:
    """Partitions each parameter over the ZeRO group the moment it is materialized, with the settings the
    DeepSpeed engine would use itself (its config: dtype, offload_param device, persistence threshold; the
    dp x ulysses group). The engine then finds the model already partitioned and leaves it as it is."""

    def __init__(self, ds_config: dict, group, mpu):
        self.ds_config, self.group, self.mpu = ds_config, group, mpu
        self.dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
        if ds_config.get("fp16", {}).get("enabled"):
            self.dtype = torch.float16
        self.first = None

    def __call__(self, param: nn.Parameter) -> None:
        import deepspeed

        if self.first is None:  # one zero.Init, as the engine's own conversion makes; the rest join it
            holder = nn.Module()
            holder.register_parameter("p", param)
            deepspeed.zero.Init(
                module=holder, data_parallel_group=self.group, config_dict_or_path=self.ds_config, mpu=self.mpu
            )
            self.first = param
        else:
            self.first.convert_to_zero_parameters([param])


def materialize_parameters(
    plan: InitPlan,
    params: dict[str, nn.Parameter],
    device: torch.device,
    tp: int = 1,
    tp_rank: int = 0,
    partition: Zero3Partitioner | None = None,
) -> None:
    """Fills the meta parameters in `params` (plain-model name -> this rank's parameter) with this rank's
    tensor-parallel shard of the full build's values."""
    from model.parallelize import shard

    def sink(name: str, full: torch.Tensor) -> None:
        value = shard(name, full, tp, tp_rank, plan.swiglu)
        value = value.to(partition.dtype) if partition is not None else value
        fill_parameter(params[name], value.clone(memory_format=torch.contiguous_format))  # not a view of `full`
        if partition is not None:
            partition(params[name])

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(plan.seed)  # the full build draws right after seeding (pretrain/job.py build_model)
        materialize(plan.steps, plan.shapes, set(params), sink, device)
    left = [n for n, p in params.items() if p.is_meta]
    if left:
        raise RuntimeError(f"sharded init left parameters on the meta device: {', '.join(left)}")


def local_parameters(gpt, modules) -> dict[str, nn.Parameter]:
    """The parameters of `modules` (this rank's part of the parallelized GPT) by their plain-model name."""
    names = parameter_names(gpt)
    return {names[id(p)]: p for m in modules for p in m.parameters()}


def stage_modules(gpt, cfg, layout, pp_rank: int) -> tuple[list[nn.Module], list[int]]:
    """The layers DeepSpeed's PipelineModule will give this rank's stage, from the same partitioner it uses
    (model/inventory.py; checked against the real PipelineModule by `check_stage`)."""
    from model.inventory import model_inventory
    from model.pipeline import stage_layers

    parts = model_inventory(cfg.model).stage_boundaries(layout.tp, layout.pp, cfg.parallel.pp_partition)
    return stage_layers(gpt)[parts[pp_rank] : parts[pp_rank + 1]], parts


def check_stage(pipe, parts: list[int]) -> None:
    if [int(p) for p in pipe.parts] != list(parts) or any(p.is_meta for p in pipe.parameters()):
        raise RuntimeError(
            f"sharded init materialized the layers of stages {list(parts)} but DeepSpeed cut {list(pipe.parts)}"
        )
