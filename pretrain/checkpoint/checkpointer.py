"""Saving and loading a DeepSpeed engine's checkpoint: complete, atomic, verified (DESIGN.md §7).

A checkpoint is written to `.tmp-step_N/` and renamed only when every rank has finished and the
manifest is written, so a crash mid-save leaves the previous checkpoints untouched and the partial
one is recognisably partial. The checkpoint directory must be on a filesystem all ranks share (as
DeepSpeed's own checkpoints assume).
"""

from __future__ import annotations

import json
import os
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


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {META}; not a checkpoint of this stack") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / META}: unreadable ({e})") from None


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
        rank, world = rank_world()
        mine = {rel: digest_and_sync(tmp / rel) for rel in share(payload_files(tmp), rank, world)}
        entries = {k: v for part in all_gather(mine) for k, v in part.items()}
        final = self.root / name
        if self.rank == 0:
            write_manifest(tmp, entries)
            fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
                old = self.root / f".old-{name}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            atomic_write_text(self.root / LATEST, name + "\n")
            fsync_dir(self.root)
            apply_retention(self.root, self.keep_last, keep=final)
            self.log(f"[checkpoint] saved {final} in {time.perf_counter() - t0:.1f}s")
        barrier()
        return final

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
        load_path, _ = engine.load_checkpoint(
            str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")
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
        load_path, _ = engine.load_checkpoint(
            str(universal.parent), tag=universal.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"{universal}: DeepSpeed could not load the universal checkpoint")
        unshare_step_counters(engine)
        seed = meta["config"]["run"]["seed"]
        reseed(seed * 1_000_003 + meta["step"] * 7919 + self.rank)
        self.log(
            f"[checkpoint] loaded the universal checkpoint {universal}; every rank's RNG reseeded from "
            f"(seed {seed}, step {meta['step']}, rank)"
        )
        return meta
