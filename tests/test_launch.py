"""The launch scripts: syntax, the local launcher's contract, and (slow) the README's quickstart."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, _env, tiny_args

SCRIPTS = [
    "launch/setup.sh",
    "launch/local.sh",
    "launch/quickstart.sh",
    "launch/torchrun.sh",
    "launch/deepspeed.sh",
    "launch/launcher_options.sh",
    "tests/run.sh",
    ".ci/run",
]


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


def _bash(*args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=cwd, env=_venv_env(), capture_output=True, text=True, timeout=timeout)


def _dry_run(script: str, *args: str, hostfile: Path | None = None) -> subprocess.CompletedProcess:
    before = ["--hostfile", str(hostfile), "--no-check"] if hostfile else []
    return _bash(str(ROOT / "launch" / script), *before, *args, "--dry-run", "--", "-m", "x")


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_network_options_read_alike_by_both_launchers(script, tmp_path):
    """launch/launcher_options.sh: the same flags give the same exports and the same errors in each launcher."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    hostfile = hosts if script == "deepspeed.sh" else None
    options = "--socket-ifname lo --pg-timeout 7 --master-addr 10.1.2.3 --master-port 29611".split()
    proc = _dry_run(script, *options, hostfile=hostfile)
    assert proc.returncode == 0, proc.stderr
    exports = (
        "DEEPSPEED_TIMEOUT=7",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=3",
        "NCCL_SOCKET_IFNAME=lo",
        "GLOO_SOCKET_IFNAME=lo",
    )
    for export in exports:
        assert f"export {export}" in proc.stdout.splitlines(), proc.stdout
    assert "10.1.2.3" in proc.stdout and "29611" in proc.stdout
    proc = _dry_run(script, "--nccl-socket-ifname", "lo", "--gloo-socket-ifname", "lo", hostfile=hostfile)
    assert "export NCCL_SOCKET_IFNAME=lo" in proc.stdout and "export GLOO_SOCKET_IFNAME=lo" in proc.stdout
    for bad, message in (
        (["--pg-timeout", "0"], "--pg-timeout: '0' is not a positive number of minutes"),
        (["--pg-timeout", ""], "--pg-timeout needs a value (see --help)"),
        (["--bogus"], "unknown option '--bogus' (the program's arguments go after --)"),
    ):
        proc = _dry_run(script, *bad, hostfile=hostfile)
        assert proc.returncode == 2 and f"launch/{script}: {message}" in proc.stderr, proc.stderr


def test_torchrun_sh_names_the_interfaces_that_exist():
    proc = _dry_run("torchrun.sh", "--socket-ifname", "nosuchif0")
    assert proc.returncode == 2
    assert "no network interface 'nosuchif0'" in proc.stderr and " lo" in proc.stderr.split("this node has:")[1]


@pytest.mark.distributed
def test_local_sh_runs_python_args_as_n_processes(bundled_dir, tmp_path):
    run_dir = tmp_path / "run"
    sets = ("train.max_steps=6", "train.warmup_steps=2", "checkpoint.every=0")
    proc = _bash(
        str(ROOT / "launch" / "local.sh"), "2", *tiny_args(bundled_dir, run_dir, *sets), cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = pp 1 x dp 2 x tp 1" in proc.stdout
    assert (run_dir / "checkpoints" / "step_000006" / "manifest.json").is_file()


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's first command in a copy of the repository (shortened to 60 steps)."""
    repo = tmp_path / "repo"
    top_level = {".venv", "runs", "data", ".git"}
    skip = lambda d, names: [n for n in names if n == "__pycache__" or (Path(d) == ROOT and n in top_level)]
    shutil.copytree(ROOT, repo, ignore=skip)
    sets = ("train.max_steps=60", "train.eval_every=30", "checkpoint.every=30")
    proc = _bash("launch/quickstart.sh", *(x for s in sets for x in ("--set", s)), cwd=repo, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((repo / "runs" / "quickstart" / "eval" / "test_step_000060.json").read_text())
    assert result["split"] == "test" and result["tokens"] > 200_000
    assert result["bits_per_byte"] < 3.0  # far below the 13 bits/token of a uniform guess over 8k tokens
    out = proc.stdout
    assert "run directory : runs/quickstart" in out and "TensorBoard" in out and "--resume auto" in out
