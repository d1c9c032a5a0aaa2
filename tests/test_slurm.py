"""SLURM: host lists and job variables parsed as SLURM means them, the batch script rendered from a config
and a resource ask (it passes `bash -n`), and the rendered script run against stand-in `srun` and
`scontrol` commands: the srun line it builds, SIGUSR1 forwarded to the tasks, the requeue after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import Ask, SlurmError, expand_nodelist, job_from_env, parse_gpus, parse_time, render
from tests.conftest import ROOT, _env

# ------------------------------------------------------------------------------- host lists


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("node07", ["node07"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[09-11]", ["node09", "node10", "node11"]),
        ("gpu-a[1-2],cpu7,gpu-b[005]", ["gpu-a1", "gpu-a2", "cpu7", "gpu-b005"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("a[1,3-4]-ib", ["a1-ib", "a3-ib", "a4-ib"]),
    ],
)
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize(
    "text, message",
    [
        ("node[01-04", "'[' without ']'"),
        ("node01-04]", "']' without '['"),
        ("node[04-01]", "runs backwards"),
        ("node[a-b]", "is not a number or a range"),
        ("node1,,node2", "empty entry"),
        ("node[1-2],node2", "'node2' appears twice"),
        ("", "host list is empty"),
    ],
)
def test_bad_nodelists_are_named(text, message):
    with pytest.raises(SlurmError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand_nodelist(text)


def test_nodes_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.slurm", "nodes", "node[01-04,07]"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["node01", "node02", "node03", "node04", "node07"]


# ------------------------------------------------------------------------------ environment


def slurm_env(**over) -> dict:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-04,07]",
        "SLURM_NNODES": "5",
        "SLURM_NODEID": "3",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "5",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_RESTART_COUNT": "2",
    }
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_job_from_env_one_task_per_node():
    job = job_from_env(slurm_env())
    assert job.nodes == ["node01", "node02", "node03", "node04", "node07"]
    assert (job.nnodes, job.node_id, job.procid, job.localid, job.ntasks) == (5, 3, 3, 0, 5)
    assert job.master_addr == "node01" and job.gpus_per_node == 8 and job.restart_count == 2
    assert job.torch_env(29600) == {
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "29600",
        "NNODES": "5",
        "NODE_RANK": "3",
        "GPUS_PER_NODE": "8",
    }


def test_job_from_env_one_task_per_gpu():
    """srun --ntasks-per-node 8 without torchrun: SLURM's task ids are the ranks."""
    job = job_from_env(
        slurm_env(
            SLURM_NTASKS="40",
            SLURM_PROCID="17",
            SLURM_LOCALID="1",
            SLURM_NODEID="2",
            SLURM_GPUS_ON_NODE=None,
            SLURM_GPUS_PER_NODE="gpu:h100:8",
        )
    )
    env = job.torch_env(per_task=True)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("17", "1", "40", "8")
    assert env["NODE_RANK"] == "2" and env["GPUS_PER_NODE"] == "8"


def test_old_variable_names_are_read():
    env = slurm_env(
        SLURM_JOB_ID=None,
        SLURM_JOBID="7",
        SLURM_JOB_NODELIST=None,
        SLURM_NODELIST="n[1-2]",
        SLURM_NNODES=None,
        SLURM_NTASKS="2",
        SLURM_NODEID="1",
        SLURM_PROCID="1",
    )
    job = job_from_env(env)
    assert job.job_id == "7" and job.nodes == ["n1", "n2"] and job.nnodes == 2


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(SLURM_JOB_ID=None), "SLURM_JOB_ID is not set"),
        (dict(SLURM_JOB_NODELIST=None), "SLURM_JOB_NODELIST"),
        (dict(SLURM_NNODES="4"), "SLURM_NNODES=4 but SLURM_JOB_NODELIST='node\\[01-04,07\\]' names 5 nodes"),
        (dict(SLURM_NODEID="5"), "SLURM_NODEID=5 is outside 0..4"),
        (dict(SLURM_PROCID="5"), "SLURM_PROCID=5 is outside 0..4"),
        (dict(SLURM_PROCID="x"), "SLURM_PROCID='x' is not an integer"),
        (dict(SLURM_NTASKS="7"), "do not spread evenly over 5 nodes"),
        (dict(SLURM_LOCALID="1"), "SLURM_LOCALID=1 is outside 0..0"),
    ],
)
def test_bad_job_variables_are_named(over, message):
    with pytest.raises(SlurmError, match=message):
        job_from_env(slurm_env(**over))


@pytest.mark.parametrize(
    "raw, count",
    [("8", 8), ("gpu:8", 8), ("h100:8", 8), ("gpu:h100:8", 8), ("a100:4,v100:2", 6), ("gpu:8(IDX:0-7)", 8), ("", None)],
)
def test_gpu_counts(raw, count):
    assert parse_gpus(raw) == count


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 5400), ("1:30", 90), ("24:00:00", 86400), ("1-12", 129600), ("2-00:30", 174600), ("1-00:00:10", 86410)],
)
def test_time_limits(text, seconds):
    assert parse_time(text) == seconds


