"""One training step (forward, backward, AdamW), measured side by side: ours against Hugging Face's
Llama, eager and compiled, Peri-LN against Pre-LN. Prints one JSON object.

    python bench/train_step.py --config configs/quickstart.yaml                      # CPU, fp32
    python bench/train_step.py --config configs/quickstart.yaml --timing cpu --threads 1  # a CPU shared with others
    python bench/train_step.py --config configs/gpt-1.3b.yaml --dtype bf16 --sides ours:pre ours:peri   # GPU

Every dimension, the vocabulary included, comes from the config given (`--set` overrides keys); a
vocabulary of 0 (the tokenizer's) is read from the config's tokenizer when it exists, else taken as
`pretrain.data prepare`'s default, and the JSON says which.

Each side (`ours:pre`, `ours:peri`, `hf:pre`, `ours:pre:plain-loss`, `ours:pre:model`, `ours:pre:budget0.5`,
`mcore:pre`) runs in its own process, so its peak memory is its own (CPU: the process's peak resident set
during the measured steps, /proc VmHWM reset after the warm-up steps and glibc's free heap trimmed; GPU:
torch.cuda.max_memory_allocated, reset alike).
The processes take turns step by step (one runs while the others wait), so machine noise hits all sides alike; the
figures are medians over the measured steps (--concurrent-warmup runs the unmeasured warm-up steps, where
compilation happens, of all sides at once: bench/gpu_check.sh uses it to fit its time budget).
Modes (`--modes eager compiled`) run one after the other, each with all sides. Ours compiled is what
`train.compile: true` does with `--compile-scope` (default: the config's `train.compile_scope`):
blocks compiles each block, model the whole model as one graph; a side's `:blocks` / `:model` suffix
overrides it; the norm kernels and the fused loss are custom ops either way. The reference compiled is
torch.compile over its whole forward and loss, as compile scope model is.

The reference is LlamaForCausalLM at the same dimensions, built from our `pre` weights by
pretrain.export (RMSNorm + SwiGLU + RoPE Pre-LN is exactly Llama), fed the same tokens, trained by the
same torch.optim.AdamW (fused, as pretrain/engine.py and the Hugging Face Trainer's default build it):
the loss curves must agree (the JSON reports the largest difference), so the
speed ratio compares equal work. The parameters and the AdamW states are in the chosen --dtype on
every side (no fp32 master copy): the JSON labels the dtypes it found in the optimizer state.

MFU = tokens/s x (6N + 12 L H Q T) / peak, N every matmul parameter (the output layer included, the
embedding lookup not), L layers, H heads, Q head size, T sequence length (PaLM, appendix B); peak:
the device's dense bf16 figure (H100/H200 989 TFLOP/s) or --peak-tflops; none for a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
PREPARE_DEFAULT_VOCAB = 8192  # python -m pretrain.data prepare --vocab-size default
MARK = "@@bench "  # the line prefix of a worker's replies (anything else on its stdout is ignored)
# Targets of issue 19 (CPU, quickstart dimensions, fp32): measured here, never asserted in a test.
TARGETS = {
    "ours_over_hf_eager_tokens_per_s": 1.2,
    "ours_over_hf_compiled_tokens_per_s": 1.1,
    "ours_over_hf_peak_memory": 0.8,  # at most
    "peri_over_pre_step_time": 1.03,  # at most
}


# ----------------------------------------------------------------------------------- the config


def model_config(config: str, sets: list[str], placement: str) -> tuple[object, object, str]:
    """(resolved config, model section, where the vocabulary size came from)."""
    from pretrain.config import load_config, resolve

    cfg = load_config(config, [*sets, f"model.placement={placement}"])
    source = "model.vocab_size in the config"
    vocab = None
    if cfg.model.vocab_size == 0:
        from pretrain.config import tokenizer_path

        path = Path(tokenizer_path(cfg.data))
        if path.is_file():
            import sentencepiece as spm

            vocab = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
            source = f"the tokenizer {path} ({vocab}), padded"
        else:
            vocab = PREPARE_DEFAULT_VOCAB
            source = f"no tokenizer at {path}: pretrain.data prepare's default {vocab}, padded"
    cfg = resolve(cfg, vocab)
    return cfg, cfg.model, source


def flops_per_token(m) -> float:
    """6N + 12*L*H*Q*T, written out here rather than taken from the model, so the two can be compared."""
    d, L, ffn, V = m.hidden_size, m.num_layers, m.ffn_hidden_size, m.vocab_size
    kv = m.num_kv_heads or m.num_heads
    q = d // m.num_heads
    attn = d * (m.num_heads * q) + 2 * d * (kv * q) + (m.num_heads * q) * d
    mlp = (3 if m.mlp == "swiglu" else 2) * d * ffn
    return 6 * (L * (attn + mlp) + V * d) + 12 * L * m.num_heads * q * m.seq_len


def model_flops_per_token(m) -> float:
    """The model's own count (GPT.flops_per_token), built on the meta device: no memory, no time."""
    from model.gpt import build_model

    return build_model(m, "torch", torch.device("meta"))[0].flops_per_token()


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


