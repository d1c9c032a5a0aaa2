"""The hand-written RoPE and SwiGLU autograd functions (model/rope.py, model/mlp.py) against the
textbook expressions under autograd, in float64: values, gradients (torch.autograd.gradcheck), what
they keep for backward, and the plain expressions they switch to under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.mlp import swiglu
from model.rope import Rotary
from tests.conftest import saved_for_backward_bytes

S, B, HD = 6, 3, 8


def reference_rotate(x, cos, sin):
    """Hugging Face Llama's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, None, :] + rotated * sin[:, None, None, :]


def tables(rotary, dtype=torch.float64):
    return rotary.tables(S, torch.device("cpu"), dtype)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_fused_qkv_rotation_equals_split_and_rotate_half(heads, kv_heads):
    rotary = Rotary(HD, 10000.0)
    cos, sin = tables(rotary)
    per = heads // kv_heads + 2
    qkv = torch.randn(S, B, kv_heads, per, HD, dtype=torch.float64, requires_grad=True)
    q, k, v = rotary.apply_qkv(qkv, heads, cos, sin)
    rq, rk, rv = torch.split(qkv, [per - 2, 1, 1], dim=3)
    ref = (
        reference_rotate(rq.reshape(S, B, heads, HD), cos, sin),
        reference_rotate(rk.squeeze(3), cos, sin),
        rv.squeeze(3),
    )
    for got, want in zip((q, k, v), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
        # batch-major memory (the (B, S, heads, hd) order SDPA's CPU kernel reads fastest)
        assert got.permute(1, 0, 2, 3).is_contiguous()
    grads = [torch.randn_like(t) for t in ref]
    mine = torch.autograd.grad((q, k, v), qkv, grads)[0]
    theirs = torch.autograd.grad(ref, qkv, grads)[0]
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda t: rotary.apply_qkv(t, heads, cos, sin), (qkv,))


def test_fused_qkv_rotation_with_unused_outputs():
    """Only q, or only k, used (the others get no gradient): their parts of the input gradient are zero, as
    autograd's."""
    rotary = Rotary(HD, 500.0)
    cos, sin = tables(rotary)
    qkv = torch.randn(S, B, 2, 4, HD, dtype=torch.float64, requires_grad=True)
    q, _, _ = rotary.apply_qkv(qkv, 4, cos, sin)
    (g,) = torch.autograd.grad(q.square().sum(), qkv)
    ref_q = reference_rotate(qkv[:, :, :, :2].reshape(S, B, 4, HD), cos, sin)
    (want,) = torch.autograd.grad(ref_q.square().sum(), qkv)
    torch.testing.assert_close(g, want, rtol=0, atol=1e-13)
    assert g[:, :, :, 2:].abs().max() == 0
    # only k used (q's and v's gradients are None)
    _, k, _ = rotary.apply_qkv(qkv, 4, cos, sin)
    (g,) = torch.autograd.grad(k.square().sum(), qkv)
    (want,) = torch.autograd.grad(reference_rotate(qkv[:, :, :, 2], cos, sin).square().sum(), qkv)
    torch.testing.assert_close(g, want, rtol=0, atol=1e-13)


def test_single_tensor_rotation_and_its_gradient():
    rotary = Rotary(HD, 10000.0)
    cos, sin = tables(rotary)
    x = torch.randn(S, B, 4, HD, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(rotary.apply(x, cos, sin), reference_rotate(x, cos, sin), rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: rotary.apply(t, cos, sin), (x,))
    # a non-contiguous input (a view of a wider tensor, as the QK-norm path produces)
    wide = torch.randn(S, B, 4, 2 * HD, dtype=torch.float64)[..., :HD]
    torch.testing.assert_close(rotary.apply(wide, cos, sin), reference_rotate(wide, cos, sin), rtol=0, atol=1e-14)


def test_swiglu_equals_silu_gate_times_up():
    gu = torch.randn(S, B, 2 * 10, dtype=torch.float64, requires_grad=True)

    def reference(t):
        gate, up = t.chunk(2, dim=-1)
        return F.silu(gate) * up

    torch.testing.assert_close(swiglu(gu), reference(gu), rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(swiglu, (gu,))
    g = torch.randn(S, B, 10, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad(swiglu(gu), gu, g)[0], torch.autograd.grad(reference(gu), gu, g)[0], rtol=0, atol=1e-14
    )
    # it keeps the input only: autograd of the expression also keeps silu(gate), half the input's size
    assert saved_for_backward_bytes(swiglu, gu) == gu.numel() * 8
    assert saved_for_backward_bytes(reference, gu) == gu.numel() * 8 * 3 // 2


def test_under_torch_compile_the_plain_expressions_run(monkeypatch):
    """Dynamo cannot trace the functions' strided out= writes; compiled, the attention splits q|k|v itself
    and the plain expressions run: the same q, k, v and SwiGLU values as the eager functions."""
    from model import build_model
    from pretrain.config import Config, ModelConfig, resolve

    cfg = Config()
    cfg.model = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, seq_len=S)
    torch.manual_seed(0)
    attention = build_model(resolve(cfg).model, "torch", torch.device("cpu"))[0].blocks[0].attn.fn.double()
    x = torch.randn(S, B, 32, dtype=torch.float64)
    rotary = Rotary(HD, 10000.0)
    cos, sin = tables(rotary)
    gu = torch.randn(S, B, 20, dtype=torch.float64)
    single = torch.randn(S, B, 4, HD, dtype=torch.float64)
    eager = attention.split_qkv(x), swiglu(gu), rotary.apply(single, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plain = attention.split_qkv(x), swiglu(gu), rotary.apply(single, cos, sin)
    for a, b in zip(eager[0], plain[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        # both batch-major in memory, (B, S, heads, hd) order: the layout SDPA's CPU flash kernel reads fastest
        assert a.stride() == b.stride() == (a.shape[2] * HD, S * a.shape[2] * HD, HD, 1)
    torch.testing.assert_close(eager[1], plain[1], rtol=0, atol=0)
    torch.testing.assert_close(eager[2], plain[2], rtol=0, atol=1e-14)
