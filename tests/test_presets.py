"""The papers' layouts as planner presets (configs/gpt-530b.yaml, gpt-1t-zero-infinity.yaml, gpt-1t-frontier.yaml)
and the 70B and 32k-context presets: each plans on its stated cluster, in the paper's layout, and the paper's
memory figures come out of the planner's own numbers (launch/plan.py, pretrain/memory.py) within the accuracy
its accounting allows -- each figure recomputed here from the paper's own formula, next to the planner's."""

from __future__ import annotations

import pytest

from launch.plan import GIB, estimate, format_plan, load_plan_config, make_plan, parse_memory
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
TIB = 2**40

# preset -> (nodes, GPUs per node, GPU memory, CPU memory per node, NVMe per node)
CLUSTERS = {
    "gpt-530b": (560, 8, "80GB", None, None),  # Selene: DGX A100 80GB nodes
    "gpt-1t-zero-infinity": (1, 16, "32GB", "1.5TB", "27.9TB"),  # one DGX-2: 16 V100 32GB, 1.5 TB, 30.7 TB NVMe
    "gpt-1t-frontier": (384, 8, "64GB", None, None),  # Frontier: 4 MI250X = 8 GCDs of 64 GB per node
    "gpt-70b": (8, 8, "80GB", None, None),
    "gpt-1.3b-32k": (2, 8, "80GB", None, None),
}


def plan_of(name: str, *sets: str):
    nodes, gpus, gpu, cpu, nvme = CLUSTERS[name]
    cfg = load_plan_config(str(CONFIGS / f"{name}.yaml"), list(sets), world_size=nodes * gpus)
    return make_plan(
        cfg,
        nodes,
        gpus,
        parse_memory(gpu),
        search=False,
        cpu_memory=parse_memory(cpu) if cpu else None,
        nvme_memory=parse_memory(nvme) if nvme else None,
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("gpt-*.yaml")))
def test_every_preset_plans(name):
    """Every gpt-* preset validates and plans on its cluster (the older presets on 2 x 8 GPUs)."""
    if name in CLUSTERS:
        plan = plan_of(name)
    else:
        plan = make_plan(load_plan_config(str(CONFIGS / f"{name}.yaml"), [], world_size=16), 2, 8, 80 * GIB)
    assert plan.stages and format_plan(plan)


@pytest.mark.parametrize("name", ["gpt-530b", "gpt-1t-frontier", "gpt-70b", "gpt-1.3b-32k"])
def test_preset_layout_fits(name):
    assert plan_of(name).verdict == "fits"


def test_mt_nlg_530b_layout_and_memory_figures():
    """Smith et al. 2022: 105 layers of hidden 20480 (530B parameters), 8-way tensor x 35-way pipeline x 16-way
    data parallelism on 4,480 A100s, 3 layers per stage, global batch 1920. Its memory figures: "over 10 TB"
    of weights, gradients and optimizer states (20 B per parameter in its accounting); 16.9 TB of checkpointed
    block inputs for a whole batch (2 B x 1920 x 2048 x 20480 x 105)."""
    plan = plan_of("gpt-530b")
    lay, cfg = plan.layout, plan.cfg
    assert (lay.tp, lay.pp, lay.dp, plan.world) == (8, 35, 16, 4480)
    assert plan.accumulation == 120 and cfg.train.global_batch_size == 1920
    assert all(len(s.blocks) == 3 for s in plan.stages)
    total = 529_558_876_160  # the model, tied embedding once: the paper's 530B
    held = sum(8 * s.params for s in plan.stages)  # per replica: + the last stage's tied embedding, replicated norms
    assert 1 < held / total < 1.003
    # Model states of one replica, the optimizer counted once (ZeRO-1 partitions it over dp): DeepSpeed's ZeRO-1
    # allocates 16 B per parameter (bf16 weights and gradients, fp32 master and two Adam moments), the paper
    # counts 20 (fp32 gradients besides): 8.5 TB here, 10.6 TB ("over 10 TB") in its accounting.
    states = sum(8 * (s.parameters + s.gradients + s.optimizer * lay.dp) for s in plan.stages)
    assert states / held == pytest.approx(16, rel=1e-6)
    assert 20 * total > 10e12 and states / held * 20 / 16 * total == pytest.approx(20 * total, rel=1e-6)
    # Checkpointed activations (full recomputation): per block and sequence our blocks keep two 16-bit tensors
    # (x and the normed h the junctions pass on), the paper one; the formula is otherwise the paper's.
    s = plan.stages[1]  # 3 blocks, no embedding or head
    none_per_block = s.activations["none"] / (s.in_flight * 3)
    full_per_block = (s.activations["full"] - none_per_block) / (s.in_flight * 3)  # minus the recompute working set
    assert full_per_block == 2 * 2 * 2048 * 20480  # not split over tp: no sequence parallelism, as in the paper
    paper = 2 * 1920 * 2048 * 20480 * 105
    assert paper == pytest.approx(16.9e12, rel=2e-3)
    assert full_per_block / 2 * 105 * 1920 == paper


