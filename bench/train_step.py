"""One training step (forward, backward, AdamW), measured: tokens/s, step time, peak memory, MFU.

    python bench/train_step.py --config configs/quickstart.yaml --compare hf          # CPU: ours vs HF Llama
    python bench/train_step.py --config configs/gpt-125m.yaml --placements pre peri lns --dtype bf16   # GPU
    python bench/train_step.py ... --compile --profile

Side by side in one process: each measured step runs every model once, in turn (ours, then the
reference), so machine noise hits both alike; the figures are medians over the measured steps.
The reference is Hugging Face's LlamaForCausalLM at the same dimensions (the `pre` placement with
RMSNorm, SwiGLU and RoPE is exactly Llama: it is built from our weights by pretrain.export), fed the
same tokens, trained by the same torch.optim.AdamW. megatron-core's GPTModel (local layer spec,
one rank) is added with --compare mcore; it needs a GPU: its RoPE table and its attention's global
memory buffer are allocated on torch.cuda.current_device() whatever the model's device, so on CPU the
JSON records that error under "skipped".

MFU = tokens/s x (6N + 12 L H Q T) / peak, with N every matmul parameter (the output layer included,
the embedding lookup not), L layers, H heads, Q head size, T sequence length (PaLM, appendix B).
Peak: the device's dense bf16 figure (H100/H200 SXM 989 TFLOP/s, A100 312), or --peak-tflops; none
is stated for a CPU, so MFU is null there unless one is given. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.config import load_config, resolve

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # TFLOP/s, dense (no sparsity)
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)
        return {"device": name, "peak_flops": peak, "peak_source": "dense bf16 table in bench/train_step.py"}
    return {
        "device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "peak_flops": None,
        "peak_source": "no stated peak for a CPU",
    }


def flops_per_token(m) -> float:
    """6N + 12*L*H*Q*T, written out here rather than taken from the model, so the benchmark and the
    model's own figure can be compared."""
    d, L, ffn, V = m.hidden_size, m.num_layers, m.ffn_hidden_size, m.vocab_size
    kv = m.num_kv_heads or m.num_heads
    q = d // m.num_heads
    attn = d * (m.num_heads * q) + 2 * d * (kv * q) + (m.num_heads * q) * d
    mlp = (3 if m.mlp == "swiglu" else 2) * d * ffn
    n = L * (attn + mlp) + V * d
    return 6 * n + 12 * L * m.num_heads * q * m.seq_len


class Contender:
    """A model, its optimizer and a step function returning the loss."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn, lr: float, compile_: bool):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
        self.fn = torch.compile(loss_fn) if compile_ else loss_fn
        self.times: list[float] = []
        self.first_step_s: float | None = None
        self.losses: list[float] = []

    def step(self, tokens, labels, sync) -> float:
        sync()
        t = time.perf_counter()
        loss = self.fn(self.model, tokens, labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        self.losses.append(loss.item())
        return time.perf_counter() - t


def ours_contender(m, device, dtype, backend, compile_, lr):
    from model.gpt import build_model

    torch.manual_seed(0)
    model, reason = build_model(m, backend, device)
    model = model.to(dtype)
    return Contender("ours", model, lambda mod, x, y: mod(x, y), lr, compile_), model, reason


def hf_contender(our_model, m, dtype, compile_, lr):
    from model.hf_convert import choose_format
    from pretrain.export import build_hf_model

    fmt = choose_format(m, "llama")  # raises ConversionError unless the placement is Llama's
    hf = build_hf_model(copy.deepcopy(our_model).float(), m, fmt, IDS).to(next(our_model.parameters()).device)
    hf = hf.to(dtype).train()
    hf.config.use_cache = False
    hf.config._attn_implementation = "sdpa"

    def loss(mod, x, y):
        logits = mod(input_ids=x, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    return Contender("hf_llama", hf, loss, lr, compile_)


def mcore_contender(m, device, dtype, compile_, lr):
    """megatron-core's GPTModel with the local (no Transformer Engine) layer spec, on one rank."""
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0) if device.type == "cuda" else None
    cfg = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.num_kv_heads or m.num_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=m.norm_eps,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_cpu_initialization=device.type != "cuda",
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    model = GPTModel(
        cfg,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=m.vocab_size,
        max_sequence_length=m.seq_len,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta),
        share_embeddings_and_output_weights=m.tie_embeddings,
    ).to(device)
    pos = torch.arange(m.seq_len, device=device)

    def loss(mod, x, y):
        per_token = mod(x, pos.expand_as(x), None, labels=y)  # (B, T) fp32 losses; causal mask built inside
        return per_token.float().mean()

    return Contender("megatron_core", model, loss, lr, compile_)


