"""Checks that need a real GPU (compiled Triton, not the interpreter). All skip without CUDA.

Speed is never asserted here (bench/kernels.py measures it); these check what makes the speed
possible: compiled kernels, one kernel per fused op, no atomics in the gain reduction, and
bf16 numerics at training-sized shapes.
"""

import pytest
import torch
from norm_reference import CASE_IDS, CASES, DTYPES, LNS_SCALE, check_op

from kernels import resolve_backend, triton_common, triton_norm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)"),
]

CUDA = torch.device("cuda")


def test_kernels_are_compiled_not_interpreted():
    assert not triton_norm.interpreter_active()
    ops, reason = resolve_backend("auto", CUDA)
    assert ops.name == "triton", reason


@pytest.mark.parametrize("op,kind,bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "rows,hidden",
    [(4096, 8192), (16384, 2048), (2048, 4100), (8, 32768)],
    ids=["4096x8192", "16384x2048", "2048x4100", "8x32768"],
)
def test_bf16_large_shapes(op, kind, bias, rows, hidden):
    check_op("triton", op, kind, bias, rows, hidden, torch.bfloat16, LNS_SCALE, CUDA)


@pytest.mark.parametrize("op,kind,bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_all_dtypes_mid_shape(op, kind, bias, dtype):
    check_op("triton", op, kind, bias, 1000, 3000, dtype, LNS_SCALE, CUDA)


def _run_peri(rows=4096, hidden=2048, kind="layernorm"):
    ops = resolve_backend("triton", CUDA)[0]
    g = torch.Generator(device="cuda").manual_seed(0)
    f, r = (
        torch.randn(rows, hidden, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(2)
    )
    ws = [torch.rand(hidden, device="cuda", generator=g).requires_grad_() for _ in range(4)]
    s, y = ops.peri_junction(f, r, ws[0], ws[1], ws[2], ws[3], 1e-5, LNS_SCALE, kind=kind)
    torch.autograd.backward(
        [s, y], [torch.ones_like(s), torch.randn(y.shape, device="cuda", generator=g, dtype=y.dtype)]
    )
    return [t.grad.clone() for t in [f, r, *ws]]


def test_backward_has_no_atomics():
    ops = resolve_backend("triton", CUDA)[0]
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(1024, device="cuda", requires_grad=True)
    ops.rms_norm(x, w, 1e-5).sum().backward()
    _run_peri()
    for name in ("norm_bwd", "peri_bwd"):
        ptx = triton_common.LAST_COMPILED[name].asm["ptx"]
        assert "atom." not in ptx and "red.global" not in ptx, f"{name} uses atomics"


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_backward_is_bitwise_deterministic(kind):
    """Per-program partial sums and one reduction, no atomics: the same gradients bit for bit, run after run."""
    a, b = _run_peri(kind=kind), _run_peri(kind=kind)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fused_ops_launch_one_kernel_each():
    from torch.profiler import ProfilerActivity, profile

    _run_peri(rows=256, hidden=512)  # compile outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _run_peri(rows=256, hidden=512)
    events = prof.key_averages()
    names = [e.key for e in events]
    counts = {k: sum(e.count for e in events if k in e.key) for k in ("peri_fwd_kernel", "peri_bwd_kernel")}
    assert counts == {"peri_fwd_kernel": 1, "peri_bwd_kernel": 1}, names
    # ...and no separate norm kernels: the junction is not secretly run unfused.
    assert not any(n.startswith(("norm_fwd_kernel", "norm_bwd_kernel")) for n in names), names
