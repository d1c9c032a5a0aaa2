"""Sharded initialization (model/init.py, pretrain/sharded_init.py): every rank builds the model on the meta
device and materializes only its own part, with the values of the full build.

The reference is always the full build itself -- torch.manual_seed(seed); GPT(cfg, ops), real tensors, the
model's own constructors and reset_parameters -- compared bit for bit: single-process for the replay (every
placement and switch that changes what is initialised), and in a real 2-process group for tensor-parallel,
pipeline and ZeRO-3 layouts built by the trainer's own code (pretrain/job.py), their parameters consolidated
(all-gathered shards, both stages, ZeRO-3's gathered partitions). The start-up peak memory of a real
2-process build is measured (bench/startup_memory.py, RSS) against the planner's bound."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from model import build_model
from model.init import init_steps, materialize, parameter_names, transient_peak
from pretrain.config import load_config, resolve
from tests.conftest import ROOT, end_worker_case, finish_worker, run_module

TINY = str(ROOT / "configs" / "tiny.yaml")
SEED = 1234

# What changes the set of parameters or their init: placements with init gains (deepnorm), biases, untied
# embeddings, LayerNorm biases, zero-centred gains, QK-norm, GQA, GELU.
VARIANTS = [
    [],
    ["model.placement=deepnorm", "model.bias=true"],
    ["model.tie_embeddings=false", "model.norm=layernorm", "model.num_kv_heads=2", "model.mlp=gelu"],
    ["model.placement=pre", "model.zero_centered_gain=true", "model.qk_norm=true"],
]


def tiny_model_cfg(sets):
    return resolve(load_config(TINY, sets), 2048).model


def full_build(m, seed=SEED):
    torch.manual_seed(seed)
    gpt, _ = build_model(m, "torch", "cpu")
    return gpt


def replayed(m, wanted=None, seed=SEED):
    meta, _ = build_model(m, "torch", "cpu", materialize=False)
    names = parameter_names(meta)
    shapes = {names[id(p)]: (p.shape, p.dtype) for p in meta.parameters()}
    got = {}
    torch.manual_seed(seed)
    materialize(init_steps(meta), shapes, set(shapes) if wanted is None else wanted, got.__setitem__, "cpu")
    return got


@pytest.mark.parametrize("sets", VARIANTS, ids=[" ".join(v) or "peri" for v in VARIANTS])
def test_replayed_init_is_the_full_build_bit_for_bit(sets):
    m = tiny_model_cfg(sets)
    reference = dict(full_build(m).named_parameters())
    got = replayed(m)
    assert set(got) == set(reference)
    for name, value in got.items():
        assert torch.equal(value, reference[name]), name
    # a rank that keeps only some parameters (a pipeline stage) gets the same values for those
    some = {n for n in reference if "blocks.1." in n or n == "embed.weight"}
    part = replayed(m, some)
    assert set(part) == some and all(torch.equal(part[n], reference[n]) for n in some)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the replay on the GPU's own generator")
def test_replay_on_a_gpu_is_the_full_build_on_that_gpu():
    """On a GPU the full build draws from the CUDA generator (Philox): the replay there gives the same bits."""
    m = tiny_model_cfg(["model.placement=deepnorm", "model.bias=true"])
    torch.manual_seed(SEED)
    reference, _ = build_model(m, "torch", "cuda")
    meta, _ = build_model(m, "torch", "cuda", materialize=False)
    names = parameter_names(meta)
    shapes = {names[id(p)]: (p.shape, p.dtype) for p in meta.parameters()}
    got = {}
    torch.manual_seed(SEED)
    materialize(init_steps(meta), shapes, set(shapes), got.__setitem__, "cuda")
    for name, value in reference.named_parameters():
        assert torch.equal(got[name], value), name


def test_another_seed_gives_other_values_and_the_same_as_its_full_build():
    m = tiny_model_cfg([])
    got = replayed(m, seed=7)
    assert torch.equal(got["embed.weight"], dict(full_build(m, 7).named_parameters())["embed.weight"])
    assert not torch.equal(got["embed.weight"], dict(full_build(m).named_parameters())["embed.weight"])


def test_a_parameter_without_an_init_rule_is_refused():
    m = tiny_model_cfg([])
    meta, _ = build_model(m, "torch", "cpu", materialize=False)
    meta.blocks[0].extra = torch.nn.Conv1d(2, 2, 1, device="meta")  # a module kind model/init.py has no rule for
    with pytest.raises(NotImplementedError, match="blocks.0.extra"):
        init_steps(meta)


def test_transient_peak_counts_the_largest_parameter_and_its_copy():
    m = tiny_model_cfg([])  # the embedding (2048 x 64) is the largest tensor
    meta, _ = build_model(m, "torch", "cpu", materialize=False)
    names = parameter_names(meta)
    shapes = {names[id(p)]: (p.shape, p.dtype) for p in meta.parameters()}
    embed = 2048 * 64 * 4
    peak = transient_peak(init_steps(meta), shapes, copy_bytes=4)
    assert 2 * embed <= peak < 3 * embed  # the full tensor and its fp32 copy; never two layers at once


def test_materialized_parameters_keep_their_identity_ties_and_hooks():
    """fill_parameter swaps storage into the meta Parameter object itself: the tied output layer, the hooks and
    attributes tensor parallelism put on parameters stay."""
    from pretrain.sharded_init import fill_parameter

    m = tiny_model_cfg([])
    meta, _ = build_model(m, "torch", "cpu", materialize=False)
    p = meta.embed.weight
    p.tensor_model_parallel = True
    p.register_hook(lambda g: g * 3)
    value = torch.randn(p.shape)
    fill_parameter(p, value)
    assert meta.embed.weight is p and meta.head.weight is p and not p.is_meta
    assert torch.equal(p, value) and p.tensor_model_parallel
    (p * 1).sum().backward()
    assert torch.equal(p.grad, torch.full_like(value, 3.0))


# ------------------------------------------------------------------ real layouts, 2 processes

LAYOUTS = {  # name -> overrides of configs/tiny.yaml (2 processes)
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=8"],
    "pp2": ["parallel.pp=2", "model.num_layers=4"],
    "zero3": ["zero.stage=3"],
    "zero3-tp2": ["zero.stage=3", "parallel.tp=2", "train.micro_batch_size=8", "model.tie_embeddings=false"],
}


def _consolidate_layouts(out_path: str, run_root: str) -> None:
    """Worker (torchrun, 2 processes): builds each LAYOUTS case through pretrain/job.py (meta build, tensor
    parallelism, pipeline stage, ZeRO-3 partitioning) and writes whether the consolidated parameters equal the
    full build's, bit for bit."""
    from pretrain.distributed import init_distributed

    dist = init_distributed()
    import deepspeed

    from model.parallelize import unshard
    from pretrain.job import build_model as job_build_model
    from pretrain.job import open_run, parallelize

    results = {}
    for name, sets in LAYOUTS.items():
        cfg = resolve(load_config(TINY, [*sets, f"run.dir={run_root}/{name}"]), 2048)
        run = open_run(cfg, None, dist)
        model = job_build_model(run)
        assert all(p.is_meta for p in model.parameters())  # nothing materialized before parallelize
        module = parallelize(run, model)
        names = parameter_names(model)
        local = {names[id(p)]: p for p in module.parameters()}
        if cfg.zero.stage == 3:
            with deepspeed.zero.GatheredParameters(list(local.values())):
                local = {n: p.detach().clone() for n, p in local.items()}
        else:
            local = {n: p.detach().clone() for n, p in local.items()}
        if run.layout.tp > 1:  # all-gather every tensor-parallel shard and put the plain tensor back together
            group = run.groups["tp"]
            gathered = {}
            for n, t in local.items():
                parts = [torch.empty_like(t) for _ in range(run.layout.tp)]
                torch.distributed.all_gather(parts, t.contiguous(), group=group)
                gathered[n] = unshard(n, parts, cfg.model.mlp == "swiglu")
            local = gathered
        everything = [None] * dist.world_size
        torch.distributed.all_gather_object(everything, local)
        if dist.rank == 0:
            merged = {}
            for part in everything:  # pipeline stages hold different parameters (the tied embedding on both)
                for n, t in part.items():
                    assert n not in merged or torch.equal(merged[n], t), n
                    merged[n] = t
            reference = dict(full_build(cfg.model, cfg.run.seed).named_parameters())
            results[name] = {
                "names_match": sorted(merged) == sorted(reference),
                "unequal": [
                    n for n in reference if n in merged and not torch.equal(merged[n], reference[n].to(merged[n].dtype))
                ],
                "dtype": str(next(iter(merged.values())).dtype),
            }
        end_worker_case()
    finish_worker(dist.rank, results, out_path)


