"""Triton-backend behaviour beyond the numeric matrix: limits, layouts, mixed dtypes, unused
outputs, argument errors, module forms. (Bitwise determinism of the atomic-free gain reduction is
tests/kernels/test_norm_gpu.py's: the interpreter runs a kernel's programs one after another, so on
CPU it is deterministic by construction and a test of it could not fail.)"""

import pytest
import torch
from norm_reference import EPS, LNS_SCALE, assert_close, check_op, ref_norm, tolerance

from kernels import BackendUnavailableError, backend, resolve_backend, triton_common
from kernels.modules import AddNorm, LayerNorm, PeriJunction, RMSNorm


@pytest.fixture
def tops(device):
    return resolve_backend("triton", device)[0]


@pytest.fixture
def torch_ops_(device):
    return resolve_backend("torch", device)[0]


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def test_max_hidden_constant_agrees():
    # backend.py keeps a copy so that it need not import triton; they must not drift.
    assert backend.TRITON_MAX_HIDDEN == triton_common.MAX_HIDDEN


def test_largest_supported_hidden_runs(device):
    check_op("triton", "norm", "rmsnorm", False, 2, triton_common.MAX_HIDDEN, torch.float32, LNS_SCALE, device)


def test_hidden_above_maximum_is_a_clear_error(tops, device):
    h = triton_common.MAX_HIDDEN * 2
    x, w = torch.randn(1, h, device=device), torch.ones(h, device=device)
    with pytest.raises(ValueError, match=rf"hidden size {h} exceeds .* maximum of {triton_common.MAX_HIDDEN}.*torch"):
        tops.rms_norm(x, w, EPS)
    with pytest.raises(ValueError, match="exceeds"):
        tops.peri_junction(x, x, w, None, w, None, EPS)
    with pytest.raises(BackendUnavailableError, match=rf"'triton'.*hidden size {h}"):
        resolve_backend("triton", device, hidden_size=h)


def test_non_contiguous_inputs(tops, device):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 2 * 123, generator=g).to(device)
    x_strided = big[:, ::2]  # stride 2 along hidden
    x_t = torch.randn(123, 5, generator=g).to(device).t()  # transposed
    w = torch.rand(123, generator=g).to(device) + 0.5
    for x in (x_strided, x_t):
        assert not x.is_contiguous()
        y = tops.rms_norm(x, w, EPS, LNS_SCALE)
        ref = ref_norm(x.double(), w.double(), None, "rmsnorm") * LNS_SCALE
        assert_close(y, ref, torch.float32, "non-contiguous rms_norm", 123)
        s, n = tops.add_norm(x, x_strided[: x.shape[0]], w, None, EPS)
        assert_close(s, (x + x_strided[: x.shape[0]]).double(), torch.float32, "non-contiguous add_norm s", 123)


