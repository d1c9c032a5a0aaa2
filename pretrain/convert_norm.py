"""python -m pretrain.convert_norm --checkpoint RUN_OR_CKPT --to rmsnorm|crmsnorm --out DIR [--force]

Turns a trained Pre-LN GPT with LayerNorm into the equivalent Pre-RMSNorm or Pre-CRMSNorm GPT (Jiang et al.
2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers"): the same
function, computed without LayerNorm's mean.

Why it is exact. In a Pre-LN model every read of the residual stream goes through a LayerNorm, and LayerNorm
does not see the stream's mean: LN(x) = LN(x - mean(x)). Centring every weight that WRITES to the stream --
each row of the token embedding, and the output dimension of every attention-output and MLP-output projection
(weight and bias) -- makes the stream x' = x - mean(x), zero-mean at every layer, while every sublayer still
sees exactly the same normalised input. On a zero-mean vector LayerNorm's variance is RMSNorm's mean square,
so LN(x) = RMSNorm(x') * g + b with the same gain g, shift b and eps; CRMSNorm (kernels/torch_ops.py) equals
RMSNorm on it. The norms keep their gains and shifts (model.norm_bias: true; an RMSNorm with LayerNorm's
shift), the readers (QKV, MLP input, output layer) are unchanged. With tied embeddings the output layer keeps
the original (uncentred) embedding and the converted model is untied: the centred table cannot serve as the
output layer (E' z != E z unless mean(z) = 0).

What it refuses (the identity does not cover it): a model that is not LayerNorm; a placement where a norm
does not read the stream (post, deepnorm and mix's Post-LN blocks write it; peri and reordered normalise
sublayer outputs, which are not zero-mean); QK-norm (queries and keys are not zero-mean); a norm after the
embedding (the stream starts at a LayerNorm output, which no weight change centres); dropout (the branches'
dropout breaks the zero mean in training). Zero-centred gains, LayerNorm Scaling (lns, depth_scale), biases
in the linear layers, GQA, SwiGLU/GELU and any tensor/pipeline layout of the source are covered.

The output DIR is an ordinary run directory: config.yaml, checkpoints/step_N (a DeepSpeed checkpoint written
by one process, tp 1 pp 1, at the source's step, data position and LR-schedule position), conversion.json.
`python -m pretrain.eval --run DIR` evaluates it, `python -m pretrain.train --config DIR/config.yaml --resume
auto` continues training it (on any layout: another one is resharded), `python -m pretrain.export` exports it.
Adam's moments are NOT carried over (they are moments of the LayerNorm model's gradients, which differ from
the converted model's by the stream-mean direction): the optimizer restarts from zero moments at step N.
Before anything is written, the converted model's logits are compared with the source's in fp32 on validation
text; a difference above --tolerance is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from kernels.errors import PretrainError

TARGETS = ("rmsnorm", "crmsnorm")
STREAM_READERS = ("pre", "lns")  # placements whose every norm reads the residual stream, and only norms do
_WHY_NOT = {
    "post": "its norms sit after the residual add and write the stream",
    "deepnorm": "its norms sit after the residual add and write the stream",
    "mix": "its first blocks are Post-LN, whose norms write the stream",
    "peri": "its output norms normalise the sublayer outputs, which are not zero-mean",
    "reordered": "its norms normalise the sublayer outputs, which are not zero-mean",
}


class NormConversionError(PretrainError):
    """The model cannot be converted exactly, or the conversion did not reproduce its logits."""

    exit_code = 2


# ------------------------------------------------------------------------------------ what is covered


def blockers(m) -> list[str]:
    """Why the resolved ModelConfig `m` cannot be converted exactly (empty: it can)."""
    out = []
    if m.norm != "layernorm":
        out.append(f"model.norm='{m.norm}': only a LayerNorm model is converted")
    if m.placement not in STREAM_READERS:
        why = _WHY_NOT.get(m.placement, "it is not a Pre-LN placement")
        out.append(
            f"model.placement='{m.placement}': the identity needs every norm to read the residual stream "
            f"(placements {', '.join(STREAM_READERS)}); {why}"
        )
    if m.qk_norm:
        out.append("model.qk_norm=true: the QK-norms normalise queries and keys, which are not zero-mean")
    if m.embedding_norm:
        out.append(
            "model.embedding_norm=true: the stream starts at a norm's output (g * n + b), which no change of "
            "weights makes zero-mean"
        )
    if m.dropout > 0:
        out.append(
            f"model.dropout={m.dropout}: dropout on the branches breaks the stream's zero mean in training "
            "(the identity would hold at evaluation only)"
        )
    return out


def converted_model_section(m, to: str):
    """The resolved ModelConfig of the converted model."""
    if to not in TARGETS:
        raise NormConversionError(f"--to {to}: allowed {', '.join(TARGETS)}")
    problems = blockers(m)
    if problems:
        raise NormConversionError(
            "this model is not converted exactly by recentring the residual stream: " + "; ".join(problems)
        )
    has_bias = m.norm == "layernorm" if m.norm_bias is None else m.norm_bias
    return dataclasses.replace(m, norm=to, norm_bias=has_bias, tie_embeddings=False)


# ------------------------------------------------------------------------------------------ the weights


def _centred(w: torch.Tensor, dim: int) -> torch.Tensor:
    """w minus its mean over `dim`, computed in float64."""
    w64 = w.double()
    return (w64 - w64.mean(dim=dim, keepdim=True)).to(w.dtype)


def convert_state_dict(state: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    """The plain model's weights (resolved ModelConfig `m`, a convertible one) -> the converted model's: every
    writer to the residual stream centred over the hidden dimension, the output layer untied."""
    out = dict(state)
    out["head.weight"] = state["head.weight"] if not m.tie_embeddings else state["embed.weight"].clone()
    out["embed.weight"] = _centred(state["embed.weight"], dim=1)  # each token's vector
    for i in range(m.num_layers):
        for writer in (f"blocks.{i}.attn.fn.proj", f"blocks.{i}.mlp.fn.fc2"):
            out[f"{writer}.weight"] = _centred(state[f"{writer}.weight"], dim=0)  # (hidden, in): the output dim
            if f"{writer}.bias" in state:
                out[f"{writer}.bias"] = _centred(state[f"{writer}.bias"], dim=0)
    return out


# ---------------------------------------------------------------------------------------------- checks


def probe_tokens(cfg, sequences: int = 4) -> tuple[torch.Tensor, str]:
    """A few validation sequences (random tokens when the data is not at hand), for the logit comparison."""
    from pretrain.config import parse_blend
    from pretrain.data import DataError, TokenStream

    try:
        stream = TokenStream([p for _, p in parse_blend("data.valid", cfg.data.valid)], cfg.model.seq_len)
        return stream.batch(list(range(sequences))).tokens, f"{sequences} x {cfg.model.seq_len} validation tokens"
    except (DataError, OSError, ValueError, IndexError):
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (sequences, cfg.model.seq_len), generator=g)
        return tokens, f"{sequences} x {cfg.model.seq_len} random tokens (validation data not found)"


@torch.no_grad()
def max_logit_difference(source, converted, tokens: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of two models in fp32 on `tokens`."""
    a, b = source.float()(tokens), converted.float()(tokens)
    return float((a - b).abs().max()), float(a.abs().max())


