"""The placement study's machinery end to end, with real processes on the bundled corpus: an LR search
(2 placements x 2 learning rates x 2 seeds), the study cells at each placement's best rate, a
placement whose runs all diverge, `report` with summary.json; and the initial model the evaluation
rebuilds is the one training starts from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import check, run_module, tiny_args
from tests.test_scaling_sweep import tiny_sweep_head

SUMMARY_CELL_KEYS = {"size", "placement", "seed", "lr", "N", "D", "valid_loss", "test_bpb", "diverged"}
SUMMARY_FIT_KEYS = {"placement", "heldout_error", "naive_error", "at_bound"}


def write_sweep(tmp_path: Path, data_dir: Path) -> Path:
    """post's runs are made to diverge: a NaN loss injected at step 3 with the stop policy."""
    path = tmp_path / "study.yaml"
    path.write_text(
        tiny_sweep_head("tiny-study", tmp_path, data_dir, 6)
        + """  model.num_layers: 2
axes:
  size:
    a: {model.num_layers: 2}
  placement:
    pre: {model.placement: pre, warmup_fraction: 0.2}
    post: {model.placement: post, warmup_fraction: 0.5, train.bad_step_policy: stop,
            train.inject_nonfinite_at: [3]}
  run.seed: [1, 2]
lr_search:
  values: [1.0e-3, 1.0e-2]
  at: {size: [a]}
  per: [placement]
checkpoints_per_cell: 2
"""
    )
    return path


def run(args: list[str], timeout: int = 600) -> str:
    return check(run_module(["-m", "pretrain.scaling", *args], timeout=timeout)).stdout


@pytest.mark.slow  # 75 s; the pieces (LR choice, claims, fits, summary) have their own default tests
def test_lr_search_study_and_summary_end_to_end(tmp_path, bundled_dir):
    sweep_file = write_sweep(tmp_path, bundled_dir)
    cells = tmp_path / "cells"
    out = run(["sweep", str(sweep_file), "--progress-every", "30"])
    # 8 search cells, then the study cells at the best rates: they are search cells already (same size and
    # seeds), so the second round only upgrades their evaluation from light to full
    assert "8 cells in" in out and out.count("all cells finished") == 2, out
    evals = {
        d.name: json.loads((d / "eval" / "scaling_eval.json").read_text())
        for d in cells.iterdir()
        if (d / "eval" / "scaling_eval.json").is_file()
    }
    assert len(evals) == 8
    for name, ev in evals.items():
        assert ev["init"]["loss"] > 0 and ev["non_embedding_parameters"] > 0
        if "placement-post" in name:  # stopped at the injected NaN: a result, not a failure
            assert ev["diverged"] and "valid" not in ev and (cells / name / "diverged.json").is_file()
        else:
            assert not ev["diverged"] and ev["valid"]["loss"] < ev["init"]["loss"]
    pre_best = min(
        (0.001, 0.01),
        key=lambda lr: sum(evals[f"size-a_placement-pre_seed-{s}_lr-{lr:g}"]["valid"]["loss"] for s in (1, 2)),
    )
    full = {n for n, ev in evals.items() if ev["level"] == "full"}
    # the study cells: pre at its best rate, post at the smaller rate (every rate diverged: a tie at L0)
    assert full == {f"size-a_placement-pre_seed-{s}_lr-{pre_best:g}" for s in (1, 2)} | {
        f"size-a_placement-post_seed-{s}_lr-0.001" for s in (1, 2)
    }
    for name in full - {n for n in full if "post" in n}:
        depth = evals[name]["depth"]
        assert len(depth["var"]) == 3 and len(evals[name]["init"]["depth"]["var"]) == 3
        assert depth["growth"]["linear_ratio"] > 0
    assert "8 finished, 0 to run" in run(["sweep", str(sweep_file)])

    report_dir = tmp_path / "report"
    run(["report", str(sweep_file), "--out-dir", str(report_dir), "--bootstrap", "20"])
    summary = json.loads((report_dir / "summary.json").read_text())
    assert len(summary["cells"]) == 8 and all(SUMMARY_CELL_KEYS <= set(c) for c in summary["cells"])
    assert {c["lr"] for c in summary["cells"]} == {0.001, 0.01} and {c["seed"] for c in summary["cells"]} == {1, 2}
    assert sum(c["diverged"] for c in summary["cells"]) == 4
    assert {f["placement"] for f in summary["fits"]} == {"pre", "post"}
    assert all(SUMMARY_FIT_KEYS <= set(f) for f in summary["fits"])
    assert summary["claims"] and all({"claim", "verdict"} <= set(c) for c in summary["claims"])
    assert {c["verdict"] for c in summary["claims"]} <= {"holds", "does not hold", "not resolved", "not measured"}
    report = (report_dir / "REPORT.md").read_text()
    assert "## Recipe of every cell" in report and "## Learning rates" in report and "lr_sweep.png" in report
    for name in ("lr_sweep.png", "depth_variance.png", "depth_growth_vs_size.png"):
        data = (report_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_the_rebuilt_initial_model_is_the_one_training_starts_from(tmp_path, bundled_dir):
    """One step at a learning rate of 1e-30 leaves every weight as initialised (the update is far below
    float32 resolution), so the checkpoint holds pretrain.train's initial model."""
    from pretrain.scaling.cell_eval import initial_model, load_final

    run_dir = tmp_path / "run"
    proc = run_module(
        tiny_args(
            bundled_dir,
            run_dir,
            "train.max_steps=1",
            "train.lr=1.0e-30",
            "train.warmup_steps=0",
            "run.seed=77",
            "model.placement=pre",
            "zero.stage=0",
            "train.eval_every=0",
            "train.diagnostics_every=0",
            "checkpoint.every=1",
        )
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "step_000001"
    trained, cfg, _ = load_final(ckpt, torch.device("cpu"))
    rebuilt = initial_model(cfg, torch.device("cpu")).state_dict()
    for name, value in trained.state_dict().items():
        assert torch.equal(value, rebuilt[name]), name
    other = initial_model(
        dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=78)), torch.device("cpu")
    ).state_dict()
    assert not torch.equal(other["blocks.0.attn.fn.proj.weight"], rebuilt["blocks.0.attn.fn.proj.weight"])
