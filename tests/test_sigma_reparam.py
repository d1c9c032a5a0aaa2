"""sigma-Reparam (model/sigma_reparam.py, model.sigma_reparam) against independent references: the spectral norm
from torch.linalg.matrix_norm (whole and tensor-parallel shards, 2 gloo processes), the formula
W_hat = gamma / (u^T W v) * W written out in torch, the plain model (the initial function is unchanged), the
tp=1 model with the same weights (a tp=2 model: losses, gradients and power-iteration vectors), an
uninterrupted run (resume with every stability remedy on, bit for bit) and the model's own eval logits (the HF
export, which folds the reparametrisation into the weights)."""

from __future__ import annotations

import copy
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import pytest
import torch
import torch.nn.functional as F

from kernels.errors import ConfigError
from model import build_model
from model.placement import PLACEMENTS
from model.recompute import apply_activation_checkpointing
from model.sigma_reparam import INIT_ITERATIONS, ReparamLinear, SigmaReparam, initial_sigma
from pretrain.config import load_config
from tests.conftest import ROOT, check, end_worker_case, finish_worker, run_module, tiny_args, train_losses
from tests.test_model import make_cfg

TINY = str(ROOT / "configs" / "tiny.yaml")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


# ------------------------------------------------------------------------------------ one matrix


def test_power_iteration_converges_to_the_spectral_norm():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    exact = torch.linalg.matrix_norm(w, ord=2)
    r = SigmaReparam(48, 32)
    r.initialize(w)
    r.power_iteration(w, steps=500)
    torch.testing.assert_close(r.sigma(w), exact, rtol=1e-5, atol=0)
    # the initial estimate (gamma's init): INIT_ITERATIONS steps from the fixed start vector
    assert abs(initial_sigma(w) / exact - 1) < 2e-2, (INIT_ITERATIONS, initial_sigma(w), exact)


def test_training_forward_is_one_power_step_then_gamma_over_sigma_times_w():
    torch.manual_seed(0)
    lin = ReparamLinear(12, 20)
    with torch.no_grad():
        lin.sigma.gamma.fill_(1.7)
    x = torch.randn(5, 12)
    lin(x)  # the first forward sets u, v (initial estimate); no step on top
    u0 = lin.sigma.u.clone()
    w = lin.weight.detach().clone().requires_grad_(True)
    gamma = torch.tensor(1.7, requires_grad=True)
    # the reference: one step v <- W^T u, u <- W v, then sigma = u^T W v with u, v constants
    v1 = _unit(w.detach().t() @ u0)
    u1 = _unit(w.detach() @ v1)
    y_ref = F.linear(x, gamma / (u1 @ w @ v1) * w, lin.bias.detach())
    y = lin(x)
    torch.testing.assert_close(lin.sigma.u, u1)
    torch.testing.assert_close(lin.sigma.v, v1)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, w.grad)  # the gradient flows through sigma
    torch.testing.assert_close(lin.sigma.gamma.grad, gamma.grad.reshape(1))
    # eval mode and no-grad forwards leave u, v alone
    lin.eval()
    lin(x)
    lin.train()
    with torch.no_grad():
        lin(x)
    assert torch.equal(lin.sigma.u, u1) and torch.equal(lin.sigma.v, v1)


