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


def _payload_files(ckpt: Path) -> list[str]:
    """Every file of a checkpoint but its manifest, as sorted relative paths (the same list on every
    rank of a shared filesystem)."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def _my_share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _digest_and_sync(path: Path) -> dict:
    """Size and sha256 of a file, and fsync it: a checkpoint is renamed into place only once its
    bytes are on disk, so a machine crash cannot leave a 'complete' checkpoint with lost data."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(ckpt: Path, entries: dict | None = None) -> None:
    """manifest.json with the size and sha256 of every file (hashed here unless `entries` is given,
    e.g. hashed by every rank for its share of the files)."""
    if entries is None:
        entries = {rel: _digest_and_sync(ckpt / rel) for rel in _payload_files(ckpt)}
    atomic_write_text(ckpt / MANIFEST, json.dumps({"files": dict(sorted(entries.items())),
                                                   "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


def _manifest_files(ckpt: Path) -> dict:
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST}; the checkpoint is partial (a save did not finish)")
    try:
        return json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{manifest}: unreadable manifest ({e})") from None


def verify(ckpt: Path, level: str = "sha256", rank: int = 0, world: int = 1) -> None:
    """Raises CheckpointError naming the first missing, truncated or corrupt file. With world > 1,
    checks this rank's share of the files only (see verify_on_all_ranks)."""
    files = _manifest_files(ckpt)
    if level == "none":
        return
    for rel in _my_share(sorted(files), rank, world):
        info, p = files[rel], ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: file {rel} listed in the manifest is missing")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{ckpt}: file {rel} has {size} bytes, the manifest says {info['size']} (truncated?)")
        if level == "sha256" and sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{ckpt}: file {rel} does not match its sha256 in the manifest (corrupt)")


def verify_on_all_ranks(ckpt: Path, level: str) -> str | None:
    """Every rank checks a share of the files (hashing a large checkpoint is split across the job);
    returns the first problem any rank found, the same on every rank, or None. A collective."""
    rank, world = _rank_world()
    try:
        verify(ckpt, level, rank, world)
        error = None
    except CheckpointError as e:
        error = str(e)
    return next((e for e in all_gather(error) if e), None)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed (hence fully written) checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_resumable(root: Path, level: str, log) -> Path | None:
    """The newest checkpoint that verifies (one process); older ones are tried when a newer one is
    damaged."""
    for ckpt in reversed(complete_checkpoints(root)):
        try:
            verify(ckpt, level)
            return ckpt
        except CheckpointError as e:
            log(f"[checkpoint] skipping damaged checkpoint: {e}")
    return None


def recover_interrupted(root: Path, log) -> None:
    """Finishes what a killed save or retention left half-done: a re-save swaps step_N for a new one
    through .old-step_N (if the process died between the two renames, the old, complete one is put
    back); retention renames to .del-step_N before deleting (leftovers are deleted)."""
    if not root.is_dir():
        return
    for old in root.glob(".old-step_*"):
        final = root / old.name.removeprefix(".old-")
        if not final.exists():
            os.replace(old, final)
            log(f"[checkpoint] restored {final.name} from an interrupted re-save")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for doomed in root.glob(".del-*"):
        shutil.rmtree(doomed, ignore_errors=True)


# ------------------------------------------------------------------------------------ save, load


class Checkpointer:
    def __init__(self, root: Path, rank: int, keep_last: int, verify_level: str, log):
        self.root, self.rank, self.keep_last, self.verify_level, self.log = root, rank, keep_last, verify_level, log

    def save(self, engine, step: int, meta: dict, extra_files: dict[str, Path] | None = None) -> Path:
        """extra_files: small files copied into the checkpoint (the tokenizer), so it is self-contained.

        Order of events (each a point a crash may hit; none loses the previous checkpoint):
        DeepSpeed writes its files into .tmp-step_N; every rank writes its RNG state; rank 0 adds
        meta.json and the extra files; every rank hashes and fsyncs a share of the files; rank 0
        writes the manifest, renames .tmp-step_N to step_N, replaces `latest`, applies retention."""
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
        if self.rank == 0:
            for file_name, src in (extra_files or {}).items():
                shutil.copyfile(src, tmp / file_name)
            (tmp / META).write_text(json.dumps(meta, indent=1))
        barrier()
        rank, world = _rank_world()
        mine = {rel: _digest_and_sync(tmp / rel) for rel in _my_share(_payload_files(tmp), rank, world)}
        entries = {k: v for part in all_gather(mine) for k, v in part.items()}
        final = self.root / name
        if self.rank == 0:
            write_manifest(tmp, entries)
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
        if self.keep_last > 0:
            ckpts = [c for c in complete_checkpoints(self.root) if c != keep]
            for old in ckpts[: max(0, len(ckpts) - (self.keep_last - 1))]:
                doomed = self.root / f".del-{old.name}"
                os.replace(old, doomed)  # atomic: a half-deleted checkpoint never looks complete
                shutil.rmtree(doomed, ignore_errors=True)
        from pretrain.reshard import UNIVERSAL_DIR

        universal = self.root / UNIVERSAL_DIR  # conversions of checkpoints that are gone
        if universal.is_dir():
            for conv in universal.iterdir():
                if STEP_DIR.match(conv.name) and not (self.root / conv.name).exists():
                    shutil.rmtree(conv, ignore_errors=True)

    def resolve(self, mode: str) -> Path | None:
        """The checkpoint to resume from for checkpoint.resume = never | auto | must | PATH. A
        collective: rank 0 lists the candidates, every rank verifies a share of each candidate's
        files, and all ranks get the same answer (or the same error)."""
        if mode == "never":
            return None
        candidates, error = [], None
        if self.rank == 0:
            recover_interrupted(self.root, self.log)
            if mode in ("auto", "must"):
                candidates = list(reversed(complete_checkpoints(self.root)))
            else:
                path = Path(mode)
                if path.is_dir() and not (path / MANIFEST).exists() and (path / "latest").is_file():
                    path = path / (path / "latest").read_text().strip()  # a checkpoints/ directory
                if path.is_dir():
                    candidates = [path]
                else:
                    error = f"--resume {mode}: no such checkpoint directory"
        candidates, error = broadcast_object((candidates, error))
        if error:
            raise CheckpointError(error)
        for ckpt in candidates:
            problem = verify_on_all_ranks(ckpt, self.verify_level)
            if problem is None:
                return ckpt
            if mode not in ("auto", "must"):
                raise CheckpointError(problem)
            self.log(f"[checkpoint] skipping damaged checkpoint: {problem}; trying the previous one")
        if mode == "must":
            found = [p.name for p in self.root.glob("*")] if self.root.exists() else "no directory"
            raise CheckpointError(f"--resume must: no complete checkpoint under {self.root} (found: {found})")
        return None

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


    def load_universal(self, engine, universal: Path, ckpt: Path) -> dict:
        """Loads the universal conversion of `ckpt` into an engine of another layout. The per-rank
        RNG streams do not carry over: every rank is reseeded from the seed, step and its rank."""
        meta = json.loads((ckpt / META).read_text())
        load_path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{universal}: DeepSpeed could not load the universal checkpoint")
        _unshare_step_counters(engine)
        seed = meta["config"]["run"]["seed"]
        reseed(seed * 1_000_003 + meta["step"] * 7919 + self.rank)
        self.log(f"[checkpoint] loaded the universal checkpoint {universal}; every rank's RNG reseeded from "
                 f"(seed {seed}, step {meta['step']}, rank)")
        return meta


def _unshare_step_counters(engine) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every parameter group the SAME 'step' tensor; torch's
    Adam increments it in place, once per group, so the second group's bias correction would run a
    step ahead. Each state gets its own copy."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen = set()
    for state in inner.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def reseed(seed: int) -> None:
    from model.parallel_rng import TP_RNG

    seed %= 2**63
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if TP_RNG.state is not None:  # only where a tensor-parallel stream is in use
        TP_RNG.seed(seed + 1)


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
