"""Training-stability signals (pretrain/diagnostics.py): the largest attention logit and the smallest per-head
attention entropy of each layer, and the output logits' mean, max and mean log-partition, against direct torch
computations; the same numbers under tensor, sequence, pipeline and Ulysses parallelism as in one process; and
their records in metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from model import build_model
from pretrain.config import Config, ModelConfig, load_config, resolve
from pretrain.diagnostics import activation_stats
from pretrain.metrics import read_metrics
from tests.conftest import ROOT, check, end_worker_case, finish_worker, run_module, tiny_args

TINY = str(ROOT / "configs" / "tiny.yaml")
STABILITY = ("attn_logit_max", "attn_entropy_min", "attn_entropy", "logit_mean", "logit_max", "log_z_mean")


def sharpen_last_group(blocks, factor: float, holds_last_group: bool = True) -> None:
    """Multiplies the query rows of the last KV group of the last block by `factor`: its heads get the largest
    logits and the smallest entropy, and sit on the last tensor-parallel (or Ulysses) rank, so a statistic
    that is not combined over ranks comes out wrong."""
    attn = blocks[-1].attn.fn
    w = attn.qkv.weight
    if w.is_meta or not holds_last_group:
        return
    with torch.no_grad():
        grouped = w.view(attn.num_kv_heads, attn.q_per_kv + 2, attn.head_dim, w.shape[-1])
        grouped[-1, : attn.q_per_kv].mul_(factor)


# --------------------------------------------------------------------- one process, by hand


def tiny_model(placement: str, qk_norm: bool):
    cfg = Config()
    cfg.model = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        seq_len=12,
        placement=placement,
        qk_norm=qk_norm,
    )
    torch.manual_seed(0)
    model = build_model(resolve(cfg).model, "torch")[0].eval()
    with torch.no_grad():  # attention far from uniform, different per head
        for i, block in enumerate(model.blocks):
            attn = block.attn.fn
            for norm in (attn.q_norm, attn.k_norm):
                for p in norm.parameters():
                    p.mul_(2.0 + i)
            attn.qkv.weight.mul_(5.0)
        sharpen_last_group(model.blocks, 4.0)
    return model


def direct_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn) -> tuple[list[float], float]:
    """Per-head mean entropy and the largest unmasked logit, from the model's own q, k (T, B, heads, hd), in
    float64; the probabilities are checked to be the ones SDPA applies (same output)."""
    t, _, h, hd = q.shape
    group = torch.arange(h) // (h // k.shape[2])  # the KV head each query head reads
    scores = torch.einsum("ibhd,jbhd->bhij", q.double(), k.double()[:, :, group]) / math.sqrt(hd)
    keep = torch.arange(t)[:, None] >= torch.arange(t)[None, :]
    p = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    sdpa = attn.attend(q, k, v).double().permute(1, 2, 0, 3)  # (B, H, T, hd)
    assert torch.allclose(p @ v.double()[:, :, group].permute(1, 2, 0, 3), sdpa, atol=1e-5)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)  # (B, H, T)
    return entropy.mean(dim=(0, 2)).tolist(), float(scores[:, :, keep].max())


@pytest.mark.parametrize("placement, qk_norm", [("pre", True), ("peri", False), ("post", True)])
def test_stability_signals_equal_a_direct_computation(placement, qk_norm):
    model = tiny_model(placement, qk_norm)
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    stats = activation_stats(model, model.blocks, tokens, model=model)

    inputs = {}  # what each attention sublayer really receives
    handles = [
        b.attn.fn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        for i, b in enumerate(model.blocks)
    ]
    with torch.no_grad():
        logits = model(tokens).double()  # (B, T, V)
        per_layer = [direct_attention(*b.attn.fn.split_qkv(inputs[i]), b.attn.fn) for i, b in enumerate(model.blocks)]
    for h in handles:
        h.remove()

    entropies = [e for e, _ in per_layer]
    assert stats["attn_entropy"] == pytest.approx([sum(e) / len(e) for e in entropies], rel=1e-5)
    assert stats["attn_entropy_min"] == pytest.approx([min(e) for e in entropies], rel=1e-5)
    assert stats["attn_logit_max"] == pytest.approx([m for _, m in per_layer], rel=1e-5)
    last = entropies[-1]
    assert min(last) < 0.9 * sum(last) / len(last)  # the sharpened heads stand out: the min is not the mean
    assert stats["logit_mean"] == pytest.approx(float(logits.mean()), rel=1e-5, abs=1e-7)
    assert stats["logit_max"] == pytest.approx(float(logits.max()), rel=1e-6)
    assert stats["log_z_mean"] == pytest.approx(float(torch.logsumexp(logits, dim=-1).mean()), rel=1e-6)


def test_chunked_reads_give_the_same_numbers(monkeypatch):
    """Logits read a few rows at a time and attention a few heads at a time (the probe never holds an fp32 copy
    of all logits, nor every head's probabilities at long sequences) give the numbers of one whole read."""
    import pretrain.diagnostics as diagnostics

    logits = torch.randn(7, 3, 50, dtype=torch.float64) * 10
    q, k = torch.randn(2, 9, 6, 4) * 3, torch.randn(2, 9, 3, 4) * 3
    whole, (whole_entropy, whole_peak) = diagnostics.logit_stats(logits), diagnostics.attention_stats(q, k)
    monkeypatch.setattr(diagnostics, "LOGIT_CHUNK_ELEMENTS", 120)  # 2 rows of 50 per chunk
    monkeypatch.setattr(diagnostics, "SCORE_CHUNK_ELEMENTS", 2 * 2 * 9 * 9)  # 2 heads per chunk
    assert diagnostics.logit_stats(logits) == pytest.approx(whole, rel=1e-6)
    entropy, peak = diagnostics.attention_stats(q, k)
    assert entropy.tolist() == pytest.approx(whole_entropy.tolist(), rel=1e-6) and float(peak) == float(whole_peak)
    assert whole["log_z_mean"] == pytest.approx(float(torch.logsumexp(logits, -1).mean()), rel=1e-6)


# ------------------------------------------------------------------- layouts against one process

# name -> (processes, overrides of configs/tiny.yaml); GQA: 2 KV heads of 4, one per tp / Ulysses rank
LAYOUTS = {
    # first: DeepSpeed keeps the mpu of a tensor-parallel case for the engines built after it
    "dp2-zero3": (2, ["zero.stage=3"]),  # the hooks' module calls gather partitioned parameters
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2-unfused": (2, ["parallel.pp=2", "train.fused_loss=false"]),
    "pp2-untied": (2, ["parallel.pp=2", "model.tie_embeddings=false"]),  # the output layer: its own stage module
    "u2": (2, ["parallel.ulysses=2"]),
}
SLOW_LAYOUTS = {  # 4 processes: heads split over tp and Ulysses, the residual stream over both
    "tp2-u2-sp": (4, ["parallel.tp=2", "parallel.ulysses=2", "parallel.sequence_parallel=true", "model.num_kv_heads=4"])
}
COMMON = ["model.num_kv_heads=2", "model.num_layers=2", "train.micro_batch_size=2", "zero.stage=1"]


def _layout_worker(out_path: str, run_root: str, names: list[str]) -> None:
    """Worker (torchrun): each layout built by the trainer's code (pretrain/job.py, pretrain/engine.py), probed
    through its runner (pretrain/runner.py) as at a diagnostics step; rank 0 also probes the plain one-process
    model of the same weights. Writes both per case."""
    from pretrain.distributed import init_distributed

    dist = init_distributed()
    from pretrain.engine import build_engine
    from pretrain.job import build_model as job_build_model
    from pretrain.job import open_run, parallelize
    from pretrain.parallel import DeepSpeedMPU, needs_mpu
    from pretrain.runner import EngineRunner, PipelineRunner

    results = {}
    for name in names:
        _, sets = {**LAYOUTS, **SLOW_LAYOUTS}[name]
        sets = [*COMMON, *sets, f"run.dir={run_root}/{name}"]
        p = load_config(TINY, sets).parallel
        dp = dist.world_size // (p.tp * p.pp * p.ulysses)
        cfg = resolve(load_config(TINY, [*sets, f"train.global_batch_size={2 * dp}"]), 2048)
        run = open_run(cfg, None, dist)
        model = job_build_model(run)
        module = parallelize(run, model)
        factor = 300.0 if cfg.zero.stage < 3 else 1.0  # ZeRO-3 partitioned the weights as it made them
        sharpen_last_group(model.blocks, factor, holds_last_group=run.coords[2] == run.layout.tp - 1)
        engine, _ = build_engine(module, cfg, run.grad_accum, mpu=DeepSpeedMPU() if needs_mpu(run.layout) else None)
        runner_kind = PipelineRunner if run.layout.pp > 1 else EngineRunner
        runner = runner_kind(engine, None, cfg, run.layout, run.dp_rank, run.grad_accum, dist.device, run.groups)
        tokens = torch.randint(
            0, cfg.model.vocab_size, (3, cfg.model.seq_len), generator=torch.Generator().manual_seed(5)
        )
        engine.eval()
        stats = runner.probe(tokens.to(dist.device))
        every_rank = [None] * dist.world_size
        torch.distributed.all_gather_object(every_rank, stats)
        if dist.rank == 0:
            torch.manual_seed(cfg.run.seed)
            plain, _ = build_model(cfg.model, "torch", "cpu")
            sharpen_last_group(plain.blocks, factor)
            plain.loss_spec = model.loss_spec
            plain.eval()
            results[name] = {"ranks": every_rank, "one": activation_stats(plain, plain.blocks, tokens, model=plain)}
        engine.destroy()
        end_worker_case()
    finish_worker(dist.rank, results, out_path)


def _probe_layouts(tmp, layouts: dict) -> dict:
    """All `layouts` (same process count) in one torchrun launch: one start-up for all cases."""
    (nproc,) = {n for n, _ in layouts.values()}
    out = tmp / "results.json"
    proc = run_module(
        ["-m", "tests.test_stability_signals", "--layouts", str(out), str(tmp), *layouts], nproc=nproc, timeout=600
    )
    check(proc)
    return json.loads(out.read_text())


def _assert_same_as_one_process(name: str, result: dict, sharpened: bool = True) -> None:
    one = result["one"]
    if sharpened:  # the sharpened heads: the minimum entropy is far from the mean
        assert min(one["attn_entropy_min"]) < 0.5 * min(one["attn_entropy"])
    for rank, stats in enumerate(result["ranks"]):
        for key in STABILITY + ("var", "rms", "max_abs"):  # the residual stream too: Ulysses slices it
            assert stats[key] == pytest.approx(one[key], rel=2e-5, abs=1e-6), (name, rank, key)


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory) -> dict:
    return _probe_layouts(tmp_path_factory.mktemp("stability-layouts"), LAYOUTS)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_stability_signals_do_not_depend_on_the_layout(layout_results, name):
    _assert_same_as_one_process(name, layout_results[name], sharpened="zero3" not in name)


