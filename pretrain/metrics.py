"""What a run reports: metrics.jsonl (for machines), TensorBoard scalars, and a progress line.

Only the main rank writes. On resume, records beyond the resumed step are dropped from
metrics.jsonl and TensorBoard is purged from that step, so the curves have no duplicated tail.

metrics.jsonl schema: one JSON object per line, every one with `step` and `kind`:
    kind=train     tokens (cumulative training tokens), loss (mean over the logged interval), lr,
                   grad_norm, tokens_per_s, step_time, mfu, mem_mb
    kind=valid     loss, perplexity, bits_per_byte, tokens (validation tokens evaluated)
    kind=diag      layer_var, layer_rms, layer_max_abs, layer_attn_entropy, layer_grad_norm (per layer)
    kind=stability attn_logit_max, attn_entropy_min (over layers), logit_mean, logit_max, log_z_mean (output
                   layer), layer_attn_logit_max, layer_attn_entropy_min (per layer; pretrain/diagnostics.py)
    kind=bad_step  skipped, bad_steps;   kind=spike  loss, sigma
Non-finite numbers are written as the strings "nan" / "inf". Files written before `kind` existed
are read by `read_metrics`, which infers it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pretrain.fsutil import atomic_write_text


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if (record := _parse(line)) is not None and record.get("step", 0) <= resume_step
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            keep_earlier_curves(run_dir)  # a fresh start draws a fresh curve; the earlier one is kept
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step is not None else None)
        self.file = open(self.path, "a")

    def log(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": prefix, **{k: _clean(v) for k, v in record.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        for key, value in record.items():
            if key in ("step", "kind"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
            elif isinstance(value, list):  # per-layer values: one curve per layer
                for i, v in enumerate(value):
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{prefix}/{key}/layer_{i:02d}", v, step)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text.replace("\n", "  \n"), 0)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def keep_earlier_curves(run_dir: Path) -> None:
    """Renames an earlier run's metrics.jsonl and tb/ to *.before-<its date>, never deleting them."""
    old = [name for name in ("metrics.jsonl", "tb") if (run_dir / name).exists()]
    if not old:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime((run_dir / old[0]).stat().st_mtime))
    suffix, n = f"before-{stamp}", 1
    while any((run_dir / f"{name}.{suffix}").exists() for name in old):  # never replace a kept one
        n += 1
        suffix = f"before-{stamp}-{n}"
    for name in old:
        os.replace(run_dir / name, run_dir / f"{name}.{suffix}")


def _infer_kind(record: dict) -> str:
    """The kind of a row written before rows carried one."""
    if "lr" in record:
        return "train"
    if "perplexity" in record:
        return "valid"
    if "layer_var" in record:
        return "diag"
    if "skipped" in record:
        return "bad_step"
    return "spike" if "sigma" in record else "unknown"


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """The rows of a metrics.jsonl (old files included), optionally only those of one kind."""
    rows = []
    for line in Path(path).read_text().splitlines():
        record = _parse(line)
        if record is not None:
            record.setdefault("kind", _infer_kind(record))
            if kind is None or record["kind"] == kind:
                rows.append(record)
    return rows


def _parse(line: str) -> dict | None:
    """One metrics line, or None for a blank line or the torn last line of a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def _clean(v):
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Dense bf16 peaks (no sparsity) for MFU; override with train.peak_tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_peak_tflops(device: torch.device, override: float) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Step time averaged since the (re)start, for tokens/s and the ETA."""

    def __init__(self, start_step: int, max_steps: int, tokens_per_step: int):
        self.start_step, self.max_steps, self.tokens_per_step = start_step, max_steps, tokens_per_step
        self.t_start = time.perf_counter()
        self.t_last, self.step_last = self.t_start, start_step

    @contextmanager
    def excluded(self):
        """Time spent inside (validation, checkpoints, diagnostics) does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self.t_last += spent
            self.t_start += spent

    def interval(self, step: int) -> dict:
        """Timing over the steps since the previous call (step = number of completed steps)."""
        now = time.perf_counter()
        steps = max(1, step - self.step_last)
        dt = (now - self.t_last) / steps
        self.t_last, self.step_last = now, step
        done = step - self.start_step
        avg = (now - self.t_start) / max(1, done)
        return {
            "step_time": dt,
            "tokens_per_s": self.tokens_per_step / dt if dt > 0 else 0.0,
            "eta_s": avg * (self.max_steps - step),
            "elapsed_s": now - self.t_start,
        }


def say(msg: str, enabled: bool = True, log_file: Path | None = None) -> None:
    if not enabled:
        return
    print(msg, flush=True)
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(msg + "\n")
    sys.stdout.flush()