# ----------------------------------------------------------------------------------- one side


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux: /proc/self/clear_refs, value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """Hands the C heap's free memory back to the system (glibc malloc_trim), so that the resident set
    counts live memory only, as torch.cuda.max_memory_allocated counts allocated memory only. Without it
    the peak resident set of the measured steps includes whatever the warm-up steps (compilation, the
    first step's temporaries) freed but glibc kept, which differs between sides for reasons that are not
    the step's. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def build_side(spec: dict, device: torch.device, dtype: torch.dtype):
    """(model, loss function(model, tokens, labels)) of one side."""
    from model.gpt import build_model
    from model.loss import LossSpec

    impl, placement, *variant = spec["side"].split(":")
    cfg, m, _ = model_config(spec["config"], spec["sets"], placement)
    torch.manual_seed(0)
    ours, _ = build_model(m, spec["backend"], device)
    ours.loss_spec = LossSpec(fused="plain-loss" not in variant and cfg.train.fused_loss, z_loss=cfg.train.z_loss)
    if impl == "ours":
        model = ours.to(dtype)
        budget = next((float(v.removeprefix("budget")) for v in variant if v.startswith("budget")), 1.0)
        if budget < 1 and not spec["compile"]:
            raise ValueError(f"side '{spec['side']}': a memory budget is the compiler's (compiled mode only)")
        if spec["compile"]:
            scope = next((v for v in variant if v in ("blocks", "model")), spec["compile_scope"])
            compile_ = model.compile_model if scope == "model" else model.compile_blocks
            compile_(memory_budget=budget)
        return model, lambda mod, x, y: mod(x, y)
    if impl == "hf":
        from model.hf_convert import choose_format
        from pretrain.export import build_hf_model

        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        hf = build_hf_model(ours.float(), m, choose_format(m, "llama"), ids).to(device=device, dtype=dtype).train()
        hf.config.use_cache = False
        hf.config._attn_implementation = "sdpa"
        del ours

        def loss(mod, x, y):
            logits = mod(input_ids=x, use_cache=False).logits
            return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

        return hf, torch.compile(loss) if spec["compile"] else loss
    if impl == "mcore":
        return mcore_side(m, device, dtype, spec["compile"])
    raise ValueError(f"side '{spec['side']}': implementations are ours, hf, mcore")


def mcore_side(m, device, dtype, compile_):
    """megatron-core's GPTModel with the local (no Transformer Engine) layer spec, on one rank. It needs
    a GPU: its RoPE table and its attention's global memory buffer are allocated on
    torch.cuda.current_device() whatever the model's device."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29731 + os.getpid() % 1000))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_heads,
        num_query_groups=m.num_kv_heads or m.num_heads, ffn_hidden_size=m.ffn_hidden_size, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, layernorm_epsilon=m.norm_eps, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_cpu_initialization=device.type != "cuda", gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
    )  # fmt: skip
    model = GPTModel(
        cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=m.vocab_size,
        max_sequence_length=m.seq_len, position_embedding_type="rope", rotary_base=int(m.rope_theta),
        share_embeddings_and_output_weights=m.tie_embeddings,
    ).to(device)  # fmt: skip
    pos = torch.arange(m.seq_len, device=device)

    def loss(mod, x, y):
        return mod(x, pos.expand_as(x), None, labels=y).float().mean()

    return model, torch.compile(loss) if compile_ else loss