# ------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_initial_function_is_the_plain_models(placement):
    """gamma starts at the initial sigma estimate: same seed, same logits as without sigma-Reparam."""
    kw = dict(placement=placement, qk_norm=True)
    torch.manual_seed(3)
    plain, _ = build_model(make_cfg(**kw), "torch")
    torch.manual_seed(3)
    reparam, _ = build_model(make_cfg(sigma_reparam=True, **kw), "torch")
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reparam(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


def test_sharded_initialisation_gives_the_full_builds_gamma():
    """The meta build materialised parameter by parameter (model/init.py replay, what every training run does)
    holds the full build's values, gamma = sigma(W_init) included, bit for bit."""
    from tests.test_sharded_init import full_build, replayed, tiny_model_cfg

    m = tiny_model_cfg(["model.sigma_reparam=true", "model.placement=deepnorm", "model.bias=true"])
    reference = dict(full_build(m).named_parameters())
    got = replayed(m)
    assert sorted(got) == sorted(reference) and any(n.endswith("sigma.gamma") for n in got)
    for name, value in reference.items():
        assert torch.equal(got[name], value), name


def test_recomputed_blocks_update_u_v_once():
    """Full activation checkpointing recomputes every linear in backward; u, v (and so the gradients) must be
    those of the run without recomputation."""
    cfg = make_cfg(sigma_reparam=True)
    torch.manual_seed(0)
    plain, _ = build_model(cfg, "torch")
    recomputing = copy.deepcopy(plain)
    apply_activation_checkpointing(recomputing.blocks, "full")
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # the first forward sets u, v; the next two step them
        for model in (plain, recomputing):
            model(tokens, tokens).backward()
    for (name, a), b in zip(plain.named_buffers(), recomputing.buffers()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), recomputing.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_config_rejects_a_non_boolean():
    with pytest.raises(ConfigError, match=r"model.sigma_reparam: expected true or false, got 'maybe'"):
        load_config(TINY, ["model.sigma_reparam=maybe"])
    with pytest.raises(ConfigError, match=r"model.sigma_reparm: unknown key; did you mean 'sigma_reparam'\?"):
        load_config(TINY, ["model.sigma_reparm=true"])


def test_universal_resharding_is_refused_with_sigma_reparam():
    from pretrain.checkpoint import CheckpointError
    from pretrain.checkpoint.universal import needs_conversion

    saved = {
        "layout": {"tp": 2, "pp": 1, "dp": 1},
        "world_size": 2,
        "zero_stage": 1,
        "config": {"model": {"sigma_reparam": True}},
    }
    same = {"tp": 2, "pp": 1, "dp": 1, "ulysses": 1, "zero_stage": 1}
    assert needs_conversion(saved, same) is None  # the same layout loads directly
    with pytest.raises(CheckpointError, match=r"tp 2 -> 1.*sigma_reparam's power-iteration buffers"):
        needs_conversion(saved, dict(same, tp=1, dp=2))


# ------------------------------------------------------------------------------------ HF export


def _trained(cfg, steps=3):
    """A sigma-Reparam model after a few SGD steps: gamma away from sigma, u, v stepped."""
    torch.manual_seed(0)
    model, _ = build_model(cfg, "torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        opt.zero_grad()
        model(tokens, tokens).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("fmt, kw", [("custom", {}), ("llama", {"placement": "pre"})], ids=["custom-peri", "llama"])
def test_hf_export_folds_the_reparametrisation(tmp_path, fmt, kw):
    import transformers

    from pretrain import export as hf_export

    cfg = make_cfg(sigma_reparam=True, **kw)
    model = _trained(cfg)
    assert any(abs(m.gamma.item() - m.sigma(w).item()) > 1e-3 for m, w in _reparams(model))  # not the identity
    out = tmp_path / "hf"
    summary = hf_export.export(model, cfg, out, fmt, sp_model=None, info={"step": 3, "tokens": 1})
    assert any("sigma_reparam" in line for line in summary["folded"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=fmt == "custom").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def _reparams(model):
    return [(m.sigma, m.weight) for m in model.modules() if isinstance(getattr(m, "sigma", None), SigmaReparam)]


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    "layout",
    [
        [],  # the default suite resumes on one process (three DeepSpeed start-ups, ~25 s quiet)
        # u of column-parallel and v of row-parallel layers are saved as per-rank shards
        pytest.param(
            ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=8"],
            marks=[pytest.mark.slow, pytest.mark.distributed],
        ),
        pytest.param(["zero.stage=3"], marks=[pytest.mark.slow, pytest.mark.distributed]),
    ],
    ids=["one-process", "tp2-sp", "dp2-zero3"],
)
def test_resume_with_every_remedy_is_bit_exact(bundled_dir, tmp_path, layout):
    """sigma-Reparam + QK-norm + z-loss + independent weight decay, full recomputation: stopped at step 3 and
    resumed, the losses are those of the uninterrupted run, bit for bit."""
    nproc = 2 if layout else 1
    remedies = [
        *layout,
        "model.sigma_reparam=true",
        "model.qk_norm=true",
        "train.z_loss=1e-4",
        "train.weight_decay_mode=independent",
        "train.weight_decay=1e-4",
        "train.activation_checkpointing=full",
        "train.max_steps=6",
        "train.eval_every=0",
        "train.diagnostics_every=0",
        "checkpoint.every=3",
    ]
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "resumed"
    check(run_module(tiny_args(bundled_dir, reference_dir, *remedies), nproc=nproc))
    check(run_module(tiny_args(bundled_dir, run_dir, *remedies, "train.exit_at_step=3"), nproc=nproc))
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    proc = check(run_module(tiny_args(bundled_dir, run_dir, *remedies) + ["--resume", "must"], nproc=nproc))
    assert "step_000003" in proc.stdout
    reference = train_losses(reference_dir)
    assert sorted(reference) == list(range(1, 7))
    assert train_losses(run_dir) == reference  # bit for bit


# ------------------------------------------------------------------------------------ tensor parallelism


def _tp_worker(out_path: str) -> None:
    """torchrun, 2 processes, tp=2 on gloo: (1) sigma of a column- and a row-parallel shard of one matrix;
    (2) a tp=2 sigma-Reparam model (with and without sequence parallelism) against the tp=1 model with the
    same weights: losses, every gradient (shards gathered) and u, v over three SGD steps."""
    from megatron.core import parallel_state

    from model.parallelize import apply_tensor_parallel, unshard
    from pretrain.distributed import init_distributed

    dist = init_distributed()
    rank = dist.rank
    results: dict = {}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()

    torch.manual_seed(0)
    w = torch.randn(40, 24)  # the same on both ranks
    results["exact"] = torch.linalg.matrix_norm(w, ord=2).item()
    for split, dim in (("out", 0), ("in", 1)):
        part = w.chunk(2, dim=dim)[rank].contiguous()
        r = SigmaReparam(*part.shape, split=split)
        r.initialize(part)
        r.power_iteration(part, steps=500)
        sigmas = [None, None]
        torch.distributed.all_gather_object(sigmas, r.sigma(part).item(), group=group)
        results[f"sigma_{split}"] = sigmas

    def gathered(name, t):
        parts = [torch.empty_like(t) for _ in range(2)]
        torch.distributed.all_gather(parts, t.contiguous(), group=group)
        return unshard(name, parts, swiglu=True)

    cfg = make_cfg(sigma_reparam=True, qk_norm=True, num_kv_heads=4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for sp in (False, True):
        torch.manual_seed(0)
        reference, _ = build_model(cfg, "torch")
        model = apply_tensor_parallel(copy.deepcopy(reference), 2, rank, sequence_parallel=sp)
        worst = {"loss": 0.0, "grad": 0.0, "buffer": 0.0}
        for _ in range(3):
            losses = []
            for m in (reference, model):
                m.zero_grad()
                loss = m(tokens, tokens)
                loss.backward()
                losses.append(loss.item())
            worst["loss"] = max(worst["loss"], abs(losses[0] - losses[1]))
            ref_params = dict(reference.named_parameters())
            for name, p in model.named_parameters():
                g = gathered(name, p.grad)
                worst["grad"] = max(worst["grad"], (g - ref_params[name].grad).abs().max().item())
            ref_buffers = dict(reference.named_buffers())
            for name, b in model.named_buffers():
                worst["buffer"] = max(worst["buffer"], (gathered(name, b) - ref_buffers[name]).abs().max().item())
            with torch.no_grad():
                for m in (reference, model):
                    for p in m.parameters():
                        p.sub_(0.5 * p.grad)
        results[f"sp={sp}"] = worst
    end_worker_case()
    finish_worker(rank, results, out_path)


@pytest.mark.distributed
def test_tensor_parallel_sigma_is_the_full_matrix_and_the_model_matches_tp1(tmp_path):
    out = tmp_path / "tp.json"
    check(run_module(["-m", "tests.test_sigma_reparam", "--tp-worker", str(out)], nproc=2, timeout=120))
    got = json.loads(out.read_text())
    for split in ("out", "in"):
        a, b = got[f"sigma_{split}"]
        assert a == b, split  # every rank the same sigma
        assert abs(a / got["exact"] - 1) < 1e-5, (split, a, got["exact"])
    for sp in ("sp=False", "sp=True"):
        assert got[sp]["loss"] < 1e-5, got
        assert got[sp]["grad"] < 1e-5, got
        assert got[sp]["buffer"] < 1e-5, got


if __name__ == "__main__":  # the worker of the tensor-parallel test, started by torchrun
    if sys.argv[1:2] == ["--tp-worker"]:
        _tp_worker(sys.argv[2])
