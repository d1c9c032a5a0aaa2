"""The parallel layout: ranks as (pp, dp, tp) with tp fastest (Megatron's order, and DeepSpeed's
PipeModelDataParallelTopology's), process groups from megatron-core's parallel_state, and the
adapter DeepSpeed needs to know which group is which.

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    sequence_parallel: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        return rank // (self.tp * self.dp), dp_rank, tp_rank

    def rank_map(self) -> str:
        """One line per rank, for the run log."""
        return "\n".join(
            "  rank {:3d}: pp {} dp {} tp {}".format(rank, *self.coords(rank)) for rank in range(self.world)
        )


def layout_for(cfg, world: int) -> Layout:
    p = cfg.parallel
    return Layout(tp=p.tp, pp=p.pp, dp=world // (p.tp * p.pp), sequence_parallel=p.sequence_parallel)


def initialize_groups(layout: Layout) -> None:
    """Creates the tensor-, pipeline- and data-parallel groups (megatron-core; gloo or NCCL, whatever
    the default group uses). Its default order puts tp fastest and pp slowest, as Layout does."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp
    )


def data_parallel_group(layout: Layout):
    """The group over which data-parallel ranks sum their statistics (None = every rank)."""
    if layout.tp == 1 and layout.pp == 1:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def tensor_parallel_group(layout: Layout):
    """The tensor-parallel group (None without tensor parallelism)."""
    if layout.tp == 1:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def pipeline_parallel_group(layout: Layout):
    """The group of this rank's pipeline stages (None without pipeline parallelism)."""
    if layout.pp == 1:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


class DeepSpeedMPU:
    """What DeepSpeed's engine asks an `mpu` for, answered from megatron-core's groups. DeepSpeed's
    "model parallel" is tensor parallelism: it reduces gradients over the data-parallel group only,
    and counts tensor-parallel shards once each (and replicated parameters once) in the gradient norm."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()