@pytest.mark.distributed
@pytest.mark.slow  # 4 processes
def test_stability_signals_with_tensor_sequence_and_ulysses_parallelism(tmp_path):
    for name, result in _probe_layouts(tmp_path, SLOW_LAYOUTS).items():
        _assert_same_as_one_process(name, result)


# ------------------------------------------------------------------------- metrics.jsonl and log


@pytest.mark.distributed
def test_a_training_run_writes_the_stability_record(bundled_dir, tmp_path):
    run_dir = tmp_path / "run"
    check(
        run_module(
            tiny_args(
                bundled_dir,
                run_dir,
                "train.max_steps=4",
                "train.warmup_steps=1",
                "train.diagnostics_every=2",
                "train.eval_every=0",
                "checkpoint.every=0",
            )
        )
    )
    rows = read_metrics(run_dir / "metrics.jsonl", "stability")
    assert [r["step"] for r in rows] == [2, 4]
    layers = 2  # configs/tiny.yaml
    for r in rows:
        assert len(r["layer_attn_logit_max"]) == len(r["layer_attn_entropy_min"]) == layers
        assert r["attn_logit_max"] == max(r["layer_attn_logit_max"])
        assert r["attn_entropy_min"] == min(r["layer_attn_entropy_min"])
        assert 0 < r["attn_entropy_min"] <= math.log(64)  # nats, at most log(sequence length)
        # log Z >= the largest logit's share: lse >= max >= mean
        assert r["log_z_mean"] > r["logit_mean"] and r["logit_max"] > r["logit_mean"]
    log = (run_dir / "train.log").read_text()
    assert "[stability] step 2: attn logit max" in log and "log Z mean" in log
    assert "stability/attn_logit_max" in _tensorboard_tags(run_dir)


def _tensorboard_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


if __name__ == "__main__":  # the worker of the layout tests, started by torchrun
    if sys.argv[1:2] == ["--layouts"]:
        _layout_worker(sys.argv[2], sys.argv[3], sys.argv[4:])