def profile_top(contender: Contender, tokens, labels, rows: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tokens.is_cuda else [])
    with profile(activities=acts) as prof:
        contender.step(tokens, labels, lambda: torch.cuda.synchronize() if tokens.is_cuda else None)
    key = "self_cuda_time_total" if tokens.is_cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [
        {
            "op": e.key,
            "self_ms": round(getattr(e, key) / 1e3, 2),
            "share": round(getattr(e, key) / total, 3),
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def measure(cfg_path: str, sets: list[str], placement: str, args, device: torch.device) -> dict:
    cfg = load_config(
        cfg_path,
        list(sets)
        + [f"model.placement={placement}"]
        + ([f"model.vocab_size={args.vocab_size}"] if args.vocab_size else []),
    )
    m = resolve(cfg).model
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batch = args.micro_batch or cfg.train.micro_batch_size
    ours, our_model, reason = ours_contender(m, device, dtype, args.backend, args.compile, cfg.train.lr)
    contenders = [ours]
    skipped = {}
    for other in args.compare:
        try:
            contenders.append(
                hf_contender(our_model, m, dtype, args.compile, cfg.train.lr)
                if other == "hf"
                else mcore_contender(m, device, dtype, args.compile, cfg.train.lr)
            )
        except Exception as err:  # recorded in the JSON: why a reference could not run here
            skipped[other] = f"{type(err).__name__}: {err}"[:400]
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, m.vocab_size, (batch, m.seq_len + 1), generator=gen) for _ in range(4)]
    peak_mem = {}
    for i in range(args.warmup + args.steps):
        data = batches[i % len(batches)].to(device)
        tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        for c in list(contenders):
            if device.type == "cuda" and i == args.warmup:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                dt = c.step(tokens, labels, sync)
            except Exception as err:
                if c is ours:
                    raise
                skipped[c.name] = f"{type(err).__name__} in its training step: {err}"[:400]
                contenders.remove(c)
                continue
            if i == 0:
                c.first_step_s = dt
            if i >= args.warmup:
                c.times.append(dt)
            if device.type == "cuda" and i == args.warmup + args.steps - 1:
                peak_mem[c.name] = torch.cuda.max_memory_allocated(device)
    fpt = flops_per_token(m)
    info = device_info(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else info["peak_flops"]
    tokens_per_step = batch * m.seq_len
    out = {
        "placement": placement,
        "dims": {
            "hidden": m.hidden_size,
            "layers": m.num_layers,
            "heads": m.num_heads,
            "ffn": m.ffn_hidden_size,
            "vocab": m.vocab_size,
            "seq": m.seq_len,
            "micro_batch": batch,
        },
        "norm_backend": reason,
        "flops_per_token": fpt,
        "model_flops_per_token": our_model.flops_per_token(),
        "contenders": {},
        "skipped": skipped,
    }
    for c in contenders:
        step = statistics.median(c.times)
        tps = tokens_per_step / step
        row = {
            "step_s": round(step, 5),
            "tokens_per_s": round(tps, 1),
            "achieved_tflops": round(tps * fpt / 1e12, 4),
            "mfu": round(tps * fpt / peak, 4) if peak else None,
            "peak_memory_bytes": peak_mem.get(c.name),
            "first_step_s": round(c.first_step_s, 3),
            "params": sum(p.numel() for p in c.model.parameters()),
            "loss_first_last": [round(c.losses[0], 4), round(c.losses[-1], 4)],
        }
        if args.compile:
            row["compile_s_approx"] = round(c.first_step_s - step, 3)
        out["contenders"][c.name] = row
    for c in contenders[1:]:
        out[f"ours_over_{c.name}"] = round(out["contenders"][c.name]["step_s"] / out["contenders"]["ours"]["step_s"], 3)
    if args.profile:
        data = batches[0].to(device)
        out["profile"] = {
            c.name: profile_top(c, data[:, :-1].contiguous(), data[:, 1:].contiguous(), args.profile_rows)
            for c in contenders
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--placements", nargs="+", default=["pre"])
    p.add_argument(
        "--compare",
        nargs="*",
        default=["hf"],
        choices=["hf", "mcore"],
        help="references run side by side (only for placements they can express: hf needs pre)",
    )
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--backend", default="auto", help="norm kernels: auto, triton, apex, torch")
    p.add_argument("--micro-batch", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="torch.compile every contender's loss function")
    p.add_argument("--profile", action="store_true", help="add the top ops of one profiled step")
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's peak (TFLOP/s)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {
        "bench": "train_step",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv),
        **device_info(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "compile": args.compile,
        "optimizer": "torch.optim.AdamW(foreach) fp32 states",
        "runs": [],
    }
    for placement in args.placements:
        compare = [c for c in args.compare if c != "hf" or placement == "pre"]
        result["runs"].append(
            measure(args.config, args.set, placement, argparse.Namespace(**{**vars(args), "compare": compare}), device)
        )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
