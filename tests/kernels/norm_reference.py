"""Plain-torch reference for the norm kernel tests (test code, not kernels/ code).

The reference runs in float64 on the same (already rounded) inputs, so the only differences a
correct backend shows are its fp32 arithmetic and the rounding of its outputs (and of intermediates
kept in the activation dtype, such as s = r + N(f)) to the activation dtype. The allowed error is
derived from exactly that (`tolerance`), relative to the largest reference value:

    4 units of the dtype's rounding (u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32)
  + 2 sqrt(n) units of fp32's, for fp32 reductions over n terms (a random-walk bound)

Measured on CPU (torch and the Triton interpreter, every op, shape and dtype below): at most 1.6 u in
bf16/fp16 and 3 units of fp32's in fp32, so the bound has a margin of 2.5x (bf16) to 7x (fp32). A
wrong eps, a variance over n-1, statistics in the input dtype or a missing gradient term is off by far
more on the inputs made for it (EDGE_INPUTS; tests/kernels/test_norm_tolerances.py).
"""

import math

import torch

from kernels import resolve_backend

EPS = 1e-5
LNS_SCALE = 1.0 / math.sqrt(3.0)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUNDING_UNITS = 4  # of the activation dtype
REDUCTION_UNITS = 2  # x sqrt(n), of fp32


def tolerance(dtype: torch.dtype, n: int, cond: float = 1.0) -> float:
    """Allowed |error| / max|reference| for a value of `dtype` computed with fp32 reductions over n
    terms. cond: LayerNorm's centring amplifies the rounding of the mean by |mean| / sqrt(var + eps)
    (conditioning), which even an exact two-pass algorithm cannot avoid; 1 for RMSNorm."""
    u = torch.finfo(dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    return ROUNDING_UNITS * u + REDUCTION_UNITS * math.sqrt(n) * u32 * cond


def conditioning(op, kind, t) -> float:
    """1 + the largest |mean| / sqrt(var + eps) over the rows every LayerNorm of `op` normalises
    (t: the float64 reference leaves); 1 for RMSNorm."""
    if kind != "layernorm":
        return 1.0
    with torch.no_grad():
        if op == "norm":
            normed = [t["x"]]
        elif op == "add_norm":
            normed = [t["x"] + t["r"]]
        else:
            normed = [t["x"], t["r"] + ref_norm(t["x"], t["wo"], t.get("bo"), kind)]
        return 1.0 + max(
            float((z.mean(-1).abs() / torch.sqrt(z.var(-1, unbiased=False) + EPS)).max()) for z in normed if z.numel()
        )


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

# Inputs that make a wrong formula visible (beyond `standard`, non-zero mean and non-unit spread):
#   tiny       rows of RMS ~3e-3: the mean square is ~eps, so eps decides the output
#   flat       rows nearly constant (a spread of ~3e-3 around 0.5): LayerNorm's variance is ~eps
#   constant   rows exactly constant: LayerNorm's variance is 0, the output its bias, dx scales with 1/sqrt(eps)
#   large-mean a mean far above the spread (1e4 +- 1 in fp32, 1024 +- 16 in bf16/fp16): a one-pass
#              variance E[x^2] - E[x]^2 in fp32 cancels catastrophically
#   large      |x| ~ 300: x^2 overflows fp16 (65504) unless the statistics are computed in fp32
EDGE_INPUTS = ("tiny", "flat", "constant", "large-mean", "large")


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


def make_inputs(op, kind, bias, leading, hidden, dtype, device, seed=0, inputs="standard"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, mul=1.0, add=0.0):
        return (torch.randn(*shape, generator=g) * mul + add).to(dtype).to(device)

    shape = (*leading, hidden)
    t = {"x": _activations(inputs, shape, dtype, rnd)}
    if op in ("add_norm", "peri"):
        # add_norm normalises x + r: the residual keeps the row statistics the input was made for
        t["r"] = rnd(*shape, mul=1.5, add=-0.3) if inputs == "standard" else torch.zeros_like(t["x"])
    names = [("wo", "bo"), ("wi", "bi")] if op == "peri" else [("w", "b")]
    for wn, bn in names:
        t[wn] = rnd(hidden, mul=0.3, add=1.0)
        if bias:
            t[bn] = rnd(hidden, mul=0.2)
    return t


def _activations(inputs, shape, dtype, rnd):
    if inputs == "standard":  # non-zero mean and non-unit spread: centring and both statistics matter
        return rnd(*shape, mul=2.0, add=0.5)
    if inputs == "tiny":
        return rnd(*shape, mul=3e-3)
    if inputs == "flat":
        return rnd(*shape, mul=3e-3, add=0.5)
    if inputs == "constant":
        return rnd(*shape[:-1], 1).expand(shape).contiguous()
    if inputs == "large-mean":
        return rnd(*shape, mul=1.0, add=1e4) if dtype == torch.float32 else rnd(*shape, mul=16.0, add=1024.0)
    if inputs == "large":
        return rnd(*shape, mul=300.0)
    raise AssertionError(inputs)


def assert_close(actual, expected, dtype, what, n, cond=1.0, floor=0.0):
    """|actual - expected| <= tolerance(dtype, n, cond) * max(max|expected|, floor), elementwise (n: the
    length of the fp32 reductions behind the value; floor: the scale of the value's terms, for a value
    that is ~0 because its terms cancel, such as a gain gradient on constant rows)."""
    assert actual is not None, f"{what}: no gradient"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    mag = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    err = (actual.double() - expected).abs()
    tol = tolerance(dtype, n, cond)
    bad = ~(err <= tol * mag)  # a NaN is bad too
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {err.numel()} elements off; max err {err.max().item():.3e} "
        f"= {err.max().item() / max(mag, 1e-300):.2e} of the scale {mag:.3e} (allowed {tol:.2e}, cond {cond:.3g})"
    )


def leading_shape(rows):
    """Rows spread over different leading shapes: the ops flatten any leading dims."""
    return {1: (1,), 3: (1, 3), 17: (17,), 64: (4, 16)}.get(rows, (rows,))


def check_op(backend, op, kind, bias, rows, hidden, dtype, scale, device, ops=None, inputs="standard"):
    """Runs `op` forward+backward on `backend` (or the given NormOps) and compares outputs and
    all gradients with the float64 reference."""
    if ops is None:
        ops, _ = resolve_backend(backend, device)
    t = make_inputs(op, kind, bias, leading_shape(rows), hidden, dtype, device, inputs=inputs)
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
    label = f"{backend} {op}/{kind} {inputs} {str(dtype).removeprefix('torch.')} {rows}x{hidden}"
    cond = conditioning(op, kind, ref_t)
    # a normalised value has about the size of its gain, also where the reference is ~0 (constant rows)
    normed_scale = max(t[k].abs().max().item() for k in ("w", "wi", "wo") if k in t) * scale
    for name, o, r in zip(names, outs, ref_outs):
        assert_close(o.detach(), r.detach(), dtype, f"{label} output {name}", hidden, cond, normed_scale)
    # a gain or bias gradient sums rows x (upstream gradient ~ normalised value ~ 1)
    term_scale = max(u.abs().max().item() for u in ups) * math.sqrt(rows)
    for k, v in t.items():
        # activations: reductions over the hidden size; gains and biases: over the rows, of values
        # that themselves came out of reductions over the hidden size
        activation = k in ("x", "r")
        n = hidden if activation else rows + hidden
        floor = 0.0 if activation else term_scale
        assert_close(v.grad, ref_t[k].grad, dtype, f"{label} grad of {k}", n, cond, floor)
