"""The run directory belongs to one job at a time, and a new run never deletes an old one's files
unless told to (--overwrite).

Lock: rank 0 holds an exclusive `fcntl.flock` on `<run>/.lock` (host, pid and start time written
in it) for the life of the process. The kernel releases it when the process dies however it dies
(kill -9 included), so a crashed run leaves no stale lock: the `.lock` file stays, unlocked, and
the next run takes it over. A filesystem without flock support is named in the error (mount it with
lock support, e.g. Lustre's `-o flock`, or put run.dir elsewhere) rather than run unlocked.

Fresh start: a directory that already holds checkpoints is refused (continue it with --resume auto,
or start over with --overwrite, which deletes them). An earlier run's curves on a directory that
starts fresh anyway (nothing to resume) are kept under a dated name by pretrain/metrics.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from kernels.errors import PretrainError
from pretrain.checkpoint.layout import complete_checkpoints

LOCK = ".lock"
RUN_FILES = ("metrics.jsonl", "tb", "train.log", "memory.json", "config.yaml")


class RunDirectoryError(PretrainError):
    """The run directory is in use by another job, or holds a run this command would overwrite."""

    exit_code = 2


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        run_dir = self.path.parent
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only filesystem, no permission, a file where a folder should be
            raise RunDirectoryError(
                f"run.dir {run_dir}: cannot write there ({e.strerror}: {e.filename}); point run.dir at a "
                "writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise RunDirectoryError(
                    f"{run_dir} is in use by another job ({self._holder()}); wait for it, "
                    "stop it, or choose another run.name / run.dir"
                ) from None
            raise RunDirectoryError(
                f"{self.path}: cannot lock the run directory ({e.strerror}); its filesystem does not support "
                "flock: mount it with lock support or choose another run.dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self._me()).encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise RunDirectoryError(
                f"run.dir {run_dir}: cannot write {self.path.name} ({e.strerror}); free space or choose another run.dir"
            ) from None
        self.fd = fd
        return self

    @staticmethod
    def _me() -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def prepare_run_directory(run_dir: Path, resume: str, overwrite: bool, log=print) -> None:
    """Refuses to start fresh over another run's checkpoints; --overwrite deletes that run first.
    Called by rank 0 with the lock held, before any process group exists."""
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    if overwrite:
        removed = [name for name in ("checkpoints", "eval", *RUN_FILES) if (run_dir / name).exists()]
        for name in removed:
            target = run_dir / name
            try:
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            except OSError as e:
                raise RunDirectoryError(
                    f"--overwrite: cannot delete {target} ({e.strerror}); delete it by hand"
                ) from None
        if removed:
            log(f"[run] --overwrite: deleted {', '.join(removed)} of the previous run in {run_dir}")
        return
    if resume != "never":
        return  # auto / must / PATH continue the run (auto with nothing to continue starts it)
    if ckpts:
        raise RunDirectoryError(
            f"{run_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in ckpts[-3:])}); continue it "
            "with --resume auto, start over with --overwrite (deletes them), or choose another run.name"
        )