def optimizer_dtypes(opt) -> list[str]:
    return sorted({str(v.dtype).removeprefix("torch.") for s in opt.state.values() for v in s.values() if v.ndim})


def worker(spec: dict) -> int:
    """One side: builds, then answers the coordinator's commands on stdin ("step I", "report")."""
    import importlib

    # Every side imports the same modules (and so starts from the same resident set), whichever it runs.
    for name in ("transformers.models.llama.modeling_llama", "model.hf_convert", "pretrain.export"):
        importlib.import_module(name)

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def reply(obj):
        print(MARK + json.dumps(obj), flush=True)

    try:
        model, loss_fn = build_side(spec, device, dtype)
    except Exception as err:  # recorded in the JSON: why a side could not run here
        reply({"error": f"{type(err).__name__}: {err}"[:600]})
        return 0
    # fused: what pretrain/engine.py builds, and the Hugging Face Trainer's default with torch >= 2.8
    # (optim adamw_torch_fused); the same optimizer on every side
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    _, m, _ = model_config(spec["config"], spec["sets"], "pre")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, m.vocab_size, (spec["batch"], m.seq_len + 1), generator=gen) for _ in range(4)]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    import gc

    gc.collect()
    rss_setup = rss_warm = _proc_status("VmRSS")
    peak_reset = reset_peak_rss()
    reply({"ready": True, "params": sum(p.numel() for p in model.parameters())})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "step":
            i = int(cmd[1])
            if i == spec["warmup"]:  # the peak of the measured steps: not compilation's, not set-up's
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                else:
                    gc.collect()
                    release_free_heap()  # what set-up and compilation freed is not the steps' memory
                    rss_warm = _proc_status("VmRSS")  # with the AdamW states and the compiled code
                    peak_reset = reset_peak_rss()
            data = batches[i % len(batches)].to(device)
            tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                loss = loss_fn(model, tokens, labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
            except Exception as err:
                reply({"error": f"{type(err).__name__} in its training step: {err}"[:600]})
                return 0
            reply({"dt": time.perf_counter() - t0, "cpu": time.process_time() - c0, "loss": loss.item()})
        elif cmd[0] == "report":
            reply(
                {
                    "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
                    if device.type == "cuda"
                    else _proc_status("VmHWM"),
                    "memory_kind": "torch.cuda.max_memory_allocated over the measured steps"
                    if device.type == "cuda"
                    else (
                        "peak RSS of the process during the measured steps "
                        "(VmHWM reset and the free heap trimmed after the warm-up)"
                        if peak_reset
                        else "peak RSS of the process since it started"
                    ),  # fmt: skip
                    "rss_after_setup_bytes": rss_setup if device.type != "cuda" else None,
                    "rss_after_warmup_bytes": rss_warm if device.type != "cuda" else None,
                    "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "optimizer_state_dtypes": optimizer_dtypes(opt),
                }
            )
            return 0
    return 0


# ----------------------------------------------------------------------------------- the coordinator


class Side:
    def __init__(self, spec: dict):
        self.name, self.spec = spec["side"], spec
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.times, self.cpu, self.losses, self.first_s, self.error, self.info = [], [], [], None, None, {}

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        return {"error": f"the worker exited (code {self.proc.wait()}) without replying; see its stderr"}

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str) -> dict:
        self.send(command)
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


