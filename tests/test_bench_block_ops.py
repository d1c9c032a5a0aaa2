"""bench/block_ops.py runs each hand-written op beside the composition it replaces and reports what each keeps
for backward: the SwiGLU function keeps its input only (2F per token, the composition 3F), RMSNorm x and
one statistic per row (the composition also keeps x^2-derived and normalised copies), the fused loss no
logits, attention no probabilities. Timings are printed, never asserted."""

from __future__ import annotations

import json

from tests.conftest import run_module


def test_block_ops_bench_reports_every_op_side_by_side():
    args = ["--tokens", "64", "--batch", "2", "--hidden", "32", "--heads", "4", "--ffn", "48", "--vocab", "128"]
    proc = run_module(["bench/block_ops.py", *args, "--reps", "2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert set(r["ops"]) == {"rms_norm", "swiglu", "rope_qkv", "peri_junction", "sdpa_layout", "attention",
                             "fused_loss"}  # fmt: skip
    for op in r["ops"].values():
        assert all(ms > 0 for ms in op["fwd_bwd_ms"].values()) and op["speedup"] > 0
    kept = {k: v["saved_for_backward_bytes"] for k, v in r["ops"].items()}
    tokens, ffn, vocab = 64, 48, 128
    assert kept["swiglu"]["ours"] == tokens * 2 * ffn * 4
    assert kept["swiglu"]["composition"] == tokens * 3 * ffn * 4
    assert kept["rms_norm"]["ours"] < kept["rms_norm"]["composition"]
    assert kept["fused_loss"]["composition"] - kept["fused_loss"]["ours"] >= tokens * vocab * 4  # the logits
    # attention keeps what SDPA keeps (q, k, v, out, one log-sum-exp per row), not the probabilities
    assert kept["attention"]["ours"] == kept["attention"]["SDPA"] < kept["attention"]["composition"]
    # the fused CPU kernels beside the same functions on torch's ops, each keeping the same for backward
    assert r["cpu_kernels"] == "loaded"
    for name in ("rms_norm", "swiglu", "rope_qkv", "peri_junction", "attention", "fused_loss"):
        assert r["ops"][name]["kernels_over_torch_ops"] > 0
        assert kept[name]["ours"] == kept[name]["ours, torch ops"]
