"""Evaluation of one sweep cell at its final checkpoint, written to <cell>/eval/scaling_eval.json:
held-out loss, perplexity and bits per byte on the test split (and the validation split).

EVAL_VERSION changes whenever what is measured changes; the sweep re-evaluates cells whose file
carries another version.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pretrain.checkpoint import CheckpointError, find_resumable
from pretrain.config import parse_blend
from pretrain.data import TokenStream, Tokenizer
from pretrain.fsutil import atomic_write_text

EVAL_VERSION = 1
EVAL_FILE = "scaling_eval.json"


def heldout(model, cfg, split: str, tokenizer: Tokenizer, device: torch.device, max_tokens: int = 0) -> dict:
    from pretrain.evaluate import evaluate_stream

    prefixes = [p for _, p in parse_blend(f"data.{split}", getattr(cfg.data, split))]
    stream = TokenStream(prefixes, cfg.model.seq_len, max_tokens=max_tokens)
    return evaluate_stream(lambda x, y, m: model(x, y, m), stream, tokenizer.token_bytes(), cfg.eval.batch_size,
                           0, 1, device, tokenizer.pad)


@torch.no_grad()
def evaluate_cell(cell_dir: Path, log=print) -> dict:
    from pretrain.eval import load_checkpoint_model

    cell_dir = Path(cell_dir)
    ckpt = find_resumable(cell_dir / "checkpoints", "size", log)
    if ckpt is None:
        raise CheckpointError(f"{cell_dir}: no complete checkpoint to evaluate")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t0 = time.perf_counter()
    model, cfg, meta = load_checkpoint_model(ckpt, device=device)
    tokenizer = Tokenizer(cfg.data.tokenizer)
    result = {"version": EVAL_VERSION, "cell": cell_dir.name, "checkpoint": str(ckpt), "step": meta["step"],
              "trained_tokens": meta["tokens"], "placement": cfg.model.placement,
              "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
              "parameters": model.num_params(), "non_embedding_parameters": model.num_params(embedding=False),
              "flops_per_token": model.flops_per_token()}
    for split in ("test", "valid"):
        result[split] = heldout(model, cfg, split, tokenizer, device, cfg.eval.max_tokens)
        log(f"[evaluate] {cell_dir.name} {split}: loss {result[split]['loss']:.4f} "
            f"bpb {result[split]['bits_per_byte']:.4f}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = cell_dir / "eval" / EVAL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    return result
