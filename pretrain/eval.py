"""python -m pretrain.eval --run runs/NAME [--checkpoint PATH] [--split test|valid] [--set KEY=VALUE]

Evaluates a checkpoint on a held-out split (the test set by default): loss per token, perplexity
and bits per byte over every token of the split, printed and written as JSON to
<run>/eval/<split>_<checkpoint>.json. The model is rebuilt from the config saved in the checkpoint
and its weights are consolidated from DeepSpeed's files (any ZeRO stage), so evaluation needs
neither the training world size nor DeepSpeed's engine. Several processes (launch/local.sh) split
the windows between them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from pretrain.checkpoint import META, CheckpointError, find_resumable, verify
from pretrain.config import ConfigError, apply_override, config_from_dict, parse_blend
from pretrain.data import DataError, TokenStream, Tokenizer
from pretrain.fsutil import atomic_write_text


def _pipeline_module_state(ckpt: Path, tp_rank: int, num_layers: int) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's weights from DeepSpeed's per-layer pipeline files, renamed to the
    plain model's keys (layer 0 embedding, 1..L blocks, L+1 final norm, L+2 untied head)."""
    state = {}
    for f in sorted(ckpt.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
        idx = int(f.name.split("-")[0].split("_")[1])
        part = torch.load(f, map_location="cpu", weights_only=False)
        for key, value in part.items():
            if 1 <= idx <= num_layers:
                key = f"blocks.{idx - 1}." + key.removeprefix("block.")
            state[key] = value
    return state


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The plain model's fp32 weights from a DeepSpeed checkpoint directory, whatever the ZeRO stage
    (tensor/pipeline-parallel checkpoints: ZeRO 0-2, from the module weights each rank saved)."""
    from model.parallelize import unshard_state_dicts
    from pretrain.distributed import prefer_cpu_accelerator_if_no_gpu

    prefer_cpu_accelerator_if_no_gpu()
    meta = json.loads((ckpt / META).read_text()) if (ckpt / META).is_file() else {}
    layout = meta.get("layout", {"tp": 1, "pp": 1})
    if layout["tp"] > 1 or layout["pp"] > 1:
        if meta["zero_stage"] == 3:
            raise CheckpointError(f"{ckpt}: consolidating a ZeRO-3 checkpoint written with tp={layout['tp']} is not "
                                  "implemented; evaluate or export it from a ZeRO 0-2 run")
        model_cfg = meta["config"]["model"]
        shards = []
        for r in range(layout["tp"]):
            if layout["pp"] > 1:
                shards.append(_pipeline_module_state(ckpt, r, model_cfg["num_layers"]))
            else:
                shards.append(torch.load(ckpt / f"mp_rank_{r:02d}_model_states.pt", map_location="cpu",
                                         weights_only=False)["module"])
        state = unshard_state_dicts(shards, model_cfg["mlp"] == "swiglu")
        if model_cfg["tie_embeddings"]:
            state.pop("head.weight", None)
        return {k: v.float() for k, v in state.items()}
    zero_files = list(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO-0 in fp32: the module file holds the full-precision weights
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def load_checkpoint_model(ckpt: Path, overrides: list[str] = (), device: str | torch.device = "cpu"):
    """(model in eval mode, resolved config, checkpoint meta) for a checkpoint directory."""
    from model import build_model

    meta = json.loads((ckpt / META).read_text())
    data = meta["config"]
    for assignment in overrides:
        data = apply_override(data, assignment)
    cfg = config_from_dict(data)
    model, _ = build_model(cfg.model, "auto", device)
    state = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.weight"} if cfg.model.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model.eval(), cfg, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run directory; evaluates its newest complete checkpoint")
    p.add_argument("--checkpoint", help="a checkpoint directory (runs/NAME/checkpoints/step_000123)")
    p.add_argument("--split", choices=["test", "valid"], default=None, help="default: eval.split of the config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config, e.g. eval.max_tokens=100000")
    p.add_argument("--out", help="JSON file to write (default <run>/eval/<split>_<checkpoint>.json)")
    args = p.parse_args(argv)
    if not args.run and not args.checkpoint:
        p.error("give --run or --checkpoint")
    try:
        result, out = evaluate_checkpoint(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2))
        print(f"[eval] wrote {out}")
    return 0


def evaluate_checkpoint(args) -> tuple[dict | None, Path | None]:
    from pretrain.evaluate import evaluate_stream

    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_dir():
            raise CheckpointError(f"--checkpoint {ckpt}: no such directory")
        verify(ckpt, "size")
        run_dir = ckpt.parent.parent
    else:
        run_dir = Path(args.run)
        ckpt = find_resumable(run_dir / "checkpoints", "size", print)
        if ckpt is None:
            raise CheckpointError(f"--run {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    dist = _init_eval_distributed()
    model, cfg, meta = load_checkpoint_model(ckpt, args.set, dist.device)
    split = args.split or cfg.eval.split
    prefixes = [p for _, p in parse_blend(f"data.{split}", getattr(cfg.data, split))]
    tokenizer = Tokenizer(cfg.data.tokenizer)
    stream = TokenStream(prefixes, cfg.model.seq_len, max_tokens=cfg.eval.max_tokens)
    t0 = time.perf_counter()

    def loss_fn(tokens, labels, mask):
        return model(tokens, labels, mask)

    result = evaluate_stream(loss_fn, stream, tokenizer.token_bytes(), cfg.eval.batch_size, dist.rank,
                             dist.world_size, dist.device, tokenizer.pad)
    result.update({
        "split": split, "data": prefixes, "checkpoint": str(ckpt), "step": meta["step"],
        "trained_tokens": meta["tokens"], "placement": cfg.model.placement,
        "parameters": model.num_params(), "non_embedding_parameters": model.num_params(embedding=False),
        "tokenizer_sha256": tokenizer.sha256, "seconds": round(time.perf_counter() - t0, 2),
    })
    if dist.rank != 0:
        return None, None
    out = Path(args.out) if args.out else run_dir / "eval" / f"{split}_{ckpt.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    return result, out


def _init_eval_distributed():
    """Plain torch.distributed when launched with several processes; nothing for one."""
    from pretrain.distributed import DistInfo

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", "0")), device,
                    "nccl" if device.type == "cuda" else "gloo")


if __name__ == "__main__":
    sys.exit(main())
