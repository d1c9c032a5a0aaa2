"""The fused CPU kernels (kernels/csrc/cpu_kernels.cpp) against float64 references written as plain torch
expressions (Hugging Face Llama's RoPE, silu(gate) * up, the RMSNorm formula, F.cross_entropy), forward and
backward, and a training step of the model with them against the same step on torch's ops (PRETRAIN_CPU_KERNELS=0)."""

from __future__ import annotations

import contextlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_kernels, torch_ops
from model.mlp import swiglu
from model.rope import Rotary

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason=f"CPU kernels unavailable: {cpu_kernels.status()}")


def rotate_half_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, None, None, :] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None, None, :]


def grads(outputs, inputs, cotangents, retain=False):
    return torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain)


@pytest.mark.parametrize("heads, kv_heads, hd", [(4, 4, 8), (6, 2, 16), (4, 1, 64), (2, 2, 6)])
@pytest.mark.parametrize("threads", [1, 2])
def test_rope_qkv_matches_the_rotate_half_expression(heads, kv_heads, hd, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        S, B, per = 13, 3, heads // kv_heads + 2
        rotary = Rotary(hd, 10000.0)
        cos, sin = rotary.tables(S, torch.device("cpu"), torch.float32)
        c64, s64 = rotary.tables(S, torch.device("cpu"), torch.float64)
        x64 = torch.randn(S, B, kv_heads, per, hd, dtype=torch.float64) * 4
        x = x64.float().requires_grad_()
        ref_in = x64.clone().requires_grad_()
        out = rotary.apply_qkv(x, heads, cos, sin)
        q, k, v = torch.split(ref_in, [per - 2, 1, 1], dim=3)
        ref = (rotate_half_reference(q.reshape(S, B, heads, hd), c64, s64),
               rotate_half_reference(k.squeeze(3), c64, s64), v.squeeze(3))  # fmt: skip
        for got, want in zip(out, ref):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-6)
            assert got.transpose(0, 1).is_contiguous()  # batch-major, as SDPA's CPU kernel reads fastest
        cot = [torch.randn_like(t) for t in ref]
        (mine,) = grads(out, x, [c.float() for c in cot], retain=True)
        (theirs,) = grads(ref, ref_in, cot)
        torch.testing.assert_close(mine.double(), theirs, rtol=0, atol=5e-6)
        # gradients arriving sequence-major (another layout than the forward's) take the same path
        (again,) = grads(out, x, [c.float().transpose(0, 1).contiguous().transpose(0, 1) for c in cot])
        torch.testing.assert_close(again, mine, rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(5, 7, 2 * 12), (2048, 2 * 704), (3, 2 * 1)])
