"""Process-group setup and the few collective helpers the loop needs.

Works for 1 process (plain `python`), torchrun, SLURM/torchrun and the DeepSpeed launcher: the
rank comes from the environment those set. On a machine without CUDA, DeepSpeed is pointed at
its CPU accelerator and gloo before it is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def prefer_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; without CUDA it must be told 'cpu'."""
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


def all_reduce_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sums a few floats across the ranks of `group` (default: all) in one collective (float64, so
    sums of many tokens stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(t, group=group)
    return t.tolist()


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
