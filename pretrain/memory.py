"""What each rank holds, measured and predicted.

Measured: `held_bytes(engine)` sums the parameter and optimizer-state bytes a live DeepSpeed engine
holds on this rank (so ZeRO's partitioning shows). Predicted: `zero_state_bytes` (parameters,
gradients, optimizer states per ZeRO stage and precision) and `activation_bytes` (Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models", generalised to this model's
blocks); `launch/plan.py` adds them up per GPU for a cluster layout. `expected_bytes` is the
parameter/optimizer part for train.py's memory.json.

Model states per rank, N = this rank's unique parameters (its tensor-parallel shard of its pipeline
stage's layers, a tied embedding counted once per stage that holds it), dp = data-parallel ranks,
Adam (two fp32 states per parameter), as DeepSpeed 0.19 allocates them:

    fp32        parameters      gradients     optimizer
    ZeRO-0      4N              4N            8N           (Adam states on the full model)
    ZeRO-1      4N              4N            12N / dp     (an fp32 copy of the partition + 2 states)
    ZeRO-2      4N              4N / dp       12N / dp
    ZeRO-3      4N / dp         4N / dp       8N / dp      (the fp32 partition is the master: no copy)

    bf16/fp16   parameters      gradients     optimizer    (16-bit weights, fp32 master + 2 states)
    ZeRO-0      2N              2N            12N          (pipeline + bf16: DeepSpeed's BF16_Optimizer
    ZeRO-1      2N              2N            12N / dp      partitions the master over dp, 12N/dp, and
    ZeRO-2      2N              2N / dp       12N / dp      keeps a gradient accumulation buffer, 4N)
    ZeRO-3      2N / dp         2N / dp       12N / dp

ZeRO-3 keeps parameters with at most `stage3_param_persistence_threshold` elements (default 1e5)
whole on every rank, in addition to their partition. Partitions are padded to alignment, so
measured values exceed N/dp by a few elements per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATES = 2  # exp_avg, exp_avg_sq (fp32)
ZERO3_PERSISTENCE_DEFAULT = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def held_bytes(engine) -> dict[str, int]:
    """{"parameters": bytes, "optimizer": bytes} held by this rank."""
    params, storages = 0, set()
    seen = set()
    for p in engine.module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition (+ the full tensor if persistent)
            t = p.ds_tensor
            params += t.numel() * t.element_size()
            storages.add(t.untyped_storage().data_ptr())
            if getattr(p, "ds_persist", False):
                params += p.numel() * p.element_size()
        else:
            params += p.numel() * p.element_size()
            storages.add(p.untyped_storage().data_ptr())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO
    optimizer, counted = 0, set()
    found = list(_tensors(inner.state)) + [p for g in inner.param_groups for p in g["params"]]
    for t in found:
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or ptr in counted:
            continue  # a view of the parameters themselves (ZeRO-3's fp32 master), or already counted
        counted.add(ptr)
        optimizer += t.untyped_storage().nbytes()
    return {"parameters": params, "optimizer": optimizer}


# ------------------------------------------------------------------------------ model states


def zero_state_bytes(
    num_params: int,
    stage: int,
    dp: int,
    precision: str = "fp32",
    *,
    zero3_partition: float | None = None,
    zero3_persistent: int = 0,
    pipeline: bool = False,
) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer states one rank holds (the table above).

    num_params: this rank's unique parameters. zero3_partition: this rank's ZeRO-3 partition in
    elements (default num_params / dp; pass the padded per-tensor sum for the exact figure).
    zero3_persistent: elements of the parameters ZeRO-3 keeps whole (under the persistence threshold).
    pipeline: pipeline parallelism (DeepSpeed then runs bf16 through its BF16_Optimizer)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage {stage}: allowed 0, 1, 2, 3")
    if precision not in BYTES:
        raise ValueError(f"precision '{precision}': allowed {', '.join(BYTES)}")
    if dp < 1:
        raise ValueError(f"dp {dp}: must be >= 1")
    n, b = num_params, BYTES[precision]
    part = n / dp
    states = 4 * ADAM_STATES  # fp32 Adam moments per parameter
    master = 0 if precision == "fp32" else 4  # fp32 master copy next to 16-bit weights
    if stage == 3:
        z = n / dp if zero3_partition is None else zero3_partition
        return {"parameters": b * (z + zero3_persistent), "gradients": b * z, "optimizer": (states + master) * z}
    params = b * n
    grads = b * n if stage < 2 else b * part
    if stage == 0:
        if pipeline and precision == "bf16":  # BF16_Optimizer: partitioned master, extra accumulation buffer
            return {"parameters": params, "gradients": 2 * b * n, "optimizer": (states + 4) * part}
        return {"parameters": params, "gradients": grads, "optimizer": (states + master) * n}
    # ZeRO-1/2 keep an fp32 copy of their partition (also in fp32 training) + the Adam states on it.
    return {"parameters": params, "gradients": grads, "optimizer": (states + 4) * part}


def expected_bytes(
    num_params: int, stage: int, dp: int, bytes_per_param: int = 4, precision: str | None = None
) -> dict[str, float]:
    """Parameter and optimizer-state bytes per rank (what held_bytes measures); fp32 unless told."""
    precision = precision or ("fp32" if bytes_per_param == 4 else "bf16")
    s = zero_state_bytes(num_params, stage, dp, precision)
    return {"parameters": s["parameters"], "optimizer": s["optimizer"]}


# ------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class BlockShape:
    """What a block's stored activations depend on (per token: multiply by sequence x micro-batch)."""

    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    mlp: str = "swiglu"  # swiglu | gelu
    norms: int = 2  # norms on the residual path whose input is stored (pre: 2, peri: 4)
    qk_norm: bool = False
    dropout: bool = False  # dropout > 0: 1-byte masks are stored