def test_swiglu_matches_silu_gate_times_up(shape):
    torch.manual_seed(sum(shape))
    gu64 = torch.randn(*shape, dtype=torch.float64) * 5
    gu64[0, ..., 0] = 90.0  # exp(-x) underflows, and overflows for -90: silu must stay x and -0
    gu64[-1, ..., 0] = -90.0
    gu64[..., 1 % (shape[-1] // 2)] = 30.0  # where 1 - sigmoid(x) as a difference would lose every digit
    gu = gu64.float().requires_grad_()
    ref_in = gu64.clone().requires_grad_()
    out = swiglu(gu)
    half = shape[-1] // 2
    ref = F.silu(ref_in[..., :half]) * ref_in[..., half:]
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)
    cot = torch.randn_like(ref)
    (mine,) = grads(out, gu, cot.float())
    (theirs,) = grads(ref, ref_in, cot)
    torch.testing.assert_close(mine.double(), theirs, rtol=2e-6, atol=2e-6)
    assert torch.isfinite(mine).all()


@pytest.mark.parametrize("shape", [(5, 7, 24), (2048, 256), (3, 1000)])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_matches_the_formula(shape, scale, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x64, w64 = torch.randn(*shape, dtype=torch.float64) * 3, torch.randn(shape[-1], dtype=torch.float64)
        x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
        rx, rw = x64.clone().requires_grad_(), w64.clone().requires_grad_()
        out = torch_ops.rms_norm(x, w, 1e-5, scale)
        ref = rx * torch.rsqrt(rx.square().mean(-1, keepdim=True) + 1e-5) * rw * scale
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        cot = torch.randn_like(ref)
        mine = grads(out, (x, w), cot.float())
        theirs = grads(ref, (rx, rw), cot)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4 * b.abs().max().item())
    finally:
        torch.set_num_threads(before)


def rms_reference(x, w, eps, scale=1.0):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w * scale


@pytest.mark.parametrize("junction", ["peri_junction", "add_norm"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("s_used", [True, False])
def test_fused_junctions_match_the_composition(junction, scale, threads, s_used):
    """s = residual + f (add_norm) or residual + RMSNorm(f) (peri_junction), y = RMSNorm(s) * scale: values and
    every gradient, with the residual stream's gradient present or not (s unused: autograd's zeros)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(3)
        shape, d = (37, 3, 40), 40
        f64, r64 = torch.randn(*shape, dtype=torch.float64) * 2, torch.randn(*shape, dtype=torch.float64)
        wo64, wi64 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
        mine = [t.float().requires_grad_() for t in (f64, r64, wo64, wi64)]
        ref = [t.clone().requires_grad_() for t in (f64, r64, wo64, wi64)]
        if junction == "peri_junction":
            s, y = torch_ops.peri_junction(mine[0], mine[1], mine[2], None, mine[3], None, 1e-5, scale)
            rs = ref[1] + rms_reference(ref[0], ref[2], 1e-5)
            used = [0, 1, 2, 3]
        else:
            s, y = torch_ops.add_norm(mine[0], mine[1], mine[3], None, 1e-5, scale)
            rs = ref[0] + ref[1]
            used = [0, 1, 3]
        ry = rms_reference(rs, ref[3], 1e-5, scale)
        assert type(y.grad_fn).__name__ == "_FusedRMSJunctionBackward"  # the fused path ran
        torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
        gs, gy = torch.randn_like(rs), torch.randn_like(ry)
        outs_m, outs_r, cot = ((s, y), (rs, ry), (gs, gy)) if s_used else ((y,), (ry,), (gy,))
        got = torch.autograd.grad(outs_m, [mine[i] for i in used], [c.float() for c in cot])
        want = torch.autograd.grad(outs_r, [ref[i] for i in used], cot)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    finally:
        torch.set_num_threads(before)


def cross_entropy_reference(h, w, labels, weights, z_loss):
    """sum_t w_t (lse_t - z_t[y_t] + z_loss lse_t^2) in float64, by F.cross_entropy."""
    logits = h.double() @ w.double().t()
    lse = logits.logsumexp(-1)
    per = F.cross_entropy(logits, labels, reduction="none") + z_loss * lse.square()
    return (weights.double() * per).sum()


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_loss_on_the_kernel_matches_cross_entropy(z_loss, chunk, threads):
    """model/loss.py's chunked loss computes each chunk's softmax, loss and logit gradient with
    cross_entropy_rows: loss and both gradients against F.cross_entropy in float64, and against the same
    loss on torch's ops, masked, over one chunk and over several (the last one partial)."""
    from model.loss import linear_cross_entropy

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(3)
        n, d, v = 45, 24, 301
        h, w = (torch.randn(n, d) * 2).requires_grad_(), (torch.randn(v, d) * 0.5).requires_grad_()
        labels, mask = torch.randint(0, v, (n,)), (torch.rand(n) > 0.3).float()
        results = []
        for off in (False, True):
            with cpu_kernels.turned_off() if off else contextlib.nullcontext():
                loss = linear_cross_entropy(h, w, labels, mask, z_loss=z_loss, chunk_tokens=chunk)
                results.append((loss.detach(), *torch.autograd.grad(loss, (h, w))))
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = cross_entropy_reference(h64, w64, labels, mask / mask.sum(), z_loss)
        want = (ref.detach(), *torch.autograd.grad(ref, (h64, w64)))
        for got, other, expected in zip(*results, want):
            scale = expected.abs().max().item()
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6 * max(scale, 1.0))
            torch.testing.assert_close(got, other, rtol=0, atol=2e-6 * max(scale, 1.0))
    finally:
        torch.set_num_threads(before)


def test_cross_entropy_rows_on_a_vocabulary_slice_and_without_gradient():
    """The op itself: a label outside the slice [vocab_start, vocab_start + V) (tensor parallelism's other
    ranks) leaves the row lse - max, with no one-hot in its gradient; compute_grad=False leaves the logits
    alone; a NaN or inf logit makes its row's loss and gradient NaN (fast math must not hide a diverged
    step)."""
    ops = cpu_kernels.load()
    torch.manual_seed(4)
    z64 = torch.randn(9, 130, dtype=torch.float64) * 6
    start, labels = 100, torch.tensor([100, 229, 5, 150, 0, 300, 101, 99, 230])
    weights = torch.rand(9)
    local = labels - start
    mine = (local >= 0) & (local < 130)
    lse = z64.logsumexp(-1)
    # another rank's target: the row's term is lse - max (model/loss.py sums the ranks' z_y - max)
    target = torch.where(mine, z64.gather(1, local.clamp(0, 129)[:, None])[:, 0], z64.amax(-1))
    want = weights.double() * (lse - target + 1e-2 * lse.square())
    grad = torch.softmax(z64, -1) * (weights.double() * (1 + 2e-2 * lse))[:, None]
    grad[mine.nonzero()[:, 0], local[mine]] -= weights.double()[mine]

    z = z64.float()
    untouched = z.clone()
    got = ops.cross_entropy_rows(z, labels, weights, 1e-2, start, False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(z, untouched)
    got = ops.cross_entropy_rows(z, labels, weights, 1e-2, start, True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), grad, rtol=0, atol=1e-6)

    bad = untouched.clone()
    bad[2, 7], bad[5, 0] = float("nan"), float("inf")
    got = ops.cross_entropy_rows(bad, labels, weights, 0.0, start, True)
    assert got[[2, 5]].isnan().all() and got[[0, 1, 3, 4, 6, 7, 8]].isfinite().all()
    assert bad[[2, 5]].isnan().all() and bad[[0, 1, 3, 4, 6, 7, 8]].isfinite().all()


def _batch_major_heads(b, heads, s, d, dtype=torch.float32):
    """(B, heads, S, D) in (B, S, heads, D) memory, as the model's RoPE hands q, k, v to attention."""
    return torch.randn(b, s, heads, d, dtype=dtype).permute(0, 2, 1, 3)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "heads, kv_heads, seq, hd, layout",
    [
        (4, 4, 256, 64, "batch-major"),
        (6, 2, 130, 16, "batch-major"),
        (2, 1, 7, 8, "contiguous"),
        (3, 3, 64, 32, "contiguous"),
        (1, 1, 1, 4, "batch-major"),
    ],
)
def test_causal_attention_matches_sdpa(heads, kv_heads, seq, hd, layout, threads, kernels_on, monkeypatch):
    """The kernel (several query blocks, a partial last one, grouped-query heads, one token) and its
    fallback on torch's flash kernel, forward and the three gradients, against SDPA in float64."""
    from kernels import cpu_attention

    if not kernels_on:
        monkeypatch.setattr(cpu_kernels, "_state", {"error": "off"})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seq)
        make = _batch_major_heads if layout == "batch-major" else lambda b, h, s, d: torch.randn(b, h, s, d)
        q, k, v = make(2, heads, seq, hd) * 2, make(2, kv_heads, seq, hd) * 2, make(2, kv_heads, seq, hd)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        sdpa = partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=heads != kv_heads)
        out, ref = cpu_attention.causal_attention(q, k, v), sdpa(*ref_in)
        fp32_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        torch_fp32 = sdpa(*fp32_in)  # torch's own fp32 error is the bar
        cot = torch.randn_like(ref)
        mine = [out, *grads(out, (q, k, v), cot.float())]
        bar = [torch_fp32, *grads(torch_fp32, fp32_in, cot.float())]
        want = [ref, *grads(ref, ref_in, cot)]
        for got, fp32, exact in zip(mine, bar, want):
            assert (got.double() - exact).abs().max() <= 2 * (fp32.double() - exact).abs().max() + 1e-6
            assert got.transpose(1, 2).is_contiguous()  # batch-major: the projection after it reads rows
    finally:
        torch.set_num_threads(before)