def test_zero_infinity_1t_on_one_dgx2():
    """Rajbhandari et al. 2021: a 1T model (128 layers, hidden 25,600) on one DGX-2 with its model states on
    NVMe. The paper's Table 1 for 1T: 18.31 TiB of model states (20 B per parameter), 9.77 GiB of model-state
    working memory per GPU (the largest layer's fp16 weights and gradients, 4 h x h)."""
    plan = plan_of("gpt-1t-zero-infinity")
    (stage,) = plan.stages
    n = 1_007_986_329_600
    assert stage.params == n and (plan.layout.dp, plan.cfg.zero.stage) == (16, 3)
    assert plan.gpu_verdict == "fits"  # 16 x 32 GB: gathered layer + checkpoints of micro-batch 1 x 1024
    nvme, cpu = plan.node_bytes("nvme"), plan.node_bytes("cpu")
    assert nvme <= parse_memory("27.9TB")  # the node's NVMe holds every offloaded state
    # model states: 16-bit weights (but the 1e9 per rank DeepSpeed keeps in CPU memory) and fp32 master, moments,
    # gradients on NVMe; 16-bit gradients in CPU memory
    grads_in_cpu, params_in_cpu = 2 * n, 16 * 2 * 1_000_000_000
    states = nvme + grads_in_cpu + params_in_cpu
    assert states / n == pytest.approx(20, rel=1e-3)
    paper = 20 * 128 * 12 * 25600**2  # the paper counts the 12 h^2 of each block
    assert paper / TIB == pytest.approx(18.31, abs=0.01)
    assert states / TIB == pytest.approx(18.31, rel=0.01)
    # working memory: the largest layer (the MLP's 4h x h) gathered, and its gradient
    assert 4 * 4 * 25600**2 / GIB == pytest.approx(9.77, abs=0.01)
    assert stage.gathered / GIB == pytest.approx(9.77, rel=0.02)
    # What DeepSpeed 0.19 adds in CPU memory: the 16-bit gradient partitions of the whole model (stage3.py
    # grad_partitions_flat_buffer) and pinned swap buffers: more than the DGX-2's 1.5 TB, so the node as a
    # whole does not fit -- the paper streamed gradients to NVMe too. The planner says so.
    assert cpu > grads_in_cpu > parse_memory("1.5TB")
    assert plan.verdict == "does not fit" and "CPU memory" in plan.node_problems[0]


def test_frontier_1t_layout_and_memory_figure():
    """Dash et al. 2023: 1T (128 layers, hidden 25,600) on 3,072 MI250X GCDs of 64 GB, tensor 8 x pipeline 64 x
    data 6, and ~14 TB of weights and optimizer states (14 B per parameter) before activations."""
    plan = plan_of("gpt-1t-frontier")
    lay = plan.layout
    assert (lay.tp, lay.pp, lay.dp, plan.world) == (8, 64, 6, 3072)
    assert all(len(s.blocks) == 2 for s in plan.stages)
    assert plan.verdict == "fits" and plan.worst.peak <= 0.9 * 64 * GIB
    weights_and_optimizer = sum(8 * (s.parameters + s.optimizer * lay.dp) for s in plan.stages)
    held = sum(8 * s.params for s in plan.stages)
    assert weights_and_optimizer / held == pytest.approx(14, rel=1e-6)
    assert weights_and_optimizer / 1e12 == pytest.approx(14.1, abs=0.1)  # the paper's "~14 TB"


def test_seventy_b_starts_sharded_where_the_whole_build_could_not():
    plan = plan_of("gpt-70b")
    w = plan.worst
    assert w.startup <= plan.usable < w.startup_whole  # ~60 GiB sharded, ~290 GiB whole, of 72 usable


def test_long_context_preset_divides_the_sequence_by_ulysses():
    plan = plan_of("gpt-1.3b-32k")
    assert plan.layout.ulysses == 8 and plan.cfg.model.seq_len == 32768
    (u8,) = plan.stages
    (u1,) = estimate(load_plan_config(str(CONFIGS / "gpt-1.3b-32k.yaml"), ["parallel.ulysses=1"]), 16)
    # activations: 1/8 of the tokens per GPU (the output layer's too); model states the same: ZeRO partitions
    # over dp x ulysses = 16 ranks either way
    assert u8.activations["none"] == pytest.approx(u1.activations["none"] / 8, rel=1e-9)
    assert (u8.parameters, u8.gradients, u8.optimizer) == (u1.parameters, u1.gradients, u1.optimizer)
