"""Shared fixtures: the prepared bundled corpus (real text, prepared once per session) and a helper
that runs a module under torchrun with real processes on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def bundled_dir(tmp_path_factory) -> Path:
    """The bundled corpus (Shakespeare, Milton, KJV; SOTU 2000- as test) prepared with a
    2048-token vocabulary: real text, ~10 s."""
    out = tmp_path_factory.mktemp("data") / "bundled"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.data", "prepare", "--out", str(out), "--vocab-size", "2048"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def run_module(
    module_args: list[str], nproc: int = 1, cwd: Path = ROOT, extra_env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m ...` as nproc processes (torchrun --standalone when nproc > 1)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + module_args
    else:
        cmd = [sys.executable] + module_args
    return subprocess.run(cmd, cwd=cwd, env=_env(extra_env), capture_output=True, text=True, timeout=timeout)


def tiny_args(data_dir: Path, run_dir: Path, *sets: str) -> list[str]:
    args = [
        "-m",
        "pretrain.train",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--set",
        f"data.dir={data_dir}",
        "--set",
        f"run.dir={run_dir}",
    ]
    for s in sets:
        args += ["--set", s]
    return args


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    from pretrain.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl", "train")}


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Asserts a finished command succeeded, showing the end of its output if not."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc
