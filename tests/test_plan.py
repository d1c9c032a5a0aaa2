"""The dry-run planner (launch/plan.py) and the memory formulas under it (pretrain/memory.py):
hand-computed ZeRO 0-3 and activation figures, divisibility errors with the sizes that would work,
every cluster preset planned on its suggested layout, and the estimate against the bytes a live
2-process DeepSpeed engine holds on CPU for ZeRO 0-3 (and the tp / pp shards)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.plan import PlanError, estimate, load_plan_config, make_plan, parse_memory, with_changes
from model.inventory import model_inventory
from pretrain.config import ConfigError
from pretrain.memory import BlockShape, activation_bytes, expected_bytes, korthikanti_bytes, zero_state_bytes
from tests.conftest import ROOT, _env, run_module, tiny_args

GIB = 2**30
CONFIGS = ROOT / "configs"


# ------------------------------------------------------------------ model states, by hand

N, DP = 1000, 4
# (precision, stage) -> (parameters, gradients, optimizer) bytes for N=1000 parameters over dp=4:
# fp32: weights 4 B, grads 4 B, Adam m+v 8 B; ZeRO-1/2 add an fp32 copy of the partition (12 B / dp).
# bf16: weights 2 B, grads 2 B, fp32 master + m + v = 12 B (full at ZeRO-0, 1/dp from ZeRO-1 on).
HAND = {
    ("fp32", 0): (4000, 4000, 8000),
    ("fp32", 1): (4000, 4000, 3000),
    ("fp32", 2): (4000, 1000, 3000),
    ("fp32", 3): (1000, 1000, 2000),
    ("bf16", 0): (2000, 2000, 12000),
    ("bf16", 1): (2000, 2000, 3000),
    ("bf16", 2): (2000, 500, 3000),
    ("bf16", 3): (500, 500, 3000),
}


@pytest.mark.parametrize("precision, stage", list(HAND))
def test_zero_state_bytes_by_hand(precision, stage):
    got = zero_state_bytes(N, stage, DP, precision)
    assert (got["parameters"], got["gradients"], got["optimizer"]) == HAND[precision, stage]


def test_zero_state_details_by_hand():
    # bf16 under the pipeline engine (BF16_Optimizer): fp32 master + states partitioned, 2 x 2 B grads.
    got = zero_state_bytes(N, 0, DP, "bf16", pipeline=True)
    assert (got["parameters"], got["gradients"], got["optimizer"]) == (2000, 4000, 3000)
    # ZeRO-3 with a padded partition of 260 elements and 100 persistent (whole) elements.
    got = zero_state_bytes(N, 3, DP, "fp32", zero3_partition=260, zero3_persistent=100)
    assert (got["parameters"], got["gradients"], got["optimizer"]) == (4 * 360, 4 * 260, 8 * 260)
    # what train.py's memory.json compares against (parameters + optimizer, fp32)
    assert expected_bytes(N, 1, DP) == {"parameters": 4000, "optimizer": 3000}
    for bad in (dict(stage=4), dict(precision="fp8"), dict(dp=0)):
        with pytest.raises(ValueError):
            zero_state_bytes(N, **{"stage": 1, "dp": DP, "precision": "fp32", **bad})


# -------------------------------------------------------------------- activations, by hand


GPT3_BLOCK = BlockShape(hidden=2048, heads=16, kv_heads=16, ffn=4 * 2048, mlp="gelu", norms=2, dropout=True)


@pytest.mark.parametrize(
    "tp, sp, want",
    [
        (1, False, 2048 * 2048 * 114),  # s b h (34 + 5 a s / h) = 34 + 5*16*2048/2048 = 114
        (2, False, 2048 * 2048 * 62),  # s b h (10 + 24/t + 5 a s / (h t)) = 10 + 12 + 40
        (2, True, 2048 * 2048 * 57),  # s b h (34 + 5 a s / h) / t = 114 / 2
    ],
)
def test_activations_reproduce_korthikanti(tp, sp, want):
    """Korthikanti et al. (2022), GPT-3 block, s=2048, b=1, h=2048, a=16, 16-bit: the paper's numbers."""
    got = activation_bytes(GPT3_BLOCK, 2048, 1, tp=tp, sequence_parallel=sp, act_bytes=2, scores="materialized")
    assert got["none"] == want
    assert korthikanti_bytes(2048, 1, 2048, 16, tp, sp) == want
    # selective recompute drops the 5as/h attention-core term; full keeps the block inputs only
    assert got["selective"] == pytest.approx(want - 2048 * 2048 * 5 * 16 * 2048 / 2048 / tp)
    assert got["full"] == 2048 * 2 * 2 * 2048 / (tp if sp else 1)