def activation_bytes(
    shape: BlockShape,
    seq: int,
    micro: int,
    *,
    tp: int = 1,
    sequence_parallel: bool = False,
    act_bytes: int = 2,
    scores: str = "fused",
    ulysses: int = 1,
) -> dict[str, float]:
    """Stored activation bytes of ONE block for one micro-batch, by recompute mode, on one rank.

    Korthikanti et al. (2022) count, for a GPT-3 block (16-bit activations, LayerNorm, 4h GELU MLP,
    dropout, attention scores materialised), s*b*h*(34 + 5*a*s/h) bytes; with tensor parallelism
    s*b*h*(10 + 24/t + 5*a*s/(h*t)), with sequence parallelism as well s*b*h*(34 + 5*a*s/h)/t.
    Term by term (per token, B = bytes per activation element, hkv = kv_heads * head_dim, f = ffn):

      split over tp    Q B*h, K and V B*hkv each, output projection input B*h,
                       MLP: GELU input and fc2 input 2*B*f; SwiGLU [gate; up], silu(gate), fc2 input 4*B*f;
                       QK-norm inputs B*(h + hkv)
      replicated       (split too under sequence parallelism) every residual-path norm's input B*h,
                       the QKV and fc1 inputs B*h each, two dropout masks 1*h each (if dropout)
      attention core   scores="materialized": softmax B*a*s (+ mask a*s + dropout output B*a*s if
                       dropout), split over tp -- Korthikanti's 5*a*s/h; scores="fused" (SDPA's flash /
                       memory-efficient kernels, what this model runs on GPU): output B*h + fp32
                       log-sum-exp 4*a

    GPT-3 (B=2, hkv=h, f=4h GELU, 2 LayerNorms, dropout, materialized) gives 24 + 10 + 5as/h = 34 + 5as/h.
    DeepSpeed-Ulysses (ulysses=u) keeps seq/u tokens per rank; its attention core sees the whole sequence for
    a/u heads, which is the same per-token count (a materialized score row is still seq long), so every term
    divides by u.
    Modes: "none" all of it; "selective" (the attention core recomputed) without the attention-core
    term; "full" (the block recomputed) only the block's inputs, x and the normed h that the junctions
    pass on: 2*B*h (split under sequence parallelism) -- the working set of the one block being
    recomputed in backward is added once per stage by the caller.
    """
    if scores not in ("fused", "materialized"):
        raise ValueError(f"scores '{scores}': allowed fused, materialized")
    h, a, f, B = shape.hidden, shape.heads, shape.ffn, act_bytes
    hkv = shape.kv_heads * (h // shape.heads)
    mlp = {"gelu": 2 * B * f, "swiglu": 4 * B * f}[shape.mlp]
    split = B * h + 2 * B * hkv + B * h + mlp + (B * (h + hkv) if shape.qk_norm else 0)
    replicated = shape.norms * B * h + 2 * B * h + (2 * h if shape.dropout else 0)
    if scores == "materialized":
        core = a * seq * (B + (1 + B if shape.dropout else 0))
    else:
        core = B * h + 4 * a
    tokens = seq * micro / ulysses
    none = tokens * (split / tp + replicated / (tp if sequence_parallel else 1) + core / tp)
    selective = none - tokens * core / tp
    full = tokens * 2 * B * h / (tp if sequence_parallel else 1)
    return {"none": none, "selective": selective, "full": full}


def korthikanti_bytes(
    seq: int, micro: int, hidden: int, heads: int, tp: int = 1, sequence_parallel: bool = False
) -> float:
    """The paper's closed form for one GPT-3 block (16-bit, no recompute), for reference and tests."""
    s, b, h, a, t = seq, micro, hidden, heads, tp
    if sequence_parallel:
        return s * b * h * (34 + 5 * a * s / h) / t
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def output_layer_bytes(seq: int, micro: int, vocab: int, tp: int = 1, act_bytes: int = 2) -> float:
    """Logits and the cross-entropy's fp32 softmax on the last stage (vocabulary split over tp):
    B*V logits + 4*V softmax (+ 4*V for the fp32 cast of 16-bit logits) per token."""
    per_token = act_bytes * vocab + 4 * vocab + (4 * vocab if act_bytes < 4 else 0)
    return seq * micro * per_token / tp


# --------------------------------------------------------------------------- ZeRO-Offload / Infinity

OPTIMIZER_SWAP_BUFFERS = 4  # DeepSpeed's offload_optimizer.buffer_count default (nvme)
SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default (elements)


def offloaded(
    states: dict[str, float],
    part: float,
    stage: int,
    precision: str,
    offload_optimizer: str = "none",
    offload_params: str = "none",
    persistent: float = 0.0,
    param_buffers: float = 0.0,
    params_in_cpu: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Where one rank's model states live under ZeRO-Offload / ZeRO-Infinity: {"gpu": states left on the GPU,
    "cpu": bytes of CPU memory, "nvme": bytes on the NVMe drive}. `states` is zero_state_bytes' result, `part`
    this rank's partition in elements (N / (dp x ulysses), padded), `persistent` the elements ZeRO-3 keeps
    whole on the GPU, `param_buffers` the elements of the NVMe parameter buffers (count x size), `params_in_cpu`
    the elements of parameters DeepSpeed keeps in CPU memory before it uses the drive (offload_param.max_in_cpu).

    As DeepSpeed 0.19 allocates them (stage_1_and_2.py, stage3.py, swap_tensor/):
      optimizer, ZeRO-1/2     CPU: fp32 master partition, its fp32 gradient, Adam m and v (16 B per element);
                              the GPU keeps whole gradients under ZeRO-1 and only reduce buckets under ZeRO-2
      optimizer cpu, ZeRO-3   CPU: fp32 master, m, v (12 B) and the gradient partitions in the training precision
                              (grad_partitions_flat_buffer), plus the fp32 gradient of one sub-group being stepped
      optimizer nvme, ZeRO-3  NVMe: fp32 master, m, v and fp32 gradients (16 B); CPU: the gradient partitions
                              and 4 swap buffers of one sub-group (zero_optimization.sub_group_size, 1e9)
      parameters, ZeRO-3      the 16-bit partition in CPU memory, or on NVMe (beyond `params_in_cpu`) read
                              through `param_buffers` pinned buffers; the GPU keeps the persistent small
                              parameters and what a layer gathers."""
    b = BYTES[precision]
    gpu, cpu, nvme = dict(states), 0.0, 0.0
    group = min(part, SUB_GROUP_SIZE)
    if offload_optimizer != "none":
        gpu["optimizer"] = 0.0
        if stage >= 2:
            gpu["gradients"] = 0.0
        if stage < 3:
            cpu += 16 * part
        elif offload_optimizer == "cpu":
            cpu += (12 + b) * part + 4 * group
        else:
            nvme += 16 * part
            cpu += b * part + OPTIMIZER_SWAP_BUFFERS * 4 * group
    if offload_params != "none":
        gpu["parameters"] = b * persistent
        if offload_params == "cpu":
            cpu += b * part
        else:
            kept = min(part, params_in_cpu)
            nvme += b * (part - kept)
            cpu += b * (kept + param_buffers)
    return {"gpu": gpu, "cpu": cpu, "nvme": nvme}


# --------------------------------------------------------------------------------- start-up


def startup_bytes(share: float, transient: float) -> float:
    """Peak bytes of a rank while the model is built (pretrain/sharded_init.py): its own share once it is all
    materialized (fp32, or its ZeRO-3 partition in the training precision) plus the largest set of full
    parameters in flight at once (model/init.py transient_peak: the value being drawn, the draws later
    overwritten, the shard copied out of it -- one layer's worth at most)."""
    return share + transient
