"""Every parallel layout trains like one process: same seed, same global batch (8 sequences), 6 steps
of the tiny model, loss at every step equal to the single-process run.

Tolerance 1e-5 (absolute, on a loss of ~8): not zero because the layouts add the same numbers in
another order in fp32 (data parallelism averages gradients with an all-reduce instead of
accumulating them in one process; tensor parallelism splits matmuls into partial sums summed by an
all-reduce; pipeline stages change nothing numerically but the accumulation order of the
micro-batch gradients). Measured differences are at most ~2e-6.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_module, tiny_args
from tests.conftest import train_losses as losses

pytestmark = pytest.mark.distributed

STEPS = 6
COMMON = [
    f"train.max_steps={STEPS}",
    "train.warmup_steps=2",
    "checkpoint.every=0",
    "train.eval_every=0",
    "train.diagnostics_every=0",
]
TOLERANCE = 1e-5

# name -> (processes, config overrides): the matrix bench/layout_equality.py reports on
from bench.layout_equality import LAYOUTS  # noqa: E402


def train(bundled_dir, run_dir, nproc, sets):
    proc = run_module(tiny_args(bundled_dir, run_dir, *COMMON, *sets), nproc=nproc, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def single(bundled_dir, tmp_path_factory):
    """The reference: one process accumulating the 8 sequences in 2 micro-batches of 4."""
    cache = {}

    def get(placement):
        if placement not in cache:
            cache[placement] = train(
                bundled_dir,
                tmp_path_factory.mktemp(f"single-{placement}"),
                1,
                [f"model.placement={placement}", "zero.stage=0"],
            )
        return cache[placement]

    return get


def assert_same_curve(curve, reference):
    assert sorted(curve) == list(range(1, STEPS + 1))
    worst = max(abs(curve[s] - reference[s]) for s in reference)
    assert worst <= TOLERANCE, f"max loss difference {worst:.2e} > {TOLERANCE}"


# Peri-LN's code differs from Pre-LN's where tensor and pipeline parallelism split the blocks; its
# pure data-parallel cases run with -m slow to keep the default suite under 30 minutes.
PERI_DEFAULT = {"tp2-sp", "pp2-zero1", "tp2xpp2"}
PRE_SLOW = {"dp2xtp2", "dp2xpp2"}  # 4-process runs; tp2xpp2 stays in the default suite
CASES = [pytest.param(layout, "pre", marks=pytest.mark.slow if layout in PRE_SLOW else ()) for layout in LAYOUTS] + [
    pytest.param(layout, "peri", marks=() if layout in PERI_DEFAULT else pytest.mark.slow) for layout in LAYOUTS
]


@pytest.mark.parametrize("layout, placement", CASES)
def test_layout_matches_single_process(layout, placement, single, bundled_dir, tmp_path):
    nproc, sets = LAYOUTS[layout]
    curve = train(bundled_dir, tmp_path / "run", nproc, sets + [f"model.placement={placement}"])
    assert_same_curve(curve, single(placement))


def test_lns_under_pipeline_uses_global_layer_index(single, bundled_dir, tmp_path):
    """LNS scales block l by 1/sqrt(l); with a stage-local index stage 2 would restart at l=1."""
    curve = train(
        bundled_dir, tmp_path / "run", 2, ["parallel.pp=2", "parallel.pp_partition=layers", "model.placement=lns"]
    )
    assert_same_curve(curve, single("lns"))


def test_untied_embeddings_under_pipeline(bundled_dir, tmp_path):
    """Untied: the output layer is its own stage layer on the last stage (no tied copy)."""
    untied = ["model.tie_embeddings=false", "model.placement=peri"]
    reference = train(bundled_dir, tmp_path / "single", 1, untied + ["zero.stage=0"])
    curve = train(bundled_dir, tmp_path / "pp2", 2, untied + ["parallel.pp=2"])
    assert_same_curve(curve, reference)


@pytest.mark.parametrize("layout, mode", [("pp2-zero1", "full"), ("dp2-zero3", "selective"), ("tp2-sp", "full")])
def test_activation_checkpointing_under_parallelism(layout, mode, single, bundled_dir, tmp_path):
    nproc, sets = LAYOUTS[layout]
    curve = train(
        bundled_dir, tmp_path / "run", nproc, sets + ["model.placement=peri", f"train.activation_checkpointing={mode}"]
    )
    assert_same_curve(curve, single("peri"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_partitioning_of_parameters_and_optimizer_states(stage, bundled_dir, tmp_path):
    """Bytes each rank holds (measured from the live tensors) against the ZeRO formula with
    N parameters and dp=2: parameters 4N (ZeRO-3: 4N/2), optimizer 8N (ZeRO-1/2: 12N/2, ZeRO-3: 8N/2)."""
    ds_json = tmp_path / "ds.json"  # partition every ZeRO-3 parameter, however small
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    train(
        bundled_dir,
        tmp_path / "run",
        2,
        [
            f"zero.stage={stage}",
            "train.max_steps=1",
            "train.warmup_steps=0",
            "train.schedule=constant",
            f"zero.ds_config={ds_json}",
        ],
    )
    report = json.loads((tmp_path / "run" / "memory.json").read_text())
    n = report["ranks"][0]["local_params"]
    want = {0: (4 * n, 8 * n), 1: (4 * n, 12 * n / 2), 2: (4 * n, 12 * n / 2), 3: (4 * n / 2, 8 * n / 2)}[stage]
    for rank in report["ranks"]:
        params, optimizer = rank["held"]["parameters"], rank["held"]["optimizer"]
        assert params == pytest.approx(want[0], rel=1e-3), rank
        assert optimizer == pytest.approx(want[1], rel=1e-3), rank  # padding and Adam's step counters


def test_eval_consolidates_tensor_and_pipeline_parallel_checkpoints(bundled_dir, tmp_path):
    """pretrain.eval puts a tp2 x pp2 checkpoint back into the plain layout: its held-out loss equals
    the one of the same training run on one process (the runs agree to ~1e-6)."""
    results = {}
    for name, nproc, sets in (
        ("single", 1, ["zero.stage=0"]),
        ("tp2xpp2", 4, ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=8"]),
    ):
        run_dir = tmp_path / name
        train(bundled_dir, run_dir, nproc, sets + ["checkpoint.every=6"])
        proc = run_module(["-m", "pretrain.eval", "--run", str(run_dir), "--set", "eval.max_tokens=20000"])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        results[name] = json.loads((run_dir / "eval" / "test_step_000006.json").read_text())
    assert results["tp2xpp2"]["tokens"] == results["single"]["tokens"] == 20000
    assert results["tp2xpp2"]["loss"] == pytest.approx(results["single"]["loss"], abs=1e-5)
