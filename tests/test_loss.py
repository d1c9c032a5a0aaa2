"""The fused, chunked output layer + cross-entropy (model/loss.py) against the plain torch expression
F.cross_entropy(h @ W.T) (+ z_loss * logsumexp^2), forward and backward; the vocab-parallel version on
2 gloo ranks against the same expression on one process and against megatron-core's vocab-parallel
cross-entropy."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels.errors import ConfigError
from model import build_model
from model.loss import LossSpec, chunk_tokens_for, linear_cross_entropy
from pretrain.config import Config, ModelConfig, load_config, resolve
from tests.conftest import ROOT, run_module


def reference(h, w, y, mask, z_loss):
    """The plain expression: the whole logits, torch's cross-entropy, the masked mean."""
    logits = (h @ w.t()).to(torch.promote_types(h.dtype, torch.float32))
    per_token = F.cross_entropy(logits, y, reduction="none") + z_loss * torch.logsumexp(logits, -1).square()
    if mask is None:
        return per_token.mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def inputs(n=300, d=48, v=160, dtype=torch.float64, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).to(torch.float64) if masked else None
    return h, w, y, mask


def grads(loss, *tensors, scale=3.0):
    return torch.autograd.grad(loss * scale, tensors)  # a non-unit upstream gradient reaches the op


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("chunk", [0, 7, 64, 300, 1000])  # auto, ragged last chunk, one chunk, more than N
@pytest.mark.parametrize("masked", [True, False])
def test_fused_equals_the_plain_expression_in_float64(z_loss, chunk, masked):
    h, w, y, mask = inputs(masked=masked)
    fused = linear_cross_entropy(h, w, y, mask, z_loss=z_loss, chunk_tokens=chunk)
    plain = reference(h, w, y, mask, z_loss)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(fused, h, w), grads(plain, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fp32_is_tight_and_masked_tokens_get_no_gradient():
    h, w, y, mask = inputs(dtype=torch.float32)
    mask[:50] = 0  # the first 50 tokens are masked: their hidden states get no gradient at all
    fused = linear_cross_entropy(h, w, y, mask, z_loss=1e-4, chunk_tokens=32)
    plain = reference(h, w, y, mask.float(), 1e-4)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    (dh, dw), (rh, rw) = grads(fused, h, w), grads(plain, h, w)
    torch.testing.assert_close(dh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, rw, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(dh[:50]) == 0


def test_bf16_within_the_usual_tolerance():
    """bf16 inputs: the plain bf16 path (bf16 logits, fp32 cross-entropy) and the fused one both
    against the float64 expression on the same bf16 values."""
    h, w, y, mask = inputs(dtype=torch.bfloat16, n=256, d=64, v=512)
    exact = reference(h.detach().double().requires_grad_(), w.detach().double().requires_grad_(), y, mask, 0.0)
    fused = linear_cross_entropy(h, w, y, mask, chunk_tokens=48)
    plain = reference(h, w, y, mask.float(), 0.0)
    assert fused.dtype == torch.float32
    assert abs(fused.item() - exact.item()) <= 2e-2 * abs(exact.item())
    assert abs(fused.item() - plain.item()) <= 2e-2 * abs(exact.item())
    (dh, dw), (rh, rw) = grads(fused, h, w), grads(plain, h, w)
    assert dh.dtype == dw.dtype == torch.bfloat16
    for a, b in ((dh, rh), (dw, rw)):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2 * b.float().abs().max().item())


def test_fp16_gradients_of_many_tokens_do_not_underflow():
    """w_t = 1/N makes each logit gradient tiny (here ~1e-7, below fp16 normal range): the fused path
    scales them before the cast, so the gradients keep fp16's relative precision."""
    h, w, y, _ = inputs(n=8192, d=16, v=1024, dtype=torch.float16, masked=False)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    fused = linear_cross_entropy(h, w, y, chunk_tokens=1000)
    (dh, dw), (rh, rw) = grads(fused, h, w, scale=1.0), grads(reference(h64, w64, y, None, 0.0), h64, w64, scale=1.0)
    for got, ref in ((dh, rh), (dw, rw)):
        assert got.dtype == torch.float16
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 3e-3, f"relative error {err:.2e}"  # unscaled: 6.5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_in_bf16_with_the_gpu_chunk_size():
    """The GPU's default chunk (model/loss.py CHUNK_ELEMENTS_GPU: several chunks here, a ragged last one)
    against the float64 expression on the same bf16 values."""
    h, w, y, mask = inputs(dtype=torch.bfloat16, n=4500, d=64, v=32_768, masked=True)
    h, w = (t.detach().cuda().requires_grad_() for t in (h, w))
    y, mask = y.cuda(), mask.cuda()
    assert chunk_tokens_for(4500, 32_768, device_type="cuda") == 2048  # 3 chunks
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    exact = reference(h64, w64, y, mask, 1e-4)
    fused = linear_cross_entropy(h, w, y, mask, z_loss=1e-4)
    assert abs(fused.item() - exact.item()) <= 1e-2 * abs(exact.item())
    (dh, dw), (rh, rw) = grads(fused, h, w), grads(exact, h64, w64)
    for a, b in ((dh, rh), (dw, rw)):
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


def test_without_grad_only_the_loss():
    h, w, y, mask = inputs(dtype=torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, mask)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(h, w, y, mask.float(), 0.0).detach(), rtol=1e-6, atol=1e-6)


