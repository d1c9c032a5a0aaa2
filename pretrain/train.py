"""python -m pretrain.train --config configs/quickstart.yaml [--set KEY=VALUE ...] [--resume auto]

Trains a GPT under a DeepSpeed engine. Run it through a launcher for several processes:
    bash launch/local.sh 2 -m pretrain.train --config configs/tiny.yaml
The config is validated before any process group starts; see `--help-config` for every key.

The job in three steps, each in its own module:
    build    pretrain/job.py      run directory, layout and groups, model, parallelism, engine, data
    restore  pretrain/restore.py  resume / reshard / fresh start
    loop     pretrain/loop.py     step, log, evaluate, save, stop
(checked before any of it: pretrain/preflight.py)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pretrain.cli import run
from pretrain.config import Config, describe_keys
from pretrain.data import Tokenizer
from pretrain.distributed import DistInfo, init_distributed
from pretrain.preflight import preflight


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (configs/*.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.placement=pre (repeatable)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="MODE",
        help="never | auto (newest complete checkpoint, else fresh) | must | PATH",
    )
    p.add_argument(
        "--anneal-from",
        default=None,
        metavar="CHECKPOINT",
        help="start the final decay / annealing phase (train.schedule wsd, infinite or power) at this checkpoint "
        "(or a run's newest): resumes it exactly and changes only the LR (train.decay_start = its step); the "
        "phase ends at train.max_steps",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh even if the run directory holds an earlier run's checkpoints (deletes them)",
    )
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if not args.help_config and not args.config:
        p.error("--config is required")
    if args.anneal_from and args.resume:
        p.error("--anneal-from resumes its checkpoint itself; leave out --resume")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe_keys())
        return 0
    overrides, resume = list(args.set), args.resume
    if args.anneal_from:  # = --resume CHECKPOINT with the decay starting at its step
        from pretrain.restore import anneal_checkpoint, check_anneal_target

        ckpt, step = anneal_checkpoint(args.anneal_from)
        overrides, resume = overrides + [f"train.decay_start={step}"], str(ckpt)
    cfg, tokenizer, lock = preflight(args.config, overrides, resume, args.overwrite)
    try:
        if args.anneal_from:
            check_anneal_target(Path(cfg.run.dir), ckpt, step)
        dist = init_distributed()
        train(cfg, tokenizer, dist)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if lock is not None:
            lock.release()
    return 0


def train(cfg: Config, tokenizer: Tokenizer, dist: DistInfo) -> None:
    from pretrain.job import build_job, build_model, open_run
    from pretrain.loop import TrainLoop
    from pretrain.restore import locate_resume, prepare_weights, restore

    run_ = open_run(cfg, tokenizer, dist)
    for line in cfg.train.derived:  # train.lr / global_batch_size auto, max_steps from train.tokens
        run_.log(f"[config] {line}")
    model = build_model(run_)
    point = locate_resume(run_)
    prepare_weights(run_, model, point)
    job = build_job(run_, model, load_universal=point.universal is not None)
    state = restore(job, point)
    TrainLoop(job, state).run_to_end()


if __name__ == "__main__":
    raise SystemExit(run(main))
