"""Plain-torch reference for the norm kernel tests (test code, not kernels/ code).

The reference runs in float64 on the same (already rounded) inputs, so the only differences a
correct backend shows are its fp32 arithmetic and the final rounding to the activation dtype.
"""

import math

import torch

from kernels import resolve_backend

EPS = 1e-5
LNS_SCALE = 1.0 / math.sqrt(3.0)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance per dtype (errors are measured against the reference's largest magnitude).
# (op, norm kind, bias): every fused op in both norm kinds, with and without a LayerNorm bias
CASES = [
    ("norm", "rmsnorm", False),
    ("norm", "layernorm", True),
    ("norm", "layernorm", False),
    ("add_norm", "rmsnorm", False),
    ("add_norm", "layernorm", True),
    ("peri", "rmsnorm", False),
    ("peri", "layernorm", True),
]
CASE_IDS = [f"{o}-{k}-{'bias' if b else 'nobias'}" for o, k, b in CASES]

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------- plain-torch reference (fp64)
def ref_norm(x, w, b, kind):
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w
    return y if b is None else y + b


def reference(op, kind, t, scale):
    """t: dict of float64 leaves. Returns the op's outputs as a tuple."""
    if op == "norm":
        return (ref_norm(t["x"], t["w"], t.get("b"), kind) * scale,)
    if op == "add_norm":
        s = t["x"] + t["r"]
        return s, ref_norm(s, t["w"], t.get("b"), kind) * scale
    if op == "peri":
        s = t["r"] + ref_norm(t["x"], t["wo"], t.get("bo"), kind)
        return s, ref_norm(s, t["wi"], t.get("bi"), kind) * scale
    raise AssertionError(op)


def run_backend(ops, op, kind, t, scale):
    if op == "norm":
        if kind == "rmsnorm":
            return (ops.rms_norm(t["x"], t["w"], EPS, scale),)
        return (ops.layer_norm(t["x"], t["w"], t.get("b"), EPS, scale),)
    if op == "add_norm":
        return ops.add_norm(t["x"], t["r"], t["w"], t.get("b"), EPS, scale, kind=kind)
    return ops.peri_junction(t["x"], t["r"], t["wo"], t.get("bo"), t["wi"], t.get("bi"), EPS, scale, kind=kind)


def make_inputs(op, kind, bias, leading, hidden, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, mul=1.0, add=0.0):
        return (torch.randn(*shape, generator=g) * mul + add).to(dtype).to(device)

    shape = (*leading, hidden)
    # Non-zero mean and non-unit spread, so LayerNorm's centring and both statistics matter.
    t = {"x": rnd(*shape, mul=2.0, add=0.5)}
    if op in ("add_norm", "peri"):
        t["r"] = rnd(*shape, mul=1.5, add=-0.3)
    names = [("wo", "bo"), ("wi", "bi")] if op == "peri" else [("w", "b")]
    for wn, bn in names:
        t[wn] = rnd(hidden, mul=0.3, add=1.0)
        if bias:
            t[bn] = rnd(hidden, mul=0.2)
    return t


def assert_close(actual, expected, dtype, what):
    assert actual is not None, f"{what}: no gradient"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    tol = TOL[dtype]
    mag = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected).abs()
    bound = tol * (mag + expected.abs())  # relative to the largest value, plus elementwise
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {err.numel()} elements off; max err {err.max().item():.3e} "
        f"(largest |ref| {mag:.3e}, tol {tol})"
    )


def leading_shape(rows):
    """Rows spread over different leading shapes: the ops flatten any leading dims."""
    return {1: (1,), 3: (1, 3), 17: (17,), 64: (4, 16)}.get(rows, (rows,))


def check_op(backend, op, kind, bias, rows, hidden, dtype, scale, device, ops=None):
    """Runs `op` forward+backward on `backend` (or the given NormOps) and compares outputs and
    all gradients with the float64 reference."""
    if ops is None:
        ops, _ = resolve_backend(backend, device)
    t = make_inputs(op, kind, bias, leading_shape(rows), hidden, dtype, device)
    for v in t.values():
        v.requires_grad_(True)
    outs = run_backend(ops, op, kind, t, scale)

    ref_t = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    ref_outs = reference(op, kind, ref_t, scale)
    assert len(outs) == len(ref_outs)

    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=g).to(dtype).to(device) for o in ref_outs]
    torch.autograd.backward(list(outs), ups)
    # The reference sees the same (rounded) upstream gradients.
    torch.autograd.backward(list(ref_outs), [u.double() for u in ups])

    names = ["s", "normed"] if len(outs) == 2 else ["y"]
    for name, o, r in zip(names, outs, ref_outs):
        assert_close(o.detach(), r.detach(), dtype, f"{backend} {op}/{kind} output {name}")
    for k, v in t.items():
        assert_close(v.grad, ref_t[k].grad, dtype, f"{backend} {op}/{kind} grad of {k}")