def test_expanded_upstream_gradient(tops, torch_ops_, device):
    # y.sum() backpropagates an expanded (stride-0) gradient.
    x0 = torch.randn(5, 64, device=device)
    w0 = torch.rand(64, device=device) + 0.5
    grads = []
    for ops in (tops, torch_ops_):
        x, w = leaves(x0, w0)
        ops.layer_norm(x, w, None, EPS, LNS_SCALE).sum().backward()
        grads.append((x.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_zero_rows(tops, device):
    x = torch.randn(0, 7, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    s, y = tops.add_norm(x, x, w, None, EPS)
    assert s.shape == y.shape == (0, 7, 64)
    (y.sum() + s.sum()).backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(64, device=device))


def test_outputs_are_not_views(tops, device):
    # Outputs of a custom Function that are views would forbid in-place ops on them.
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    y = tops.rms_norm(x, w, EPS)
    s, n = tops.peri_junction(x, x, w, None, w, None, EPS)
    assert y._base is None and s._base is None and n._base is None
    y.mul_(2.0)  # allowed: backward of rms_norm does not need y
    y.sum().backward()


def test_mixed_dtypes(tops, torch_ops_, device):
    """bf16 activations with fp32 gains; bf16 x with an fp32 residual stream (s promoted)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(17, 123, generator=g).to(device).bfloat16()
    r0 = torch.randn(17, 123, generator=g).to(device)
    w0 = (torch.rand(123, generator=g) + 0.5).to(device)
    b0 = torch.randn(123, generator=g).to(device) * 0.1
    res = {}
    for name, ops in (("triton", tops), ("torch", torch_ops_)):
        x, r, w, b = leaves(x0, r0, w0, b0)
        y = ops.layer_norm(x, w, b, EPS, LNS_SCALE)
        s, n = ops.add_norm(x, r, w, b, EPS, kind="layernorm")
        assert y.dtype == torch.bfloat16 and s.dtype == n.dtype == torch.float32
        torch.autograd.backward([y, s, n], [torch.ones_like(y), torch.ones_like(s), torch.full_like(n, 0.5)])
        assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
        res[name] = [y, s, n, x.grad, r.grad, w.grad, b.grad]
    for a, b_ in zip(res["triton"], res["torch"]):
        tol = 2 * tolerance(a.dtype, 17 + 123)  # two backends, each within tolerance of the exact value
        torch.testing.assert_close(a.float(), b_.float(), rtol=0, atol=tol * b_.abs().max().item())


@pytest.mark.parametrize("which", ["only_normed", "only_sum"])
@pytest.mark.parametrize("op", ["add_norm", "peri"])
def test_unused_output_gets_no_gradient_tensor(tops, torch_ops_, device, which, op):
    g = torch.Generator().manual_seed(0)
    x0, r0 = (torch.randn(9, 100, generator=g).to(device) for _ in range(2))
    w0 = (torch.rand(100, generator=g) + 0.5).to(device)
    grads = {}
    for name, ops in (("triton", tops), ("torch", torch_ops_)):
        x, r, w1, w2 = leaves(x0, r0, w0, w0)
        if op == "add_norm":
            s, n = ops.add_norm(x, r, w1, None, EPS, LNS_SCALE)
        else:
            s, n = ops.peri_junction(x, r, w1, None, w2, None, EPS, LNS_SCALE)
        out = n if which == "only_normed" else s
        (out * torch.linspace(-1, 1, 100, device=device)).sum().backward()
        grads[name] = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (x, r, w1, w2)]
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_peri_with_one_bias_only(device):
    # LayerNorm junction whose output norm has no bias but whose input norm has one.
    ops = resolve_backend("triton", device)[0]
    g = torch.Generator().manual_seed(0)
    f, r = (torch.randn(5, 77, generator=g).to(device).requires_grad_() for _ in range(2))
    wo, wi, bi = ((torch.rand(77, generator=g) + 0.5).to(device).requires_grad_() for _ in range(3))
    s, n = ops.peri_junction(f, r, wo, None, wi, bi, EPS, LNS_SCALE, kind="layernorm")
    t = {k: v.detach().double().requires_grad_() for k, v in dict(f=f, r=r, wo=wo, wi=wi, bi=bi).items()}
    rs = t["r"] + ref_norm(t["f"], t["wo"], None, "layernorm")
    rn = ref_norm(rs, t["wi"], t["bi"], "layernorm") * LNS_SCALE
    (s.sum() + (n * n).sum()).backward()
    (rs.sum() + (rn * rn).sum()).backward()
    assert_close(n.detach(), rn.detach(), torch.float32, "normed", 77)
    for k, v in dict(f=f, r=r, wo=wo, wi=wi, bi=bi).items():
        assert_close(v.grad, t[k].grad, torch.float32, f"grad {k}", 5 + 77)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_argument_errors(name, device):
    ops = resolve_backend(name, device)[0]
    x, w = torch.randn(2, 8, device=device), torch.ones(8, device=device)
    with pytest.raises(ValueError, match="RMSNorm takes no bias"):
        ops.add_norm(x, x, w, w, EPS, kind="rmsnorm")
    with pytest.raises(ValueError, match=r"gain has shape \(7,\), expected \(8,\)"):
        ops.rms_norm(x, torch.ones(7, device=device), EPS)
    with pytest.raises(ValueError, match="norm kind 'batchnorm' is not supported; allowed: rmsnorm, layernorm"):
        ops.peri_junction(x, x, w, None, w, None, EPS, kind="batchnorm")
    with pytest.raises(ValueError, match=r"x has shape \(2, 8\) but residual has \(1, 8\)"):
        ops.add_norm(x, x[:1], w, None, EPS)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_modules(name, device):
    ops = resolve_backend(name, device)[0]
    x = torch.randn(3, 4, 32, device=device)
    ln = LayerNorm(32, eps=EPS, scale=LNS_SCALE, ops=ops).to(device)
    torch.testing.assert_close(ln(x), ops.layer_norm(x, ln.weight, ln.bias, EPS, LNS_SCALE))
    assert RMSNorm(32, ops=ops).bias is None
    pj = PeriJunction(32, kind="layernorm", bias=True, ops=ops).to(device)
    assert {n for n, _ in pj.named_parameters()} == {"out_weight", "out_bias", "in_weight", "in_bias"}
    s, n = pj(x, x)
    s2, n2 = AddNorm(32, ops=ops).to(device)(x, x)
    assert s.shape == n.shape == s2.shape == n2.shape == x.shape
    # ops=None resolves `auto` for the input's device on first use.
    assert RMSNorm(32).to(device)(x).shape == x.shape


def test_backward_grid_heuristic(monkeypatch):
    # GPU grid: a few programs per SM (fewer warps per program -> more programs), but at least
    # 16 rows each so the fp32 partial-sum buffer stays small; checked without a GPU.
    monkeypatch.setattr(triton_common, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert triton_common.backward_programs(65536, cuda, num_warps=8) == 132 * 4
    assert triton_common.backward_programs(65536, cuda, num_warps=32) == 132
    assert triton_common.backward_programs(100, cuda, num_warps=4) == 7
    assert triton_common.backward_programs(1, cuda, num_warps=4) == 1
    assert triton_common.backward_programs(17, torch.device("cpu"), num_warps=4) == 4
    assert [triton_common.num_warps_for(b) for b in (64, 1024, 2048, 8192, 32768)] == [4, 4, 8, 16, 32]
