"""Everything checked before a process group exists: the config, the data it points at, the batch
arithmetic for this world size, the user's DeepSpeed JSON, and what this machine can run (the norm
kernels, disk for a checkpoint, the rendezvous address and port). A problem found here costs the
user seconds, not a hung job on every rank."""

from __future__ import annotations

import errno
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from kernels.errors import ConfigError, EnvironmentCheckError
from pretrain.config import Config, check_world, load_config, parse_blend, resolve, tokenizer_path
from pretrain.data import DataError, Tokenizer
from pretrain.data.indexed import open_indexed
from pretrain.data.provenance import check_data_tokenizer, check_init_from_tokenizer
from pretrain.engine import deepspeed_config
from pretrain.rundir import RunLock, prepare_run_directory

# Token files up to this size are scanned in full for ids outside the vocabulary (about 0.3 s per
# GiB); larger ones are checked batch by batch as they are read (pretrain/data/loader.py).
SCAN_LIMIT_BYTES = 2 << 30


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
    check_rendezvous()
    check_data(cfg, tokenizer)
    check_init_from_tokenizer(cfg.checkpoint.init_from, tokenizer)
    check_environment(cfg)
    check_something_to_resume(cfg)
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


def check_something_to_resume(cfg: Config) -> None:
    """--resume must with no checkpoint at all fails before the run directory, its lock or its log
    exist (a damaged or half-written checkpoint is left to the checkpointer, which reports it)."""
    from pretrain.checkpoint import CheckpointError

    root = Path(cfg.run.dir) / "checkpoints"
    if cfg.checkpoint.resume == "must" and not (root.is_dir() and any(root.iterdir())):
        raise CheckpointError(f"--resume must: no complete checkpoint under {root} (found: nothing)")


# ---------------------------------------------------------------------------------------- data


def check_data(cfg: Config, tokenizer: Tokenizer) -> None:
    """Every training and validation prefix opens, holds tokens, and was made with this tokenizer (as
    its prepared directory records, and as its token ids show)."""
    for split in ("train", "valid"):
        for weight, prefix in parse_blend(f"data.{split}", getattr(cfg.data, split)):
            if not math.isfinite(weight):  # float('nan') and 'inf' parse, and nan <= 0 is False
                raise ConfigError(f"data.{split}: the weight {weight} of '{prefix}' is not a finite positive number")
            dataset = open_indexed(prefix)
            if int(dataset.sequence_lengths.sum()) == 0:
                raise DataError(
                    f"data.{split}: '{prefix}' holds no tokens (an empty corpus); prepare it from text "
                    "with `python -m pretrain.data prepare` or remove it from the blend"
                )
            check_data_tokenizer([prefix], tokenizer)  # a prepared directory records its tokenizer
            check_token_ids(prefix, dataset, tokenizer, f"data.{split}")


def check_token_ids(prefix: str, dataset, tokenizer: Tokenizer, where: str) -> None:
    """Every token id must be one of the tokenizer's (a file of another tokenizer's ids would index
    past the embedding, or silently train on other text)."""
    path = prefix + ".bin"
    if os.path.getsize(path) > SCAN_LIMIT_BYTES:
        return  # too large to scan at every start: the loader checks each batch as it reads it
    tokens = np.memmap(path, dtype=dataset.index.dtype, mode="r")
    largest = max((int(tokens[i : i + (1 << 26)].max()) for i in range(0, len(tokens), 1 << 26)), default=0)
    if largest >= tokenizer.vocab_size:
        raise DataError(
            f"{where}: '{prefix}' holds token id {largest}, outside data.tokenizer's vocabulary of "
            f"{tokenizer.vocab_size} ({tokenizer.path}): it was tokenized with another tokenizer; use "
            "that one, or prepare the data again with this one"
        )


# ---------------------------------------------------------------------------------- environment


def check_environment(cfg: Config) -> None:
    """What this machine must offer for the config: the requested norm kernels and disk for a
    checkpoint (the rendezvous is checked first, by check_rendezvous)."""
    from kernels import resolve_backend

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.kernels.backend != "auto":
        resolve_backend(cfg.kernels.backend, device, hidden_size=cfg.model.hidden_size)  # EnvironmentCheckError
    check_checkpoint_disk(cfg)
    check_offload(cfg)


def check_offload(cfg: Config) -> None:
    """ZeRO-Offload / ZeRO-Infinity: DeepSpeed's CPU Adam op, and for NVMe a writable folder with room and the
    async_io op (libaio), checked here rather than when the first rank's engine fails (pretrain/zero.py)."""
    from pretrain.zero import check_offload_environment

    check_offload_environment(cfg)


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


def check_rendezvous(env=os.environ) -> None:
    """MASTER_ADDR must resolve (torch would retry an unresolvable name until its 30-minute timeout),
    and where this process is rank 0 and opens the rendezvous store itself (a single process, the
    DeepSpeed launcher, srun; not under torchrun, whose agent owns the port) MASTER_PORT must be free."""
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if port is not None:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise EnvironmentCheckError(f"MASTER_PORT={port!r} is not a port number (1..65535)")
    if addr:
        try:
            socket.getaddrinfo(addr, None)
        except (socket.gaierror, UnicodeError) as e:
            raise EnvironmentCheckError(
                f"MASTER_ADDR={addr!r} does not resolve ({getattr(e, 'strerror', None) or e}); set it to the address "
                "or a resolvable name of the node that runs rank 0"
            ) from None
    under_torchrun = "TORCHELASTIC_RUN_ID" in env  # the agent chose the port and owns (or hands over) the store
    if port is None or under_torchrun or int(env.get("RANK", "0")) != 0:
        return
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store does: TIME_WAIT is no conflict
    try:
        probe.bind(("", int(port)))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise EnvironmentCheckError(
                f"MASTER_PORT={port} is in use on this node (another job, or one still shutting down); choose a "
                "free port (MASTER_PORT=..., or --master_port for torchrun and deepspeed)"
            ) from None
        raise EnvironmentCheckError(f"MASTER_PORT={port}: cannot listen on it ({e.strerror})") from None
    finally:
        probe.close()
