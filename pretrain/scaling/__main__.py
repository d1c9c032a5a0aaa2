"""python -m pretrain.scaling {sweep,evaluate,archive,fit,report} ...

  sweep configs/sweeps/NAME.yaml [--only PATTERN ...] [--cpus N] [--gpus N] [--out DIR] [--no-eval] [--dry-run]
      train and evaluate every cell of the grid (finished cells skipped, interrupted ones resumed)
  evaluate --cell DIR [--light]
      evaluate one cell's final checkpoint (what the sweep runs after training a cell)
  archive configs/sweeps/NAME.yaml --to DIR [--out DIR]
      copy the finished cells' results, without checkpoints, to a directory small enough to commit;
      `--out DIR` then reads it back in every command (`sweep` counts its cells as finished)
  fit configs/sweeps/NAME.yaml [--out DIR] [--metric valid_loss|valid_bpb|test_loss|test_bpb] [--json FILE]
      scaling-law fits per placement with bootstrap intervals; the held-out size predicted by the law,
      a 2-parameter power law and the naive baseline (fit.json)
  report configs/sweeps/NAME.yaml [--out DIR] [--out-dir DIR]
      REPORT.md with plots (LR sweep, loss curves, loss vs parameters, depth diagnostics), the claims'
      verdicts, the recipe of every cell, and summary.json beside it

--out DIR: where the sweep's cells are, instead of the `out` of the sweep file (the same option for
every command, so a sweep trained elsewhere can be fitted and reported from any checkout).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _load(args):
    from pretrain.scaling.spec import load_sweep

    return load_sweep(args.file, out=getattr(args, "out", None))


def _sweep(args) -> int:
    """Runs what the sweep holds now; with an LR search, loads it again once the search cells are done
    (their evaluations decide the best learning rates) and runs the cells that were waiting for them."""
    from pretrain.scaling.sweep import SweepRunner

    previous = None
    while True:
        sweep = _load(args)
        if args.cpus is not None or args.gpus is not None:
            sweep.resources = dataclasses.replace(
                sweep.resources, **{k: v for k, v in (("cpus", args.cpus), ("gpus", args.gpus)) if v is not None}
            )
        runner = SweepRunner(sweep, evaluate=not args.no_eval, progress_every=args.progress_every)
        if args.dry_run:
            _dry_run(sweep, runner)
            return 0
        todo = {
            (c.name, tuple(p))
            for c in sweep.cells
            if (not args.only or any(pat in c.name for pat in args.only)) and (p := runner.phases_needed(c))
        }
        if previous is not None and (not todo or todo == previous):  # done, or nothing more this round can do
            break
        rc = runner.run(args.only)
        if rc:
            return rc
        previous = todo
    if not sweep.waiting:
        return 0
    waiting = ", ".join(f"{_key_text(k)} ({n} cells)" for k, n in sweep.waiting.items())
    print(
        f"[sweep] {sweep.name}: cells still wait for their best learning rate: {waiting}; the LR search "
        "that decides it is not complete (see `--dry-run`)",
        file=sys.stderr,
    )
    return 1


def _key_text(key: tuple) -> str:
    return ", ".join(f"{a}={v}" for a, v in key) or "all"


def _dry_run(sweep, runner) -> None:
    print(f"{'cell':<56} {'steps':>6} {'tokens':>11} {'GFLOP/token':>12}  to do")
    for cell in sweep.cells:
        todo = runner.phases_needed(cell)
        role = "" if cell.study and not cell.search else "  (LR search)" if not cell.study else "  (LR search, study)"
        print(
            f"{cell.name:<56} {cell.max_steps:>6} {cell.tokens:>11,} {runner.flops[cell.name] / 1e9:>12.4f}  "
            f"{'+'.join(todo) or 'finished'}{'  (held out)' if sweep.is_held_out(cell) else ''}{role}"
        )
    for key, choice in sweep.lr_choices.items():
        state = (
            f"best lr {choice.lr:g}" + (" (at the edge of the grid)" if choice.at_edge else "")
            if choice.lr is not None
            else f"pending: {choice.why_pending}; {sweep.waiting.get(key, 0)} cells wait"
        )
        print(f"[lr] {_key_text(key)}: {state}")


def _evaluate(args) -> int:
    from pretrain.scaling.cell_eval import evaluate_cell

    evaluate_cell(args.cell, light=args.light)
    return 0


def _archive(args) -> int:
    from pretrain.scaling.archive import archive_sweep

    sweep = _load(args)
    archived, left_out = archive_sweep(sweep, Path(args.to))
    print(f"[archive] {sweep.name}: {len(archived)} finished cells copied to {args.to}")
    if left_out:
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        print(f"[archive] {len(left_out)} cells not finished, left out: {shown}")
    return 0


def _fit(args) -> int:
    from pretrain.scaling.fit import FIT_FILE, fit_sweep, summary_lines, write_fit

    sweep = _load(args)
    result = fit_sweep(sweep, args.metric, args.bootstrap, args.seed, args.huber_delta)
    print("\n".join(summary_lines(result)))
    path = write_fit(result, Path(args.json) if args.json else sweep.out / FIT_FILE)
    print(f"[fit] wrote {path}")
    return 0


def _report(args) -> int:
    from pretrain.scaling.report import write_report

    sweep = _load(args)
    path = write_report(
        sweep,
        Path(args.out_dir) if args.out_dir else sweep.out / "report",
        args.metric,
        args.bootstrap,
        args.seed,
        args.huber_delta,
    )
    print(f"[report] wrote {path}")
    return 0


def _fit_options(p: argparse.ArgumentParser) -> None:
    """The options `fit` and `report` share: the sweep, where its cells are, and how the law is fitted."""
    from pretrain.scaling.results import METRICS

    p.add_argument("file", help="sweep definition (configs/sweeps/*.yaml)")
    p.add_argument("--out", help="where the cells are (default: the sweep's out)")
    p.add_argument(
        "--metric",
        default="valid_loss",
        choices=list(METRICS),
        help="what the law is fitted to (default: the in-domain validation loss)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--huber-delta", type=float, default=1e-3, help="Huber threshold on log-loss residuals")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    e.add_argument("--light", action="store_true", help="held-out losses and the initial loss only (LR-search cells)")
    e.set_defaults(fn=_evaluate)
    a = sub.add_parser("archive", help="copy the finished cells' results (no checkpoints) to a directory to commit")
    a.add_argument("file", help="sweep definition (configs/sweeps/*.yaml)")
    a.add_argument("--out", help="where the cells are (default: the sweep's out)")
    a.add_argument("--to", required=True, help="the archive directory (read back with --out DIR)")
    a.set_defaults(fn=_archive)
    f = sub.add_parser("fit", help="fit scaling laws to the evaluated cells")
    _fit_options(f)
    f.add_argument("--json", help="where to write the fits (default: <out>/fit.json)")
    f.set_defaults(fn=_fit)
    r = sub.add_parser("report", help="write REPORT.md and its plots")
    _fit_options(r)
    r.add_argument("--out-dir", help="where to write the report (default: <out>/report)")
    r.set_defaults(fn=_report)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    from pretrain.cli import run

    raise SystemExit(run(main))
