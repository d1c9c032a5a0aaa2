"""A 2-cell sweep end to end with real processes: train + evaluate, an interruption (the sweep and its
training process killed while the second cell is half done), a rerun that skips the finished cell and
resumes the other from its checkpoint, then `fit` and `report` with their plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, _env

MAX_STEPS = 12


def tiny_sweep_head(name: str, tmp_path: Path, data_dir: Path, max_steps: int) -> str:
    """The top of a sweep file of tiny cells (32 wide, 32 tokens, no evaluation during training)."""
    return f"""name: {name}
base: {ROOT / "configs" / "tiny.yaml"}
out: {tmp_path / "cells"}
set:
  data.dir: {data_dir}
  model.hidden_size: 32
  model.num_heads: 2
  model.seq_len: 32
  train.max_steps: {max_steps}
  train.eval_every: 0
  train.diagnostics_every: 0
  eval.max_tokens: 4096
  zero.stage: 0
"""


def write_sweep(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(
        tiny_sweep_head("two", tmp_path, data_dir, MAX_STEPS)
        + """axes:
  size:
    a: {model.num_layers: 2}
    b: {model.num_layers: 3}
  model.placement: [pre]
checkpoints_per_cell: 3
"""
    )
    return path


def sweep_cmd(sweep_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain.scaling", "sweep", str(sweep_file), "--progress-every", "5", *extra]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def checkpoint_steps(cell: Path) -> list[int]:
    d = cell / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in d.glob("step_*")) if d.is_dir() else []


def kill_when_checkpointed(cmd: list[str], cell: Path, timeout: float = 240) -> None:
    """Starts the sweep in its own process group and SIGKILLs the group (sweep and training process,
    as a lost node would) once `cell` has a checkpoint short of the end."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            done = [s for s in checkpoint_steps(cell) if s < MAX_STEPS]
            if done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before it could be interrupted:\n{proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint of the second cell appeared")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert MAX_STEPS not in checkpoint_steps(cell), "killed too late: the cell had already finished"


def test_two_cell_sweep_interrupted_resumed_fitted_and_reported(tmp_path, bundled_dir):
    sweep_file = write_sweep(tmp_path, bundled_dir)
    cells = tmp_path / "cells"
    a, b = cells / "size-a_placement-pre", cells / "size-b_placement-pre"

    # 1. The first cell alone: trained to the end and evaluated.
    out = run(sweep_cmd(sweep_file, "--only", "size-a")).stdout
    assert "0 finished, 1 to run" in out and "size-a_placement-pre: evaluate done" in out
    assert checkpoint_steps(a)[-1] == MAX_STEPS
    eval_a = a / "eval" / "scaling_eval.json"
    first = json.loads(eval_a.read_text())
    assert first["step"] == MAX_STEPS and first["test"]["tokens"] > 0
    assert len(first["depth"]["var"]) == 3 and len(first["depth"]["removal"]["increase"]) == 2
    assert 0 <= first["last_word"]["accuracy"] <= 1 and first["last_word"]["passages"] > 0
    stamp_a = (eval_a.stat().st_mtime_ns, (a / "checkpoints" / f"step_{MAX_STEPS:06d}").stat().st_mtime_ns)

    # 2. The whole sweep, killed while the second cell is between checkpoints.
    kill_when_checkpointed(sweep_cmd(sweep_file), b)
    interrupted_at = max(checkpoint_steps(b))
    assert 0 < interrupted_at < MAX_STEPS and not (b / "eval" / "scaling_eval.json").exists()

    # 3. The rerun skips the finished cell and resumes the other from its newest checkpoint.
    out = run(sweep_cmd(sweep_file)).stdout
    assert "1 finished, 1 to run" in out, out
    assert f"size-b_placement-pre: train started from step {interrupted_at}" in out
    assert "size-a_placement-pre:" not in out  # not started, not even looked at beyond its state
    assert (eval_a.stat().st_mtime_ns, (a / "checkpoints" / f"step_{MAX_STEPS:06d}").stat().st_mtime_ns) == stamp_a
    assert (a / "sweep_train.log").read_text().count("\n# ") == 1  # trained once
    log_b = (b / "train.log").read_text()
    assert f"resumed from {b / 'checkpoints' / f'step_{interrupted_at:06d}'} at step {interrupted_at}" in log_b
    steps = [
        json.loads(line)["step"]
        for line in (b / "metrics.jsonl").read_text().splitlines()
        if line.strip() and "lr" in json.loads(line)
    ]
    assert steps == list(range(1, MAX_STEPS + 1))  # every step once: the killed tail was dropped on resume
    assert json.loads((b / "eval" / "scaling_eval.json").read_text())["step"] == MAX_STEPS
    status = json.loads((cells / "sweep_status.json").read_text())
    assert status["counts"]["done"] == 2 and status["fraction_of_flops_done"] == pytest.approx(1.0)
    # A third run has nothing left to do.
    assert "2 finished, 0 to run" in run(sweep_cmd(sweep_file)).stdout

    # 4. Fit (two sizes cannot identify a 3-parameter law: said, not crashed) and the report.
    out = run([sys.executable, "-m", "pretrain.scaling", "fit", str(sweep_file), "--bootstrap", "10"]).stdout
    assert "not fitted: 2 distinct model sizes" in out
    report_dir = tmp_path / "report"
    run(
        [
            sys.executable,
            "-m",
            "pretrain.scaling",
            "report",
            str(sweep_file),
            "--out-dir",
            str(report_dir),
            "--bootstrap",
            "10",
        ]
    )
    report = (report_dir / "REPORT.md").read_text()
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    expected = {
        "loss_vs_params.png",
        "metrics_vs_params.png",
        "loss_curves.png",
        "depth_variance.png",
        "depth_growth_vs_size.png",
        "depth_max_activation.png",
        "depth_angular_distance.png",
        "depth_layer_removal.png",
    }
    assert set(images) == expected
    for name in images:
        data = (report_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 400_000, (name, len(data))
    for cell in ("size-a_placement-pre", "size-b_placement-pre"):
        assert cell in report
    assert f"{first['test']['loss']:.4f}" in report  # the summary table shows the measured test loss
    assert json.loads((report_dir / "fit.json").read_text())["cells"]["evaluated"] == 2
    summary = json.loads((report_dir / "summary.json").read_text())
    assert [c["name"] for c in summary["cells"]] == ["size-a_placement-pre", "size-b_placement-pre"]

    # 5. The results archived without checkpoints (what a study commits) read back as the live sweep:
    #    the same summary from `report --out`, and `sweep --out` finds nothing to train.
    archive = tmp_path / "archive"
    out = run([sys.executable, "-m", "pretrain.scaling", "archive", str(sweep_file), "--to", str(archive)]).stdout
    assert "2 finished cells copied" in out, out
    assert not list(archive.rglob("checkpoints")) and sum(f.stat().st_size for f in archive.rglob("*")) < 200_000
    out = run(sweep_cmd(sweep_file, "--out", str(archive))).stdout
    assert "2 finished, 0 to run" in out, out
    archived_report = tmp_path / "archived-report"
    scaling_report = [sys.executable, "-m", "pretrain.scaling", "report", str(sweep_file), "--bootstrap", "10"]
    run([*scaling_report, "--out", str(archive), "--out-dir", str(archived_report)])
    assert json.loads((archived_report / "summary.json").read_text())["cells"] == summary["cells"]