@pytest.fixture(scope="module")
def consolidated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    out = root / "layouts.json"
    proc = run_module(["-m", "tests.test_sharded_init", "--layouts", str(out), str(root)], nproc=2, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_layout_holds_the_full_builds_weights(layout, consolidated):
    got = consolidated[layout]
    assert got["names_match"]
    assert got["unequal"] == []
    assert got["dtype"] == "torch.float32"


# ------------------------------------------------------------------ start-up peak against the planner


@pytest.mark.distributed
@pytest.mark.slow
def test_startup_peak_is_below_the_planners_bound(tmp_path):
    """A ~90M-parameter model on 2 processes under ZeRO-3: the peak resident memory while the model is built
    (bench/startup_memory.py, RSS over the process's own baseline) stays below what the planner predicts for
    the build (launch/plan.py startup_build), and far below the whole build's."""
    out = tmp_path / "startup.json"
    proc = run_module(
        [str(ROOT / "bench" / "startup_memory.py"), *STARTUP_ARGS, "--json", str(out)], nproc=1, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sharded = report["sharded"]
    for rank in sharded["ranks"]:
        assert rank["peak_increase_bytes"] <= sharded["planner_build_bytes"], rank
    whole = report["whole"]
    assert max(r["peak_increase_bytes"] for r in sharded["ranks"]) < 0.75 * min(
        r["peak_increase_bytes"] for r in whole["ranks"]
    )


STARTUP_ARGS = [
    "--config",
    TINY,
    "--set",
    "model.hidden_size=1024",
    "--set",
    "model.num_layers=6",
    "--set",
    "model.num_heads=8",
    "--set",
    "model.vocab_size=32768",
    "--set",
    "zero.stage=3",
    "--processes",
    "2",
]


if __name__ == "__main__":  # the worker of the layout tests, started by torchrun
    if sys.argv[1:2] == ["--layouts"]:
        _consolidate_layouts(sys.argv[2], sys.argv[3])