def test_causal_attention_ops_and_nan():
    """torch.library.opcheck on both custom ops (fake shapes and strides against the real ones, autograd,
    torch.compile), and a NaN: a NaN query spoils its own row only, a NaN key every row after it."""
    from kernels import cpu_attention

    q, k, v = (_batch_major_heads(2, 4, 70, 16).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.pretrain.cpu_causal_attention, (q, k, v, 0.25))
    out, lse = torch.ops.pretrain.cpu_causal_attention(q, k, v, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 0.25)
    torch.library.opcheck(torch.ops.pretrain.cpu_causal_attention_backward, args)

    q, k, v = (t.detach().clone() for t in (q, k, v))
    q[0, 1, 5, 3] = float("nan")
    k[1, 2, 40, 0] = float("inf")
    out = cpu_attention.causal_attention(q, k, v)
    bad = out.isnan().any(-1)
    assert bad[0, 1, 5] and bad[0, 1].sum() == 1 and not bad[0, [0, 2, 3]].any()
    assert bad[1, 2, 40:].all() and not bad[1, 2, :40].any() and not bad[1, [0, 1, 3]].any()


def test_causal_attention_compiles_without_a_graph_break():
    from kernels import cpu_attention

    q, k, v = (_batch_major_heads(2, 4, 33, 16).requires_grad_() for _ in range(3))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(lambda a, b, c: cpu_attention.causal_attention(a, b, c).square().sum(), fullgraph=True)
    compiled(q, k, v).backward()
    F.scaled_dot_product_attention(*ref_in, is_causal=True).square().sum().backward()
    for mine, theirs in zip((q, k, v), ref_in):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=0, atol=1e-5)


