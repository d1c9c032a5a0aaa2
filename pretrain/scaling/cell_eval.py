"""Evaluation of one sweep cell at its final checkpoint, written to <cell>/eval/scaling_eval.json:

  test, valid  held-out loss, perplexity and bits per byte over the whole split (pretrain.heldout)
  last_word    LAMBADA-style last-word accuracy on passages of the test split (pretrain/scaling/lastword.py)
  last_word_valid  the same on passages of the validation split
  depth        per-layer variance, RMS, max |activation|, attention entropy, angular distance between
               consecutive layers, and the loss increase when each block is removed, on a fixed probe
               of validation sequences (pretrain/scaling/depth.py), with the growth of the variance
               over depth (pretrain/scaling/growth.py)
  init         the same model at initialization (rebuilt from the cell's config and seed, as
               pretrain.train builds it): its validation loss (L0, the loss at initialization of the LR
               sensitivity) and its depth profile
  diverged     the run stopped on non-finite losses (<cell>/diverged.json, written by the sweep), or its
               final validation loss is not finite or not below L0; a stopped run has no final figures

`level`: "full" (all of the above) or "light" (held-out losses and the initial loss: what an
LR-search point needs).

EVAL_VERSION changes whenever what is measured changes; the sweep re-evaluates cells whose file
carries another version.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pretrain.checkpoint import CheckpointError, find_resumable
from pretrain.config import parse_blend
from pretrain.data import DataError, Tokenizer, TokenStream
from pretrain.data.tokenizer import tokenizer_file_in
from pretrain.fsutil import atomic_write_text
from pretrain.scaling.cell_files import EVAL_FILE, EVAL_VERSION

LAST_WORD_PASSAGES = 500
LAST_WORD_SEED = 1234
DEPTH_PROBE_SEQUENCES = 32  # the first full windows of the validation split


def _prefixes(cfg, split: str) -> list[str]:
    return [p for _, p in parse_blend(f"data.{split}", getattr(cfg.data, split))]


def heldout(model, cfg, split: str, tokenizer: Tokenizer, device: torch.device, max_tokens: int = 0) -> dict:
    from pretrain.heldout import evaluate_stream

    stream = TokenStream(_prefixes(cfg, split), cfg.model.seq_len, max_tokens=max_tokens)
    return evaluate_stream(
        lambda x, y, m: model(x, y, m),
        stream,
        tokenizer.token_bytes(),
        cfg.eval.batch_size,
        0,
        1,
        device,
        tokenizer.pad,
    )


def last_word(
    model,
    cfg,
    tokenizer: Tokenizer,
    device: torch.device,
    split: str = "test",
    count: int = LAST_WORD_PASSAGES,
    seed: int = LAST_WORD_SEED,
) -> dict:
    from pretrain.data.indexed import open_indexed
    from pretrain.scaling.depth import run_blocks
    from pretrain.scaling.lastword import MAX_NEW_TOKENS, METHOD, PieceBytes, build_passages, score

    t0 = time.perf_counter()
    docs = []
    for prefix in _prefixes(cfg, split):
        ds = open_indexed(prefix)
        docs += [ds[i] for i in range(len(ds))]
    pieces = PieceBytes(tokenizer)
    context_tokens = cfg.model.seq_len - MAX_NEW_TOKENS
    passages, candidates = build_passages(docs, pieces, context_tokens, count, seed)
    if not passages:
        raise DataError(
            f"last-word evaluation: the {split} split {_prefixes(cfg, split)} has no sentence-final word "
            f"with {context_tokens} tokens of context before it"
        )

    def next_token_logits(tokens: torch.Tensor) -> torch.Tensor:
        h, _ = run_blocks(model, tokens)
        return model.head(h[-1])  # only the last position is decoded

    result = score(next_token_logits, passages, pieces, cfg.eval.batch_size, MAX_NEW_TOKENS, device=device)
    result.update(
        {
            "context_tokens": context_tokens,
            "max_new_tokens": MAX_NEW_TOKENS,
            "seed": seed,
            "candidates": candidates,
            "split": split,
            "method": METHOD.format(
                context_tokens=context_tokens,
                max_new_tokens=MAX_NEW_TOKENS,
                count=len(passages),
                seed=seed,
                candidates=candidates,
            ),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    return result


def depth(model, cfg, tokenizer: Tokenizer, device: torch.device, sequences: int = DEPTH_PROBE_SEQUENCES) -> dict:
    from pretrain.scaling.depth import depth_profile

    t0 = time.perf_counter()
    stream = TokenStream(_prefixes(cfg, "valid"), cfg.model.seq_len)
    full = stream.predictions // cfg.model.seq_len  # windows without padding
    n = min(sequences, full)
    if n == 0:
        raise DataError(f"depth diagnostics: the validation split holds fewer than {cfg.model.seq_len + 1} tokens")
    batch = stream.batch(list(range(n)), tokenizer.pad)
    result = depth_profile(model, batch.tokens, batch.labels, cfg.eval.batch_size)
    result["probe"] = {"split": "valid", "sequences": n, "tokens": n * cfg.model.seq_len}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _tokenizer(ckpt: Path, cfg, meta: dict) -> Tokenizer:
    """The tokenizer the checkpoint was trained with (its own copy), checked against the data's."""
    tok = Tokenizer(tokenizer_file_in(ckpt) or cfg.data.tokenizer)
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tok.sha256:
        raise DataError(
            f"{ckpt}: trained with tokenizer sha256 {meta['tokenizer_sha256'][:12]} but {tok.path} is {tok.sha256[:12]}"
        )
    return tok


