"""The parallel layout: ranks as (pp, dp, sp, tp) with tp fastest, process groups from megatron-core's
parallel_state, and the adapter DeepSpeed needs to know which group is which.

    rank = ((pp_rank * dp + dp_rank) * ulysses + sp_rank) * tp + tp_rank

sp is DeepSpeed-Ulysses sequence parallelism (parallel.ulysses). It sits where Megatron puts context
parallelism (its default order tp-cp-dp-pp), so megatron-core's context-parallel groups are the Ulysses
groups: the ranks of one Ulysses group hold the same parameters and the same samples, each a slice of
every sequence. Without Ulysses (sp = 1) this is DeepSpeed's PipeModelDataParallelTopology order.

Gradients: each rank's loss covers its sequence slice only, so a parameter's gradient is summed over
the Ulysses ranks and averaged over data parallelism -- which is how DeepSpeed treats its "sequence data
parallel" group (dp x sp): it reduces over it and divides by dp alone (engine.py, stage_1_and_2.py,
stage3.py). ZeRO partitions over the same dp x sp group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int  # data-parallel replicas: ranks that read different samples
    sequence_parallel: bool = False
    ulysses: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.ulysses

    @property
    def zero_partitions(self) -> int:
        """Ranks ZeRO partitions over (DeepSpeed's sequence-data-parallel group): dp x ulysses."""
        return self.dp * self.ulysses

    @property
    def needs_groups(self) -> bool:
        return self.tp > 1 or self.pp > 1 or self.ulysses > 1

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        pp_rank, dp_rank, _, tp_rank = self.place(rank)
        return pp_rank, dp_rank, tp_rank

    def place(self, rank: int) -> tuple[int, int, int, int]:
        """(pp_rank, dp_rank, sp_rank, tp_rank) of a global rank."""
        tp_rank = rank % self.tp
        sp_rank = (rank // self.tp) % self.ulysses
        dp_rank = (rank // (self.tp * self.ulysses)) % self.dp
        return rank // (self.tp * self.ulysses * self.dp), dp_rank, sp_rank, tp_rank

    def sp_rank(self, rank: int) -> int:
        return self.place(rank)[2]

    def rank_map(self) -> str:
        """One line per rank, for the run log."""
        if self.ulysses == 1:
            return "\n".join(
                "  rank {:3d}: pp {} dp {} tp {}".format(rank, *self.coords(rank)) for rank in range(self.world)
            )
        return "\n".join(
            "  rank {:3d}: pp {} dp {} sp {} tp {}".format(rank, *self.place(rank)) for rank in range(self.world)
        )


def layout_for(cfg, world: int) -> Layout:
    p = cfg.parallel
    return Layout(
        tp=p.tp,
        pp=p.pp,
        dp=world // (p.tp * p.pp * p.ulysses),
        sequence_parallel=p.sequence_parallel,
        ulysses=p.ulysses,
    )


def initialize_groups(layout: Layout) -> None:
    """Creates the tensor-, pipeline-, Ulysses (megatron-core's context-parallel) and data-parallel groups
    (gloo or NCCL, whatever the default group uses). Its default order tp-cp-dp-pp is Layout's."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.ulysses,
    )


def data_parallel_group(layout: Layout):
    """The group over which data-parallel replicas sum their statistics (None = every rank). The ranks of a
    Ulysses group are not in it: they hold the same samples."""
    if not layout.needs_groups:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def zero_group(layout: Layout):
    """The group ZeRO partitions over and gradients are reduced over: dp x ulysses (None = every rank)."""
    if not layout.needs_groups:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


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


def ulysses_group(layout: Layout):
    """The ranks that share each sequence under DeepSpeed-Ulysses (None without it)."""
    if layout.ulysses == 1:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


def needs_mpu(layout: Layout) -> bool:
    """DeepSpeed's plain engine must be told the groups under tensor parallelism or Ulysses; its pipeline
    engine takes them from the PipelineModule's topology instead."""
    return layout.pp == 1 and (layout.tp > 1 or layout.ulysses > 1)


class DeepSpeedMPU:
    """What DeepSpeed's engine asks an `mpu` for, answered from megatron-core's groups. DeepSpeed's
    "model parallel" is tensor parallelism: it counts tensor-parallel shards once each (and replicated
    parameters once) in the gradient norm. Its "data parallel" group is the replicas (the batch arithmetic:
    train_batch = micro x accumulation x dp); its "sequence data parallel" group, dp x ulysses, is what ZeRO
    partitions over and reduces gradients over (summed over the Ulysses ranks, averaged over dp). Without
    Ulysses the two are the same group."""

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

    def get_sequence_parallel_rank(self) -> int:
        return self.ps.get_context_parallel_rank()

    def get_sequence_parallel_world_size(self) -> int:
        return self.ps.get_context_parallel_world_size()

    def get_sequence_parallel_group(self):
        return self.ps.get_context_parallel_group()

    def get_sequence_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_sequence_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)
