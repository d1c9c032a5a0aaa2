"""bench/train_step.py measures what it says: the dimensions and vocabulary of the config it is given;
ours and Hugging Face's Llama, built from the same weights and trained by the same AdamW on the same
tokens, follow the same loss curve (so the speed ratio compares equal work); every side reports its own
process's peak memory and the dtypes its optimizer really holds; and the FLOPs per token match the
model's own count up to the norm gains (which are not matmul parameters)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_module


def test_ours_and_hf_llama_train_alike_side_by_side():
    args = ["--config", "configs/tiny.yaml", "--set", "model.vocab_size=512", "--modes", "eager"]
    proc = run_module(["bench/train_step.py", *args, "--warmup", "1", "--steps", "3"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["dims"]["vocab"] == 512 and r["vocab_source"] == "model.vocab_size in the config"
    assert (r["dims"]["hidden"], r["dims"]["layers"], r["dims"]["seq"]) == (64, 2, 64)  # configs/tiny.yaml
    eager = r["modes"]["eager"]
    assert eager["skipped"] == {}
    ours, hf, peri = (eager["sides"][s] for s in ("ours:pre", "hf:pre", "ours:peri"))
    assert ours["params"] == hf["params"]
    # the same weights, tokens and optimizer: step 0 agrees to float rounding, later steps to AdamW's
    # amplification of rounding differences in near-zero gradients
    assert ours["losses"][0] == pytest.approx(hf["losses"][0], abs=1e-5)
    assert eager["loss_curves_max_abs_diff"] <= 1e-3
    for side in (ours, hf, peri):
        assert side["tokens_per_s"] > 0 and side["peak_memory_bytes"] > side["rss_after_setup_bytes"] > 0
        assert side["peak_memory_bytes"] > side["rss_after_warmup_bytes"]  # the measured steps' own peak
        assert side["param_dtype"] == "float32" and side["optimizer_state_dtypes"] == ["float32"]
    assert eager["ours_over_hf_tokens_per_s"] > 0 and eager["peri_over_pre_step_time"] > 0
    L, d = r["dims"]["layers"], r["dims"]["hidden"]
    assert r["model_flops_per_token"] - r["flops_per_token"] == 6 * (2 * L + 1) * d  # pre: 2 norms per block + final