def test_activations_of_a_swiglu_block_by_hand():
    """This project's block, fused attention: per token Q h + K,V 2 hkv + proj h + SwiGLU 4 f (split),
    2 norm inputs + QKV/fc1 inputs 4 h (replicated), attention output h + fp32 log-sum-exp 4 a."""
    shape = BlockShape(hidden=64, heads=4, kv_heads=2, ffn=192, mlp="swiglu", norms=2)
    hkv = 2 * 16
    per_token = 4 * (64 + 2 * hkv + 64 + 4 * 192) + 4 * (2 * 64 + 2 * 64) + (4 * 64 + 4 * 4)
    assert activation_bytes(shape, 64, 4, act_bytes=4)["none"] == 256 * per_token


# ------------------------------------------------------------------------- inputs and CLI


def test_parse_memory():
    assert parse_memory("80GB") == 80 * GIB == parse_memory("80GiB") == parse_memory("80")
    assert parse_memory("81559MiB") == 81559 * 2**20
    for bad in ("eighty", "80XB", "-1GB", "0"):
        with pytest.raises(ValueError, match="--gpu-memory"):
            parse_memory(bad)


def plan_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "launch.plan", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -------------------------------------------------------------------------------- presets


# name -> (paper parameters, nodes x GPUs of the suggested layout, tokens per step)
PRESETS = {
    "gpt-125m": (125e6, (1, 8), 256 * 2048),
    "gpt-350m": (350e6, (1, 8), 256 * 2048),
    "gpt-760m": (760e6, (2, 8), 256 * 2048),
    "gpt-1.3b": (1.3e9, (2, 8), 512 * 2048),
    "gpt-6.7b": (6.7e9, (4, 8), 1024 * 2048),
    "gpt-13b": (13e9, (4, 8), 1024 * 2048),
}


def hand_params(d: int, layers: int, ffn: int, vocab: int) -> int:
    """Pre-LN, RMSNorm, SwiGLU, multi-head, tied embeddings: V d + L (4 d^2 + 3 d f + 2 d) + d."""
    return vocab * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_validates_and_fits_its_suggested_layout(name):
    paper, (nodes, gpus), tokens = PRESETS[name]
    cfg = load_plan_config(str(CONFIGS / f"{name}.yaml"), [])
    m = cfg.model
    n = hand_params(m.hidden_size, m.num_layers, m.ffn_hidden_size, m.vocab_size)
    assert model_inventory(m).total == n
    assert abs(n - paper) / paper < 0.06, f"{name}: {n:,} parameters vs the paper's {paper:,.0f}"
    assert m.hidden_size // m.num_heads in (64, 96, 128)
    plan = make_plan(cfg, nodes, gpus, 80 * GIB)
    assert plan.verdict == "fits", f"{name} on {nodes}x{gpus}: {plan.worst.total / GIB:.1f} GiB"
    assert plan.tokens_per_step == tokens
    assert plan.world == nodes * gpus and plan.layout.world == plan.world


