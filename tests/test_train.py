"""Training for real: 2 gloo processes under DeepSpeed on the bundled text; exact resume against an
uninterrupted run; the held-out evaluation against a direct computation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.data.indexed import open_indexed
from tests.conftest import check, run_module, tiny_args
from tests.conftest import train_losses as losses

pytestmark = pytest.mark.distributed


def bundled_dir_of(run_dir):
    import yaml

    return Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dir"])


@pytest.fixture(scope="module")
def uninterrupted(bundled_dir, tmp_path_factory):
    """20 steps of the tiny Peri-LN model, dp=2, ZeRO-1, one process group start to finish."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    check(run_module(tiny_args(bundled_dir, run_dir), nproc=2))
    return run_dir


def test_two_process_training_lowers_the_loss(uninterrupted):
    curve = losses(uninterrupted)
    assert sorted(curve) == list(range(1, 21))
    assert curve[1] == pytest.approx(math.log(2048), abs=0.15)  # uniform over the 2,048-token vocabulary
    # After 20 steps the model has learned most of the token frequencies: its loss is within 0.5 nats of
    # the unigram entropy of the training split (6.3 nats here; uniform is 7.6).
    train = open_indexed(str(bundled_dir_of(uninterrupted) / "train"))
    counts = np.bincount(np.concatenate([train[i] for i in range(len(train))]), minlength=2048).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    assert np.mean([curve[s] for s in (18, 19, 20)]) < unigram_entropy + 0.5
    log = (uninterrupted / "train.log").read_text()
    assert "world 2 = pp 1 x dp 2 x tp 1" in log and "world 2 (gloo); ZeRO-1" in log
    assert (uninterrupted / "config.yaml").is_file() and list((uninterrupted / "tb").iterdir())
    ckpts = uninterrupted / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000020"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000010", "step_000020"]
    saved = ckpts / "step_000020"
    assert (saved / "tokenizer.model").read_bytes() == (bundled_dir_of(uninterrupted) / "tokenizer.model").read_bytes()
    assert json.loads((saved / "meta.json").read_text())["consumed_samples"] == 20 * 8


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([], marks=pytest.mark.slow),  # slow: the default suite resumes ZeRO-3, TP+SP and PP
        pytest.param(["zero.stage=2"], marks=pytest.mark.slow),
        ["zero.stage=3"],
        ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=8"],
        ["parallel.pp=2"],
        # the first stage holds the untied embedding alone: one optimizer group fewer than the last stage
        ["parallel.pp=2", "model.placement=pre", "model.tie_embeddings=false"],
    ],
    ids=["dp2-zero1", "dp2-zero2", "dp2-zero3", "tp2-sp", "pp2", "pp2-untied-embedding-stage"],
)
def test_stop_and_resume_reproduces_the_uninterrupted_losses(bundled_dir, uninterrupted, tmp_path, layout):
    run_dir = tmp_path / "resumed"
    if not layout:
        reference = losses(uninterrupted)
    else:
        reference_dir = tmp_path / "reference"
        check(run_module(tiny_args(bundled_dir, reference_dir, *layout), nproc=2))
        reference = losses(reference_dir)
    check(run_module(tiny_args(bundled_dir, run_dir, "train.exit_at_step=7", *layout), nproc=2))
    assert sorted(losses(run_dir)) == list(range(1, 8))
    proc = check(run_module(tiny_args(bundled_dir, run_dir, *layout) + ["--resume", "auto"], nproc=2))
    assert "resumed from" in proc.stdout and "step_000007" in proc.stdout
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == reference  # bit for bit


def test_resume_must_without_checkpoint_fails_clearly(bundled_dir, tmp_path):
    proc = run_module(tiny_args(bundled_dir, tmp_path / "empty") + ["--resume", "must"], nproc=1)
    assert proc.returncode == 3
    assert "--resume must: no complete checkpoint under" in proc.stderr
    assert not (tmp_path / "empty").exists()  # refused before the run directory (lock, log) was made


def test_resume_refuses_a_different_model_shape(bundled_dir, uninterrupted, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    proc = run_module(tiny_args(bundled_dir, run_dir, "model.num_layers=3") + ["--resume", "auto"], nproc=2)
    assert proc.returncode != 0  # torchrun reports a failed worker as 1
    assert "model.num_layers: checkpoint 2, now 3" in proc.stderr


def test_eval_matches_a_direct_computation(bundled_dir, uninterrupted):
    """pretrain.eval's JSON against plain torch: the saved weights, every test token, and the
    test documents' own UTF-8 bytes (not the tokenizer's byte table)."""
    check(run_module(["-m", "pretrain.eval", "--run", str(uninterrupted)]))
    result = json.loads((uninterrupted / "eval" / "test_step_000020.json").read_text())
    assert {"loss", "perplexity", "bits_per_byte", "checkpoint", "step", "tokens", "bytes"} <= set(result)
    assert result["step"] == 20 and result["checkpoint"].endswith("step_000020")

    from pretrain.checkpoint.consolidate import load_checkpoint_model
    from pretrain.data.corpus import bundled_corpus

    model, cfg, _ = load_checkpoint_model(uninterrupted / "checkpoints" / "step_000020")
    tokens = torch.from_numpy(np.fromfile(bundled_dir / "test.bin", dtype=np.uint16).astype(np.int64))
    T = cfg.model.seq_len
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, T * 32):
            chunk = tokens[start : start + T * 32 + 1]
            n = (len(chunk) - 1) // T * T
            if n == 0:
                x, y = chunk[:-1][None], chunk[1:][None]
            else:
                x, y = chunk[:n].view(-1, T), chunk[1 : n + 1].view(-1, T)
            nll += F.cross_entropy(model(x).reshape(-1, model.cfg.vocab_size), y.reshape(-1), reduction="sum").item()
            count += y.numel()
            if n and n < len(chunk) - 1:  # the ragged tail of this chunk
                x, y = chunk[n:-1][None], chunk[n + 1 :][None]
                nll += F.cross_entropy(
                    model(x).reshape(-1, model.cfg.vocab_size), y.reshape(-1), reduction="sum"
                ).item()
                count += y.numel()
    assert result["tokens"] == count == len(tokens) - 1
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    _, test_docs = bundled_corpus(log=lambda *_: None)
    text_bytes = sum(len(d.text.encode("utf-8")) for d in test_docs)
    assert result["bytes"] == pytest.approx(text_bytes, rel=1e-3)
    assert result["bits_per_byte"] == pytest.approx(nll / (math.log(2) * text_bytes), rel=1e-3)