def run_mode(args, mode: str, device: torch.device, cfg, m) -> dict:
    base = {
        "config": args.config, "sets": args.set, "backend": args.backend, "device": str(device), "dtype": args.dtype,
        "compile": mode == "compiled", "compile_scope": args.compile_scope or cfg.train.compile_scope,
        "threads": args.threads, "warmup": args.warmup, "lr": cfg.train.lr,
        "batch": args.micro_batch or cfg.train.micro_batch_size,
    }  # fmt: skip
    sides = [Side({**base, "side": s}) for s in args.sides]
    for s in sides:
        reply = s.read()
        s.error = reply.get("error")
        s.info["params"] = reply.get("params")
    live = [s for s in sides if s.error is None]
    for i in range(args.warmup + args.steps):
        if i < args.warmup and args.concurrent_warmup:  # all sides at once: their compilations overlap
            for s in live:
                s.send(f"step {i}")
            replies = [s.read() for s in live]
        else:
            replies = None
        for j, s in enumerate(list(live)):
            r = replies[j] if replies is not None else s.ask(f"step {i}")
            if "error" in r:
                s.error = r["error"]
                live.remove(s)
                continue
            s.losses.append(r["loss"])
            if i == 0:
                s.first_s = r["dt"]
            if i >= args.warmup:
                s.times.append(r["dt"] if args.timing == "wall" else r["cpu"])
                s.cpu.append(r["cpu"])
    for s in live:
        s.info.update(s.ask("report"))
    for s in sides:
        s.close()
    tokens_per_step = base["batch"] * m.seq_len
    fpt = flops_per_token(m)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_info(device)["peak_flops"]
    out = {"sides": {}, "skipped": {s.name: s.error for s in sides if s.error}}
    for s in live:
        step = statistics.median(s.times)
        tps = tokens_per_step / step
        out["sides"][s.name] = {
            "step_s": round(step, 5),
            "step_s_min_max": [round(min(s.times), 5), round(max(s.times), 5)],
            "cpu_s_per_step": round(statistics.median(s.cpu), 5),
            "tokens_per_s": round(tps, 1),
            "achieved_tflops": round(tps * fpt / 1e12, 4),
            "mfu": round(tps * fpt / peak, 4) if peak else None,
            "first_step_s": round(s.first_s, 3),
            **({"compile_s_approx": round(s.first_s - step, 2)} if mode == "compiled" else {}),
            "losses": [round(x, 5) for x in s.losses],
            **s.info,
        }
    return out | ratios(out["sides"])


def ratios(sides: dict) -> dict:
    r = {}
    ours, hf, peri = sides.get("ours:pre"), sides.get("hf:pre"), sides.get("ours:peri")
    if ours and hf:
        r["ours_over_hf_tokens_per_s"] = round(ours["tokens_per_s"] / hf["tokens_per_s"], 3)
        r["ours_over_hf_peak_memory"] = round(ours["peak_memory_bytes"] / hf["peak_memory_bytes"], 3)
        if ours.get("rss_after_warmup_bytes"):  # what a step adds: activations, gradients, temporaries
            growth = lambda s: s["peak_memory_bytes"] - s["rss_after_warmup_bytes"]
            r["ours_over_hf_memory_growth_during_steps"] = round(growth(ours) / max(1, growth(hf)), 3)
        r["loss_curves_max_abs_diff"] = max(abs(a - b) for a, b in zip(ours["losses"], hf["losses"]))
    if ours and peri:
        r["peri_over_pre_step_time"] = round(peri["step_s"] / ours["step_s"], 3)
    plain = sides.get("ours:pre:plain-loss")
    if ours and plain:
        r["fused_over_plain_loss_tokens_per_s"] = round(ours["tokens_per_s"] / plain["tokens_per_s"], 3)
    for name, side in sides.items():  # compiled: ours:pre:budget0.5 keeps less for backward, recomputes more
        if ours and name.startswith("ours:pre:budget"):
            r[f"{name}_over_ours_pre_tokens_per_s"] = round(side["tokens_per_s"] / ours["tokens_per_s"], 3)
            r[f"{name}_over_ours_pre_peak_memory"] = round(side["peak_memory_bytes"] / ours["peak_memory_bytes"], 3)
            if hf:
                r[f"{name}_over_hf_peak_memory"] = round(side["peak_memory_bytes"] / hf["peak_memory_bytes"], 3)
    for scope in ("blocks", "model"):  # compiled: a scope suffix beside ours:pre's --compile-scope
        if ours and (other := sides.get(f"ours:pre:{scope}")):
            r[f"{scope}_scope_over_config_scope_tokens_per_s"] = round(other["tokens_per_s"] / ours["tokens_per_s"], 3)
    return r