def test_planner_output_for_1_3b_on_two_nodes_by_hand():
    """gpt-1.3b, 2 x 8 GPUs, dp 16, ZeRO-1, bf16, micro 8 x seq 2048, every number worked out by hand."""
    proc = plan_cli("--config", str(CONFIGS / "gpt-1.3b.yaml"), "--nodes", "2", "--gpus-per-node", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["layout"] == {"tp": 1, "pp": 1, "dp": 16, "ulysses": 1, "sequence_parallel": False}
    assert plan["accumulation"] == 4 and plan["tokens_per_step"] == 1_048_576
    assert plan["ranks"][9] == {"node": 1, "gpu": 1, "pp": 0, "dp": 9, "sp": 0, "tp": 0}
    (stage,) = plan["stages"]
    n = hand_params(2048, 24, 5504, 50304)
    assert stage["params"] == n == 1_317_373_952
    assert stage["parameters"] == 2 * n and stage["gradients"] == 2 * n and stage["optimizer"] == 12 * n / 16
    # activations per token of one block (2-byte): split 2(h + 2h + h) + 8f, replicated 8h, core 2h + 4a
    per_block = 2 * 4 * 2048 + 8 * 5504 + 8 * 2048 + (2 * 2048 + 4 * 16)
    tokens = 8 * 2048
    head = tokens * 10 * 50304  # bf16 logits + their fp32 copy + fp32 softmax
    embed = tokens * 2 * 2048
    assert stage["activations"]["none"] == 24 * tokens * per_block + embed + head
    assert plan["verdict"] == "fits"


# ------------------------------------------------------------------ divisibility errors


def test_tp_that_does_not_divide_the_heads_lists_the_sizes_that_would():
    proc = plan_cli(
        "--config", str(CONFIGS / "gpt-1.3b.yaml"), "--nodes", "2", "--gpus-per-node", "8", "--set", "parallel.tp=3"
    )
    assert proc.returncode == 2
    assert "parallel.tp: 3 does not divide model.num_heads=16" in proc.stderr
    assert "sizes that would: 1, 2, 4, 8, 16" in proc.stderr


def test_world_that_is_not_a_multiple_of_tp_x_pp():
    cfg = load_plan_config(str(CONFIGS / "gpt-1.3b.yaml"), ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(PlanError) as e:
        make_plan(cfg, 3, 2, 80 * GIB)  # 6 GPUs, tp x pp = 4
    text = str(e.value)
    assert "world size 6 is not a multiple of parallel.tp x parallel.pp = 2 x 2 = 4" in text
    assert "world sizes that work with this layout: 4, 8, 12" in text
    # tp | 2 GPUs per node, pp | 24 layers, and the batch: 512 / (micro 8 x dp) whole needs dp in {1, 2}
    # (dp 6 and dp 3 give 48 and 24): tp 1 x pp 3 (dp 2), tp 1 x pp 6 (dp 1), tp 2 x pp 3 (dp 1)
    assert "layouts that divide 6 GPUs for this model: tp 1 x pp 3, tp 1 x pp 6, tp 2 x pp 3" in text


def test_batch_that_does_not_divide_over_dp_lists_batches_and_node_counts():
    cfg = load_plan_config(str(CONFIGS / "gpt-1.3b.yaml"), ["parallel.tp=2"])
    with pytest.raises(PlanError) as e:
        make_plan(cfg, 3, 8, 80 * GIB)  # dp = 24 / 2 = 12; micro 8 x 12 = 96 does not divide 512
    text = str(e.value)
    assert (
        "train.global_batch_size: 512 is not a multiple of micro_batch_size x data-parallel size = 8 x 12 = 96" in text
    )
    assert "valid sizes include 96, 192, 288, 384, 480" in text
    assert "node counts of 8 GPUs that work as configured: 1, 2, 4, 8, 16" in text  # dp 4..64: 512/(8 dp) whole


def test_micro_batch_alternatives_are_listed():
    cfg = load_plan_config(str(CONFIGS / "gpt-125m.yaml"), ["train.micro_batch_size=3"])
    with pytest.raises(PlanError) as e:
        make_plan(cfg, 1, 8, 80 * GIB)  # 256 / (3 x 8) is not whole; micro 1, 2, 4 are
    assert "train.micro_batch_size in 1, 2, 4 keeps global_batch_size 256 over dp 8" in str(e.value)


def test_pipeline_that_does_not_divide_the_layers():
    cfg = load_plan_config(str(CONFIGS / "gpt-1.3b.yaml"), ["parallel.pp=5"])
    with pytest.raises(PlanError) as e:
        make_plan(cfg, 5, 8, 80 * GIB)  # world 40 = pp 5 x dp 8; 24 layers over 5 stages
    assert "parallel.pp: 5 does not divide model.num_layers=24" in str(e.value)
    assert "pipeline sizes that divide it: 1, 2, 3, 4, 6, 8, 12, 24" in str(e.value)
    with pytest.raises(ConfigError, match="cannot be combined with pipeline parallelism"):
        load_plan_config(str(CONFIGS / "gpt-1.3b.yaml"), ["parallel.pp=2", "zero.stage=2"])


def test_a_job_that_does_not_fit_lists_changes_that_do():
    proc = plan_cli(
        "--config",
        str(CONFIGS / "gpt-6.7b.yaml"),
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--gpu-memory",
        "40GB",
        "--set",
        "train.micro_batch_size=8",
    )
    assert proc.returncode == 1, proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "changes that would" in proc.stdout
    cfg = load_plan_config(str(CONFIGS / "gpt-6.7b.yaml"), ["train.micro_batch_size=8"])
    plan = make_plan(cfg, 1, 8, 40 * GIB)
    assert plan.suggestions
    for changes, total in plan.suggestions:  # each suggestion, planned on its own, really fits
        again = make_plan(with_changes(cfg, changes), 1, 8, 40 * GIB, search=False)
        assert again.verdict == "fits" and again.worst.peak == pytest.approx(total)


def test_rank_map_is_pp_dp_tp_with_tp_fastest():
    cfg = load_plan_config(str(CONFIGS / "tiny.yaml"), ["parallel.tp=2", "parallel.pp=2"], vocab_size=2048)
    plan = make_plan(cfg, 2, 4, 80 * GIB)
    ranks = plan.to_dict()["ranks"]
    want = [
        (0, 0, 0, 0),
        (0, 0, 0, 1),
        (0, 0, 1, 0),
        (0, 0, 1, 1),  # (node, pp, dp, tp)
        (1, 1, 0, 0),
        (1, 1, 0, 1),
        (1, 1, 1, 0),
        (1, 1, 1, 1),
    ]
    assert [(r["node"], r["pp"], r["dp"], r["tp"]) for r in ranks] == want


# ------------------------------------------------- DeepSpeed-Ulysses, offloading, start-up (issue 22)


@pytest.mark.parametrize("scores", ["fused", "materialized"])
def test_ulysses_divides_every_activation_term_by_its_size(scores):
    """Each rank keeps seq/u tokens; its attention core sees the whole sequence for a/u heads, the same per-token
    count (a materialized score row is still seq long): the block's bytes are the whole-sequence figure / u."""
    shape = BlockShape(hidden=2048, heads=16, kv_heads=16, ffn=5504, mlp="swiglu", norms=2)
    whole = activation_bytes(shape, 32768, 1, scores=scores)
    split = activation_bytes(shape, 32768, 1, scores=scores, ulysses=8)
    for mode in ("none", "selective", "full"):
        assert split[mode] == pytest.approx(whole[mode] / 8, rel=1e-12)


def test_ulysses_layout_in_the_plan():
    cfg = load_plan_config(
        str(CONFIGS / "tiny.yaml"),
        ["parallel.ulysses=2", "parallel.tp=2", "train.micro_batch_size=4", "zero.stage=2"],
        vocab_size=2048,
    )
    plan = make_plan(cfg, 2, 4, 80 * GIB)
    d = plan.to_dict()
    assert d["layout"] == {"tp": 2, "pp": 1, "dp": 2, "ulysses": 2, "sequence_parallel": False}
    # tp fastest, then the Ulysses rank, then dp: rank = (dp * 2 + sp) * 2 + tp
    assert [(r["dp"], r["sp"], r["tp"]) for r in d["ranks"]] == [
        (dp, sp, tp) for dp in range(2) for sp in range(2) for tp in range(2)
    ]
    (stage,) = plan.stages
    (one,) = estimate(with_changes(cfg, {"parallel.ulysses": 1}), 4)  # tp 2 x dp 2
    assert stage.gradients == pytest.approx(one.gradients / 2, rel=1e-3)  # ZeRO-2 over dp x sp = 4, not 2
    assert stage.activations["none"] < one.activations["none"] / 1.9  # half the tokens (the head's too)


def test_offloaded_states_by_hand():
    """pretrain/memory.py offloaded(): N = 1000 parameters in partitions of 250, bf16 (2 B)."""
    from pretrain.memory import offloaded

    st = zero_state_bytes(N, 1, DP, "bf16")
    got = offloaded(st, 250, 1, "bf16", "cpu")
    assert got["gpu"] == {"parameters": 2000, "gradients": 2000, "optimizer": 0.0}  # ZeRO-1 keeps whole grads
    assert got["cpu"] == 16 * 250 and got["nvme"] == 0  # fp32 master, its gradient, Adam m and v
    st = zero_state_bytes(N, 3, DP, "bf16")
    got = offloaded(st, 250, 3, "bf16", "cpu", "cpu", persistent=10)
    assert got["gpu"] == {"parameters": 2 * 10, "gradients": 0.0, "optimizer": 0.0}
    assert got["cpu"] == (12 + 2) * 250 + 4 * 250 + 2 * 250  # master, m, v, 16-bit grads, sub-group grad, params
    got = offloaded(st, 250, 3, "bf16", "nvme", "nvme", param_buffers=5 * 100, params_in_cpu=50)
    assert got["nvme"] == 16 * 250 + 2 * 200  # master, m, v, fp32 grads; the 16-bit parameters beyond 50
    assert got["cpu"] == 2 * 250 + 4 * 4 * 250 + 2 * (50 + 500)  # 16-bit grads, swap buffers, 50 params, buffers


def test_offload_per_node_against_cpu_memory():
    sets = ["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_params=cpu"]
    cfg = load_plan_config(str(CONFIGS / "gpt-1.3b.yaml"), sets)
    plan = make_plan(cfg, 1, 8, 80 * GIB, search=False, cpu_memory=64 * GIB)
    (stage,) = plan.stages
    assert stage.optimizer == 0 and stage.gradients == 0 and stage.cpu > 0
    assert plan.node_bytes("cpu") == pytest.approx(8 * stage.cpu)
    # 1.3B x (12 + 2 + 2) B over 8 ranks plus a sub-group's fp32 gradient each: ~21 GB per node
    assert plan.node_bytes("cpu") == pytest.approx(1_317_373_952 * 16 + 8 * 4 * 1_317_373_952 / 8, rel=1e-3)
    assert plan.verdict == "fits"
    small = make_plan(cfg, 1, 8, 80 * GIB, search=False, cpu_memory=16 * GIB)
    assert small.gpu_verdict == "fits" and small.verdict == "does not fit"
    assert "CPU memory per node" in small.node_problems[0]


def test_startup_peak_sharded_against_whole_by_hand():
    """tp 2 on 2 GPUs, fp32, ZeRO-1: the sharded build holds its fp32 half plus the replay's largest in-flight
    tensors (the 2048 x 64 embedding and its copy); the whole build the fp32 model and then its half."""
    cfg = load_plan_config(str(CONFIGS / "tiny.yaml"), ["parallel.tp=2", "train.micro_batch_size=8"], vocab_size=2048)
    (stage,) = estimate(cfg, 2)
    assert stage.startup_build == 4 * TINY_TP2 + 2 * 4 * 2048 * 64
    assert stage.startup_whole >= 4 * TINY_TOTAL + 4 * TINY_TP2


# ---------------------------------------------- pipeline stages against DeepSpeed's PipelineModule


PIPE_WORLD = 6  # one process group serves pp 2, 3 and 6 and tp 2 x pp 3
# (overrides of configs/tiny.yaml, vocabulary, tp, pp): tied and untied embeddings, an embedding heavier
# than a block (vocab 4096) and lighter (vocab 256), uneven stages, both partition methods, tp shards.
PIPELINES = [
    (["model.num_layers=4"], 2048, 1, 2),
    (["model.num_layers=7"], 4096, 1, 3),
    (["model.num_layers=7", "parallel.pp_partition=layers"], 4096, 1, 3),
    (["model.num_layers=6", "model.tie_embeddings=false", "model.placement=post"], 2048, 1, 6),
    (["model.num_layers=5", "model.tie_embeddings=false", "model.placement=pre", "model.mlp=gelu"], 256, 1, 2),
    (["model.num_layers=6", "model.tie_embeddings=false"], 4096, 2, 3),
    (["model.num_layers=12", "model.qk_norm=true", "parallel.pp_partition=layers"], 2048, 1, 6),
    (["model.num_layers=9", "model.placement=lns"], 1024, 1, 2),
]


def _pipeline_config(sets: list[str], vocab: int, tp: int, pp: int):
    return load_plan_config(
        str(CONFIGS / "tiny.yaml"), [*sets, f"parallel.tp={tp}", f"parallel.pp={pp}"], vocab_size=vocab
    )


def _real_pipeline_stages(out_path: str) -> None:
    """Run under torchrun with PIPE_WORLD processes: builds every PIPELINES case the way training
    does (plain model, tensor-parallel shard, model.pipeline.build_pipeline -> DeepSpeed's
    PipelineModule) and writes DeepSpeed's stage boundaries and each stage's parameters."""
    from pretrain.distributed import prefer_cpu_accelerator_if_no_gpu

    prefer_cpu_accelerator_if_no_gpu()
    import deepspeed
    import torch

    from model import build_model
    from model.parallelize import apply_tensor_parallel
    from model.pipeline import build_pipeline
    from pretrain.parallel import Layout

    torch.distributed.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()
    results = []
    for sets, vocab, tp, pp in PIPELINES:
        cfg = _pipeline_config(sets, vocab, tp, pp)
        layout = Layout(tp=tp, pp=pp, dp=PIPE_WORLD // (tp * pp))
        gpt, _ = build_model(cfg.model, "torch", "cpu")
        apply_tensor_parallel(gpt, tp, layout.coords(rank)[2], False)
        pipe = build_pipeline(gpt, layout, cfg.parallel.pp_partition)
        held = sum(p.numel() for p in {id(p): p for p in pipe.parameters()}.values())
        per_rank = [None] * PIPE_WORLD
        torch.distributed.all_gather_object(per_rank, (pipe.stage_id, held))
        results.append({"parts": [int(x) for x in pipe.parts], "ranks": per_rank})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def real_pipeline_stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipelines") / "stages.json"
    proc = run_module(["-m", "tests.test_plan", "--real-pipeline-stages", str(out)], nproc=PIPE_WORLD, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize(
    "case", range(len(PIPELINES)), ids=[" ".join(s) + f" vocab{v} tp{t} pp{p}" for s, v, t, p in PIPELINES]
)
def test_planner_stages_are_deepspeeds(case, real_pipeline_stages):
    """The planner's stage boundaries and per-stage parameters against the PipelineModule that
    training builds for the same config, in a real process group (DeepSpeed partitions, not us)."""
    sets, vocab, tp, pp = PIPELINES[case]
    cfg = _pipeline_config(sets, vocab, tp, pp)
    real = real_pipeline_stages[case]
    stages = estimate(cfg, PIPE_WORLD)
    parts = [0]
    for s in stages:
        parts.append(parts[-1] + len(s.layers))
    assert parts == real["parts"]
    assert [stages[stage].params for stage, _ in real["ranks"]] == [held for _, held in real["ranks"]]


# ------------------------------------------------------- the estimate against a live engine


# Tiny model (d 64, L 2, 4 heads, SwiGLU 192, vocab 2048, Peri-LN: 4 norms per block + embedding norm),
# by hand: block = qkv 64*192 + proj 64*64 + fc1 64*384 + fc2 192*64 + 4*64 norms = 53,504;
# embedding 2048*64 = 131,072; plus the embedding norm and the final norm.
TINY_TOTAL = 131_072 + 2 * 53_504 + 64 + 64  # 238,208
TINY_TP2 = 131_072 // 2 + 2 * (53_504 - 4 * 64) // 2 + 2 * 4 * 64 + 64 + 64  # norms replicated
# pp 2 by parameters: [embed+embed norm | block 1] and [block 2 | final norm | tied head]; the tied
# head is DeepSpeed's second copy of the whole EmbeddingStage (TiedLayerSpec builds the module), so
# the last stage also holds the embedding norm (unused there): 64 more than embedding + final norm.
TINY_PP2 = [131_072 + 64 + 53_504, 53_504 + 64 + 131_072 + 64]

MEASURED = {  # name -> (processes, overrides)
    "zero0": (2, ["zero.stage=0"]),
    "zero1": (2, ["zero.stage=1"]),
    "zero2": (2, ["zero.stage=2"]),
    "zero3": (2, ["zero.stage=3"]),  # DeepSpeed's default persistence threshold: small tensors stay whole
}


@pytest.fixture(scope="module")
def measured(bundled_dir, tmp_path_factory):
    cache = {}

    def get(name, extra=()):
        key = (name, tuple(extra))
        if key not in cache:
            nproc, sets = MEASURED.get(name, (2, []))
            sets = (
                sets
                + list(extra)
                + [
                    "train.max_steps=1",
                    "train.warmup_steps=0",
                    "train.schedule=constant",
                    "checkpoint.every=0",
                    "train.eval_every=0",
                    "train.diagnostics_every=0",
                ]
            )
            run_dir = tmp_path_factory.mktemp(name)
            proc = run_module(tiny_args(bundled_dir, run_dir, *sets), nproc=nproc, timeout=300)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            cfg = load_plan_config(str(CONFIGS / "tiny.yaml"), [f"data.dir={bundled_dir}", f"run.dir={run_dir}", *sets])
            cache[key] = (json.loads((run_dir / "memory.json").read_text()), cfg)
        return cache[key]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize(
    "stage", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3]
)
def test_estimate_matches_measured_bytes_for_each_zero_stage(stage, measured):
    """Parameter and optimizer-state bytes of every rank of a real 2-process run (memory.json, from
    the live tensors) against the planner's estimate, and both against the hand formula."""
    report, cfg = measured(f"zero{stage}")
    (est,) = estimate(cfg, 2)
    assert est.params == TINY_TOTAL
    n = TINY_TOTAL
    hand = {0: (4 * n, 8 * n), 1: (4 * n, 12 * n / 2), 2: (4 * n, 12 * n / 2)}
    if stage == 3:  # tensors of <= 1e5 elements (all but the embedding) are kept whole next to their half
        small = TINY_TOTAL - 131_072
        hand[3] = (4 * (n / 2 + small), 8 * n / 2)
    for rank in report["ranks"]:
        assert rank["local_params"] == TINY_TOTAL
        held = rank["held"]
        assert held["parameters"] == pytest.approx(est.parameters, rel=2e-3), rank
        assert held["optimizer"] == pytest.approx(est.optimizer, rel=2e-3), rank
        assert est.parameters == pytest.approx(hand[stage][0], rel=1e-3)
        assert est.optimizer == pytest.approx(hand[stage][1], rel=1e-3)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, sets, want",
    [
        ("tp2", ["parallel.tp=2", "train.micro_batch_size=8"], [TINY_TP2, TINY_TP2]),
        ("pp2", ["parallel.pp=2"], TINY_PP2),
    ],
)
def test_estimate_matches_measured_shards_under_tp_and_pp(name, sets, want, measured):
    """The planner's tensor-parallel shards and DeepSpeed pipeline stages against the parameters each
    rank of a real run holds (ZeRO-1, dp 1)."""
    report, cfg = measured(name, sets)
    stages = estimate(cfg, 2)
    per_rank = [stages[0], stages[0]] if name == "tp2" else stages
    for rank, est, expected in zip(report["ranks"], per_rank, want, strict=True):
        assert rank["local_params"] == est.params == expected
        assert rank["held"]["parameters"] == pytest.approx(est.parameters, rel=2e-3)
        assert rank["held"]["optimizer"] == pytest.approx(est.optimizer, rel=2e-3)


if __name__ == "__main__":  # the worker of test_planner_stages_are_deepspeeds, started by torchrun
    if sys.argv[1:2] == ["--real-pipeline-stages"]:
        _real_pipeline_stages(sys.argv[2])
