"""Saving and loading a DeepSpeed engine's checkpoint: complete, atomic, verified (DESIGN.md §7).

A checkpoint is written to `.tmp-step_N/` and renamed only when every rank has finished and the
manifest is written, so a crash mid-save leaves the previous checkpoints untouched and the partial
one is recognisably partial. The checkpoint directory must be on a filesystem all ranks share (as
DeepSpeed's own checkpoints assume).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import torch

from pretrain.checkpoint.layout import (
    LATEST,
    MANIFEST,
    META,
    CheckpointError,
    complete_checkpoints,
    fsync_dir,
    recover_interrupted,
    step_name,
)
from pretrain.checkpoint.manifest import (
    all_gather,
    digest_and_sync,
    payload_files,
    rank_world,
    share,
    verify_on_all_ranks,
    write_manifest,
)
from pretrain.checkpoint.retention import apply_retention
from pretrain.checkpoint.rng import reseed, rng_state, set_rng_state
from pretrain.checkpoint.safe_load import load_weights_only
from pretrain.distributed import barrier, broadcast_object
from pretrain.ds_compat import unshare_step_counters
from pretrain.fsutil import atomic_write_text


def _write_problem(error: Exception, root: Path) -> str:
    """'rank R: <what went wrong> (<file>)', for the error every rank raises. torch.save reports a
    full disk as a RuntimeError ('unexpected pos ...'), so the free space is looked at too."""
    text = (getattr(error, "strerror", None) or str(error).strip().splitlines()[-1]) if str(error) else repr(error)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 1 << 20):
        text = f"no space left on the device ({free:,} bytes free; {text})" if free is not None else text
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    return f"rank {rank_world()[0]}: {text}{where}"


# what every meta.json of this stack holds (pretrain/loop.py writes it)
META_KEYS = {"step": int, "config": dict, "world_size": int, "zero_stage": int}


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {META}; not a checkpoint of this stack") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / META}: unreadable ({e})") from None
    wrong = [k for k, kind in META_KEYS.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if wrong:
        raise CheckpointError(
            f"{ckpt / META}: no valid {', '.join(wrong)}; not a checkpoint of this stack, or a damaged one"
        )
    return meta


class Checkpointer:
    def __init__(self, root: Path, rank: int, keep_last: int, verify_level: str, log):
        self.root, self.rank, self.keep_last, self.verify_level, self.log = root, rank, keep_last, verify_level, log

    def save(self, engine, step: int, meta: dict, extra_files: dict[str, Path] | None = None) -> Path:
        """extra_files: small files copied into the checkpoint (the tokenizer), so it is self-contained.

        Order of events (each a point a crash may hit; none loses the previous checkpoint):
        DeepSpeed writes its files into .tmp-step_N; every rank writes its RNG state; rank 0 adds
        meta.json and the extra files; every rank hashes and fsyncs a share of the files; rank 0
        writes the manifest, renames .tmp-step_N to step_N, replaces `latest`, applies retention.

        A write that fails (a full disk, a read-only or vanished filesystem) on any rank fails the
        save on every rank with the same CheckpointError: the ranks agree after each phase instead of
        meeting at a bare barrier, so none waits forever for one that gave up. The half-written
        .tmp-step_N is removed and the previous checkpoints are left as they were."""
        name = step_name(step)
        tmp_tag = f".tmp-{name}"
        tmp = self.root / tmp_tag
        problem = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-*"):  # left by a save that crashed
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError as e:
                problem = _write_problem(e, self.root)
        self._agree(problem, name, tmp)
        t0 = time.perf_counter()
        problem = None
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state={"meta": meta}, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            problem = _write_problem(e, self.root)
            barrier()  # the other ranks wait in DeepSpeed's closing barrier
        if problem is None:
            try:
                torch.save(rng_state(), tmp / f"rng_rank{self.rank:05d}.pt")
                if self.rank == 0:
                    for file_name, src in (extra_files or {}).items():
                        shutil.copyfile(src, tmp / file_name)
                    (tmp / META).write_text(json.dumps(meta, indent=1))
            except (OSError, RuntimeError) as e:
                problem = _write_problem(e, self.root)
        self._agree(problem, name, tmp)
        rank, world = rank_world()
        mine, problem = {}, None
        try:
            mine = {rel: digest_and_sync(tmp / rel) for rel in share(payload_files(tmp), rank, world)}
        except OSError as e:
            problem = _write_problem(e, self.root)
        gathered = all_gather((problem, mine))
        self._agree(next((p for p, _ in gathered if p), None), name, tmp, gathered=True)
        entries = {k: v for _, part in gathered for k, v in part.items()}
        final = self.root / name
        problem = None
        if self.rank == 0:
            try:
                self._commit(tmp, final, entries)
            except OSError as e:
                problem = _write_problem(e, self.root)
        self._agree(broadcast_object(problem), name, tmp, gathered=True)
        if self.rank == 0:
            self.log(f"[checkpoint] saved {final} in {time.perf_counter() - t0:.1f}s")
        return final

    def _commit(self, tmp: Path, final: Path, entries: dict) -> None:
        """Rank 0: the manifest, the rename that makes the checkpoint complete, `latest`, retention."""
        write_manifest(tmp, entries)
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
            old = self.root / f".old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        fsync_dir(self.root)
        try:
            apply_retention(self.root, self.keep_last, keep=final)
        except OSError as e:  # the new checkpoint is complete; an old one that cannot be deleted is no reason to stop
            self.log(f"[checkpoint] warning: keep_last={self.keep_last}: could not delete an old checkpoint ({e})")

    def _agree(self, problem: str | None, name: str, tmp: Path, gathered: bool = False) -> None:
        """A collective: every rank learns whether any rank failed this phase of the save, and all
        raise the same CheckpointError. `gathered`: `problem` is already the same on every rank."""
        if not gathered:
            problem = next((p for p in all_gather(problem) if p), None)
        if problem is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space; nothing complete lives there
        kept = [p.name for p in complete_checkpoints(self.root)]
        raise CheckpointError(
            f"saving checkpoint {name} failed: {problem}; "
            + (f"the previous checkpoints ({', '.join(kept[-3:])}) are untouched" if kept else "no earlier checkpoint")
            + "; fix that (free space, a writable run.dir) and continue with --resume auto"
        )

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
                if path.is_dir() and not (path / MANIFEST).exists() and (path / LATEST).is_file():
                    path = path / (path / LATEST).read_text().strip()  # a checkpoints/ directory
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
        meta = read_meta(ckpt)
        self._load_engine(engine, ckpt.parent, ckpt.name, ckpt)
        rng_file = ckpt / f"rng_rank{self.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(load_weights_only(rng_file))
        else:
            self.log(f"[checkpoint] {rng_file.name} missing (different world size?); RNG reseeded")
        return meta

    def load_universal(self, engine, universal: Path, ckpt: Path) -> dict:
        """Loads the universal conversion of `ckpt` into an engine of another layout. The per-rank
        RNG streams do not carry over: every rank is reseeded from the seed, step and its rank."""
        meta = read_meta(ckpt)
        self._load_engine(engine, universal.parent, universal.name, universal)
        unshare_step_counters(engine)
        seed = meta["config"]["run"]["seed"]
        reseed(seed * 1_000_003 + meta["step"] * 7919 + self.rank)
        self.log(
            f"[checkpoint] loaded the universal checkpoint {universal}; every rank's RNG reseeded from "
            f"(seed {seed}, step {meta['step']}, rank)"
        )
        return meta

    def _load_engine(self, engine, root: Path, tag: str, what: Path) -> None:
        """engine.load_checkpoint, with a file DeepSpeed cannot read (a damaged checkpoint loaded with
        checkpoint.verify=none or size) turned into the same CheckpointError on every rank."""
        problem = None
        try:
            load_path, _ = engine.load_checkpoint(
                str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                problem = "DeepSpeed found nothing to load"
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError, pickle.UnpicklingError) as e:
            text = str(e).strip().splitlines()
            problem = f"rank {self.rank}: {type(e).__name__}: {text[0] if text else ''}"
        problem = next((p for p in all_gather(problem) if p), None)
        if problem:
            raise CheckpointError(
                f"{what}: DeepSpeed could not load it ({problem}); check it with checkpoint.verify=sha256, or "
                "resume from an earlier checkpoint (--resume PATH)"
            )
