"""The numerics checks can fail: the tolerances of tests/kernels/norm_reference.py against kernels that
are wrong in the ways norm kernels go wrong -- a wrong or misplaced eps, a variance over n - 1, a
one-pass variance, statistics in the input dtype, a backward without its projection term. Each is a
small torch implementation (a mutant of the reference formula) run through the same check_op as the
real backends; the real torch backend passes the same inputs (tests/kernels/test_norm_numerics.py).

Measured against the earlier checks (1e-4 / 5e-3 / 3e-2 relative, ordinary inputs only, all 378 cases of
the op x dtype x scale x shape matrix): eps x 10, eps outside the square root, a one-pass variance and
statistics in the input dtype passed every case; a variance over n - 1 failed 106, the missing
projection term 133.
"""

import dataclasses
import math

import pytest
import torch
from norm_reference import CASES, DTYPES, EDGE_INPUTS, EPS, LNS_SCALE, check_op

from kernels import resolve_backend
from kernels.torch_ops import compose_fused


def _stats(x: torch.Tensor, center: bool, flaw: str):
    """(centred x, mean square) in fp32, or with the mutant's flaw."""
    xs = x if flaw == "statistics in the input dtype" else x.float()
    n = x.shape[-1]
    if center and flaw == "one-pass variance":
        mean = xs.mean(-1, keepdim=True)
        return xs - mean, (xs * xs).mean(-1, keepdim=True) - mean * mean
    xc = xs - xs.mean(-1, keepdim=True) if center else xs
    denominator = n - 1 if flaw == "variance over n - 1" else n
    return xc, (xc * xc).sum(-1, keepdim=True) / denominator


def _norm(x, weight, bias, eps, scale, center, flaw):
    xc, ms = _stats(x, center, flaw)
    if flaw == "eps x 10":
        eps = eps * 10
    if flaw == "eps outside the square root":
        y = xc.float() / (torch.sqrt(ms.float()) + eps)
    else:
        y = xc.float() * torch.rsqrt(ms.float() + eps)
    y = y * weight.float() + (0 if bias is None else bias.float())
    return (y * scale).to(x.dtype)


class _NoProjection(torch.autograd.Function):
    """RMSNorm whose backward forgets the term that comes from the statistic depending on x."""

    @staticmethod
    def forward(ctx, x, weight, eps, scale):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(xf, weight, rstd)
        ctx.scale = scale
        return (xf * rstd * weight.float() * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xf, weight, rstd = ctx.saved_tensors
        g = dy.float() * ctx.scale
        dx = g * weight.float() * rstd  # missing: - x * rstd^3 * mean(g * weight * x)
        dw = (g * xf * rstd).reshape(-1, xf.shape[-1]).sum(0)
        return dx.to(dy.dtype), dw.to(weight.dtype), None, None


def mutant_ops(flaw: str):
    """The torch backend with its two norms replaced by a flawed version (fused ops composed from them)."""
    if flaw == "backward without the projection term":

        def rms(x, weight, eps, scale=1.0):
            return _NoProjection.apply(x, weight, eps, scale)
    else:

        def rms(x, weight, eps, scale=1.0):
            return _norm(x, weight, None, eps, scale, False, flaw)

    def layer(x, weight, bias, eps, scale=1.0):
        return _norm(x, weight, bias, eps, scale, True, flaw)

    add_norm, peri_junction = compose_fused(rms, layer)
    ops, _ = resolve_backend("torch", torch.device("cpu"))
    return dataclasses.replace(ops, rms_norm=rms, layer_norm=layer, add_norm=add_norm, peri_junction=peri_junction)


FLAWS = [
    "eps x 10",
    "eps outside the square root",
    "variance over n - 1",
    "one-pass variance",
    "statistics in the input dtype",
    "backward without the projection term",
]


def failures(ops, kinds=("rmsnorm", "layernorm")) -> list[str]:
    """check_op over the single-norm op, every dtype and input kind: the first line of each failure."""
    found = []
    for op, kind, bias in [c for c in CASES if c[0] == "norm" and c[1] in kinds]:
        for dtype in DTYPES:
            for inputs in ("standard", *EDGE_INPUTS):
                try:
                    check_op("mutant", op, kind, bias, 17, 123, dtype, LNS_SCALE, torch.device("cpu"), ops, inputs)
                except AssertionError as e:
                    found.append(str(e).splitlines()[0])
    return found


def test_the_plain_formula_passes_every_check():
    """The harness itself: an unflawed copy of the formula (same code path as the mutants) passes."""
    assert failures(mutant_ops("none")) == []


@pytest.mark.parametrize("flaw", FLAWS)
def test_a_flawed_norm_fails_the_checks(flaw):
    kinds = ("layernorm",) if flaw == "one-pass variance" else ("rmsnorm",) if "projection" in flaw else None
    found = failures(mutant_ops(flaw), **({"kinds": kinds} if kinds else {}))
    assert found, f"no check caught: {flaw}"


def test_eps_decides_the_output_on_tiny_rows():
    """Why `tiny` catches a wrong eps in every dtype: there the mean square is comparable to eps."""
    x = torch.randn(17, 123, generator=torch.Generator().manual_seed(0)) * 3e-3
    ms = x.double().pow(2).mean(-1)
    assert ((ms > EPS / 10) & (ms < EPS * 10)).all()
    ratio = torch.sqrt((ms + 10 * EPS) / (ms + EPS))  # eps x 10 changes the output by this factor
    assert ratio.min() > 1 + 10 * torch.finfo(torch.bfloat16).eps
    assert math.isclose(EPS, 1e-5)
