"""bench/train_step.py measures what it says: ours and Hugging Face's Llama, built from the same
weights and trained by the same AdamW on the same tokens, follow the same loss curve (so the speed
ratio compares equal work), and the FLOPs per token match the model's own count up to the norm gains
(which are not matmul parameters)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_module

pytest.importorskip("transformers")


def test_ours_and_hf_llama_train_alike_and_report_their_speed():
    args = ["--config", "configs/tiny.yaml", "--compare", "hf", "--warmup", "1", "--steps", "3", "--vocab-size", "512"]
    proc = run_module(["bench/train_step.py", *args], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout)["runs"][0]
    ours, hf = run["contenders"]["ours"], run["contenders"]["hf_llama"]
    assert ours["params"] == hf["params"]
    assert ours["loss_first_last"] == pytest.approx(hf["loss_first_last"], abs=1e-4)
    assert ours["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0 and run["ours_over_hf_llama"] > 0
    d, L = run["dims"]["hidden"], run["dims"]["layers"]
    norm_gains = (2 * L + 1) * d  # two per block and the final one, for pre
    assert run["model_flops_per_token"] - run["flops_per_token"] == 6 * norm_gains
