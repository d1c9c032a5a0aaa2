"""The apex backend. apex cannot be installed here, so:
- its glue (which apex function is called, dtype handling, scale, missing bias, the residual
  and Peri compositions) is tested against a stand-in apex module implemented in torch;
- its real numerics run only where apex and a GPU exist, and skip with the reason otherwise.
"""

import sys
import types

import pytest
import torch
from norm_reference import CASE_IDS, CASES, LNS_SCALE, check_op

from kernels import apex_ops
from kernels import backend as backend_mod
from kernels.backend import NormOps, resolve_backend


@pytest.fixture
def fake_apex(monkeypatch):
    """A stand-in for apex.normalization.fused_layer_norm with apex's dtype conventions: the
    plain forms want gain dtype == input dtype, the mixed forms return the input's dtype."""
    calls = []

    def _norm(x, w, b, shape, eps, rms):
        assert tuple(shape) == (x.shape[-1],)
        xf = x.float()
        if not rms:
            xf = xf - xf.mean(-1, keepdim=True)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        return y if b is None else y + b.float()

    def plain(rms):
        def fn(x, w, *rest):
            calls.append(("rms" if rms else "ln", "plain"))
            assert x.dtype == w.dtype, "apex's plain forms need gain dtype == input dtype"
            b, (shape, eps) = (None, rest) if rms else (rest[0], rest[1:])
            return _norm(x, w, b, shape, eps, rms).to(w.dtype)

        return fn

    def mixed(rms):
        def fn(x, w, *rest):
            calls.append(("rms" if rms else "ln", "mixed"))
            b, (shape, eps) = (None, rest) if rms else (rest[0], rest[1:])
            return _norm(x, w, b, shape, eps, rms).to(x.dtype)

        return fn

    fln = types.ModuleType("apex.normalization.fused_layer_norm")
    fln.fused_rms_norm_affine, fln.mixed_dtype_fused_rms_norm_affine = plain(True), mixed(True)
    fln.fused_layer_norm_affine, fln.mixed_dtype_fused_layer_norm_affine = plain(False), mixed(False)
    apex, norm = types.ModuleType("apex"), types.ModuleType("apex.normalization")
    apex.normalization, norm.fused_layer_norm = norm, fln
    for name, mod in (
        ("apex", apex),
        ("apex.normalization", norm),
        ("apex.normalization.fused_layer_norm", fln),
        ("fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda")),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def apex_glue_ops():
    # Built directly: resolve_backend rightly refuses apex on CPU.
    return NormOps("apex", apex_ops.rms_norm, apex_ops.layer_norm, apex_ops.add_norm, apex_ops.peri_junction)


@pytest.mark.parametrize("op,kind,bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("scale", [1.0, LNS_SCALE], ids=["noscale", "lns"])
def test_apex_glue_against_reference(fake_apex, op, kind, bias, dtype, scale):
    check_op("apex", op, kind, bias, 17, 123, dtype, scale, torch.device("cpu"), ops=apex_glue_ops())
    assert fake_apex and all(form == "plain" for _, form in fake_apex)


def test_apex_glue_mixed_dtype_uses_the_mixed_forms(fake_apex):
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.ones(16)
    assert apex_ops.rms_norm(x, w, 1e-5, LNS_SCALE).dtype == torch.bfloat16
    assert apex_ops.layer_norm(x, w, None, 1e-5).dtype == torch.bfloat16
    assert fake_apex == [("rms", "mixed"), ("ln", "mixed")]


def test_apex_missing_reports_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setitem(sys.modules, "apex.normalization.fused_layer_norm", None)
    assert "apex.normalization.fused_layer_norm' is not importable" in apex_ops.apex_missing()


_APEX_MISSING = backend_mod.apex_missing(torch.device("cuda"))


@pytest.mark.skipif(_APEX_MISSING is not None, reason=f"apex backend unavailable: {_APEX_MISSING}")
@pytest.mark.parametrize("op,kind,bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows,hidden", [(3, 123), (64, 1000), (17, 4100)], ids=["3x123", "64x1000", "17x4100"])
def test_real_apex_against_reference(op, kind, bias, dtype, rows, hidden):
    ops, reason = resolve_backend("apex", "cuda")
    assert ops.name == "apex", reason
    check_op("apex", op, kind, bias, rows, hidden, dtype, LNS_SCALE, torch.device("cuda"), ops=ops)
