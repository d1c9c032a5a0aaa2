"""bench/gpu_check.sh --smoke: the GPU readiness script runs on CPU at tiny sizes, through the same
stages and code paths it takes on a GPU, so it is known to work before a GPU is lent.

The default suite runs the stages that matter most for a first GPU job (environment, install check,
training with a checkpoint and a resume, the kernel benchmark's harness); -m slow adds the train-step
benchmark in eager and compiled mode (torch.compile on 2 CPU cores takes minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, _env


def smoke(out, stages: str, timeout: int, data=None) -> dict:
    data_args = ["--data", str(data)] if data is not None else []
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--smoke", "--python", sys.executable,
         "--stages", stages, *data_args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"] if s["status"] != "ok"] == []
    return summary


def test_smoke_run_of_the_gpu_check(tmp_path, bundled_dir):
    # the session's prepared corpus (the script prepares its own when not given one, as on the GPU)
    s = smoke(tmp_path / "out", "env install train_run kernels block_ops", timeout=900, data=bundled_dir)
    assert [x["stage"] for x in s["stages"]] == ["env", "install", "train_run", "kernels", "block_ops"]
    assert s["env"]["smoke"] is True and s["install"]["installed_from_wheels"] == []  # nothing missing here
    run = s["train_run"]
    # stopped at step 2 with a checkpoint, resumed to 4: the same curve as the uninterrupted run
    assert run["checkpoints"] == ["step_000002", "step_000004"] and run["logged_steps"] == [1, 2, 3, 4]
    assert run["max_abs_loss_diff_resumed_vs_uninterrupted"] == 0.0
    assert run["diag_logged"] and run["valid"]
    assert s["kernels"]["gpu"] is False  # the harness, dry-run on CPU
    ops = {"rms_norm", "swiglu", "rope_qkv", "peri_junction", "sdpa_layout", "attention", "fused_loss"}
    assert set(s["block_ops"]["speedup"]) == ops


@pytest.mark.slow
def test_smoke_run_with_the_train_step_benchmark(tmp_path):
    s = smoke(tmp_path / "out", "env train_step", timeout=1800)
    rows = [r for r in s["train_step"] if "side" in r]
    assert {(r["side"], r["mode"]) for r in rows} == {
        (side, mode) for side in ("ours:pre", "ours:peri", "hf:pre") for mode in ("eager", "compiled")
    } | {("ours:pre:model", "compiled")}  # train.compile_scope model beside the default blocks
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 for r in rows)
    curves = [r["loss_curves_max_abs_diff"] for r in s["train_step"] if "loss_curves_max_abs_diff" in r]
    assert len(curves) == 2 and max(curves) <= 1e-3


def test_smoke_run_collects_the_gpu_only_tests(tmp_path):
    """The gpu_tests stage runs `pytest -m gpu`; on CPU every case skips, which the summary must say."""
    s = smoke(tmp_path / "out", "env gpu_tests", timeout=300)
    counts = s["gpu_tests"]
    assert counts["tests"] >= 50  # the compiled-kernel grid alone has dozens of cases
    if not torch.cuda.is_available():
        assert counts["skipped"] == counts["tests"] and counts["failures"] == counts["errors"] == 0