def initial_model(cfg, device: torch.device):
    """The cell's model at initialization: pretrain.train seeds torch with run.seed right before it
    builds the model, so the same seed and config give the same initial weights."""
    from model import build_model

    torch.manual_seed(cfg.run.seed)
    model, _ = build_model(cfg.model, "torch", device)
    return model.eval()


def _fmt(xs) -> str:
    return " ".join(f"{x:.3g}" for x in xs)


def load_final(ckpt: Path, device: torch.device):
    """(model, config, checkpoint meta) of a complete checkpoint, the model consolidated on `device`."""
    from pretrain.checkpoint.consolidate import load_checkpoint_model

    return load_checkpoint_model(ckpt, device=device)


@torch.no_grad()
def evaluate_cell(cell_dir: Path, log=print, light: bool = False) -> dict:
    from pretrain.scaling.cell_files import diverged as diverged_record
    from pretrain.scaling.growth import growth_summary

    cell_dir = Path(cell_dir)
    stopped = diverged_record(cell_dir)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t0 = time.perf_counter()
    if stopped:  # no final figures: only the initial model matters, and the run may have no checkpoint
        from pretrain.config import load_config, tokenizer_path

        cfg = load_config(cell_dir / "config.yaml")
        tokenizer, model, meta = Tokenizer(tokenizer_path(cfg.data)), None, {"step": stopped["step"]}
        ckpt = None
    else:
        ckpt = find_resumable(cell_dir / "checkpoints", "size", log)
        if ckpt is None:
            raise CheckpointError(f"{cell_dir}: no complete checkpoint to evaluate")
        model, cfg, meta = load_final(ckpt, device)
        tokenizer = _tokenizer(ckpt, cfg, meta)
    init = initial_model(cfg, device)
    result = {
        "version": EVAL_VERSION,
        "level": "light" if light else "full",
        "cell": cell_dir.name,
        "checkpoint": str(ckpt) if ckpt else None,
        "step": meta["step"],
        "trained_tokens": meta.get("tokens"),
        "placement": cfg.model.placement,
        "hidden_size": cfg.model.hidden_size,
        "num_layers": cfg.model.num_layers,
        "vocab_size": cfg.model.vocab_size,
        "parameters": init.num_params(),
        "non_embedding_parameters": init.num_params(embedding=False),
        "flops_per_token": init.flops_per_token(),
        "diverged": False,
    }
    result["init"] = {"valid": heldout(init, cfg, "valid", tokenizer, device, cfg.eval.max_tokens)}
    result["init"]["loss"] = result["init"]["valid"]["loss"]
    log(f"[evaluate] {cell_dir.name} at initialization: valid loss {result['init']['loss']:.4f}")
    if not light:
        result["init"]["depth"] = d = depth(init, cfg, tokenizer, device)
        d["growth"] = growth_summary(d["var"])
        log(f"[evaluate] {cell_dir.name} depth at initialization: var [{_fmt(d['var'])}]")
    del init
    if stopped:
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        result.update(
            diverged=True,
            diverged_reason=stopped["reason"],
            diverged_at_step=stopped["step"],
            trained_tokens=stopped["step"] * tokens_per_step,
        )
        log(f"[evaluate] {cell_dir.name} diverged at step {stopped['step']}: {stopped['reason']}; no final figures")
        return _write(cell_dir, result, t0, log)
    for split in ("test", "valid"):
        result[split] = heldout(model, cfg, split, tokenizer, device, cfg.eval.max_tokens)
        log(
            f"[evaluate] {cell_dir.name} {split}: loss {result[split]['loss']:.4f} "
            f"bpb {result[split]['bits_per_byte']:.4f}"
        )
    final = result["valid"]["loss"]
    result["diverged"] = not math.isfinite(final) or final >= result["init"]["loss"]
    if result["diverged"]:
        result["diverged_reason"] = (
            f"final validation loss {final:.4g} is not below the initial {result['init']['loss']:.4g}"
        )
    if light:
        return _write(cell_dir, result, t0, log)
    # Test (out of domain for the bundled corpus: modern speeches) and validation (held-out documents of
    # the training sources): at small scale the in-domain score is the one that separates models.
    for key, split in (("last_word", "test"), ("last_word_valid", "valid")):
        result[key] = lw = last_word(model, cfg, tokenizer, device, split)
        log(
            f"[evaluate] {cell_dir.name} last word ({split}): {lw['accuracy']:.3f} "
            f"({lw['correct']}/{lw['passages']} passages)"
        )
    result["depth"] = d = depth(model, cfg, tokenizer, device)
    d["growth"] = growth_summary(d["var"])
    log(
        f"[evaluate] {cell_dir.name} depth: var [{_fmt(d['var'])}] | angular [{_fmt(d['angular_distance'])}] | "
        f"loss increase without each block [{_fmt(d['removal']['increase'])}]"
    )
    return _write(cell_dir, result, t0, log)


def _write(cell_dir: Path, result: dict, t0: float, log) -> dict:
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = cell_dir / "eval" / EVAL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    log(f"[evaluate] wrote {out} ({result['seconds']} s)")
    return result