def test_env_cli_prints_exports():
    env = _env({k: v for k, v in slurm_env().items()})
    proc = subprocess.run(
        [sys.executable, "-m", "launch.slurm", "env", "--port", "29700"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "export MASTER_ADDR=node01\nexport MASTER_PORT=29700\nexport NNODES=5\nexport NODE_RANK=3" in proc.stdout


# -------------------------------------------------------------------------------- rendering


def test_the_template_parses():
    for script in ("launch/slurm.sbatch", "launch/torchrun.sh", "launch/deepspeed.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_render_fills_the_directives():
    ask = Ask(
        nodes=4,
        gpus_per_node=8,
        time="2-00:00:00",
        partition="gpu",
        account="proj",
        job_name="run1",
        socket_ifname="ib0",
        signal_lead=300,
        extra_sbatch=("--constraint=h100",),
    )
    text = render(ask, ["--config", "/abs/c.yaml", "--set", "train.lr=1e-4"])
    lines = text.splitlines()
    for want in (
        "#SBATCH --job-name=run1",
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --constraint=h100",
        "SOCKET_IFNAME=ib0",
        "SHUTDOWN_TIMEOUT=290",
        "GPUS_PER_NODE=8",
        'TRAIN_ARGS=(--config /abs/c.yaml --set train.lr=1e-4 "$@")',
    ):
        assert want in lines, want
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_cmd


@pytest.mark.parametrize(
    "ask, message",
    [
        (dict(nodes=0), "--nodes: 0"),
        (dict(time="1:00", signal_lead=120), "--signal-lead: 120 s must be at least 30 and below the time limit"),
        (dict(time="soon"), "is not a SLURM time"),
        (dict(job_name="a b"), "--job-name"),
        (dict(port=70000), "--port: 70000"),
    ],
)
def test_render_rejects_bad_asks(ask, message):
    with pytest.raises(SlurmError, match=message):
        render(Ask(**{"nodes": 2, "gpus_per_node": 8, **ask}), ["--config", "c.yaml"])


def render_cli(tmp_path, *extra):
    out = tmp_path / "job.sbatch"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.slurm",
            "render",
            "--config",
            str(ROOT / "configs" / "gpt-1.3b.yaml"),
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--time",
            "00:30:00",
            "--partition",
            "gpu",
            "--out",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, out


def test_render_cli_checks_the_plan_and_writes_a_valid_script(tmp_path):
    proc, out = render_cli(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tp 1 x pp 1 x dp 16" in proc.stderr and "FITS" in proc.stderr  # the plan, printed first
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    text = out.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text and "#SBATCH --partition=gpu" in text
    bad, _ = render_cli(tmp_path, "--set", "parallel.tp=3")
    assert bad.returncode == 2 and "parallel.tp: 3 does not divide model.num_heads=16" in bad.stderr
    big, _ = render_cli(tmp_path, "--gpu-memory", "8GB")
    assert big.returncode == 1 and "does not fit" in big.stderr


# ----------------------------------------------------- the rendered script, against fake SLURM

FAKE_SRUN = r"""#!/usr/bin/env bash
# Records the command line, then behaves as FAKE_SRUN says: exit N, or wait for a signal.
printf '%s\n' "$@" > "$FAKE_DIR/srun.args"
case "$FAKE_SRUN" in
  wait)
    trap 'echo USR1 >> "$FAKE_DIR/srun.signals"; exit 0' USR1
    touch "$FAKE_DIR/srun.started"
    for _ in $(seq 600); do sleep 0.1; done
    exit 9 ;;
  *) exit "$FAKE_SRUN" ;;
esac
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
[ "$1" = show ] && exit 1   # no hostnames service: the script falls back to python -m launch.slurm nodes
echo "$@" >> "$FAKE_DIR/scontrol.calls"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    proc, script = render_cli(tmp_path, "--set", "train.max_steps=1000")
    assert proc.returncode == 0, proc.stderr

    def start(behaviour: str) -> subprocess.Popen:
        env = _env(
            {
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "FAKE_DIR": str(tmp_path),
                "FAKE_SRUN": behaviour,
                "SLURM_JOB_ID": "777",
                "SLURM_JOB_NODELIST": "gpu[07-08]",
                "SLURM_NNODES": "2",
                "SLURM_CPUS_ON_NODE": "64",
                "PRETRAIN_VENV": str(Path(sys.executable).parent.parent),
            }
        )
        return subprocess.Popen(
            ["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    return tmp_path, start


def test_batch_script_runs_torchrun_per_node(fake_slurm):
    tmp_path, start = fake_slurm
    proc = start("0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    args = (tmp_path / "srun.args").read_text().splitlines()
    line = " ".join(args[3:])
    assert args[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"]
    assert (
        f"bash {ROOT}/launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint gpu07:29500 "
        "--rdzv-id 777 --max-restarts 3 --pg-timeout 30 --shutdown-timeout 110 -- -m pretrain.train "
        f"--config {ROOT}/configs/gpt-1.3b.yaml --set train.max_steps=1000 --resume auto" == line
    )
    assert "on 2 node(s) x 8 GPUs: gpu07 gpu08; rendezvous gpu07:29500" in out
    assert not (tmp_path / "scontrol.calls").exists()  # no requeue without the signal


def test_batch_script_passes_on_a_failure(fake_slurm):
    _, start = fake_slurm
    proc = start("3")
    proc.communicate(timeout=60)
    assert proc.returncode == 3


def test_sigusr1_is_forwarded_then_the_job_requeues(fake_slurm):
    """SLURM's --signal=B:USR1@120 reaches the batch shell: it goes on to srun (hence to every torchrun
    and training process), and once they have exited the job requeues itself and exits 0."""
    tmp_path, start = fake_slurm
    proc = start("wait")
    deadline = time.time() + 60
    while not (tmp_path / "srun.started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert (tmp_path / "srun.signals").read_text().split() == ["USR1"]
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "777"]
    assert "SIGUSR1: the time limit is near" in out and "requeueing job 777" in out
