"""python -m pretrain.scaling {sweep,evaluate} ...

  sweep configs/sweeps/NAME.yaml [--only PATTERN ...] [--cpus N] [--gpus N] [--no-eval] [--dry-run]
      train and evaluate every cell of the grid (finished cells skipped, interrupted ones resumed)
  evaluate --cell DIR
      evaluate one cell's final checkpoint (what the sweep runs after training a cell)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError
from pretrain.data import DataError


def _sweep(args) -> int:
    from pretrain.scaling.spec import load_sweep
    from pretrain.scaling.sweep import SweepRunner

    sweep = load_sweep(args.file)
    if args.cpus is not None or args.gpus is not None:
        sweep.resources = dataclasses.replace(
            sweep.resources, **{k: v for k, v in (("cpus", args.cpus), ("gpus", args.gpus)) if v is not None})
    if args.out:
        from pretrain.scaling.spec import expand

        sweep.out = __import__("pathlib").Path(args.out)
        sweep.cells = expand(sweep)
    runner = SweepRunner(sweep, evaluate=not args.no_eval, progress_every=args.progress_every)
    if args.dry_run:
        print(f"{'cell':<48} {'steps':>6} {'tokens':>10} {'GFLOP/token':>12}  to do")
        for cell in sweep.cells:
            todo = runner.phases_needed(cell)
            print(f"{cell.name:<48} {cell.max_steps:>6} {cell.tokens:>10,} {runner.flops[cell.name] / 1e9:>12.4f}  "
                  f"{'+'.join(todo) or 'finished'}{'  (held out)' if sweep.is_held_out(cell) else ''}")
        return 0
    return runner.run(args.only)


def _evaluate(args) -> int:
    from pretrain.scaling.evaluate import evaluate_cell

    evaluate_cell(args.cell)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="run a sweep's cells")
    s.add_argument("file", help="sweep definition (configs/sweeps/*.yaml)")
    s.add_argument("--only", nargs="+", metavar="PATTERN", help="only cells whose name contains one of these")
    s.add_argument("--cpus", type=int, help="override resources.cpus")
    s.add_argument("--gpus", type=int, help="override resources.gpus")
    s.add_argument("--out", help="override the sweep's output directory")
    s.add_argument("--no-eval", action="store_true", help="train only; evaluate later")
    s.add_argument("--dry-run", action="store_true", help="list the cells and what each still needs")
    s.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS")
    s.set_defaults(fn=_sweep)
    e = sub.add_parser("evaluate", help="evaluate one cell")
    e.add_argument("--cell", required=True, help="the cell's run directory")
    e.set_defaults(fn=_evaluate)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