def test_causal_attention_counts_the_flops_torch_counts_for_flash_attention():
    """FlopCounterMode over our op, forward and backward, gives what torch's own formulas give its flash
    attention with the same shapes (grouped-query heads counted as their query heads, as torch counts
    them); without the formulas the op would count as free, and inductor's memory budget would price its
    recomputation at nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    from kernels import cpu_attention

    b, h, s, d = 2, 4, 40, 16
    q = torch.randn(b, h, s, d, requires_grad=True)
    k, v = (torch.randn(b, 2, s, d, requires_grad=True) for _ in range(2))
    with FlopCounterMode(display=False) as ours:
        cpu_attention.causal_attention(q, k, v).sum().backward()
    meta = [torch.empty(b, h, s, d, device="meta") for _ in range(3)]
    with FlopCounterMode(display=False) as theirs:
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(*meta, 0.0, True)
        torch.ops.aten._scaled_dot_product_flash_attention_backward(
            torch.empty_like(out), *meta, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset
        )
    assert ours.get_total_flops() == theirs.get_total_flops() > 0


def test_attention_outside_the_kernels_range_takes_sdpa(monkeypatch):
    """bf16, dropout, a GPU-sized sequence and the switch turned off leave attention to SDPA."""
    from kernels import cpu_attention

    q = torch.randn(1, 2, 16, 8)
    assert cpu_attention.applies(q, 0.0)
    assert not cpu_attention.applies(q.bfloat16(), 0.0)
    assert not cpu_attention.applies(q, 0.1)
    assert not cpu_attention.applies(torch.randn(1, 1, cpu_attention.MAX_SEQ_LEN + 1, 8), 0.0)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_attention.applies(q, 0.0)


def test_other_dtypes_and_layouts_take_torchs_ops():
    """bf16, float64 and non-contiguous tensors are not the kernels' (they would read them wrongly): usable()
    says no, and the functions above compute them with torch's ops (test_rope_swiglu checks those in float64)."""
    x = torch.randn(4, 8)
    assert cpu_kernels.usable(x) is not None
    assert cpu_kernels.usable(x.to(torch.bfloat16)) is None
    assert cpu_kernels.usable(x.double()) is None
    assert cpu_kernels.usable(x.t()) is None
    assert cpu_kernels.usable(x, x[:, :4]) is None
    wide = torch.randn(6, 3, 40)[..., :24].requires_grad_()  # a strided SwiGLU input: the torch path
    half = 12
    torch.testing.assert_close(swiglu(wide), F.silu(wide[..., :half]) * wide[..., half:], rtol=1e-6, atol=1e-6)


