"""Launch settings shared by the Triton norm kernels: block size, warps, backward grid.

Design (all kernels): one program normalises one full row held in registers, with
BLOCK = next_power_of_2(hidden) and a mask for the tail, so every element is read once and
written once (the bandwidth floor). Statistics are fp32. Backward kernels run a fixed number
of programs (a few per SM) that loop over contiguous row ranges, accumulate gain/bias gradients
in fp32 registers and write one partial row each into a [num_programs, hidden] buffer that is
summed afterwards: no atomics, and bitwise-deterministic gradients.
"""

from __future__ import annotations

import functools

import torch
import triton

# Largest hidden size the kernels accept. A row lives in registers: at BLOCK = 32768 with
# 32 warps (1024 threads) that is 32 fp32 values per live tensor per thread; the backward keeps
# ~6 such tensors (the Peri junction backward ~10, which may spill at this size: still correct,
# slower). 65536 would need 64+ values per tensor per thread and spills heavily, so we refuse it
# and ask for the torch backend instead of silently running a slow kernel.
MAX_HIDDEN = 32768

# Programs per backward launch on CPU (interpreter): small, but > 1 so that tests exercise the
# partial-sum reduction and uneven row splits.
_INTERPRETER_BWD_PROGRAMS = 4
# On GPU each backward program handles at least this many rows, so that the fp32 partial-sum
# buffer ([programs, hidden]) stays a few percent of the bytes the backward must move anyway.
_MIN_ROWS_PER_PROGRAM = 16


def block_size(hidden: int, what: str) -> int:
    if hidden < 1:
        raise ValueError(f"{what}: hidden size must be >= 1, got {hidden}")
    if hidden > MAX_HIDDEN:
        raise ValueError(
            f"{what}: hidden size {hidden} exceeds the Triton norm kernels' maximum of {MAX_HIDDEN} "
            "(a row must fit in registers); use kernels.backend: torch (or apex) for this model"
        )
    return triton.next_power_of_2(hidden)


def num_warps_for(block: int) -> int:
    """Enough threads that each holds <= ~16-32 fp32 values of a row; to be tuned on a GPU."""
    if block >= 16384:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_programs(n_rows: int, device: torch.device, num_warps: int) -> int:
    """Programs for a backward launch: enough resident warps per SM to hide memory latency
    (~32 warps/SM), few enough that the partial-sum buffer stays tiny next to the activations."""
    if device.type == "cuda":
        per_sm = max(1, 32 // num_warps)
        progs = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
        progs = min(progs, triton.cdiv(n_rows, _MIN_ROWS_PER_PROGRAM))
    else:
        progs = _INTERPRETER_BWD_PROGRAMS
    return max(1, min(n_rows, progs))


def as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """A [rows, hidden] view with unit stride along hidden (copying only if it must)."""
    t2 = t.reshape(-1, hidden)
    if hidden > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    if t2.shape[0] > 1 and t2.stride(0) < hidden:
        # e.g. an expanded (stride-0) upstream gradient: rows would alias.
        t2 = t2.contiguous()
    return t2


# The compiled kernel of the latest launch of each kernel, by name: lets GPU tests inspect the
# generated code (e.g. "no atomics in the backward") without re-deriving launch arguments.
LAST_COMPILED: dict[str, object] = {}