# -------------------------------------------------------------------------------------------- writing


def _zero_adam_state(engine) -> None:
    """Adam's state as a fresh optimizer has it (step 0, zero moments), materialised so that the checkpoint
    holds it like any other (a resume on another layout converts it to DeepSpeed's universal format)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            inner.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def write_run(out: Path, cfg, model, source_meta: dict, tokenizer_file: Path, extra_meta: dict, log=print) -> Path:
    """A run directory holding one checkpoint of `model` at the source's step, written by a one-process
    DeepSpeed engine exactly as training writes them (pretrain/loop.py TrainLoop.save)."""
    from pretrain.checkpoint import Checkpointer
    from pretrain.checkpoint.universal import universal_checkpoint_info
    from pretrain.config import check_world
    from pretrain.distributed import init_distributed
    from pretrain.ds_compat import set_lr_schedule_step
    from pretrain.engine import build_engine

    created = not torch.distributed.is_initialized()
    dist = init_distributed()
    m = cfg.model
    # saved in the checkpoint, as training does, so a resume on another layout can reshard it
    model.universal_checkpoint_info = universal_checkpoint_info(model, m.num_layers, m.mlp == "swiglu")
    try:
        engine, _ = build_engine(model.to(dist.device), cfg, check_world(cfg, 1))
        _zero_adam_state(engine)
        step = int(source_meta["step"])
        set_lr_schedule_step(engine, step)  # the LR schedule goes on where the source was
        keep = ("consumed_samples", "tokens", "bad_step_guard", "spike_detector", "tokenizer_sha256")
        meta = {k: source_meta[k] for k in keep if k in source_meta}
        meta.update(
            step=step,
            world_size=1,
            layout={"tp": 1, "pp": 1, "dp": 1},
            zero_stage=cfg.zero.stage,
            config=cfg.to_dict(),
            time=time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra_meta,
        )
        checkpointer = Checkpointer(out / "checkpoints", 0, 0, cfg.checkpoint.verify, log)
        ckpt = checkpointer.save(engine, step, meta, extra_files={"tokenizer.model": tokenizer_file})
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    (out / "config.yaml").write_text(cfg.to_yaml())
    return ckpt


def convert_checkpoint(source: Path, to: str, out: Path, tolerance: float = 1e-4, force: bool = False) -> dict:
    from model import build_model
    from pretrain.checkpoint.consolidate import consolidated_state_dict, load_checkpoint_model
    from pretrain.config import ParallelConfig, resolve
    from pretrain.export import find_tokenizer, resolve_checkpoint

    ckpt = resolve_checkpoint(source)
    src_model, cfg, meta = load_checkpoint_model(ckpt)
    m = converted_model_section(cfg.model, to)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise NormConversionError(f"--out {out}: exists and is not empty; choose another directory or --force")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    new_cfg = dataclasses.replace(
        cfg,
        model=m,
        run=dataclasses.replace(cfg.run, dir=str(out)),
        parallel=ParallelConfig(pp_partition=cfg.parallel.pp_partition),  # written by one process: tp 1, pp 1
        checkpoint=dataclasses.replace(cfg.checkpoint, resume="never", init_from=""),
    )
    new_cfg = resolve(new_cfg)
    model, _ = build_model(new_cfg.model, "torch", "cpu")
    model.load_state_dict(convert_state_dict(consolidated_state_dict(ckpt), cfg.model), strict=True)
    tokens, what = probe_tokens(cfg)
    diff, scale = max_logit_difference(src_model.eval(), model.eval(), tokens)
    summary = {
        "source": str(ckpt),
        "step": meta["step"],
        "from": f"{cfg.model.placement} layernorm",
        "to": to,
        "untied": bool(cfg.model.tie_embeddings),
        "probe": what,
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "tolerance": tolerance,
    }
    if not diff <= tolerance:
        raise NormConversionError(
            f"the converted model's logits differ from the source's by {diff:.3e} (max |logit| {scale:.3g}) on "
            f"{what}, more than --tolerance {tolerance:g}; nothing was written"
        )
    tokenizer = find_tokenizer(cfg, ckpt, None)
    summary["checkpoint"] = str(write_run(out, new_cfg, model.train(), meta, tokenizer, {"converted_from": summary}))
    (out / "conversion.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.convert_norm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its newest)")
    p.add_argument("--to", required=True, choices=TARGETS, help="the norm of the converted model")
    p.add_argument("--out", required=True, help="run directory to write (empty or absent unless --force)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted (fp32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    out = Path(args.out)
    s = convert_checkpoint(Path(args.checkpoint), args.to, out, args.tolerance, args.force)
    print(
        f"[convert_norm] {s['source']} (step {s['step']}, {s['from']}) -> {args.to}: max |logit diff| "
        f"{s['max_abs_logit_diff']:.2e} (max |logit| {s['max_abs_logit']:.3g}) on {s['probe']}"
        + ("; the output layer is untied (it keeps the uncentred embedding)" if s["untied"] else "")
    )
    print(f"[convert_norm] wrote {s['checkpoint']}; Adam's moments restart from zero at step {s['step']}")
    print(f"[convert_norm] evaluate: python -m pretrain.eval --run {out}")
    print(f"[convert_norm] continue: python -m pretrain.train --config {out / 'config.yaml'} --resume auto")
    return 0


if __name__ == "__main__":
    from pretrain.cli import run

    raise SystemExit(run(main))