def targets(modes: dict) -> dict:
    eager, comp = modes.get("eager", {}), modes.get("compiled", {})
    found = {
        "ours_over_hf_eager_tokens_per_s": eager.get("ours_over_hf_tokens_per_s"),
        "ours_over_hf_compiled_tokens_per_s": comp.get("ours_over_hf_tokens_per_s"),
        "ours_over_hf_peak_memory": max(
            (x for x in (eager.get("ours_over_hf_peak_memory"), comp.get("ours_over_hf_peak_memory")) if x),
            default=None,
        ),
        "peri_over_pre_step_time": max(
            (x for x in (eager.get("peri_over_pre_step_time"), comp.get("peri_over_pre_step_time")) if x), default=None
        ),
    }
    at_most = {"ours_over_hf_peak_memory", "peri_over_pre_step_time"}
    return {
        k: {
            "target": ("<= " if k in at_most else ">= ") + str(TARGETS[k]),
            "measured": v,
            "met": None if v is None else (v <= TARGETS[k] if k in at_most else v >= TARGETS[k]),
        }
        for k, v in found.items()
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--sides",
        nargs="+",
        default=["ours:pre", "hf:pre", "ours:peri"],
        help="IMPL:PLACEMENT[:plain-loss|:blocks|:model|:budgetB] per side: ours, hf (pre only), mcore (pre, GPU "
        "only); budgetB (compiled mode only): ours with train.compile_memory_budget B, e.g. ours:pre:budget0.5",
    )
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument(
        "--compile-scope",
        choices=["blocks", "model"],
        help="what ours compiles in the compiled mode (default: the config's train.compile_scope); "
        "a side's :blocks / :model suffix overrides it",
    )
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--backend", default="auto", help="norm kernels: auto, triton, apex, torch")
    p.add_argument("--micro-batch", type=int, default=0, help="default: the config's train.micro_batch_size")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (default: torch's)")
    p.add_argument(
        "--timing",
        default="wall",
        choices=["wall", "cpu"],
        help="step time as wall-clock (default) or as the process's CPU time: on a CPU shared with other "
        "work, --timing cpu --threads 1 measures the work each side does whatever the scheduler does",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--concurrent-warmup",
        action="store_true",
        help="run the warm-up steps of all sides at once (their compilations overlap: a shorter run, "
        "but the first-step and compile times are then measured with the sides competing for the machine)",
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's peak (TFLOP/s)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cfg, m, vocab_source = model_config(args.config, args.set, "pre")
    result = {
        "bench": "train_step",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **device_info(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "dims": {
            "hidden": m.hidden_size,
            "layers": m.num_layers,
            "heads": m.num_heads,
            "kv_heads": m.num_kv_heads,
            "ffn": m.ffn_hidden_size,
            "vocab": m.vocab_size,
            "seq": m.seq_len,
            "micro_batch": args.micro_batch or cfg.train.micro_batch_size,
            "tie_embeddings": m.tie_embeddings,
        },  # fmt: skip
        "vocab_source": vocab_source,
        "fused_loss": cfg.train.fused_loss,
        "compile_scope": args.compile_scope or cfg.train.compile_scope,  # ours compiled, bar a side's suffix
        "optimizer": "torch.optim.AdamW(fused=True) on every side (pretrain/engine.py's, and the HF Trainer's "
        "default adamw_torch_fused), parameters and states in --dtype",
        "flops_per_token": flops_per_token(m),
        "model_flops_per_token": model_flops_per_token(m),
        "steps": {"warmup": args.warmup, "measured": args.steps, "concurrent_warmup": args.concurrent_warmup},
        "timing": "wall-clock" if args.timing == "wall" else "process CPU time (user + system) per step",
        "modes": {},
    }
    for mode in args.modes:
        result["modes"][mode] = run_mode(args, mode, device, cfg, m)
    if device.type == "cpu" and args.dtype == "fp32":
        result["targets"] = targets(result["modes"])
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
