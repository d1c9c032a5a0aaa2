"""Resuming on another layout (resharding): another data-, tensor- or pipeline-parallel size, or
another ZeRO stage, through DeepSpeed's universal checkpoint.

1. Every checkpoint carries `universal_checkpoint_info` (as Megatron-DeepSpeed's do): which
   parameters are tensor-parallel along rows (the default), along columns (row-parallel layers),
   made of two sub-parameters (SwiGLU's [gate_r; up_r] shards), replicated over tensor-parallel
   ranks (norm gains, row-parallel biases), or replicated over pipeline stages (the tied embedding).
2. On a resume that changes the layout, rank 0 converts the checkpoint once with DeepSpeed's
   `ds_to_universal` (ZeRO fragments -> one full fp32 tensor + Adam moments per parameter) into
   checkpoints/universal/step_N (written under a temporary name, then renamed), and renames the
   parameter folders to the plain model's names, so a pipeline checkpoint and a plain one look
   the same. Each rank then links the names its own module uses (pipeline names under pp > 1).
3. The engine is built with `checkpoint.load_universal: true` and slices every tensor for its new
   tensor-parallel rank and ZeRO partition itself.

What does not carry over: the per-rank RNG streams (the ranks are other ranks now; they are
reseeded from the run seed, the step and the new coordinates) — with dropout 0 nothing depends
on them. ZeRO-0 has no partitioned optimizer files for DeepSpeed to convert, so resharding needs
ZeRO >= 1 on both sides (a pure data-parallel change under ZeRO-0 needs no conversion at all).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pretrain.checkpoint.layout import META, UNIVERSAL_DIR, CheckpointError
from pretrain.distributed import barrier, broadcast_object
from pretrain.ds_compat import alias_model_state_files
from pretrain.fsutil import atomic_write_text, sha256_file

DONE = "converted.json"

_STAGE_PREFIX = re.compile(r"^(?:tied_modules\.embed\.|(\d+)\.)")


def plain_name(name: str, num_layers: int) -> str:
    """The plain GPT's name of a parameter, whether `name` comes from the plain model or from the
    pipeline module (layers 0 = embedding, 1..L = blocks, L+1 = final norm, L+2 = untied head)."""
    m = _STAGE_PREFIX.match(name)
    if not m:
        return name
    rest = name[m.end() :]
    if m.group(1) is None:  # tied_modules.embed.<attr of EmbeddingStage>
        return rest
    idx = int(m.group(1))
    if 1 <= idx <= num_layers:
        return f"blocks.{idx - 1}." + rest.removeprefix("block.")
    return rest  # embedding stage (0), final norm (L+1), head (L+2): their attribute names are the plain ones


def universal_checkpoint_info(module, num_layers: int, swiglu: bool) -> dict:
    """DeepSpeed's per-parameter conversion rules for this module's parameter names (exact names,
    so every pattern matches and the converter's strict check passes)."""
    from deepspeed.checkpoint import constants as C

    from model.parallelize import sharding_of

    replicated, row_parallel, two_sub_params, tied = [], [], [], []
    for name, _ in module.named_parameters():
        kind = sharding_of(plain_name(name, num_layers))
        exact = "^" + re.escape(name) + "$"
        if kind == "replicated":
            replicated.append(exact)
        elif kind == "cols":
            row_parallel.append(exact)  # Megatron's "row-parallel" layers are split along columns
        elif kind == "fc1" and swiglu:
            two_sub_params.append(exact)
        if name.startswith("tied_modules."):
            tied.append(exact)
    info = {
        C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        C.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
        C.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: two_sub_params,
        C.PIPELINE_REPLICATED_PARAMETER_PATTERNS: tied,
    }
    return info


def needs_conversion(saved: dict, now: dict) -> str | None:
    """Why a resume from `saved` (checkpoint meta) into layout `now` needs the universal
    checkpoint, or None when DeepSpeed can load the checkpoint as it is."""
    was = {"ulysses": 1, **saved.get("layout", {"tp": 1, "pp": 1, "dp": saved["world_size"]})}
    now = {"ulysses": 1, **now}
    # Ulysses splits sequences, not parameters: for the checkpoint it is more data parallelism (ZeRO
    # partitions its states over dp x ulysses ranks)
    changes = [f"{k} {was[k]} -> {now[k]}" for k in ("tp", "pp", "dp", "ulysses") if was[k] != now[k]]
    if saved["zero_stage"] != now["zero_stage"]:
        changes.append(f"ZeRO-{saved['zero_stage']} -> ZeRO-{now['zero_stage']}")
    if not changes:
        return None
    only_dp = all(c.startswith(("dp ", "ulysses ")) for c in changes)
    if only_dp and saved["zero_stage"] == 0 and now["zero_stage"] == 0:
        return None  # ZeRO-0 replicates everything: any data-parallel size loads it directly
    if saved["zero_stage"] == 0 or now["zero_stage"] == 0:
        raise CheckpointError(
            f"resuming with {', '.join(changes)} needs DeepSpeed's universal checkpoint, which converts ZeRO "
            f"optimizer partitions: the checkpoint's ZeRO stage is {saved['zero_stage']} and this run's is "
            f"{now['zero_stage']}; both must be 1, 2 or 3 (ZeRO-0 can only change the data-parallel size)"
        )
    if (saved["zero_stage"] == 3) != (now["zero_stage"] == 3):
        raise CheckpointError(
            f"resuming a ZeRO-{saved['zero_stage']} checkpoint under ZeRO-{now['zero_stage']} is not supported: "
            "DeepSpeed's universal checkpoint keeps the optimizer's global state in the source stage's format, "
            "which ZeRO-3 and ZeRO-1/2 read differently; resume with "
            f"zero.stage={saved['zero_stage']}{' (or 1/2)' if saved['zero_stage'] in (1, 2) else ''}"
        )
    if saved.get("config", {}).get("model", {}).get("sigma_reparam"):
        # The conversion carries parameters and optimizer states; sigma-Reparam's power-iteration vectors u, v are
        # module buffers (sharded with their matrix under tp), which ds_to_universal does not convert.
        raise CheckpointError(
            f"resuming with {', '.join(changes)} needs DeepSpeed's universal checkpoint, which does not carry "
            "model.sigma_reparam's power-iteration buffers (u, v); resume on the checkpoint's layout "
            f"(tp {was['tp']}, pp {was['pp']}, dp {was['dp']}, ZeRO-{saved['zero_stage']}), or start a new run from "
            "its weights (checkpoint.init_from)"
        )
    return ", ".join(changes)


def prepare_universal(ckpt: Path, rank: int, log) -> Path:
    """checkpoints/universal/<step> for checkpoint `ckpt`, converted by rank 0 if not cached.
    A collective: every rank calls it and gets the path."""
    root = ckpt.parent / UNIVERSAL_DIR
    out = root / ckpt.name
    error = None
    if rank == 0:
        try:
            if not _is_current(out, ckpt):
                _convert(ckpt, out, log)
            else:
                log(f"[checkpoint] using the universal checkpoint converted earlier: {out}")
        except CheckpointError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return out


def link_module_names(universal: Path, module, num_layers: int) -> None:
    """Makes zero/<name> exist for every parameter name of this rank's module (pipeline names link
    to the plain folders). A collective (ends with a barrier)."""
    zero = universal / "zero"
    missing = []
    for name, _ in module.named_parameters():
        target = zero / name
        if target.exists():
            continue
        plain = zero / plain_name(name, num_layers)
        if not plain.is_dir():
            missing.append(name)
            continue
        try:
            os.symlink(plain.name, target)
        except FileExistsError:  # another rank made the same link
            pass
    barrier()
    if missing:
        raise CheckpointError(
            f"{universal}: the converted checkpoint has no state for parameters {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''} (a different model?)"
        )


def _manifest_digest(ckpt: Path) -> str:
    return sha256_file(ckpt / "manifest.json")


def _is_current(out: Path, ckpt: Path) -> bool:
    done = out / DONE
    if not done.is_file():
        return False
    try:
        return json.loads(done.read_text()).get("source_manifest_sha256") == _manifest_digest(ckpt)
    except (json.JSONDecodeError, OSError):
        return False


def _convert(ckpt: Path, out: Path, log) -> None:
    meta = json.loads((ckpt / META).read_text())
    num_layers = meta["config"]["model"]["num_layers"]
    scratch = out.parent / f".tmp-{out.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    t0 = time.perf_counter()
    log(f"[checkpoint] converting {ckpt} to DeepSpeed's universal format (ds_to_universal) ...")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt),
            "--output_folder",
            str(scratch / out.name),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")},
    )
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise CheckpointError(
            f"{ckpt}: DeepSpeed's ds_to_universal failed (exit {proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    converted = scratch / out.name
    zero = converted / "zero"
    for folder in list(zero.iterdir()):
        if folder.is_dir():
            plain = plain_name(folder.name, num_layers)
            if plain != folder.name:
                if (zero / plain).exists():
                    shutil.rmtree(folder)  # a tied copy: the first stage's is kept
                else:
                    os.replace(folder, zero / plain)
    alias_model_state_files(converted)
    atomic_write_text(
        converted / DONE,
        json.dumps(
            {"source": str(ckpt), "step": meta["step"], "source_manifest_sha256": _manifest_digest(ckpt)}, indent=1
        ),
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(converted, out)
    shutil.rmtree(scratch, ignore_errors=True)
    log(f"[checkpoint] universal checkpoint written to {out} in {time.perf_counter() - t0:.1f}s")
