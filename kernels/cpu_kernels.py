"""Fused CPU kernels for the train step (kernels/csrc/cpu_kernels.cpp), forward and backward: RMSNorm, the
residual junctions (add + RMSNorm, Peri-LN's RMSNorm + add + RMSNorm), SwiGLU, the RoPE rotation of the
fused q|k|v projection, and the fused loss's per-chunk softmax cross-entropy; each one memory pass where
torch's eager ops take four or more (bench/block_ops.py, bench/RESULTS.md issue 19). And causal attention
(kernels/cpu_attention.py), blocked products through BLAS instead of torch's CPU flash kernel.

They are C++ built on first use with torch.utils.cpp_extension (g++ and ninja; about 10 s once, then
cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions) and registered as the torch ops
pretrain_cpu::*. The build targets this machine's CPU (-march=native), so the library's name carries a
hash of the source, the flags and the CPU's model and feature flags: nodes of another CPU sharing a home
directory build their own instead of loading one that would stop on an illegal instruction.

Used by kernels/torch_ops.py, model/mlp.py and model/rope.py in eager mode on fp32 CPU tensors (under
torch.compile inductor fuses the plain expressions itself; other dtypes and devices take torch's ops), and by
model/loss.py inside the fused loss's custom op, which runs eagerly in compiled models too (fp32, no tensor
parallelism: its all-reduces sit between the passes the kernel fuses), and by kernels/cpu_attention.py's
custom op, eager and compiled.
PRETRAIN_CPU_KERNELS=0 turns them off; a failed build (no compiler, say) is reported once and torch's ops run instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# -ffast-math lets g++ call the vector math library's SIMD expf (glibc declares it only under fast math);
# the kernels do no comparisons or NaN tests that fast math would change (tests/test_cpu_kernels.py checks
# large and tiny inputs against torch). -fopenmp: at::parallel_for splits the rows over torch's intra-op
# threads; the library's libgomp.so.1 resolves to the one torch has already loaded (same soname), so there
# is one OpenMP runtime in the process, not two.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
ENV_SWITCH = "PRETRAIN_CPU_KERNELS"

_state: dict = {}  # "ops": the loaded namespace, or "error": why not


def _cpu_signature() -> str:
    """The CPU's model name and feature flags (Linux), else the machine type."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def library_name() -> str:
    digest = hashlib.sha256()
    parts = (SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS), _cpu_signature(), torch.__version__)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
    return f"pretrain_cpu_kernels_{digest.hexdigest()[:12]}"


def enabled_by_env() -> bool:
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on", ""):
        return True
    raise ValueError(f"{ENV_SWITCH}={value!r}: expected 1 (use the fused CPU kernels, the default) or 0 (torch's ops)")


def load():
    """torch.ops.pretrain_cpu once built and loaded, else None (disabled, or the build failed: warned once)."""
    if "ops" in _state or "error" in _state:
        return _state.get("ops")
    if not enabled_by_env():
        _state["error"] = f"{ENV_SWITCH}=0"
        return None
    try:
        if not _registered():  # a second load of the library in one process would abort it
            _build_and_load()
        _state["ops"] = torch.ops.pretrain_cpu
    except Exception as err:  # no compiler or ninja: torch's ops still compute the same thing
        _state["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        warnings.warn(
            f"the fused CPU kernels ({SOURCE.name}) could not be built, torch's eager ops run instead "
            f"(slower, same values): {_state['error']}",
            RuntimeWarning,
            stacklevel=2,
        )
    return _state.get("ops")


def _registered() -> bool:
    return _has_op("pretrain_cpu::swiglu_forward")


def _has_op(qualified: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")
    except RuntimeError:  # "operator ... does not exist"
        return False


def _build_and_load() -> None:
    from torch.utils.cpp_extension import load as build

    build(name=library_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
          is_python_module=False, verbose=False)  # fmt: skip


def status() -> str:
    """'loaded', 'not built yet', or why they are off (for start-up logs and the benchmarks' JSON)."""
    if "ops" in _state:
        return "loaded"
    return _state.get("error", "not built yet")


def usable(*tensors: torch.Tensor):
    """The ops if every tensor is a contiguous fp32 CPU tensor and the kernels load, else None. None under
    torch.compile too: inductor fuses the plain expressions itself (and the ops have no fake kernels)."""
    if torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return None
    return load()


@contextmanager
def turned_off():
    """Torch's ops inside the block, whatever the switch says (benchmarks and tests put both side by side)."""
    saved = dict(_state)
    _state.clear()
    _state["error"] = "turned off by kernels.cpu_kernels.turned_off()"
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)
