"""DeepSpeed-Ulysses sequence parallelism (parallel.ulysses; model/ulysses.py, pretrain/parallel.py).

The reference is one process with the plain model: the same weights (the full build, same seed), the same
global batch, the loss a mean over micro-batches of each one's masked mean, gradients from autograd. Against
it: the loss and every parameter's full gradient (deepspeed.utils.safe_get_full_grad, tensor-parallel shards
put back together) of real process groups where each rank holds a slice of every sequence, with a loss mask
that leaves the slices different numbers of tokens (so the per-slice weighting matters); the loss curve of a
training run; a resume that continues bit for bit; and the refusals."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pretrain.config import ConfigError, check_world, load_config, resolve
from pretrain.parallel import Layout
from tests.conftest import ROOT, end_worker_case, finish_worker, run_module, tiny_args, train_losses

TINY = str(ROOT / "configs" / "tiny.yaml")
TOLERANCE = 1e-5  # fp32; the layouts add the same numbers in another order (see tests/test_parallel.py)


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "sets, message",
    [
        (["parallel.ulysses=3"], "parallel.ulysses: 3 x parallel.tp 1 = 3 does not divide model.num_heads=4"),
        (["parallel.ulysses=4", "model.num_kv_heads=2"], "does not divide model.num_kv_heads=2"),
        (["parallel.ulysses=2", "parallel.tp=2", "model.num_kv_heads=2"], "= 4 does not divide model.num_kv_heads=2"),
        (["parallel.ulysses=2", "model.seq_len=63"], "model.seq_len=63 is not divisible by parallel.ulysses=2"),
        (
            ["parallel.ulysses=2", "parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=66"],
            "model.seq_len=66 is not divisible by parallel.ulysses x parallel.tp (sequence parallel) = 4",
        ),
        (["parallel.ulysses=2", "parallel.pp=2"], "with parallel.pp=2 is not supported"),
        (["parallel.ulysses=0"], "parallel.ulysses: 0 is below the minimum 1"),
    ],
)
def test_layouts_ulysses_cannot_run_are_refused_with_what_would(sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, sets)


def test_the_world_must_hold_whole_ulysses_groups():
    cfg = load_config(TINY, ["parallel.ulysses=2", "parallel.tp=2", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"world size 6 is not a multiple of parallel.tp x parallel.pp x "):
        check_world(cfg, 6)
    assert check_world(cfg, 8) == 1  # dp = 8 / (tp 2 x ulysses 2) = 2: global 8 = micro 4 x dp 2


def test_rank_layout_is_megatrons_tp_cp_dp_pp_order():
    """Layout.place against megatron-core's own rank generator (what initialize_model_parallel builds its
    tensor-, context- (our Ulysses) and data-parallel groups from)."""
    from megatron.core.parallel_state import RankGenerator

    for tp, u, dp, pp in [(1, 2, 2, 1), (2, 2, 2, 1), (2, 4, 1, 1), (1, 2, 1, 2), (2, 2, 2, 2)]:
        lay = Layout(tp=tp, pp=pp, dp=dp, ulysses=u)
        gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=u, order="tp-cp-ep-dp-pp")
        for axis, index in (("tp", 3), ("cp", 2), ("dp", 1), ("pp", 0)):
            for group in gen.get_ranks(axis):
                others = {tuple(v for i, v in enumerate(lay.place(r)) if i != index) for r in group}
                assert len(others) == 1, (axis, group)  # one group varies exactly one coordinate
                assert sorted(lay.place(r)[index] for r in group) == list(range(len(group)))
        assert lay.zero_partitions == dp * u


# ----------------------------------------------------------------- loss and gradients, by hand

# name -> (processes, overrides): micro-batch 2 per data-parallel rank, one micro-batch a step
GRAD_CASES = {
    "u2-zero3-gqa": (2, ["parallel.ulysses=2", "zero.stage=3", "model.num_kv_heads=2"]),
    "dp2xu2-zero1-full-recompute": (4, ["parallel.ulysses=2", "zero.stage=1", "train.activation_checkpointing=full"]),
    "tp2xu2-sp-zero2": (4, ["parallel.ulysses=2", "parallel.tp=2", "parallel.sequence_parallel=true", "zero.stage=2"]),
    "u4-zero0-qknorm-selective": (
        4,
        ["parallel.ulysses=4", "zero.stage=0", "model.qk_norm=true", "model.placement=pre"]
        + ["train.activation_checkpointing=selective"],  # the all-to-all inside recomputed code
    ),
}
MICRO = 2


def _batch(vocab: int, rows: int, seq: int):
    """A fixed global batch; the loss mask drops tokens unevenly along the sequence (whole Ulysses slices in
    some rows, a few tokens in others)."""
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq)
    mask[0, : seq // 2 + 5] = 0
    mask[1, -7:] = 0
    if rows > 2:
        mask[2, 3:11] = 0
    return tokens, labels, mask


def _grads_worker(out_path: str, run_root: str, names: list[str]) -> None:
    """Worker (torchrun): one optimizer step's forward and backward of each case through the trainer's code
    (pretrain/job.py: meta build, tensor parallelism, Ulysses, sharded init; pretrain/engine.py), and the
    single-process reference on rank 0; writes the loss and the largest gradient difference per case."""
    from pretrain.distributed import init_distributed

    dist = init_distributed()
    from deepspeed.utils import safe_get_full_grad

    from model import build_model
    from model.init import parameter_names
    from model.parallelize import unshard
    from pretrain.engine import build_engine
    from pretrain.job import build_model as job_build_model
    from pretrain.job import open_run, parallelize
    from pretrain.parallel import DeepSpeedMPU, needs_mpu

    results = {}
    for name in names:
        _, sets = GRAD_CASES[name]
        sets = [*sets, f"run.dir={run_root}/{name}", f"train.micro_batch_size={MICRO}"]
        p = load_config(TINY, sets).parallel
        layout_dp = dist.world_size // (p.tp * p.pp * p.ulysses)  # one micro-batch per replica a step
        cfg = resolve(load_config(TINY, [*sets, f"train.global_batch_size={MICRO * layout_dp}"]), 2048)
        run = open_run(cfg, None, dist)
        model = job_build_model(run)
        module = parallelize(run, model)
        engine, _ = build_engine(module, cfg, run.grad_accum, mpu=DeepSpeedMPU() if needs_mpu(run.layout) else None)
        tokens, labels, mask = _batch(cfg.model.vocab_size, MICRO * layout_dp, cfg.model.seq_len)
        rows = slice(run.dp_rank * MICRO, (run.dp_rank + 1) * MICRO)
        loss = engine(*(t[rows].to(dist.device) for t in (tokens, labels, mask)))
        engine.backward(loss)
        names_of = parameter_names(model)
        grads = {}
        for param in dict.fromkeys(module.parameters()):
            g = safe_get_full_grad(param).detach().float().clone()  # a collective under ZeRO-3
            if run.layout.tp > 1:
                parts = [torch.empty_like(g) for _ in range(run.layout.tp)]
                torch.distributed.all_gather(parts, g.contiguous(), group=run.groups["tp"])
                g = unshard(names_of[id(param)], parts, cfg.model.mlp == "swiglu")
            grads[names_of[id(param)]] = g.cpu()
        losses = [None] * dist.world_size
        torch.distributed.all_gather_object(losses, (run.dp_rank, float(loss)))
        if dist.rank == 0:
            torch.manual_seed(cfg.run.seed)
            plain, _ = build_model(cfg.model, "torch", "cpu")
            ref_losses = [
                plain(
                    tokens[d * MICRO : (d + 1) * MICRO],
                    labels[d * MICRO : (d + 1) * MICRO],
                    mask[d * MICRO : (d + 1) * MICRO],
                )
                for d in range(layout_dp)
            ]
            torch.stack(ref_losses).mean().backward()
            ref = {n: q.grad for n, q in plain.named_parameters()}
            results[name] = {
                "loss_diff": max(abs(v - float(ref_losses[d])) for d, v in losses),
                "grad_rel_diff": {
                    n: float((grads[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30)) for n in ref
                },
                "missing": sorted(set(ref) - set(grads)),
            }
        engine.destroy()  # ZeRO-3's hooks on the model, before the next case builds another
        end_worker_case()
    finish_worker(dist.rank, results, out_path)


def _run_grad_cases(tmp_path, names: list[str]) -> dict:
    (nproc,) = {GRAD_CASES[n][0] for n in names}
    out = tmp_path / "grads.json"
    proc = run_module(
        ["-m", "tests.test_ulysses", "--grads", str(out), str(tmp_path), *names], nproc=nproc, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_same_as_one_process(result: dict) -> None:
    assert result["missing"] == []
    assert result["loss_diff"] <= TOLERANCE
    worst = max(result["grad_rel_diff"].items(), key=lambda kv: kv[1])
    assert worst[1] <= TOLERANCE, f"largest relative gradient difference {worst}"


@pytest.mark.distributed
def test_ulysses_with_zero3_and_gqa_matches_one_process(tmp_path):
    """2 ranks share each sequence, ZeRO-3 partitions over both, 2 KV heads (one per rank after the all-to-all)."""
    _assert_same_as_one_process(_run_grad_cases(tmp_path, ["u2-zero3-gqa"])["u2-zero3-gqa"])


@pytest.mark.distributed
@pytest.mark.slow
def test_ulysses_with_data_tensor_and_sequence_parallelism_matches_one_process(tmp_path):
    """4 processes: dp 2 x ulysses 2 (ZeRO-1 over both, whole blocks recomputed), tp 2 x ulysses 2 with Megatron
    sequence parallelism (ZeRO-2), ulysses 4 (ZeRO-0, QK-norm, the attention core recomputed)."""
    names = ["dp2xu2-zero1-full-recompute", "tp2xu2-sp-zero2", "u4-zero0-qknorm-selective"]
    results = _run_grad_cases(tmp_path, names)
    assert sorted(results) == names
    for result in results.values():
        _assert_same_as_one_process(result)


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: Ulysses' all-to-all over NCCL")
def test_ulysses_on_gpus_matches_one_process(tmp_path):
    """The same check on GPUs (NCCL all-to-all, SDPA's GPU kernels), ZeRO-3 and GQA; the reference runs on the
    CPU of rank 0, hence the looser tolerance (GPU matmuls round differently)."""
    result = _run_grad_cases(tmp_path, ["u2-zero3-gqa"])["u2-zero3-gqa"]
    assert result["missing"] == [] and result["loss_diff"] <= 1e-4
    assert max(result["grad_rel_diff"].values()) <= 1e-3


# ------------------------------------------------------------------ training runs: curve, resume

STEPS = 4
COMMON = [f"train.max_steps={STEPS}", "train.warmup_steps=1", "train.eval_every=0", "train.diagnostics_every=0"]


def _train(bundled_dir, run_dir, nproc, sets):
    proc = run_module(tiny_args(bundled_dir, run_dir, *COMMON, *sets), nproc=nproc, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
@pytest.mark.slow
def test_ulysses_training_curve_matches_one_process(bundled_dir, tmp_path):
    _train(bundled_dir, tmp_path / "single", 1, ["zero.stage=0", "checkpoint.every=0"])
    _train(bundled_dir, tmp_path / "u2", 2, ["parallel.ulysses=2", "zero.stage=2", "checkpoint.every=0"])
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "u2")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[s] - b[s]) for s in a) <= TOLERANCE


@pytest.mark.slow  # 36 s; the default suite's resume cases cover the checkpoint path, this the Ulysses layout
@pytest.mark.distributed
def test_ulysses_resume_continues_bit_for_bit(bundled_dir, tmp_path):
    """ulysses 2 with ZeRO-1: stopped after step 2 with a checkpoint and resumed, steps 3-4 equal the
    uninterrupted run's exactly (weights, optimizer, schedule, data position, every rank's RNG restored)."""
    sets = ["parallel.ulysses=2", "zero.stage=1", "checkpoint.every=2", "model.dropout=0.1"]
    _train(bundled_dir, tmp_path / "whole", 2, sets)
    _train(bundled_dir, tmp_path / "cut", 2, [*sets, "train.exit_at_step=2"])
    proc = run_module(
        tiny_args(bundled_dir, tmp_path / "cut", *COMMON, *sets) + ["--resume", "auto"], nproc=2, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    whole, cut = train_losses(tmp_path / "whole"), train_losses(tmp_path / "cut")
    assert [whole[s] for s in range(1, STEPS + 1)] == [cut[s] for s in range(1, STEPS + 1)]


if __name__ == "__main__":  # the worker of the gradient tests, started by torchrun
    if sys.argv[1:2] == ["--grads"]:
        _grads_worker(sys.argv[2], sys.argv[3], sys.argv[4:])


def test_a_change_of_the_ulysses_size_is_a_data_parallel_change_for_the_checkpoint():
    """Ulysses splits sequences, not parameters: a resume across a change of its size converts ZeRO's
    partitions like a change of dp (tests/test_reshard.py runs it); ZeRO-0 loads directly. A checkpoint
    written before `ulysses` was recorded counts as ulysses 1."""
    from pretrain.checkpoint.universal import needs_conversion

    saved = {"world_size": 2, "zero_stage": 1, "layout": {"tp": 1, "pp": 1, "dp": 1, "ulysses": 2}}
    now = {"tp": 1, "pp": 1, "dp": 2, "ulysses": 1, "zero_stage": 1}
    assert needs_conversion(saved, now) == "dp 1 -> 2, ulysses 2 -> 1"
    assert needs_conversion(saved, dict(now, dp=1, ulysses=2)) is None
    zero0 = dict(saved, zero_stage=0)
    assert needs_conversion(zero0, dict(now, zero_stage=0)) is None
    old = {"world_size": 2, "zero_stage": 1, "layout": {"tp": 1, "pp": 1, "dp": 2}}
    assert needs_conversion(old, dict(now, dp=2, ulysses=1)) is None
