"""DeepSpeed's ZeRO settings for a run: the zero_optimization block (the stage; ZeRO-Offload and ZeRO-Infinity
from the zero.offload_* keys; what DeepSpeed-Ulysses needs of ZeRO-3), the aio block, the optimizer that steps
offloaded states, and what the machine must offer for them.

    zero.offload_optimizer: cpu    fp32 master weights + Adam states in CPU memory, stepped there by
                                   DeepSpeed's CPU Adam (ZeRO-Offload; ZeRO 1-3)
    zero.offload_optimizer: nvme   the same states on an NVMe folder, swapped through CPU buffers (ZeRO-Infinity;
                                   ZeRO-3)
    zero.offload_params: cpu|nvme  ZeRO-3's 16-bit parameter partitions in CPU memory or on NVMe, fetched for
                                   each layer's forward and backward (ZeRO-Infinity)

The config rules (which stage allows what) are pretrain/config.py's; `check_offload_environment` (called by
pretrain/preflight.py before any process group) checks what only the machine can answer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kernels.errors import EnvironmentCheckError

LIBAIO_HINT = (
    "install the libaio headers and library (Debian/Ubuntu: apt-get install libaio-dev; RHEL: dnf install "
    "libaio-devel), then run again: DeepSpeed builds its async_io op on first use"
)


# DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
REDUCE_BUCKET_DEFAULT = 500_000_000


def zero_optimization(cfg) -> dict:
    """DeepSpeed's zero_optimization block for this run."""
    z = cfg.zero
    block: dict = {"stage": z.stage}
    if z.stage == 3 and cfg.parallel.ulysses > 1:
        # Ulysses ranks hold slices of the same sequences: their gradients must be summed, the replicas' averaged.
        # DeepSpeed 0.19's ZeRO-3 does so on its all-reduce path (stage3.py __avg_scatter_contiguous_grads divides
        # by dp x sp / sp) but its default reduce-scatter path averages over all of dp x sp
        # (coalesced_collectives.reduce_scatter_coalesced pre-divides by the group size): gradients 1/ulysses too
        # small. So all-reduce, in buckets that hold any single parameter (a larger one would take the other path).
        # tests/test_ulysses.py compares the gradients with one process's.
        block["reduce_scatter"] = False
        block["reduce_bucket_size"] = max(REDUCE_BUCKET_DEFAULT, largest_partition(cfg, partitions=1))
    if z.offload_optimizer != "none":
        block["offload_optimizer"] = {"device": z.offload_optimizer, "pin_memory": z.pin_memory}
        if z.offload_optimizer == "nvme":
            block["offload_optimizer"]["nvme_path"] = z.nvme_path
    if z.offload_params != "none":
        block["offload_param"] = {"device": z.offload_params, "pin_memory": z.pin_memory}
        if z.offload_params == "nvme":
            block["offload_param"].update(
                nvme_path=z.nvme_path,
                max_in_cpu=z.nvme_params_in_cpu,
                buffer_count=z.nvme_param_buffers,
                buffer_size=z.nvme_param_buffer_size or largest_partition(cfg),
            )
    return block


def aio_section(cfg) -> dict:
    """DeepSpeed's top-level aio block (only with NVMe offload)."""
    z = cfg.zero
    if "nvme" not in (z.offload_optimizer, z.offload_params):
        return {}
    return {
        "aio": {
            "block_size": z.aio_block_size,
            "queue_depth": z.aio_queue_depth,
            "intra_op_parallelism": z.aio_intra_op_parallelism,
            "single_submit": z.aio_single_submit,
            "overlap_events": z.aio_overlap_events,
        }
    }


