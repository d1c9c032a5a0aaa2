"""Runs a sweep: every cell is an ordinary run directory (<out>/<cell>) trained by pretrain.train and
then evaluated by `python -m pretrain.scaling evaluate`.

- Finished cells are skipped (their newest complete checkpoint is at max_steps, or they are archived
  results -- pretrain/scaling/archive.py -- and their evaluation is current); interrupted ones resume
  from their newest checkpoint (--resume auto).
- Cells run one after another or several at once, within a CPU/GPU budget (resources.cpus,
  resources.gpus; a cell takes nproc_per_cell x threads_per_proc CPUs, or nproc_per_cell GPUs).
- A cell being run is locked (flock on <cell>/.sweep.lock), so two sweep processes on the same
  directory (e.g. one per node of a shared filesystem) share the work instead of doubling it.
- Progress across the whole sweep (cells done, tokens, FLOPs-weighted ETA) is printed every
  `--progress-every` seconds and written to <out>/sweep_status.json.
- A cell whose training stops on non-finite losses (pretrain.train exits with 4, "training stopped")
  has diverged: that is a result, not a failure (an LR search expects it at its largest learning
  rates). <cell>/diverged.json records it and the evaluation records the cell as diverged.
- Cells that are only points of an LR search get a light evaluation (held-out losses and the loss at
  initialization); cells of the study proper the full one (pretrain/scaling/cell_eval.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.checkpoint import META, complete_checkpoints, verify
from pretrain.fsutil import atomic_write_text
from pretrain.metrics import format_duration
from pretrain.scaling.cell_files import DIVERGED_FILE, archived_step, diverged, evaluation_current
from pretrain.scaling.spec import Cell, Sweep

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------- cell state


def trained_step(cell_dir: Path) -> int:
    """The step of the newest complete checkpoint, or the step an archived cell finished at (its
    checkpoints were not kept: pretrain/scaling/archive.py); 0 when there is neither."""
    if step := archived_step(cell_dir):
        return step
    for ckpt in reversed(complete_checkpoints(cell_dir / "checkpoints")):
        try:
            verify(ckpt, "size")
            return int(json.loads((ckpt / META).read_text())["step"])
        except Exception:  # a damaged one: the resume will fall back past it too
            continue
    return 0


TRAINING_STOPPED_EXIT = 4  # pretrain.train's exit status for TrainingStopped (kernels/errors.py family)


def stopped_by_divergence(rc: int, log_tail: str) -> str | None:
    """Why training stopped, when it stopped because its losses were not finite (else None)."""
    lines = [line for line in log_tail.splitlines() if "training stopped:" in line]
    if rc == TRAINING_STOPPED_EXIT or lines:
        return lines[-1].split("training stopped:", 1)[1].strip() if lines else f"exit status {rc}"
    return None


def steps_logged(cell_dir: Path) -> int:
    """The last training step in metrics.jsonl (progress of a running cell)."""
    path = cell_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    last = 0
    with open(path, "rb") as f:
        try:
            f.seek(-8192, os.SEEK_END)
        except OSError:
            f.seek(0)
        for line in f.read().decode(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "lr" in r:
                last = max(last, int(r["step"]))
    return last


class CellLock:
    """An exclusive, non-blocking flock on <cell>/.sweep.lock, released when the holder exits."""

    def __init__(self, cell_dir: Path):
        cell_dir.mkdir(parents=True, exist_ok=True)
        self.path = cell_dir / ".sweep.lock"
        self.fd = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------- commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(sweep: Sweep, cell: Cell) -> tuple[list[str], dict]:
    nproc = sweep.resources.nproc_per_cell
    args = ["-m", "pretrain.train", "--config", str(sweep.base), "--resume", "auto"]
    for s in cell.overrides:
        args += ["--set", s]
    env = {"OMP_NUM_THREADS": str(sweep.resources.threads_per_proc)}
    if nproc == 1:
        # One process needs no launcher; its own rendezvous port keeps concurrent cells apart.
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        return [sys.executable] + args, env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args, env


def eval_command(sweep: Sweep, cell: Cell) -> tuple[list[str], dict]:
    light = [] if cell.study else ["--light"]
    return (
        [sys.executable, "-m", "pretrain.scaling", "evaluate", "--cell", str(sweep.out / cell.name)] + light,
        {"OMP_NUM_THREADS": str(sweep.resources.cell_cpus())},
    )


# ----------------------------------------------------------------------------------- running


@dataclass
class Job:
    cell: Cell
    lock: CellLock
    phases: list  # remaining ("train" | "evaluate")
    gpus: list = field(default_factory=list)
    proc: subprocess.Popen | None = None
    phase: str = ""
    started: float = 0.0
    log_path: Path | None = None
    log_offset: int = 0  # where this phase's output starts in log_path


class SweepRunner:
    def __init__(self, sweep: Sweep, evaluate: bool = True, log=print, progress_every: float = 60.0):
        self.sweep, self.evaluate, self.log, self.progress_every = sweep, evaluate, log, progress_every
        self.flops = {c.name: _flops_per_token(c) for c in sweep.cells}
        self.failed: dict[str, str] = {}
        self.elsewhere: set[str] = set()
        self.t0 = time.time()
        self.done_flops_at_start = None
        self._stop = False

    # -- planning
    def phases_needed(self, cell: Cell) -> list[str]:
        d = self.sweep.out / cell.name
        phases = []
        if not diverged(d) and trained_step(d) < cell.max_steps:
            phases.append("train")
        if self.evaluate and ("train" in phases or not evaluation_current(d, full=cell.study)):
            phases.append("evaluate")
        return phases

    def ordered(self, cells: list[Cell]) -> list[Cell]:
        if self.sweep.order == "largest-first":
            return sorted(cells, key=lambda c: -self.flops[c.name] * c.tokens)
        return list(cells)

    # -- the loop
    def run(self, only: list[str] | None = None) -> int:
        cells = [c for c in self.sweep.cells if not only or any(pat in c.name for pat in only)]
        todo = [(c, p) for c in self.ordered(cells) if (p := self.phases_needed(c))]
        skipped = len(cells) - len(todo)
        self.log(
            f"[sweep] {self.sweep.name}: {len(cells)} cells in {self.sweep.out}; {skipped} finished, "
            f"{len(todo)} to run; budget {self.sweep.resources.cpus} CPUs, {self.sweep.resources.gpus} GPUs; "
            f"{self.sweep.resources.nproc_per_cell} process(es) x {self.sweep.resources.threads_per_proc} "
            f"thread(s) per cell"
        )
        pending: list[tuple[Cell, list[str]]] = list(todo)
        running: list[Job] = []
        free_gpus = list(range(self.sweep.resources.gpus))
        cpus_free = self.sweep.resources.cpus
        last_progress = 0.0
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def stop(signum, frame):
            self._stop = True
            self.log(f"[sweep] signal {signum}: stopping the running cells (they save and resume next time)")
            for job in running:
                if job.proc and job.proc.poll() is None:
                    job.proc.send_signal(signal.SIGTERM)

        for s in previous:
            signal.signal(s, stop)
        try:
            while (pending or running) and not (self._stop and not running):
                # start what fits
                i = 0
                while i < len(pending) and not self._stop:
                    cell, phases = pending[i]
                    need_cpu = self.sweep.resources.cell_cpus()
                    need_gpu = self.sweep.resources.cell_gpus()
                    if need_cpu > cpus_free or need_gpu > len(free_gpus):
                        break
                    lock = CellLock(self.sweep.out / cell.name)
                    pending.pop(i)
                    if not lock.acquire():
                        self.elsewhere.add(cell.name)
                        self.log(f"[sweep] {cell.name}: locked by another sweep process; skipping it")
                        continue
                    phases = self.phases_needed(cell)  # another process may have finished it meanwhile
                    if not phases:
                        lock.release()
                        continue
                    job = Job(cell, lock, phases, gpus=[free_gpus.pop(0) for _ in range(need_gpu)])
                    cpus_free -= need_cpu
                    self._start_phase(job)
                    running.append(job)
                # reap
                for job in list(running):
                    rc = job.proc.poll()
                    if rc is None:
                        continue
                    took = time.time() - job.started
                    why = self._divergence(job, rc) if rc != 0 and job.phase == "train" else None
                    if rc == 0:
                        self.log(f"[sweep] {job.cell.name}: {job.phase} done in {format_duration(took)}")
                        job.phases.pop(0)
                    elif why:
                        self.log(f"[sweep] {job.cell.name}: diverged ({why}); recorded as a result")
                        job.phases.pop(0)
                    else:
                        self.failed[job.cell.name] = f"{job.phase} exited with {rc}; log: {job.log_path}"
                        self.log(f"[sweep] {job.cell.name}: {job.phase} FAILED (exit {rc}); see {job.log_path}")
                        job.phases = []
                    if job.phases and not self._stop:
                        self._start_phase(job)
                        continue
                    job.lock.release()
                    running.remove(job)
                    cpus_free += self.sweep.resources.cell_cpus()
                    free_gpus.extend(job.gpus)
                now = time.time()
                if now - last_progress >= self.progress_every:
                    self.progress(running)
                    last_progress = now
                time.sleep(0.5)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            for job in running:
                if job.proc and job.proc.poll() is None:
                    job.proc.wait()
                job.lock.release()
        self.progress([])
        if self.failed:
            self.log("[sweep] failed cells:\n" + "\n".join(f"  {n}: {why}" for n, why in self.failed.items()))
            return 1
        if self._stop:
            return 130
        self.log(f"[sweep] {self.sweep.name}: all cells finished")
        return 0

    def _start_phase(self, job: Job) -> None:
        job.phase = job.phases[0]
        cmd, extra = (train_command if job.phase == "train" else eval_command)(self.sweep, job.cell)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(extra)
        if self.sweep.resources.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.gpus))
        else:
            env.setdefault("DS_ACCELERATOR", "cpu")
        cell_dir = self.sweep.out / job.cell.name
        job.log_path = cell_dir / f"sweep_{job.phase}.log"
        (cell_dir / "sweep_cell.json").write_text(
            json.dumps(
                {
                    "name": job.cell.name,
                    "labels": job.cell.labels,
                    "overrides": list(job.cell.overrides),
                    "base": str(self.sweep.base),
                    "max_steps": job.cell.max_steps,
                    "tokens": job.cell.tokens,
                    "flops_per_token": self.flops[job.cell.name],
                    "held_out": self.sweep.is_held_out(job.cell),
                },
                indent=1,
            )
        )
        with open(job.log_path, "ab") as log_file:
            log_file.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log_file.flush()
            job.log_offset = log_file.tell()
            job.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        job.started = time.time()
        what = f"from step {trained_step(cell_dir)}" if job.phase == "train" else ""
        self.log(f"[sweep] {job.cell.name}: {job.phase} started {what}".rstrip())

    def _divergence(self, job: Job, rc: int) -> str | None:
        """Records a training phase that stopped on non-finite losses (<cell>/diverged.json)."""
        with open(job.log_path, "rb") as f:
            f.seek(job.log_offset)
            tail = f.read().decode(errors="replace")
        why = stopped_by_divergence(rc, tail)
        if why:
            cell_dir = self.sweep.out / job.cell.name
            atomic_write_text(
                cell_dir / DIVERGED_FILE,
                json.dumps(
                    {
                        "step": steps_logged(cell_dir),
                        "max_steps": job.cell.max_steps,
                        "reason": why,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    },
                    indent=1,
                ),
            )
        return why

    # -- progress
    def progress(self, running: list[Job]) -> dict:
        cells = []
        done_flops = total_flops = 0.0
        tokens_done = tokens_total = 0
        for cell in self.sweep.cells:
            d = self.sweep.out / cell.name
            job = next((j for j in running if j.cell.name == cell.name), None)
            step = steps_logged(d) if job and job.phase == "train" else trained_step(d)
            step = cell.max_steps if diverged(d) else min(step, cell.max_steps)
            per_step = cell.tokens / cell.max_steps
            tokens_done += int(step * per_step)
            tokens_total += cell.tokens
            done_flops += step * per_step * self.flops[cell.name]
            total_flops += cell.tokens * self.flops[cell.name]
            if cell.name in self.failed:
                state = "failed"
            elif job:
                state = job.phase + "ing" if job.phase == "train" else "evaluating"
            elif step >= cell.max_steps and (not self.evaluate or evaluation_current(d, full=cell.study)):
                state = "done"
            else:
                state = "pending"
            cells.append(
                {"name": cell.name, "state": state, "step": step, "max_steps": cell.max_steps, "labels": cell.labels}
            )
        if self.done_flops_at_start is None:
            self.done_flops_at_start = done_flops
        elapsed = time.time() - self.t0
        rate = (done_flops - self.done_flops_at_start) / elapsed if elapsed > 0 else 0.0
        eta = (total_flops - done_flops) / rate if rate > 0 else None
        counts = {
            s: sum(c["state"] == s for c in cells) for s in ("done", "training", "evaluating", "pending", "failed")
        }
        status = {
            "sweep": self.sweep.name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "counts": counts,
            "tokens_done": tokens_done,
            "tokens_total": tokens_total,
            "fraction_of_flops_done": done_flops / total_flops if total_flops else 1.0,
            "elapsed_s": round(elapsed),
            "eta_s": None if eta is None else round(eta),
            "cells": cells,
        }
        self.sweep.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.sweep.out / "sweep_status.json", json.dumps(status, indent=1))
        active = ", ".join(
            f"{c['name']} {100 * c['step'] / c['max_steps']:.0f}%" for c in cells if c["state"] == "training"
        )
        self.log(
            f"[sweep] {counts['done']}/{len(cells)} done, {counts['training'] + counts['evaluating']} running"
            f"{' (' + active + ')' if active else ''}, {counts['pending']} pending, {counts['failed']} failed | "
            f"{tokens_done / 1e6:.2f}M/{tokens_total / 1e6:.2f}M tokens, {100 * status['fraction_of_flops_done']:.0f}%"
            f" of FLOPs | elapsed {format_duration(elapsed)} | ETA "
            f"{format_duration(eta) if eta is not None else 'n/a'}"
        )
        return status


def _flops_per_token(cell: Cell) -> float:
    """Training FLOPs per token of a cell's model (6N + attention), from the model itself."""
    return _model_flops(cell.config)


_FLOPS_CACHE: dict[str, float] = {}


def _model_flops(cfg) -> float:
    import dataclasses

    import torch

    from model import build_model
    from pretrain.config import resolve
    from pretrain.data import Tokenizer

    key = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True) + cfg.data.dir + cfg.data.tokenizer
    if key not in _FLOPS_CACHE:
        vocab = None
        if cfg.model.vocab_size == 0:
            from pretrain.config import tokenizer_path

            vocab = Tokenizer(tokenizer_path(cfg.data)).vocab_size
        resolved = resolve(cfg, vocab)
        with torch.device("meta"):
            model, _ = build_model(resolved.model, "torch", "meta")
        _FLOPS_CACHE[key] = float(model.flops_per_token())
    return _FLOPS_CACHE[key]
