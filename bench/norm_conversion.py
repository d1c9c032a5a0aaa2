#!/usr/bin/env python
"""Step time of a Pre-LN GPT with LayerNorm against the same model converted to Pre-RMSNorm and Pre-CRMSNorm
(pretrain/convert_norm.py), side by side in one run. Prints one JSON object on stdout.

The three models compute the same function (their logits are compared and reported): a LayerNorm model with
random weights, and its conversions (stream writers centred, norms keeping gain and shift). Measured per
model: the training step (forward, backward, AdamW step) and the forward alone, in rounds that visit the
models in turn (so a machine that gets busier or cooler mid-run affects all three alike), median over the
rounds; and the norm op alone (forward + backward over a [tokens, hidden] activation) for each kind on the
selected kernel backend. CRMSNorm has no kernel of its own: it is RMSNorm on the decompressed vector (one
extra concatenation), so it is expected no faster than RMSNorm here (the paper's d-1 saving is in the
residual width, which our model keeps at d).

    python bench/norm_conversion.py                          # CPU-sized defaults (a minute or two on 2 cores)
    python bench/norm_conversion.py --hidden 2048 --layers 16 --seq 2048 --batch 8 --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

from kernels import resolve_backend
from model import build_model
from pretrain.config import load_config, resolve
from pretrain.convert_norm import convert_state_dict, converted_model_section

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_config(args):
    sets = [
        "model.placement=pre",
        "model.norm=layernorm",
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}",
        f"model.seq_len={args.seq}",
        f"model.vocab_size={args.vocab}",
        f"model.tie_embeddings={str(args.tied).lower()}",
    ]
    return resolve(load_config(ROOT / "configs" / "tiny.yaml", sets)).model


def build(m, device, backend):
    """The LayerNorm model and its RMSNorm and CRMSNorm conversions (the same function)."""
    torch.manual_seed(0)
    source, _ = build_model(m, backend, device)
    with torch.no_grad():
        for p in source.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))  # gains and shifts away from their init
    models = {"layernorm": source}
    for to in ("rmsnorm", "crmsnorm"):
        model, _ = build_model(converted_model_section(m, to), backend, device)
        model.load_state_dict(convert_state_dict(source.state_dict(), m), strict=True)
        models[to] = model
    return models


def time_it(fn, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def model_bench(models: dict, args, device, dtype) -> dict:
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(name):
        def run():
            with autocast:
                loss = models[name](inputs, labels)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

        return run

    def forward(name):
        @torch.no_grad()
        def run():
            with autocast:
                models[name](inputs, labels)

        return run

    times = {k: {"step_ms": [], "forward_ms": []} for k in models}
    for _ in range(args.rounds):
        for name in models:
            times[name]["step_ms"].append(time_it(step(name), device, 1, args.reps))
            times[name]["forward_ms"].append(time_it(forward(name), device, 1, args.reps))
    out = {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}
    for name in ("rmsnorm", "crmsnorm"):
        for metric in ("step_ms", "forward_ms"):
            out[name][f"{metric.removesuffix('_ms')}_speedup_vs_layernorm"] = (
                out["layernorm"][metric] / out[name][metric]
            )
    return out


def op_bench(ops, args, device, dtype) -> dict:
    rows, d = args.batch * args.seq, args.hidden
    x = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True)
    x0 = x.detach() - x.detach().mean(-1, keepdim=True)
    xc = x0.clone().requires_grad_(True)
    w = torch.ones(d, device=device, requires_grad=True)
    b = torch.zeros(d, device=device, requires_grad=True)
    dy = torch.randn(rows, d, device=device, dtype=dtype)
    calls = {
        "layernorm": lambda: ops.layer_norm(x, w, b, 1e-5),
        "rmsnorm": lambda: ops.rms_norm(xc, w, 1e-5),
        "crmsnorm": lambda: ops.crms_norm(xc, w, 1e-5),
    }
    times = {k: [] for k in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times[name].append(time_it(lambda c=call: c().backward(dy), device, 2, args.reps * 5))
    return {k: {"fwd_bwd_ms": statistics.median(v)} for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tied", action="store_true", help="tie the source's embeddings (its conversion is untied)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--backend", default="auto", help="kernels.backend: auto | triton | apex | torch")
    p.add_argument("--rounds", type=int, default=7, help="rounds over the three models; medians are reported")
    p.add_argument("--reps", type=int, default=3, help="steps timed per model per round")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    m = model_config(args)
    models = build(m, device, args.backend)
    tokens = torch.randint(0, args.vocab, (2, args.seq), device=device)
    with torch.no_grad():
        ref = models["layernorm"].eval()(tokens)
        diffs = {k: float((models[k].eval()(tokens) - ref).abs().max()) for k in ("rmsnorm", "crmsnorm")}
    for model in models.values():
        model.train()
    ops, why = resolve_backend(args.backend, device, hidden_size=args.hidden)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "backend": why,
        "dtype": args.dtype,
        "model": dataclasses.asdict(m) | {"parameters": models["layernorm"].num_params()},
        "batch": args.batch,
        "rounds": args.rounds,
        "reps": args.reps,
        "max_abs_logit_diff_vs_layernorm": diffs,
        "train": model_bench(models, args, device, dtype),
        "norm_op": op_bench(ops, args, device, dtype),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
