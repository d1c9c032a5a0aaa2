"""Parallel layouts against one process: for each layout x placement, the largest per-step difference of
the training loss and of the gradient norm, and the largest relative difference of any parameter after
the last step (every run's final checkpoint consolidated to the plain model's fp32 weights). Prints JSON
and a Markdown table: the figures behind tests/test_parallel.py.

    python bench/layout_equality.py --out /tmp/layouts            # the default tiny model, 6 steps
    python bench/layout_equality.py --placements pre --layouts tp2 pp2-zero1 --data-dir data/bundled

Each run is a normal run directory under --out; the config is configs/tiny.yaml unless --config.

What a correct layout meets (TOLERANCE, asserted by the tests), and why not zero: the layouts add the
same numbers in another order in fp32 -- data parallelism averages gradients with an all-reduce instead
of accumulating micro-batches in one process, tensor parallelism splits matmuls into partial sums, the
pipeline changes the accumulation order of micro-batch gradients.
  loss       1e-5 absolute on a loss of ~7.6 (measured: at most ~1e-6)
  grad_norm  1e-5 relative, every step, before clipping (measured: at most ~3e-7). A data-parallel
             gradient summed instead of averaged doubles it; a norm gradient left unreduced under
             sequence parallelism moves it by ~1e-3.
  params     1e-4 relative (|w - w_ref| / |w_ref| per tensor, after the last step; measured: ~3e-7
             under dp and pp, ~1e-5 under tp). Adam divides by sqrt(v): an element whose gradient is
             near zero because its terms cancel gets an update of size ~lr from rounding noise, so
             rounding that is 1e-7 in the gradient becomes 1e-5 in the weights; a wrong gradient moves
             them by 1e-3 and more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # pretrain.* for reading the runs back
LAYOUTS = {
    "dp2-zero0": (2, ["zero.stage=0"]),
    "dp2-zero1": (2, ["zero.stage=1"]),
    "dp2-zero2": (2, ["zero.stage=2"]),
    "dp2-zero3": (2, ["zero.stage=3"]),
    "tp2": (2, ["parallel.tp=2", "train.micro_batch_size=8"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=8"]),
    "pp2-zero1": (2, ["parallel.pp=2", "zero.stage=1"]),
    "dp2xtp2": (4, ["parallel.tp=2"]),
    "dp2xpp2": (4, ["parallel.pp=2"]),
    "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=8"]),
}
REFERENCE = ["zero.stage=0"]  # one process, the global batch in two micro-batches
TOLERANCE = {"loss": 1e-5, "grad_norm": 1e-5, "params": 1e-4}


def step_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> its metrics.jsonl training record (loss, grad_norm, ...)."""
    from pretrain.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl", "train")}


def final_weights(run_dir: Path) -> dict:
    """The plain model's fp32 weights from the run's newest checkpoint, whatever its layout (a tied
    output layer is the embedding: left out)."""
    from pretrain.checkpoint import complete_checkpoints
    from pretrain.checkpoint.consolidate import consolidated_state_dict

    state = consolidated_state_dict(complete_checkpoints(Path(run_dir) / "checkpoints")[-1])
    if _tied(run_dir):
        state.pop("head.weight", None)
    return state


def _tied(run_dir: Path) -> bool:
    import yaml

    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["model"]["tie_embeddings"]


def differences(run_dir: Path, reference_dir: Path) -> dict:
    """The largest differences of a run from the reference run: loss (absolute) and gradient norm
    (relative) over the steps, parameters (relative, per tensor) after the last step."""
    run, ref = step_metrics(run_dir), step_metrics(reference_dir)
    if sorted(run) != sorted(ref):
        raise ValueError(f"{run_dir}: steps {sorted(run)}, the reference has {sorted(ref)}")
    out = {
        "loss": max(abs(run[s]["loss"] - ref[s]["loss"]) for s in ref),
        "grad_norm": max(abs(run[s]["grad_norm"] / ref[s]["grad_norm"] - 1) for s in ref),
    }
    weights, ref_weights = final_weights(run_dir), final_weights(reference_dir)
    if weights.keys() != ref_weights.keys():
        raise ValueError(f"{run_dir}: parameters {sorted(weights.keys() ^ ref_weights.keys())} differ in name")
    rel = {k: float((weights[k] - w).detach().norm() / w.detach().norm()) for k, w in ref_weights.items()}
    out["params"] = max(rel.values())
    out["worst_param"] = max(rel, key=rel.get)
    return out


def within(diff: dict) -> list[str]:
    """The measures of `differences` that exceed TOLERANCE (empty: the layout trains like one process)."""
    return [f"{k} {diff[k]:.2e} > {tol:.0e}" for k, tol in TOLERANCE.items() if not diff[k] <= tol]


def run(out: Path, name: str, nproc: int, sets: list[str], args) -> Path:
    run_dir = out / name
    cmd = [
        "bash",
        str(ROOT / "launch" / "local.sh"),
        str(nproc),
        "-m",
        "pretrain.train",
        "--config",
        args.config,
        "--set",
        f"run.dir={run_dir}",
        "--set",
        f"data.dir={args.data_dir}",
        "--set",
        f"train.max_steps={args.steps}",
        "--set",
        "train.warmup_steps=2",
        "--set",
        "checkpoint.every=0",  # the last step is saved anyway: its weights are compared
        "--set",
        "train.eval_every=0",
        "--set",
        "train.diagnostics_every=0",
    ]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return run_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--placements", nargs="+", default=["pre", "peri"])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--data-dir", default="data/bundled")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="runs/layouts")
    args = p.parse_args()
    out = Path(args.out)
    table = {}
    for placement in args.placements:
        ref = run(out, f"single-{placement}", 1, [f"model.placement={placement}", *REFERENCE], args)
        for layout in args.layouts:
            nproc, sets = LAYOUTS[layout]
            run_dir = run(out, f"{layout}-{placement}", nproc, sets + [f"model.placement={placement}"], args)
            table.setdefault(layout, {})[placement] = differences(run_dir, ref)
    print(json.dumps({"bench": "layout_equality", "steps": args.steps, "tolerance": TOLERANCE, "max_diff": table}))
    print("\n| layout | " + " | ".join(f"{p}: loss / grad norm / params" for p in args.placements) + " |")
    print("|---" * (len(args.placements) + 1) + "|")
    for layout, row in table.items():
        cells = [
            f"{d['loss']:.1e} / {d['grad_norm']:.1e} / {d['params']:.1e}" for d in (row[p] for p in args.placements)
        ]
        print(f"| {layout} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