def test_the_switch_and_a_failed_build(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="PRETRAIN_CPU_KERNELS='maybe'"):
        cpu_kernels.load()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.load() is None and cpu_kernels.status() == "PRETRAIN_CPU_KERNELS=0"
    # no compiler: a warning naming the cause, and torch's ops
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    monkeypatch.setattr(cpu_kernels, "_registered", lambda: False)

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_build_and_load", no_compiler)
    with pytest.warns(RuntimeWarning, match="Ninja is required"):
        assert cpu_kernels.load() is None
    assert "Ninja is required" in cpu_kernels.status()
    assert cpu_kernels.usable(torch.randn(3)) is None


def test_library_name_follows_the_cpu_and_the_source(monkeypatch):
    name = cpu_kernels.library_name()
    monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "model name : another CPU\nflags : sse2")
    assert cpu_kernels.library_name() != name
    monkeypatch.setattr(cpu_kernels, "CFLAGS", [*cpu_kernels.CFLAGS, "-DX"])
    assert cpu_kernels.library_name() not in (name,)


def _train(kernels_on: bool, monkeypatch, placement: str):
    """Four AdamW steps of a small GQA model: (losses, the first step's gradients)."""
    from model import build_model
    from pretrain.config import Config, ModelConfig, resolve

    monkeypatch.setattr(cpu_kernels, "_state", {} if kernels_on else {"error": "off"})
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=96, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, seq_len=16,
                            placement=placement)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(resolve(cfg).model, "torch", torch.device("cpu"))[0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses, first_grads = [], None
    for _ in range(4):
        data = torch.randint(0, 96, (4, 17), generator=gen)
        loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        first_grads = first_grads or [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, first_grads


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_training_with_the_kernels_equals_training_on_torchs_ops(placement, monkeypatch):
    on_losses, on_grads = _train(True, monkeypatch, placement)
    off_losses, off_grads = _train(False, monkeypatch, placement)
    assert cpu_kernels.usable(torch.zeros(1)) is None  # the "off" run really ran torch's ops
    assert on_losses == pytest.approx(off_losses, rel=1e-5, abs=1e-5)
    for a, b in zip(on_grads, off_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize(
    "precision, compile_, fused_loss, tp, model_keys, expected",
    [
        ("fp32", False, True, 1, {}, "fused RMSNorm, junction, SwiGLU, RoPE, attention, cross-entropy kernels loaded"),
        ("fp32", True, True, 1, {}, "fused attention, cross-entropy kernels loaded"),  # custom ops
        ("fp32", False, True, 2, {}, "fused RMSNorm, junction, SwiGLU, RoPE, attention kernels loaded"),  # TP loss
        ("fp32", True, False, 1, {}, "fused attention kernels loaded"),
        ("fp32", True, False, 1, {"dropout": 0.1}, "not used"),  # SDPA
        ("fp32", True, False, 1, {"seq_len": 2048}, "not used"),  # SDPA: torch's flash kernel is as fast there
        ("bf16", False, True, 1, {}, "not used"),
    ],
)
def test_the_run_log_names_the_kernels_a_run_uses(precision, compile_, fused_loss, tp, model_keys, expected):
    from pretrain.config import Config
    from pretrain.job import cpu_kernels_line

    cfg = Config()
    cfg.train.precision, cfg.train.compile, cfg.train.fused_loss, cfg.parallel.tp = precision, compile_, fused_loss, tp
    for key, value in model_keys.items():
        setattr(cfg.model, key, value)
    assert expected in cpu_kernels_line(cfg)
