"""Faults, for real: kill -9 during saves, damaged checkpoints on disk, preemption signals and
non-finite steps, each checked against an uninterrupted run of the same config (2 gloo processes
under DeepSpeed on the bundled text)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import complete_checkpoints, verify
from pretrain.metrics import read_metrics
from tests.conftest import ROOT, _env, check, run_module, tiny_args
from tests.conftest import train_losses as losses

pytestmark = pytest.mark.distributed

STEPS = 12
BASE = [f"train.max_steps={STEPS}", "train.eval_every=0", "train.diagnostics_every=0"]


def launch(args: list[str], nproc: int, log: Path) -> subprocess.Popen:
    """torchrun in its own process group (so a kill reaches the agent and every worker at once)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def worker_pids(agent_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def worker_with_rank(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with the given RANK (from its environment)."""
    for pid in worker_pids(agent_pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of torchrun {agent_pid} has RANK={rank}")


def kill_job(agent_pid: int) -> None:
    """SIGKILL torchrun and its workers at once, as a node failure would (torchrun starts each
    worker in its own session, so the agent's process group does not reach them)."""
    for pid in [agent_pid] + worker_pids(agent_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, proc: subprocess.Popen, poll: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


@pytest.fixture(scope="module")
def reference(bundled_dir, tmp_path_factory):
    """The uninterrupted run: 12 steps, dp=2, ZeRO-1, a checkpoint every step."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    check(run_module(tiny_args(bundled_dir, run_dir, *BASE, "checkpoint.every=1"), nproc=2))
    return losses(run_dir)


@pytest.mark.slow  # ~4.5 min: ten full restarts of a 2-process job
def test_kill_9_during_saves_never_loses_the_run(bundled_dir, reference, tmp_path):
    """SIGKILL to the whole job at random moments inside checkpoint saves (while a .tmp-step_N
    directory exists), ten times; each restart with --resume auto must load a checkpoint and go
    on, and the finished curve must equal the uninterrupted one bit for bit."""
    run_dir = tmp_path / "killed"
    args = tiny_args(bundled_dir, run_dir, *BASE, "checkpoint.every=1") + ["--resume", "auto"]
    ckpts = run_dir / "checkpoints"
    rng = random.Random(7)
    kills = 0
    for attempt in range(40):
        log = tmp_path / f"attempt{attempt}.log"
        launched = time.time()
        proc = launch(args, 2, log)

        def saving(launched=launched):  # a save of this attempt (not the .tmp-step_N a killed one left)
            try:
                return any(p.name.startswith(".tmp-step") and p.stat().st_mtime > launched for p in ckpts.iterdir())
            except FileNotFoundError:
                return False

        if kills < 10 and wait_for(saving, 240, proc):
            time.sleep(rng.uniform(0, 0.15))  # somewhere inside the save: writing, hashing, renaming
            kill_job(proc.pid)
            proc.wait()
            kills += 1
        else:
            assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
        if proc.returncode == 0:
            break
    assert kills == 10
    log_text = (run_dir / "train.log").read_text()
    resumed_from = [
        line.split("resumed from", 1)[1].split()[0] for line in log_text.splitlines() if "resumed from" in line
    ]
    # every restart after a kill found a checkpoint (all but a kill during the very first save)
    assert len(resumed_from) >= 9 and "no complete checkpoint" not in log_text
    assert losses(run_dir) == reference
    assert not any(p.name.startswith((".tmp-", ".old-", ".del-")) for p in ckpts.iterdir())


def test_damaged_checkpoints_are_named_and_auto_falls_back(bundled_dir, tmp_path):
    """A flipped byte in the newest checkpoint and a truncated file in the one before: --resume auto
    names both and resumes from the one before them; --resume PATH on a damaged one refuses."""
    run_dir = tmp_path / "run"
    check(
        run_module(
            tiny_args(
                bundled_dir, run_dir, *BASE, "checkpoint.every=2", "checkpoint.keep_last=0", "train.exit_at_step=6"
            ),
            nproc=2,
        )
    )
    ckpts = run_dir / "checkpoints"
    newest, middle = ckpts / "step_000006", ckpts / "step_000004"
    model_file = next(newest.rglob("mp_rank_00_model_states.pt"))
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    model_file.write_bytes(bytes(data))
    optim_file = next(middle.rglob("*optim_states.pt"))
    optim_file.write_bytes(optim_file.read_bytes()[:-100])
    kept = tmp_path / "kept" / middle.name  # the resume below re-saves step 4: keep the damaged one
    shutil.copytree(middle, kept)
    proc = check(
        run_module(
            tiny_args(
                bundled_dir, run_dir, *BASE, "checkpoint.every=2", "checkpoint.keep_last=0", "train.exit_at_step=8"
            )
            + ["--resume", "auto"],
            nproc=2,
        )
    )
    out = proc.stdout + proc.stderr
    rel_model = model_file.relative_to(newest)
    assert f"step_000006: file {rel_model} does not match its sha256" in out
    assert f"file {optim_file.relative_to(middle)} has" in out and "(truncated?)" in out
    assert "resumed from" in out and "step_000002" in out.split("resumed from", 1)[1].splitlines()[0]
    bad = run_module(tiny_args(bundled_dir, tmp_path / "other", *BASE) + ["--resume", str(kept)], nproc=2)
    assert bad.returncode != 0 and "(truncated?)" in bad.stderr


@pytest.mark.parametrize(
    "sig,target", [("SIGTERM", "agent"), pytest.param("SIGUSR1", "one-worker", marks=pytest.mark.slow)]
)
def test_preemption_signal_saves_exits_0_and_resume_continues_exactly(bundled_dir, reference, tmp_path, sig, target):
    """A scheduler's signal mid-run: every rank saves at the end of the step, the job exits 0, and
    --resume auto continues the curve bit for bit. SIGTERM goes to torchrun (which forwards it to
    its workers), SIGUSR1 to one worker only: the other rank learns of it through the step's
    all-reduce."""
    run_dir = tmp_path / "preempted"
    args = tiny_args(bundled_dir, run_dir, *BASE, "checkpoint.every=1")
    log = tmp_path / "first.log"
    proc = launch(args, 2, log)
    metrics = run_dir / "metrics.jsonl"
    started = lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 4
    assert wait_for(started, 240, proc, poll=0.05), log.read_text()[-3000:]
    if target == "agent":
        os.kill(proc.pid, getattr(signal, sig))
    else:
        os.kill(worker_with_rank(proc.pid, 1), getattr(signal, sig))
    rc = proc.wait(timeout=300)
    text = log.read_text()
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS, "the signal arrived too late to test anything"
    # rank 0 does the logging; in the one-worker case it learned of rank 1's signal from the all-reduce
    cause = sig if target == "agent" else "another rank's signal"
    assert f"[preempt] {cause}: saved step {stopped_at} and exiting 0" in text, text[-3000:]
    if target == "one-worker":  # (torchrun itself exits non-zero after forwarding a SIGTERM)
        assert rc == 0, text[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"
    proc = check(run_module(args + ["--resume", "auto"], nproc=2))
    assert f"step_{stopped_at:06d}" in proc.stdout.split("resumed from", 1)[1].splitlines()[0]
    assert losses(run_dir) == reference


def _module_and_adam_state(ckpt: Path) -> tuple[dict, list]:
    model = torch.load(next(ckpt.rglob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    optim = [torch.load(p, map_location="cpu", weights_only=False) for p in sorted(ckpt.rglob("*optim_states.pt"))]
    # Every tensor of ZeRO's optimizer state: the fp32 master partition, Adam's moments, step counts.
    return model["module"], [o["optimizer_state_dict"] for o in optim]


def _tensors_of(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors_of(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors_of(v, f"{prefix}[{i}]")


def test_nonfinite_step_is_skipped_and_changes_nothing(bundled_dir, tmp_path):
    """A NaN loss injected on rank 0 at step 4: all ranks skip the update, so the weights and every
    Adam moment and step counter saved after step 4 equal those saved after step 3; training goes on
    with finite losses. With bad_step_policy=stop the run stops there with exit code 4."""
    run_dir = tmp_path / "nan"
    proc = check(
        run_module(
            tiny_args(
                bundled_dir,
                run_dir,
                *BASE,
                "train.max_steps=6",
                "checkpoint.every=1",
                "checkpoint.keep_last=0",
                "train.inject_nonfinite_at=[4]",
            ),
            nproc=2,
        )
    )
    assert "[bad step] step 4: non-finite loss or gradient; the update was skipped" in proc.stdout + proc.stderr
    # Training goes on with finite losses: metrics.jsonl writes a non-finite number as the string "nan"
    # or "inf", so a finite loss must be a float that isfinite (`v == v` would hold for "nan" too).
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 7))
    for step, loss in curve.items():
        if step != 4:
            assert isinstance(loss, float) and math.isfinite(loss), (step, loss)
    assert curve[4] == "nan"  # the skipped step contributes no loss to the logged mean
    bad = read_metrics(run_dir / "metrics.jsonl", "bad_step")
    assert [(r["step"], r["skipped"], r["bad_steps"]) for r in bad] == [(4, 1, 1)]
    ckpts = run_dir / "checkpoints"
    (m3, o3), (m4, o4) = _module_and_adam_state(ckpts / "step_000003"), _module_and_adam_state(ckpts / "step_000004")
    assert m3.keys() == m4.keys()
    for name in m3:
        assert torch.equal(m3[name], m4[name]), name
    t3, t4 = dict(_tensors_of(o3)), dict(_tensors_of(o4))
    assert t3.keys() == t4.keys() and len(t3) > 0
    for name in t3:
        assert torch.equal(t3[name], t4[name]), name
    m5, _ = _module_and_adam_state(ckpts / "step_000005")
    assert any(not torch.equal(m4[n], m5[n]) for n in m4)  # step 5 trains again
    assert all(torch.isfinite(v).all() for v in m5.values())

    stop = run_module(
        tiny_args(bundled_dir, tmp_path / "stop", *BASE, "train.inject_nonfinite_at=[3]", "train.bad_step_policy=stop"),
        nproc=1,
    )
    assert stop.returncode == 4, stop.stdout[-2000:] + stop.stderr[-2000:]
    assert "step 3: the loss or a gradient is not finite (train.bad_step_policy=stop)" in stop.stderr


def test_torchrun_max_restarts_resumes_after_a_killed_rank(bundled_dir, reference, tmp_path):
    """One worker killed mid-run: torchrun --max-restarts=1 restarts the job, which resumes with
    --resume auto from the last checkpoint; the curve equals the uninterrupted one."""
    run_dir = tmp_path / "restarted"
    args = tiny_args(bundled_dir, run_dir, *BASE, "checkpoint.every=1") + ["--resume", "auto"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
    ] + args
    log = tmp_path / "restart.log"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    metrics = run_dir / "metrics.jsonl"
    assert wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 5, 240, proc, 0.05)
    victim = worker_pids(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    assert "resumed from" in log.read_text()
    assert losses(run_dir) == reference


def refused_runs(args: list[str], variants: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """The same command with each extra argument list, all at once, one process each."""
    procs = [
        subprocess.Popen(
            [sys.executable] + args + extra,
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for extra in variants
    ]
    done = [(p, *p.communicate(timeout=300)) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, out, err in done]


def test_a_second_run_on_a_busy_directory_is_refused_and_the_first_finishes_intact(bundled_dir, reference, tmp_path):
    """While a 2-process run trains, the same command -- fresh, --resume auto, --overwrite -- is refused
    with one line naming the holder (rank 0's pid and host) before any process group; nothing of the
    running job is renamed or deleted, and it finishes with the uninterrupted curve."""
    run_dir = tmp_path / "shared"
    args = tiny_args(bundled_dir, run_dir, *BASE, "checkpoint.every=1")
    log = tmp_path / "first.log"
    first = launch(args, 2, log)
    assert wait_for(lambda: (run_dir / "train.log").is_file(), 240, first, poll=0.05), log.read_text()[-3000:]
    holder = worker_with_rank(first.pid, 0)
    # The first job is frozen (SIGSTOP: it keeps its lock and its state) while the others start, so that
    # it is still running when they reach the lock however slowly they start on a loaded machine.
    job = [first.pid, *worker_pids(first.pid)]
    for pid in job:
        os.kill(pid, signal.SIGSTOP)
    try:
        seconds = refused_runs(args, [[], ["--resume", "auto"], ["--overwrite"]])
    finally:
        for pid in job:
            os.kill(pid, signal.SIGCONT)
    for second in seconds:
        errors = [line for line in second.stderr.splitlines() if "error:" in line]
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
        assert f"{run_dir} is in use by another job (pid {holder} on {socket.gethostname()}, since " in errors[0]
        assert "Traceback" not in second.stderr
    assert first.wait(timeout=400) == 0, log.read_text()[-3000:]
    assert losses(run_dir) == reference
    assert not list(run_dir.glob("*.before-*"))  # no refused run kept the running one's curves aside
    for ckpt in complete_checkpoints(run_dir / "checkpoints"):
        verify(ckpt)


def test_a_run_killed_with_kill_9_leaves_no_stale_lock(bundled_dir, reference, tmp_path):
    """kill -9 of the whole job: its .lock file stays (naming a dead pid) but the kernel released the
    flock, so the next --resume auto takes the directory over and finishes the uninterrupted curve."""
    run_dir = tmp_path / "killed"
    args = tiny_args(bundled_dir, run_dir, *BASE, "checkpoint.every=1") + ["--resume", "auto"]
    log = tmp_path / "first.log"
    proc = launch(args, 2, log)
    metrics = run_dir / "metrics.jsonl"
    assert wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 4, 240, proc, 0.05)
    holder = worker_with_rank(proc.pid, 0)
    kill_job(proc.pid)
    proc.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder
    resumed = check(run_module(args, nproc=2))
    assert "resumed from" in resumed.stdout and "in use by another job" not in resumed.stderr
    assert losses(run_dir) == reference
