"""Every norm op of the torch and triton backends against the float64 plain-torch reference
(tests/kernels/norm_reference.py): outputs, input/residual gradients, gain/bias gradients, within
a tolerance derived from the dtype; on ordinary inputs and on inputs made to expose a wrong eps or
a missing term (EDGE_INPUTS). On CPU the triton backend runs under the Triton interpreter (see conftest.py).
"""

import pytest
from norm_reference import CASE_IDS, CASES, DTYPES, EDGE_INPUTS, LNS_SCALE, check_op

# (rows, hidden): odd and even hidden sizes, non-power-of-two tails, 1..64 rows; few rows at
# the largest hidden size because the interpreter is slow.
SHAPES = [(1, 64), (17, 64), (3, 123), (64, 123), (17, 256), (3, 1000), (64, 1000), (1, 4100), (3, 4100)]
BACKENDS = ["torch", "triton"]
DTYPE_IDS = lambda d: str(d).split(".")[-1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,kind,bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", [1.0, LNS_SCALE], ids=["noscale", "lns"])
@pytest.mark.parametrize("rows,hidden", SHAPES, ids=[f"{r}x{h}" for r, h in SHAPES])
def test_op_matches_reference(backend, op, kind, bias, dtype, scale, rows, hidden, device):
    check_op(backend, op, kind, bias, rows, hidden, dtype, scale, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,kind,bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("inputs", EDGE_INPUTS)
def test_op_matches_reference_on_eps_sensitive_and_extreme_inputs(backend, op, kind, bias, dtype, inputs, device):
    check_op(backend, op, kind, bias, 17, 123, dtype, LNS_SCALE, device, inputs=inputs)
