"""python -m pretrain.eval --run runs/NAME [--checkpoint PATH] [--split test|valid] [--set KEY=VALUE]

Evaluates a checkpoint on a held-out split (the test set by default): loss per token, perplexity
and bits per byte over every token of the split, printed and written as JSON to
<run>/eval/<split>_<checkpoint>.json. The model is rebuilt from the config saved in the checkpoint
and its weights are consolidated from DeepSpeed's files (any ZeRO stage), so evaluation needs
neither the training world size nor DeepSpeed's engine. Several processes (launch/local.sh) split
the windows between them.

The pieces: pretrain/checkpoint/consolidate.py (weights), pretrain/heldout.py (the metric).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from pretrain.checkpoint import CheckpointError, find_resumable, verify
from pretrain.checkpoint.consolidate import load_checkpoint_model
from pretrain.cli import run
from pretrain.config import parse_blend
from pretrain.data import Tokenizer, TokenStream
from pretrain.distributed import DistInfo
from pretrain.fsutil import atomic_write_text
from pretrain.heldout import evaluate_stream


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", help="run directory; evaluates its newest complete checkpoint")
    p.add_argument("--checkpoint", help="a checkpoint directory (runs/NAME/checkpoints/step_000123)")
    p.add_argument("--split", choices=["test", "valid"], default=None, help="default: eval.split of the config")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the checkpoint's config, e.g. eval.max_tokens=100000",
    )
    p.add_argument("--out", help="JSON file to write (default <run>/eval/<split>_<checkpoint>.json)")
    args = p.parse_args(argv)
    if not args.run and not args.checkpoint:
        p.error("give --run or --checkpoint")
    return args


def main(argv: list[str] | None = None) -> int:
    result, out = evaluate_checkpoint(parse_args(argv))
    if result is not None:
        print(json.dumps(result, indent=2))
        print(f"[eval] wrote {out}")
    return 0


def checkpoint_to_evaluate(args) -> tuple[Path, Path]:
    """(checkpoint, run directory) from --checkpoint or --run."""
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_dir():
            raise CheckpointError(f"--checkpoint {ckpt}: no such directory")
        verify(ckpt, "size")
        return ckpt, ckpt.parent.parent
    run_dir = Path(args.run)
    ckpt = find_resumable(run_dir / "checkpoints", "size", print)
    if ckpt is None:
        raise CheckpointError(f"--run {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    return ckpt, run_dir


def evaluate_checkpoint(args) -> tuple[dict | None, Path | None]:
    ckpt, run_dir = checkpoint_to_evaluate(args)
    dist = _init_eval_distributed()
    model, cfg, meta = load_checkpoint_model(ckpt, args.set, dist.device)
    split = args.split or cfg.eval.split
    prefixes = [p for _, p in parse_blend(f"data.{split}", getattr(cfg.data, split))]
    tokenizer = Tokenizer(cfg.data.tokenizer)
    stream = TokenStream(prefixes, cfg.model.seq_len, max_tokens=cfg.eval.max_tokens)
    t0 = time.perf_counter()
    result = evaluate_stream(
        lambda tokens, labels, mask: model(tokens, labels, mask),
        stream,
        tokenizer.token_bytes(),
        cfg.eval.batch_size,
        dist.rank,
        dist.world_size,
        dist.device,
        tokenizer.pad,
    )
    result.update(
        {
            "split": split,
            "data": prefixes,
            "checkpoint": str(ckpt),
            "step": meta["step"],
            "trained_tokens": meta["tokens"],
            "placement": cfg.model.placement,
            "parameters": model.num_params(),
            "non_embedding_parameters": model.num_params(embedding=False),
            "tokenizer_sha256": tokenizer.sha256,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    if dist.rank != 0:
        return None, None
    out = Path(args.out) if args.out else run_dir / "eval" / f"{split}_{ckpt.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    return result, out


def _init_eval_distributed() -> DistInfo:
    """Plain torch.distributed when launched with several processes; nothing for one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return DistInfo(rank, world, local_rank, device, backend)


if __name__ == "__main__":
    raise SystemExit(run(main))
