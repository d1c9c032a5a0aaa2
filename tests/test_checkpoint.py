"""Checkpoint integrity without DeepSpeed: manifests, corruption and truncation detection, the
fall-back to the previous good checkpoint, retention, config comparison."""
from __future__ import annotations

import json
import os

import pytest

from pretrain.checkpoint import (Checkpointer, CheckpointError, compare_configs, complete_checkpoints,
                                 find_resumable, verify, write_manifest)


def fake_checkpoint(root, step, payload=b"weights" * 1000):
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(payload + bytes([step % 256]))
    (d / "meta.json").write_text(json.dumps({"step": step}))
    write_manifest(d)
    return d


def test_verify_names_a_flipped_byte_and_a_truncated_file(tmp_path):
    d = fake_checkpoint(tmp_path, 10)
    verify(d)
    f = d / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    verify(d, "size")  # same size: only the digest notices
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt does not match its sha256.*corrupt"):
        verify(d)
    f.write_bytes(bytes(data[:50]))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt has 50 bytes, the manifest says \d+ \(truncated\?\)"):
        verify(d, "size")
    f.unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt listed in the manifest is missing"):
        verify(d, "size")


def test_partial_checkpoint_is_named_and_the_previous_one_used(tmp_path):
    good = fake_checkpoint(tmp_path, 10)
    bad = fake_checkpoint(tmp_path, 20)
    (bad / "manifest.json").unlink()  # as if the save died before the manifest
    (tmp_path / ".tmp-step_000030").mkdir()  # a save that died before the rename
    messages = []
    assert find_resumable(tmp_path, "sha256", messages.append) == good
    assert any("step_000020" in m and "partial" in m for m in messages)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000010", "step_000020"]


def test_resume_modes(tmp_path):
    ck = Checkpointer(tmp_path / "ckpts", rank=0, keep_last=2, verify_level="sha256", log=lambda m: None)
    assert ck.resolve("never") is None and ck.resolve("auto") is None
    with pytest.raises(CheckpointError, match="--resume must: no complete checkpoint under"):
        ck.resolve("must")
    d = fake_checkpoint(tmp_path / "ckpts", 5)
    assert ck.resolve("must") == d and ck.resolve(str(d)) == d
    (tmp_path / "ckpts" / "latest").write_text("step_000005\n")
    assert ck.resolve(str(tmp_path / "ckpts")) == d  # a checkpoints/ directory follows `latest`
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        ck.resolve(str(tmp_path / "nope"))


def test_retention_keeps_the_newest(tmp_path):
    ck = Checkpointer(tmp_path, rank=0, keep_last=2, verify_level="size", log=lambda m: None)
    for step in (10, 20, 30, 40):
        newest = fake_checkpoint(tmp_path, step)
        ck._retain(keep=newest)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    ck.keep_last = 1
    ck._retain(keep=newest)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000040"]
    assert os.listdir(tmp_path / "step_000040")


def test_compare_configs_separates_shape_from_settings():
    saved = {"model": {"hidden_size": 64, "num_layers": 2}, "train": {"lr": 1e-3, "max_steps": 10}}
    now = {"model": {"hidden_size": 64, "num_layers": 3}, "train": {"lr": 5e-4, "max_steps": 10}}
    shape, other = compare_configs(saved, now)
    assert shape == ["model.num_layers: checkpoint 2, now 3"]
    assert other == ["train.lr: checkpoint 0.001, now 0.0005"]
