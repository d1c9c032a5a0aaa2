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
        "--overwrite",
        action="store_true",
        help="start fresh even if the run directory holds an earlier run's checkpoints (deletes them)",
    )
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if not args.help_config and not args.config:
        p.error("--config is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe_keys())
        return 0
    cfg, tokenizer, lock = preflight(args.config, args.set, args.resume, args.overwrite)
    try:
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
    model = build_model(run_)
    point = locate_resume(run_)
    prepare_weights(run_, model, point)
    job = build_job(run_, model, load_universal=point.universal is not None)
    state = restore(job, point)
    TrainLoop(job, state).run_to_end()


if __name__ == "__main__":
    raise SystemExit(run(main))
