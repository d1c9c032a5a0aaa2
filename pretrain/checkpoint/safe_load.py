"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle; `torch.load(weights_only=False)` on a downloaded checkpoint would run
whatever the pickle names. Our own reads use `weights_only=True` with an allow-list of the few
non-tensor classes our and DeepSpeed's checkpoints hold. DeepSpeed's engine reads its files with
weights_only=False, which we cannot change, so before any file of a checkpoint reaches it every
pickle is scanned (torch's `get_unsafe_globals_in_checkpoint`, which reads the opcodes without
executing them) and a file naming anything outside the allow-list is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.checkpoint.layout import CheckpointError

# module.qualname of every non-torch global a checkpoint of this stack legitimately contains
ALLOWED_GLOBALS = frozenset(
    {
        # every rank's RNG file: numpy's MT19937 state is an array
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
        # DeepSpeed's ZeRO optimizer files
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def _allowed_objects() -> list:
    import numpy as np

    objects = [np.ndarray, np.dtype, np.dtypes.UInt32DType, getattr(np, "_core", np.core).multiarray._reconstruct]
    try:  # DeepSpeed's own classes, where DeepSpeed is importable (a consolidation may run without it)
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        objects += [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return objects


def unexpected_globals(path: Path) -> list[str]:
    """The globals `path`'s pickle would import that are not on the allow-list (nothing is executed)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:
        first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint file ({type(e).__name__}: {first}); truncated or damaged"
        ) from None
    return sorted(set(found) - ALLOWED_GLOBALS)


def check_pickles(folder: Path) -> None:
    """Refuses a checkpoint (or universal conversion) any of whose .pt files would run foreign code."""
    for path in sorted(folder.rglob("*.pt")):
        if path.is_symlink() and path.resolve().parent == path.parent:
            continue  # an alias of a file checked in its own right
        bad = unexpected_globals(path)
        if bad:
            raise CheckpointError(
                f"{path}: the file would import {', '.join(bad)} when loaded, which no checkpoint "
                "of this stack contains; refusing to load it (a tampered or foreign file)"
            )


def load_weights_only(path: Path, map_location: str | torch.device = "cpu"):
    """torch.load with weights_only=True, our allow-listed classes permitted."""
    with torch.serialization.safe_globals(_allowed_objects()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{path}: cannot be read as weights only ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