def test_flops_counted_as_for_the_plain_head():
    """FlopCounterMode sees the fused loss as the plain head's matmuls (logits; with grad, dhidden and
    dweight too), so FLOP-priced tools (inductor's activation memory budget) do not take it for free."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w, y, _ = inputs(dtype=torch.float32)
    counted = []
    for fn in (lambda: linear_cross_entropy(h, w, y), lambda: F.cross_entropy(h @ w.t(), y)):
        with FlopCounterMode(display=False) as with_grad:
            fn().backward()
        with torch.no_grad(), FlopCounterMode(display=False) as without:
            fn()
        counted.append((with_grad.get_total_flops(), without.get_total_flops()))
    assert counted[0] == counted[1] and counted[0][1] > 0


def test_chunk_size_rule():
    assert chunk_tokens_for(10_000, 50_304) == 128  # never below MIN_CHUNK_TOKENS
    assert chunk_tokens_for(10_000, 8_192) == 512  # 4M elements of fp32 logits
    assert chunk_tokens_for(100, 8_192) == 100 and chunk_tokens_for(100, 8_192, requested=7) == 7
    # on a GPU 64M elements (256 MiB of fp32 logits): 16K tokens of a 50K vocabulary in 13 chunks
    assert chunk_tokens_for(16_384, 50_304, device_type="cuda") == 64 * 2**20 // 50_304 == 1334


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16)
    base.update(kw)
    cfg = Config()
    cfg.model = ModelConfig(**base)
    return resolve(cfg).model


@pytest.mark.parametrize("tie", [True, False])
def test_model_fused_loss_equals_its_plain_loss(tie):
    torch.manual_seed(0)
    model = build_model(model_cfg(tie_embeddings=tie), "torch")[0]
    tokens, labels = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    mask = (torch.rand(3, 16) > 0.2).float()
    out = {}
    for fused in (True, False):
        model.loss_spec = LossSpec(fused=fused, z_loss=1e-3)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, labels, mask)
        loss.backward()
        out[fused] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # without labels: the logits, as before (evaluation and export); the loss is theirs
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (3, 16, 96)
    expected = reference(logits.reshape(-1, 96), torch.eye(96, dtype=logits.dtype), labels.reshape(-1),
                         mask.reshape(-1), 1e-3)  # fmt: skip
    torch.testing.assert_close(out[True][0], expected, rtol=1e-5, atol=1e-6)


def test_z_loss_with_tp_needs_the_fused_loss():
    with pytest.raises(ConfigError, match=r"train.z_loss: 0.001 with parallel.tp=2 needs train.fused_loss: true"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.z_loss=1e-3", "train.fused_loss=false", "parallel.tp=2"])


# ------------------------------------------------------------------------ vocab-parallel, 2 gloo ranks


def _tp_worker(out_path: str) -> None:
    """Each rank: its vocabulary slice of W; the loss and gradients of the fused vocab-parallel loss
    (with and without sequence parallelism, with z-loss) and of megatron-core's vocab-parallel
    cross-entropy on the full logits slice; rank 0 writes them and the one-process reference."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model.loss import vocab_parallel_loss
    from model.tensor_parallel import ColumnParallelLinear

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    t, b, d, v = 12, 3, 16, 40
    g = torch.Generator().manual_seed(1)
    h_full = torch.randn(t, b, d, generator=g)
    w_full = 0.5 * torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (t, b), generator=g)
    mask = (torch.rand(t, b, generator=g) > 0.25).float()
    results = {}
    for name, sp, z, fused in (
        ("fused", False, 0.0, True),
        ("fused_sp_z", True, 1e-2, True),
        ("megatron", False, 0.0, False),
    ):
        head = ColumnParallelLinear(d, v, False, 2, sp)
        with torch.no_grad():
            head.weight.copy_(w_full.chunk(2)[rank])
        h = (h_full.chunk(2)[rank] if sp else h_full).clone().requires_grad_()
        spec = LossSpec(fused=fused, z_loss=z, chunk_tokens=5)
        loss = vocab_parallel_loss(head, h, labels, mask, spec)
        loss.backward()
        dh = [torch.empty_like(h.grad) for _ in range(2)]
        dw = [torch.empty_like(head.weight.grad) for _ in range(2)]
        dist.all_gather(dh, h.grad)
        dist.all_gather(dw, head.weight.grad)
        results[name] = {
            "loss": loss.item(),
            "dh": (torch.cat(dh) if sp else dh[0]).tolist(),
            "dw": torch.cat(dw).tolist(),
            "dh_equal_on_ranks": bool(sp or torch.equal(dh[0], dh[1])),
        }
    if rank == 0:
        ref = {}
        for z in (0.0, 1e-2):
            h = h_full.clone().requires_grad_()
            w = w_full.clone().requires_grad_()
            loss = reference(h.reshape(-1, d), w, labels.reshape(-1), mask.reshape(-1), z)
            loss.backward()
            ref[str(z)] = {"loss": loss.item(), "dh": h.grad.tolist(), "dw": w.grad.tolist()}
        results["reference"] = ref
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def test_vocab_parallel_fused_loss_on_two_ranks(tmp_path):
    out = tmp_path / "tp.json"
    proc = run_module([__file__, str(out)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for name, z in (("fused", "0.0"), ("fused_sp_z", "0.01"), ("megatron", "0.0")):
        got, ref = r[name], r["reference"][z]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
        torch.testing.assert_close(torch.tensor(got["dh"]), torch.tensor(ref["dh"]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(got["dw"]), torch.tensor(ref["dw"]), rtol=1e-5, atol=1e-7)
        assert got["dh_equal_on_ranks"], f"{name}: the input gradient must be summed over the tp ranks"


if __name__ == "__main__":  # the 2-rank worker (torchrun)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _tp_worker(sys.argv[1])