def largest_partition(cfg, world_size: int | None = None, partitions: int | None = None) -> int:
    """Elements of the largest ZeRO-3 partition of one parameter on one rank (of its tensor-parallel shard with
    partitions=1): DeepSpeed's NVMe parameter buffers must each hold one (partitioned_param_swapper.py asserts it)."""
    from model.inventory import model_inventory

    p = cfg.parallel
    if partitions is None:
        world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        partitions = max(1, world // (p.tp * p.pp))  # dp x ulysses
    inv = model_inventory(cfg.model)
    largest = max(inv.shard(n, p.tp) for n in inv.numel)
    return -(-largest // partitions)


def offload_adam(param_groups: list[dict], t):
    """DeepSpeed's CPU Adam in AdamW mode (decoupled weight decay, as torch.optim.AdamW): ZeRO-Offload steps
    the offloaded fp32 states with it on the CPU (DeepSpeed refuses a torch optimizer there)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(
        param_groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, weight_decay=t.weight_decay, adamw_mode=True
    )


def check_offload_environment(cfg) -> None:
    """What offloading needs from this machine, before any process group starts: DeepSpeed's CPU Adam op
    (built on first use with the C++ compiler), and for NVMe a writable folder and the async_io op (libaio)."""
    z = cfg.zero
    if z.offload_optimizer == z.offload_params == "none":
        return
    from pretrain.distributed import prefer_cpu_accelerator_if_no_gpu

    prefer_cpu_accelerator_if_no_gpu()  # DeepSpeed picks its accelerator when first imported
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if z.offload_optimizer != "none" and not accelerator.create_op_builder("CPUAdamBuilder").is_compatible():
        raise EnvironmentCheckError(
            f"zero.offload_optimizer: '{z.offload_optimizer}' steps the optimizer with DeepSpeed's CPU Adam, which "
            "cannot be built on this machine (a C++ compiler and the Python headers are needed: apt-get install "
            "build-essential python3-dev); or set zero.offload_optimizer: none"
        )
    if "nvme" not in (z.offload_optimizer, z.offload_params):
        return
    folder = Path(z.nvme_path)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise EnvironmentCheckError(
            f"zero.nvme_path: '{z.nvme_path}' is not a folder this user can write ({probe} is not writable); "
            "point it at a folder on a local NVMe drive"
        )
    builder = accelerator.create_op_builder("AsyncIOBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        raise EnvironmentCheckError(
            "zero.offload_optimizer/offload_params: 'nvme' needs DeepSpeed's async_io op, which cannot be built "
            f"here (libaio is missing): {LIBAIO_HINT}"
        )
    free = shutil.disk_usage(probe).free
    need = nvme_bytes_per_node(cfg)
    if free < need:
        raise EnvironmentCheckError(
            f"zero.nvme_path: {free / 2**30:.1f} GiB free on {probe}, the offloaded states of this node's ranks "
            f"need about {need / 2**30:.1f} GiB; free space or use a larger drive"
        )


def nvme_bytes_per_node(cfg, world_size: int | None = None, local_ranks: int | None = None) -> int:
    """About what this node's ranks write to zero.nvme_path: their shares of the offloaded states (16-bit
    parameters; fp32 master weights and Adam moments), all ranks of a node sharing one drive."""
    from model.inventory import model_inventory

    z = cfg.zero
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    local = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    total = model_inventory(cfg.model).total  # the whole model once; ranks hold 1/world of it under ZeRO-3
    per_param = (2 if z.offload_params == "nvme" else 0) + (12 if z.offload_optimizer == "nvme" else 0)
    return int(total * per_param * min(local, world) / world)


def offload_summary(cfg) -> str | None:
    """One run-log line saying where offloaded states go (None without offloading)."""
    z = cfg.zero
    if z.offload_optimizer == z.offload_params == "none":
        return None
    where = []
    if z.offload_optimizer != "none":
        place = "CPU memory" if z.offload_optimizer == "cpu" else z.nvme_path
        where.append(f"fp32 master weights and Adam states in {place}, stepped by DeepSpeed's CPU Adam")
    if z.offload_params == "cpu":
        where.append("16-bit parameter partitions in CPU memory")
    elif z.offload_params == "nvme":
        where.append(
            f"16-bit parameter partitions in {z.nvme_path} ({z.nvme_params_in_cpu:,} elements a rank in CPU memory)"
        )
    return f"[zero] ZeRO-{z.stage} offload ({'pinned' if z.pin_memory else 'pageable'} CPU buffers): " + "; ".join(
        where
    )
