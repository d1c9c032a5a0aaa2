"""bench/kernels.py runs and prints one valid JSON object (on CPU: the no-GPU report with the
interpreter smoke comparison, and the GPU harness in --cpu-dry-run mode)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full benchmark is run by hand")


def run_bench(*args):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_no_gpu_report():
    rep = run_bench()
    assert rep["gpu"] is False and "no CUDA GPU" in rep["note"] and rep["device"]
    smoke = rep["cpu_smoke"]
    assert set(smoke["ops"]) == {"rms_norm", "layer_norm", "add_norm", "peri_junction"}
    assert smoke["agree"] is True


def test_gpu_harness_dry_run():
    rep = run_bench("--cpu-dry-run", "--ops", "rms_norm", "peri_junction")
    providers = {(r["op"], r["provider"]) for r in rep["results"]}
    assert {("rms_norm", "triton"), ("rms_norm", "torch_eager"), ("peri_junction", "triton_unfused")} <= providers
    assert not [r for r in rep["results"] if "error" in r]
    assert rep["peri_junction_vs_unfused"] and rep["copy_bandwidth_gbps"] > 0
