"""Everything checked before a process group exists: the config, the data it points at, the batch
arithmetic for this world size, the user's DeepSpeed JSON, and what this machine can run. A
problem found here costs the user seconds, not a hung job on every rank."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from kernels.errors import ConfigError, EnvironmentCheckError
from pretrain.config import Config, check_world, load_config, parse_blend, resolve, tokenizer_path
from pretrain.data import Tokenizer
from pretrain.data.indexed import open_indexed
from pretrain.engine import deepspeed_config
from pretrain.rundir import RunLock, prepare_run_directory


def preflight(
    config_path: str, overrides: list[str], resume: str | None = None, overwrite: bool = False
) -> tuple[Config, Tokenizer, RunLock | None]:
    """The resolved config, the tokenizer and (on rank 0) the run directory's lock, or the first
    problem as a PretrainError."""
    overrides = list(overrides) + ([f"checkpoint.resume={resume}"] if resume else [])
    cfg = load_config(config_path, overrides)
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.precision: 'fp16' needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16); "
            "allowed on CPU: fp32, bf16"
        )
    tokenizer = Tokenizer(tokenizer_path(cfg.data))
    cfg = resolve(cfg, tokenizer.vocab_size)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed_config(cfg, check_world(cfg, world_size))  # a user JSON that disagrees fails here
    for split in ("train", "valid"):
        for _, prefix in parse_blend(f"data.{split}", getattr(cfg.data, split)):
            open_indexed(prefix)
    check_environment(cfg)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir = Path(cfg.run.dir)
        lock = RunLock(run_dir).acquire()
        try:
            prepare_run_directory(run_dir, cfg.checkpoint.resume, overwrite)
        except BaseException:
            lock.release()
            raise
    return cfg, tokenizer, lock


def check_environment(cfg: Config) -> None:
    """What this machine must offer for the config: the requested norm kernels, and disk for a checkpoint."""
    from kernels import resolve_backend

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.kernels.backend != "auto":
        resolve_backend(cfg.kernels.backend, device, hidden_size=cfg.model.hidden_size)  # EnvironmentCheckError
    check_checkpoint_disk(cfg)


def checkpoint_bytes(cfg: Config) -> int:
    """About what one checkpoint of this model takes on disk, all ranks together: the weights in the
    training precision, the fp32 master weights and both Adam moments."""
    from model.inventory import model_inventory

    weight_bytes = 4 if cfg.train.precision == "fp32" else 2
    master = 0 if cfg.train.precision == "fp32" else 4
    return model_inventory(cfg.model).total * (weight_bytes + master + 8 + 4)


def check_checkpoint_disk(cfg: Config) -> None:
    folder = Path(cfg.run.dir).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = int(checkpoint_bytes(cfg) * 1.1)
    if free < need:
        raise EnvironmentCheckError(
            f"run.dir {cfg.run.dir}: {free / 2**30:.2f} GiB free on its filesystem, a checkpoint of this model needs "
            f"about {need / 2**30:.2f} GiB; free space, or point run.dir at a larger filesystem"
        )
