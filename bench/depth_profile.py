"""Per-layer residual-stream variance by placement: trains the quickstart model once per placement
(2 local processes) and prints the depth diagnostics of the last diagnostics step as JSON, plus a
Markdown table.

    python bench/depth_profile.py --placements pre peri lns --steps 300 --out runs/depth
    python bench/depth_profile.py --summarize-only --out runs/depth     # re-read finished runs

Each placement is a normal run directory (runs/depth/<placement>), resumed if interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def last_diagnostics(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    records = [r for r in map(json.loads, path.read_text().splitlines()) if "layer_var" in r]
    return records[-1] if records else None


def last_validation(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    records = [r for r in map(json.loads, path.read_text().splitlines()) if "bits_per_byte" in r]
    return records[-1] if records else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--placements", nargs="+", default=["pre", "peri", "lns"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--out", default="runs/depth")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    timings = {}
    for placement in args.placements:
        if args.summarize_only:
            break
        t0 = time.time()
        cmd = [
            "bash",
            str(ROOT / "launch" / "local.sh"),
            str(args.nproc),
            "-m",
            "pretrain.train",
            "--config",
            args.config,
            "--resume",
            "auto",
            "--set",
            f"model.placement={placement}",
            "--set",
            f"run.dir={out / placement}",
            "--set",
            f"train.max_steps={args.steps}",
            "--set",
            f"train.diagnostics_every={max(1, args.steps // 3)}",
            "--set",
            f"train.eval_every={args.steps}",
            "--set",
            f"checkpoint.every={args.steps}",
        ]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        timings[placement] = round(time.time() - t0, 1)
    result = {"bench": "depth_profile", "config": args.config, "steps": args.steps, "runs": {}}
    for placement in args.placements:
        diag, val = last_diagnostics(out / placement), last_validation(out / placement)
        if diag is None:
            continue
        result["runs"][placement] = {
            "step": diag["step"],
            "layer_var": diag["layer_var"],
            "layer_max_abs": diag["layer_max_abs"],
            "layer_grad_norm": diag["layer_grad_norm"],
            "layer_attn_entropy": diag["layer_attn_entropy"],
            "valid_loss": val and val["loss"],
            "valid_bpb": val and val["bits_per_byte"],
            "seconds": timings.get(placement),
        }
    print(json.dumps(result))
    runs = result["runs"]
    if runs:
        layers = len(next(iter(runs.values()))["layer_var"])
        print("\n| placement | " + " | ".join(["emb"] + [f"L{i}" for i in range(1, layers)]) + " | valid loss |")
        print("|---" * (layers + 2) + "|")
        for name, r in runs.items():
            print(
                f"| {name} (step {r['step']}) | "
                + " | ".join(f"{v:.3g}" for v in r["layer_var"])
                + f" | {r['valid_loss']:.4f} |"
            )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
