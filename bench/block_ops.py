"""The block's hand-written ops against the autograd compositions they replace, forward + backward, side by
side in one process. Prints one JSON object.

    python bench/block_ops.py                        # quickstart shape: 2,048 tokens, d 256, 4 heads, SwiGLU 704
    python bench/block_ops.py --threads 1 --reps 30  # a CPU shared with others (CPU time, one thread)
    python bench/block_ops.py --tokens 8192 --hidden 1024 --heads 16 --ffn 2816 --dtype bf16   # a GPU
    python bench/block_ops.py --ops attention --tokens 2048 --batch 2   # one op; sequences of 1,024 tokens

    rms_norm         kernels.torch_ops.rms_norm (hand-written backward) | the textbook composition | F.rms_norm
    swiglu           model.mlp.swiglu (keeps its input, one gradient tensor) | silu(gate) * up under autograd
    rope_qkv         Rotary.apply_qkv (fused split + rotation) | split, then rotate-half on q and k (HF Llama's)
    peri_junction    kernels.torch_ops.peri_junction: s = residual + RMSNorm(f), y = RMSNorm(s) | the composition
    sdpa_layout      SDPA on q, k, v laid out batch-major (what apply_qkv returns) | sequence-major views
    attention        the causal attention model/attention.py runs (fp32 CPU: kernels/cpu_attention.py) |
                     softmax(q k^T / sqrt(hd) + causal mask) v under autograd | SDPA
    fused_loss       model.loss.linear_cross_entropy (chunked, one logits buffer) | logits + cross_entropy

For the first four, attention and the fused loss, `ours` on an fp32 CPU tensor runs the fused CPU kernels
(kernels/cpu_kernels.py; the loss its per-chunk cross-entropy) and `ours, torch ops` the same autograd
functions on torch's eager ops (what runs when the kernels are off; for attention torch's CPU flash kernel).

Each pair alternates call by call (a, b, a, b, ...) so noise hits both alike; times are medians in ms (CPU:
process CPU time, so other work on the machine does not count; GPU: wall time after a synchronize).
`speedup` = the composition's time / ours. Also reported: bytes autograd keeps for backward (distinct
storages, from saved-tensor hooks), ours against the composition's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from kernels import cpu_attention, cpu_kernels
from kernels.torch_ops import peri_junction, rms_norm
from model.loss import linear_cross_entropy
from model.mlp import swiglu
from model.rope import Rotary

OPS = ("rms_norm", "swiglu", "rope_qkv", "peri_junction", "sdpa_layout", "attention", "fused_loss")  # cases()' names


def reference_rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def reference_peri_junction(f, residual, w_out, w_in, eps):
    s = residual + reference_rms_norm(f, w_out, eps)
    return s, reference_rms_norm(s, w_in, eps)


def reference_swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def reference_rope_qkv(qkv, heads, cos, sin):
    s, b, kv, per, hd = qkv.shape
    q, k, v = torch.split(qkv, [per - 2, 1, 1], dim=3)

    def rotate(x):
        half = hd // 2
        return x * cos[:, None, None, :] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None, None, :]

    return rotate(q.reshape(s, b, heads, hd)), rotate(k.squeeze(3)), v.squeeze(3)


def cpu_kernels_status(device: torch.device) -> str:
    """'loaded', or why not (a failed build names its cause); 'not used' on a GPU."""
    if device.type != "cpu":
        return "not used"
    cpu_kernels.load()
    return cpu_kernels.status()


def torch_ops_only(fn):
    """fn marked to run, forward and backward, with the fused CPU kernels off (backward_of reads the mark)."""
    fn.kernels_off = True
    return fn


def saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def timer(device: torch.device):
    if device.type == "cuda":

        def now():
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.process_time


def side_by_side(fns: dict, reps: int, now) -> dict:
    """Median ms per call of each function, the calls interleaved."""
    times = {k: [] for k in fns}
    for _ in range(2):
        for f in fns.values():
            f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = now()
            f()
            times[k].append((now() - t0) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def backward_of(forward, inputs: list[torch.Tensor]):
    """A call running forward, then backward of its output(s) against fixed random gradients."""
    outs = forward()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def run():
        for t in inputs:
            t.grad = None
        o = forward()
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)

    if getattr(forward, "kernels_off", False):

        def run_off():
            with cpu_kernels.turned_off():
                run()

        return run_off
    return run


def cases(args, device, dtype):
    n, d, heads, ffn, vocab = args.tokens, args.hidden, args.heads, args.ffn, args.vocab
    b = args.batch
    s = n // b
    hd = d // heads
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    leaf = lambda *shape: rand(*shape).requires_grad_()

    x, w = leaf(s, b, d), (1 + 0.1 * rand(d)).requires_grad_()
    yield (
        "rms_norm",
        [x, w],
        {
            "ours": lambda: rms_norm(x, w, 1e-5),
            "ours, torch ops": torch_ops_only(lambda: rms_norm(x, w, 1e-5)),
            "composition": lambda: reference_rms_norm(x, w, 1e-5),
            "F.rms_norm": lambda: F.rms_norm(x, (d,), w, 1e-5),
        },
    )
    gu = leaf(s, b, 2 * ffn)
    yield (
        "swiglu",
        [gu],
        {
            "ours": lambda: swiglu(gu),
            "ours, torch ops": torch_ops_only(lambda: swiglu(gu)),
            "composition": lambda: reference_swiglu(gu),
        },
    )
    rotary = Rotary(hd, 10000.0)
    cos, sin = rotary.tables(s, device, dtype)
    qkv = leaf(s, b, heads, 3, hd)
    yield (
        "rope_qkv",
        [qkv],
        {
            "ours": lambda: rotary.apply_qkv(qkv, heads, cos, sin),
            "ours, torch ops": torch_ops_only(lambda: rotary.apply_qkv(qkv, heads, cos, sin)),
            "composition": lambda: reference_rope_qkv(qkv, heads, cos, sin),
        },
    )
    f, res = leaf(s, b, d), leaf(s, b, d)
    w_out, w_in = (1 + 0.1 * rand(d)).requires_grad_(), (1 + 0.1 * rand(d)).requires_grad_()
    yield (
        "peri_junction",
        [f, res, w_out, w_in],
        {
            "ours": lambda: peri_junction(f, res, w_out, None, w_in, None, 1e-5),
            "ours, torch ops": torch_ops_only(lambda: peri_junction(f, res, w_out, None, w_in, None, 1e-5)),
            "composition": lambda: reference_peri_junction(f, res, w_out, w_in, 1e-5),
        },
    )
    q_seq, k_seq, v_seq = (leaf(s, b, heads, hd) for _ in range(3))
    q_bm, k_bm, v_bm = (
        t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q_seq, k_seq, v_seq)
    )
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True)
    yield (
        "sdpa_layout",
        [q_seq, k_seq, v_seq, q_bm, k_bm, v_bm],
        {"ours": lambda: sdpa(q_bm, k_bm, v_bm), "composition": lambda: sdpa(q_seq, k_seq, v_seq)},
    )
    heads_first = lambda *ts: [t.permute(1, 2, 0, 3) for t in ts]  # (S, B, heads, hd) -> (B, heads, S, hd)

    def ours_attention():  # what model/attention.py runs: the kernel on fp32 CPU, SDPA elsewhere
        q, k, v = heads_first(q_bm, k_bm, v_bm)
        return cpu_attention.causal_attention(q, k, v) if cpu_attention.applies(q, 0.0) else sdpa(q_bm, k_bm, v_bm)

    def reference_attention():
        q, k, v = heads_first(q_bm, k_bm, v_bm)
        scores = (q @ k.transpose(-1, -2)) * hd**-0.5
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v

    yield (
        "attention",
        [q_bm, k_bm, v_bm],
        {
            "ours": ours_attention,
            "ours, torch ops": torch_ops_only(lambda: ours_attention()),  # its own function: the mark is an attribute
            "composition": reference_attention,
            "SDPA": lambda: sdpa(q_bm, k_bm, v_bm),
        },
    )
    h, head = leaf(n, d), (0.02 * rand(vocab, d)).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    yield (
        "fused_loss",
        [h, head],
        {
            "ours": lambda: linear_cross_entropy(h, head, labels),
            "ours, torch ops": torch_ops_only(lambda: linear_cross_entropy(h, head, labels)),
            "composition": lambda: F.cross_entropy((h @ head.t()).float(), labels),
        },
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences (the tokens are split into this many)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--ops", nargs="+", choices=OPS, metavar="OP", help=f"only these: {', '.join(OPS)} (default all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    now = timer(device)
    out = {
        "bench": "block_ops",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "shape": {k: getattr(args, k) for k in ("tokens", "batch", "hidden", "heads", "ffn", "vocab")},
        "timing": "wall-clock after a synchronize" if device.type == "cuda" else "process CPU time",
        "cpu_kernels": cpu_kernels_status(device),
        "ops": {},
    }
    for name, inputs, fns in cases(args, device, dtype):
        if args.ops and name not in args.ops:
            continue
        runs = {k: backward_of(f, inputs) for k, f in fns.items()}
        ms = side_by_side(runs, args.reps, now)
        kept = {k: saved_bytes(f) for k, f in fns.items()}
        out["ops"][name] = {"fwd_bwd_ms": ms, "speedup": round(ms["composition"] / ms["ours"], 3)}
        if "ours, torch ops" in ms:
            out["ops"][name]["kernels_over_torch_ops"] = round(ms["ours, torch ops"] / ms["ours"], 3)
        out["ops"][name]["saved_for_backward_bytes"] = kept
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
