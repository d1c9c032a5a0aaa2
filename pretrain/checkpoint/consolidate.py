"""The plain model's weights from any checkpoint of this stack, whatever the layout it was written on:
ZeRO 0-3 through DeepSpeed's zero_to_fp32, tensor/pipeline-parallel module files unsharded and
renamed to the plain GPT's keys. Used by evaluation, export, checkpoint.init_from and the sweeps,
none of which needs the training world size or a DeepSpeed engine."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pretrain.checkpoint.checkpointer import read_meta
from pretrain.checkpoint.layout import META, CheckpointError
from pretrain.checkpoint.safe_load import check_pickles, load_weights_only
from pretrain.config import apply_override, config_from_saved
from pretrain.distributed import prefer_cpu_accelerator_if_no_gpu


def _pipeline_module_state(ckpt: Path, tp_rank: int, num_layers: int) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's weights from DeepSpeed's per-layer pipeline files, renamed to the
    plain model's keys (layer 0 embedding, 1..L blocks, L+1 final norm, L+2 untied head)."""
    state = {}
    for f in sorted(ckpt.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
        idx = int(f.name.split("-")[0].split("_")[1])
        part = load_weights_only(f)
        for key, value in part.items():
            if 1 <= idx <= num_layers:
                key = f"blocks.{idx - 1}." + key.removeprefix("block.")
            state[key] = value
    return state


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The plain model's fp32 weights from a DeepSpeed checkpoint directory, whatever the ZeRO stage
    (tensor/pipeline-parallel checkpoints: ZeRO 0-2, from the module weights each rank saved)."""
    from model.parallelize import unshard_state_dicts

    prefer_cpu_accelerator_if_no_gpu()
    check_pickles(ckpt)  # DeepSpeed's zero_to_fp32 below unpickles with weights_only=False
    meta = read_meta(ckpt) if (ckpt / META).is_file() else {}
    layout = meta.get("layout", {"tp": 1, "pp": 1})
    if layout["tp"] > 1 or layout["pp"] > 1:
        if meta["zero_stage"] == 3:
            raise CheckpointError(
                f"{ckpt}: consolidating a ZeRO-3 checkpoint written with tp={layout['tp']} is not "
                "implemented; evaluate or export it from a ZeRO 0-2 run"
            )
        model_cfg = meta["config"]["model"]
        shards = []
        for r in range(layout["tp"]):
            if layout["pp"] > 1:
                shards.append(_pipeline_module_state(ckpt, r, model_cfg["num_layers"]))
            else:
                shards.append(load_weights_only(ckpt / f"mp_rank_{r:02d}_model_states.pt")["module"])
        state = unshard_state_dicts(shards, model_cfg["mlp"] == "swiglu")
        if model_cfg["tie_embeddings"]:
            state.pop("head.weight", None)
        return {k: v.float() for k, v in state.items()}
    zero_files = list(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO-0 in fp32: the module file holds the full-precision weights
        state = load_weights_only(ckpt / "mp_rank_00_model_states.pt")["module"]
    return {k: v.float() for k, v in state.items()}


def load_checkpoint_model(ckpt: Path, overrides: list[str] = (), device: str | torch.device = "cpu"):
    """(model in eval mode, resolved config, checkpoint meta) for a checkpoint directory."""
    from model import build_model

    meta = read_meta(ckpt)
    data = meta["config"]
    for assignment in overrides:
        data = apply_override(data, assignment)
    cfg = config_from_saved(data, log=lambda msg: print(msg, file=sys.stderr))
    model, _ = build_model(cfg.model, "auto", device)
    state = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.weight"} if cfg.model.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model.eval(), cfg, meta
