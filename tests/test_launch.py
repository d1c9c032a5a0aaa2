"""The launch scripts: syntax, the local launcher's contract, and (slow) the README's quickstart."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, _env

SCRIPTS = ["launch/setup.sh", "launch/local.sh", "launch/quickstart.sh", "tests/run.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_local_sh_usage():
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: bash launch/local.sh NPROC ARGS" in proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "two", "-m", "x"], capture_output=True, text=True)
    assert proc.returncode == 2


def _venv_env() -> dict:
    """Point the scripts at the interpreter running the tests (its venv), whatever the checkout."""
    return _env({"PRETRAIN_VENV": str(Path(sys.executable).parent.parent)})


@pytest.mark.distributed
def test_local_sh_runs_python_args_as_n_processes(bundled_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), "2", "-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--set", f"data.dir={bundled_dir}", "--set", f"run.dir={run_dir}", "--set", "train.max_steps=6",
         "--set", "train.warmup_steps=2", "--set", "checkpoint.every=0"],
        cwd=tmp_path, env=_venv_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = pp 1 x dp 2 x tp 1" in proc.stdout
    assert (run_dir / "checkpoints" / "step_000006" / "manifest.json").is_file()


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's first command in a copy of the repository (shortened to 60 steps)."""
    repo = tmp_path / "repo"
    top_level = {".venv", "runs", "data", ".git"}
    shutil.copytree(ROOT, repo, ignore=lambda d, names: [n for n in names if n == "__pycache__"
                                                         or (Path(d) == ROOT and n in top_level)])
    proc = subprocess.run(["bash", "launch/quickstart.sh", "--set", "train.max_steps=60", "--set", "train.eval_every=30",
                           "--set", "checkpoint.every=30"],
                          cwd=repo, env=_venv_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((repo / "runs" / "quickstart" / "eval" / "test_step_000060.json").read_text())
    assert result["split"] == "test" and result["tokens"] > 200_000
    assert result["bits_per_byte"] < 3.0  # far below the 13 bits/token of a uniform guess over 8k tokens
    out = proc.stdout
    assert "run directory : runs/quickstart" in out and "TensorBoard" in out and "--resume auto" in out
