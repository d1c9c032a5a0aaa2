"""What each rank holds: parameter bytes and optimizer-state bytes, measured from the live tensors of
a DeepSpeed engine (so ZeRO's partitioning shows), next to what the ZeRO formulas predict.

Expected per rank, N parameters (unique, tied counted once), dp data-parallel ranks, fp32 training
with Adam (two states per parameter):
    ZeRO-0      parameters 4N      optimizer 8N          (states on the full model)
    ZeRO-1/2    parameters 4N      optimizer 12N / dp    (fp32 master partition + 2 states)
    ZeRO-3      parameters 4N / dp optimizer 8N / dp     (the partition is the master: no extra copy)
Partitions are padded to alignment, so measured values can exceed N/dp by a few elements.
"""
from __future__ import annotations

import torch


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def held_bytes(engine) -> dict[str, int]:
    """{"parameters": bytes, "optimizer": bytes} held by this rank."""
    params, storages = 0, set()
    seen = set()
    for p in engine.module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition (+ the full tensor if persistent)
            t = p.ds_tensor
            params += t.numel() * t.element_size()
            storages.add(t.untyped_storage().data_ptr())
            if getattr(p, "ds_persist", False):
                params += p.numel() * p.element_size()
        else:
            params += p.numel() * p.element_size()
            storages.add(p.untyped_storage().data_ptr())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO
    optimizer, counted = 0, set()
    found = list(_tensors(inner.state)) + [p for g in inner.param_groups for p in g["params"]]
    for t in found:
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or ptr in counted:
            continue  # a view of the parameters themselves (ZeRO-3's fp32 master), or already counted
        counted.add(ptr)
        optimizer += t.untyped_storage().nbytes()
    return {"parameters": params, "optimizer": optimizer}


def expected_bytes(num_params: int, stage: int, dp: int, bytes_per_param: int = 4) -> dict[str, float]:
    b = bytes_per_param
    if stage == 0:
        return {"parameters": b * num_params, "optimizer": 2 * b * num_params}
    if stage in (1, 2):
        return {"parameters": b * num_params, "optimizer": 3 * b * num_params / dp}
    return {"parameters": b * num_params / dp, "optimizer": 2 * b * num_params / dp}
