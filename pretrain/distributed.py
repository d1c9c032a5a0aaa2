"""Process-group setup and the few collective helpers the loop needs.

Works for 1 process (plain `python`), torchrun, SLURM/torchrun and the DeepSpeed launcher: the
rank comes from the environment those set. On a machine without CUDA, DeepSpeed is pointed at
its CPU accelerator and gloo before it is imported.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


def prefer_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; without CUDA it must be told 'cpu'.

    Also gives DeepSpeed's JIT-built ops (the CPU comm op, CPU Adam, async-io) a build folder per
    environment: torch's default (~/.cache/torch_extensions/py311_cpu) is shared by every virtualenv of
    one Python, so two environments rebuild over each other, and a build killed mid-way leaves a lock
    that makes every later run wait forever."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    prefer_cpu_accelerator_if_no_gpu()
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        _init_process_group_per_attempt(backend)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, backend)


def _init_process_group_per_attempt(backend: str) -> None:
    """Under torchrun --max-restarts, every attempt's workers share the agent's TCPStore, and
    torch prefixes the keys by group name only: a restarted rank can read a dead peer's address
    left by the previous attempt and fail with "Gloo connectFullMesh ... Connection refused".
    Prefixing the store with the restart count gives each attempt its own keys."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return  # not under torchelastic: deepspeed.init_distributed does the usual env:// setup
    from deepspeed.constants import default_pg_timeout

    store, rank, world_size = next(torch.distributed.rendezvous("env://", timeout=default_pg_timeout))
    store = torch.distributed.PrefixStore(f"attempt_{restart}", store)
    torch.distributed.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=default_pg_timeout
    )


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ------------------------------------------------------------------------------ collectives
# Every tensor collective of pretrain/ goes through all_reduce below (tests/test_collectives.py scans the
# package for any that does not): NCCL takes only CUDA tensors on the current device and gloo is safest
# with CPU ones, so the tensor moves to the group's device and its result comes back where it was.
# The tensor-parallel layers (model/tensor_parallel.py) run their collectives on the activations, which
# are on the compute device by construction, and may not import this module (model/ is below pretrain/).


def group_device(group=None) -> torch.device:
    """The device the tensors of a collective on `group` (default: all ranks) must be on."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM, group=None) -> torch.Tensor:
    """`tensor` reduced over `group` (default: all ranks), on `tensor`'s device; the tensor itself without
    a process group or on a group of one."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return tensor
    device = group_device(group)
    on_group = tensor.to(device, copy=tensor.device == device)  # a copy either way: the caller's stays intact
    torch.distributed.all_reduce(on_group, op=op, group=group)
    return on_group.to(tensor.device)


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all) in rank order within `group`, on `tensor`'s device."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return [tensor]
    device = group_device(group)
    on_group = tensor.to(device).contiguous()
    parts = [torch.empty_like(on_group) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, on_group, group=group)
    return [part.to(tensor.device) for part in parts]


def all_reduce_sum(values: list[float], device: torch.device | None = None, group=None) -> list[float]:
    """Sums a few floats across the ranks of `group` (default: all) in one collective (float64, so
    sums of many tokens stay exact). `device` is accepted for callers that pass it; the collective
    runs on the group's device whatever it is."""
    return all_reduce(torch.tensor(values, dtype=torch.float64), group=group).tolist()


def all_gather_object(obj, group=None) -> list:
    """Every rank's `obj`, in rank order within `group` (a list of one without a process group)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0):
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def ensure_process_group() -> None:
    """A single-rank gloo group when none exists (some megatron-core dataset code calls
    torch.distributed.get_rank() unconditionally); training has its own group already."""
    if torch.distributed.is_initialized():
        return
    import tempfile

    store = torch.distributed.FileStore(os.path.join(tempfile.mkdtemp(prefix="pretrain-pg-"), "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
