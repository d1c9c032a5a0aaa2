"""Checkpoints: complete, atomic, verified (DESIGN.md §7).

Layout under runs/<name>/checkpoints/:
    step_000123/   DeepSpeed's files (model, ZeRO optimizer partitions, LR schedule, loss scaler),
                   rng_rank00000.pt ... (every rank's RNG), meta.json (step, data position, config),
                   manifest.json (size and sha256 of every file; written last)
    latest         the newest complete checkpoint's name (replaced atomically)

A checkpoint is written to `.tmp-step_000123/` and renamed only when every rank has finished and
the manifest is written, so a crash mid-save leaves the previous checkpoints untouched and the
partial one is recognisably partial. The checkpoint directory must be on a filesystem all ranks
share (as DeepSpeed's own checkpoints assume).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.distributed import barrier, broadcast_object
from pretrain.fsutil import atomic_write_text, sha256_file

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


# ------------------------------------------------------------------------------------ RNG state


def rng_state() -> dict:
    from model.parallel_rng import TP_RNG

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "tensor_parallel": TP_RNG.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    from model.parallel_rng import TP_RNG

    torch.set_rng_state(state["torch"])
    TP_RNG.load_state_dict(state.get("tensor_parallel"))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- manifest, verify


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path) -> None:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    atomic_write_text(ckpt / MANIFEST, json.dumps({"files": files, "written": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                                  indent=1))


def verify(ckpt: Path, level: str = "sha256") -> None:
    """Raises CheckpointError naming the first missing, truncated or corrupt file."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST}; the checkpoint is partial (a save did not finish)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{manifest}: unreadable manifest ({e})") from None
    if level == "none":
        return
    for rel, info in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: file {rel} listed in the manifest is missing")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{ckpt}: file {rel} has {size} bytes, the manifest says {info['size']} (truncated?)")
        if level == "sha256" and sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{ckpt}: file {rel} does not match its sha256 in the manifest (corrupt)")


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed (hence fully written) checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_resumable(root: Path, level: str, log) -> Path | None:
    """The newest checkpoint that verifies; older ones are tried when a newer one is damaged."""
    for ckpt in reversed(complete_checkpoints(root)):
        try:
            verify(ckpt, level)
            return ckpt
        except CheckpointError as e:
            log(f"[checkpoint] skipping damaged checkpoint: {e}")
    return None


# ------------------------------------------------------------------------------------ save, load


class Checkpointer:
    def __init__(self, root: Path, rank: int, keep_last: int, verify_level: str, log):
        self.root, self.rank, self.keep_last, self.verify_level, self.log = root, rank, keep_last, verify_level, log

    def save(self, engine, step: int, meta: dict, extra_files: dict[str, Path] | None = None) -> Path:
        """extra_files: small files copied into the checkpoint (the tokenizer), so it is self-contained."""
        name = step_name(step)
        tmp_tag = f".tmp-{name}"
        tmp = self.root / tmp_tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # left by a save that crashed
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        t0 = time.perf_counter()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state={"meta": meta}, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank:05d}.pt")
        barrier()
        final = self.root / name
        if self.rank == 0:
            for file_name, src in (extra_files or {}).items():
                shutil.copyfile(src, tmp / file_name)
            (tmp / META).write_text(json.dumps(meta, indent=1))
            write_manifest(tmp)
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
                old = self.root / f".old-{name}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            atomic_write_text(self.root / "latest", name + "\n")
            _fsync_dir(self.root)
            self._retain(keep=final)
            self.log(f"[checkpoint] saved {final} in {time.perf_counter() - t0:.1f}s")
        barrier()
        return final

    def _retain(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        ckpts = [c for c in complete_checkpoints(self.root) if c != keep]
        for old in ckpts[: max(0, len(ckpts) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, mode: str) -> Path | None:
        """The checkpoint to resume from for checkpoint.resume = never | auto | must | PATH
        (decided on rank 0, shared with every rank)."""
        if mode == "never":
            return None
        choice, error = None, None
        if self.rank == 0:
            try:
                if mode in ("auto", "must"):
                    choice = find_resumable(self.root, self.verify_level, self.log)
                    if choice is None and mode == "must":
                        raise CheckpointError(
                            f"--resume must: no complete checkpoint under {self.root} "
                            f"(found: {[p.name for p in self.root.glob('*')] if self.root.exists() else 'no directory'})")
                else:
                    path = Path(mode)
                    if path.is_dir() and not (path / MANIFEST).exists() and (path / "latest").is_file():
                        path = path / (path / "latest").read_text().strip()  # a checkpoints/ directory
                    if not path.is_dir():
                        raise CheckpointError(f"--resume {mode}: no such checkpoint directory")
                    verify(path, self.verify_level)
                    choice = path
            except CheckpointError as e:
                error = str(e)
        choice, error = broadcast_object((choice, error))
        if error:
            raise CheckpointError(error)
        return choice

    def load(self, engine, ckpt: Path) -> dict:
        meta = json.loads((ckpt / META).read_text())
        load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")
        rng_file = ckpt / f"rng_rank{self.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            self.log(f"[checkpoint] {rng_file.name} missing (different world size?); RNG reseeded")
        return meta


def compare_configs(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(model-shape differences that forbid a resume, other changed settings that are allowed)."""
    shape, other = [], []
    for section, values in current.items():
        old = saved.get(section, {})
        for key, value in values.items():
            if key in old and old[key] != value:
                line = f"{section}.{key}: checkpoint {old[key]!r}, now {value!r}"
                (shape if section == "model" else other).append(line)
    return shape, other
