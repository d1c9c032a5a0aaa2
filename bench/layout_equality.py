"""Loss curves of parallel layouts against one process: prints JSON and a Markdown table of the
largest per-step loss difference for each layout x placement (the figures behind tests/test_parallel.py).

    python bench/layout_equality.py --out /tmp/layouts            # the default tiny model, 6 steps
    python bench/layout_equality.py --placements pre --layouts tp2 pp2-zero1 --data-dir data/bundled

Each run is a normal run directory under --out; the config is configs/tiny.yaml unless --config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def run(out: Path, name: str, nproc: int, sets: list[str], args) -> dict[int, float]:
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
        "checkpoint.every=0",
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
    return {
        r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r
    }


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
        ref = run(out, f"single-{placement}", 1, [f"model.placement={placement}", "zero.stage=0"], args)
        for layout in args.layouts:
            nproc, sets = LAYOUTS[layout]
            curve = run(out, f"{layout}-{placement}", nproc, sets + [f"model.placement={placement}"], args)
            table.setdefault(layout, {})[placement] = max(abs(curve[s] - ref[s]) for s in ref)
    print(json.dumps({"bench": "layout_equality", "steps": args.steps, "max_abs_loss_diff": table}))
    print("\n| layout | " + " | ".join(args.placements) + " |")
    print("|---" * (len(args.placements) + 1) + "|")
    for layout, row in table.items():
        print(f"| {layout} | " + " | ".join(f"{row[p]:.1e}" for p in args.placements) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
