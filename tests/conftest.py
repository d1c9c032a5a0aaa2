"""Shared fixtures: the prepared bundled corpus (real text, prepared once per session) and a helper
that runs a module under torchrun with real processes on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before triton is
# first imported, and importing the model imports it (torch.utils.flop_counter, where model/loss.py and
# kernels/cpu_attention.py declare their ops' FLOPs): set here, before any test module, whichever are run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def saved_for_backward_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for backward of fn(*args), parameters not counted."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's JIT ops built per environment (see pretrain/distributed.py prefer_cpu_accelerator_if_no_gpu)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def bundled_dir(tmp_path_factory) -> Path:
    """The bundled corpus (Shakespeare, Milton, KJV; SOTU 2000- as test) prepared with a
    2048-token vocabulary: real text, ~10 s."""
    out = tmp_path_factory.mktemp("data") / "bundled"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.data", "prepare", "--out", str(out), "--vocab-size", "2048"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def run_module(
    module_args: list[str], nproc: int = 1, cwd: Path = ROOT, extra_env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m ...` as nproc processes (torchrun --standalone when nproc > 1)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + module_args
    else:
        cmd = [sys.executable] + module_args
    return subprocess.run(cmd, cwd=cwd, env=_env(extra_env), capture_output=True, text=True, timeout=timeout)


def tiny_args(data_dir: Path, run_dir: Path, *sets: str) -> list[str]:
    args = [
        "-m",
        "pretrain.train",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--set",
        f"data.dir={data_dir}",
        "--set",
        f"run.dir={run_dir}",
    ]
    for s in sets:
        args += ["--set", s]
    return args


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    from pretrain.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl", "train")}


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Asserts a finished command succeeded, showing the end of its output if not."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


# ------------------------------------------------------------------------ fault injection (tests only)
# `python -m tests.conftest -m pretrain.train ARGS` runs the module after installing the faults named in
# $PRETRAIN_TEST_FAULTS (';'-separated, each NAME[:KEY=VALUE,...]); no production module has a hook.
#   dp-grad-sum                       every engine's backward scales the loss by the data-parallel size: the
#                                     gradients come out summed over data-parallel ranks instead of averaged
#   sp-norm-grad-unreduced            replicated norm / QK-norm gains are not all-reduced over tensor parallelism
#   tp-dropout-seeded-per-rank        the default RNG (dropout on replicated activations) seeded per tp rank
#   save:phase=P,step=S,action=A[,rank=R]
#                                     at phase P of saving checkpoint step S: action kill (SIGKILL itself), term
#                                     (SIGTERM itself, then go on) or enospc (the write fails: disk full).
#                                     Phases, in the order a save runs them: ds-write (DeepSpeed's files), rng,
#                                     hash, manifest, latest (after the rename, before `latest`), retention
#   disk-free:bytes=N                 shutil.disk_usage reports N bytes free
FAULTS_ENV = "PRETRAIN_TEST_FAULTS"
SAVE_PHASES = ("ds-write", "rng", "hash", "manifest", "latest", "retention")


def with_faults(module_args: list[str]) -> list[str]:
    """["-m", "pretrain.train", ...] -> the same run under the fault-injecting entry point."""
    return ["-m", "tests.conftest"] + list(module_args)


def faults_env(*faults: str) -> dict:
    return {FAULTS_ENV: ";".join(faults)}


def _parse_faults(spec: str) -> list[tuple[str, dict]]:
    out = []
    for item in filter(None, (f.strip() for f in spec.split(";"))):
        name, _, rest = item.partition(":")
        out.append((name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)))
    return out


def _dp_grad_sum(opts: dict) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    backward = DeepSpeedEngine.backward

    def summed(self, loss, *args, **kwargs):
        return backward(self, loss * self.dp_world_size, *args, **kwargs)

    DeepSpeedEngine.backward = summed


def _sp_norm_grad_unreduced(opts: dict) -> None:
    import model.parallelize as parallelize

    parallelize.all_reduce_grad_over_tp = lambda p: setattr(p, "sequence_parallel_grad", True)


def _tp_dropout_seeded_per_rank(opts: dict) -> None:
    import torch

    import pretrain.job as job

    seed_rank_streams = job.seed_rank_streams

    def per_rank(run):
        seed_rank_streams(run)
        torch.manual_seed(run.cfg.run.seed + 7 * run.coords[2])  # wrong: tp replicas draw other masks

    job.seed_rank_streams = per_rank


def _disk_free(opts: dict) -> None:
    import shutil as _shutil

    usage, free = _shutil.disk_usage, int(opts["bytes"])
    _shutil.disk_usage = lambda path: usage(path)._replace(free=free)


def _save_fault(opts: dict) -> None:
    """Fires once, at `phase` of the save of checkpoint `step`: enospc fails the phase's first write;
    kill / term signal this process once the phase has written something (ds-write, rng, hash,
    manifest) or just before it (latest: the checkpoint is renamed, `latest` not yet replaced;
    retention: `latest` replaced, old checkpoints not yet deleted)."""
    import errno
    import signal

    import torch

    import pretrain.checkpoint.checkpointer as ck

    if "rank" in opts and int(opts["rank"]) != int(os.environ.get("RANK", "0")):
        return
    phase, action, tag = opts["phase"], opts["action"], f"step_{int(opts['step']):06d}"
    assert phase in SAVE_PHASES and action in ("kill", "term", "enospc"), opts
    in_save = lambda path: f".tmp-{tag}" in str(path)
    targets = {  # phase -> (module, attribute, does this call belong to the phase?, fire after the call?)
        "ds-write": (torch, "save", lambda obj, path, *a, **k: in_save(path) and "rng_rank" not in str(path), True),
        "rng": (torch, "save", lambda obj, path, *a, **k: in_save(path) and "rng_rank" in str(path), True),
        "hash": (ck, "digest_and_sync", lambda path: in_save(path), True),
        "manifest": (ck, "write_manifest", lambda tmp, *a, **k: in_save(tmp), True),
        "latest": (ck, "atomic_write_text", lambda path, text: text.strip() == tag, False),
        "retention": (ck, "apply_retention", lambda root, keep_last, keep: keep.name == tag, False),
    }
    module, attr, belongs, after = targets[phase]
    original, fired = getattr(module, attr), []

    def wrapped(*args, **kwargs):
        if fired or not belongs(*args, **kwargs):
            return original(*args, **kwargs)
        fired.append(1)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1] if attr == "save" else args[0]))
        signum = signal.SIGKILL if action == "kill" else signal.SIGTERM
        if not after:
            os.kill(os.getpid(), signum)
        result = original(*args, **kwargs)
        if after:
            os.kill(os.getpid(), signum)
        return result

    setattr(module, attr, wrapped)


FAULTS = {
    "dp-grad-sum": _dp_grad_sum,
    "sp-norm-grad-unreduced": _sp_norm_grad_unreduced,
    "tp-dropout-seeded-per-rank": _tp_dropout_seeded_per_rank,
    "disk-free": _disk_free,
    "save": _save_fault,
}


def _install_faults(spec: str) -> None:
    for name, opts in _parse_faults(spec):
        if name not in FAULTS:
            raise SystemExit(f"{FAULTS_ENV}: unknown fault {name!r}; known: {', '.join(FAULTS)}")
        FAULTS[name](opts)


if __name__ == "__main__":  # python -m tests.conftest -m MODULE ARGS...: MODULE under $PRETRAIN_TEST_FAULTS
    import runpy

    _install_faults(os.environ.get(FAULTS_ENV, ""))
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: python -m tests.conftest -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_module_in_session(
    module_args: list[str], nproc: int = 1, extra_env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """run_module, with the launcher and all its workers killed on timeout (a plain subprocess timeout
    kills torchrun and leaves its workers running, e.g. deadlocked in a collective until gloo's
    30-minute timeout). A timeout returns exit code -9."""
    import signal

    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + module_args
    else:
        cmd = [sys.executable] + module_args
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts each worker in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate()
        err += f"\n[tests] killed after {timeout} s (hung?)"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def end_worker_case() -> None:
    """Between the cases of one torchrun worker: megatron-core's groups torn down, every rank in step."""
    import torch
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    torch.distributed.barrier()


def finish_worker(rank: int, results: dict, out_path: str) -> None:
    """The end of a torchrun worker: rank 0 writes the results as JSON, then the process group goes."""
    import json

    import torch

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()
