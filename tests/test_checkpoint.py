"""Checkpoint integrity without DeepSpeed: manifests, corruption and truncation detection, the
fall-back to the previous good checkpoint, retention, config comparison."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pretrain.checkpoint import (
    Checkpointer,
    CheckpointError,
    complete_checkpoints,
    find_resumable,
    verify,
    write_manifest,
)
from pretrain.checkpoint.retention import apply_retention
from pretrain.restore import compare_configs


def fake_checkpoint(root, step, payload=b"weights" * 1000):
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.zeros(16)}, "payload": payload + bytes([step % 256])}, d / "mp_rank_00_model_states.pt"
    )
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
    with pytest.raises(
        CheckpointError, match=r"mp_rank_00_model_states.pt has 50 bytes, the manifest says \d+ \(truncated\?\)"
    ):
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
    for step in (10, 20, 30, 40):
        newest = fake_checkpoint(tmp_path, step)
        apply_retention(tmp_path, keep_last=2, keep=newest)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    apply_retention(tmp_path, keep_last=1, keep=newest)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000040"]
    assert os.listdir(tmp_path / "step_000040")


def test_compare_configs_separates_shape_from_settings():
    saved = {"model": {"hidden_size": 64, "num_layers": 2}, "train": {"lr": 1e-3, "max_steps": 10}}
    now = {"model": {"hidden_size": 64, "num_layers": 3}, "train": {"lr": 5e-4, "max_steps": 10}}
    shape, other = compare_configs(saved, now)
    assert shape == ["model.num_layers: checkpoint 2, now 3"]
    assert other == ["train.lr: checkpoint 0.001, now 0.0005"]


def test_recover_interrupted_restores_a_half_swapped_resave_and_drops_leftovers(tmp_path):
    old = fake_checkpoint(tmp_path, 10)
    os.replace(old, tmp_path / ".old-step_000010")  # killed between the two renames of a re-save
    fake_checkpoint(tmp_path, 20)
    os.replace(tmp_path / "step_000020", tmp_path / ".del-step_000020")  # killed inside retention
    fake_checkpoint(tmp_path, 30)
    fake_checkpoint(tmp_path, 40)
    os.replace(tmp_path / "step_000040", tmp_path / ".old-step_000030")  # re-save finished: stale .old
    from pretrain.checkpoint import recover_interrupted

    messages = []
    recover_interrupted(tmp_path, messages.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010", "step_000030"]
    verify(tmp_path / "step_000010")
    assert any("restored step_000010" in m for m in messages)


class _Engine:
    """What BadStepGuard needs of a DeepSpeed engine: the module and an optimizer wrapping torch's."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, type("Wrapper", (), {"optimizer": optimizer})()


def test_bad_step_guard_leaves_weights_and_adam_state_untouched(tmp_path):
    import copy

    import torch

    from pretrain.guard import BadStepGuard, TrainingStopped

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reference_model = copy.deepcopy(model)
    reference_opt = torch.optim.AdamW(reference_model.parameters(), lr=1e-2)
    guard = BadStepGuard(_Engine(model, opt), "skip", max_bad_steps=1, device=torch.device("cpu"))
    x = torch.randn(8, 4)
    for step, poison in enumerate([False, True, False], start=1):
        opt.zero_grad()
        loss = model(x).pow(2).mean() * (float("nan") if poison else 1.0)
        loss.backward()
        assert guard.decide(loss) is poison
        opt.step()
        assert guard.after_step(step) is poison
        if not poison:  # the reference sees only the good steps
            reference_opt.zero_grad()
            reference_model(x).pow(2).mean().backward()
            reference_opt.step()
        for p, q in zip(model.parameters(), reference_model.parameters()):
            assert torch.equal(p, q)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        s, r = opt.state[p], reference_opt.state[q]
        assert torch.equal(s["exp_avg"], r["exp_avg"]) and torch.equal(s["exp_avg_sq"], r["exp_avg_sq"])
        assert float(s["step"]) == float(r["step"]) == 2
    opt.zero_grad()
    (model(x).sum() * float("inf")).backward()
    guard.decide(None)  # the gradients alone are enough to tell
    with pytest.raises(TrainingStopped, match="exceed train.max_bad_steps=1"):
        guard.after_step(4)


def test_spike_detector_flags_what_a_direct_z_score_flags():
    import numpy as np

    from pretrain.guard import SpikeDetector

    rng = np.random.default_rng(0)
    series = list(3.0 + 0.01 * rng.standard_normal(60))
    series[40] = 3.2  # ~20 sigma
    series[50] = float("nan")  # not a spike, and not added to the history
    det = SpikeDetector(sigma=6.0, window=32)
    flagged, history = [], []
    for i, loss in enumerate(series):
        got = det.observe(loss)
        expected = None
        if len(history) >= 16 and np.isfinite(loss):
            window = np.array(history[-32:])
            z = (loss - window.mean()) / window.std(ddof=1)
            expected = z if z > 6.0 else None
        assert (got is None) == (expected is None), i
        if got is not None:
            assert got == pytest.approx(expected, rel=1e-9)
            flagged.append(i)
        if np.isfinite(loss):
            history.append(loss)
    assert flagged == [40]


class _Payload:
    """A pickle that runs code when loaded (what a tampered checkpoint file would hold)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_before_anything_unpickles_it(tmp_path):
    marker = tmp_path / "pwned"
    d = fake_checkpoint(tmp_path / "ckpts", 10)
    torch.save({"module": {"w": torch.zeros(2)}, "evil": _Payload(marker)}, d / "mp_rank_00_model_states.pt")
    write_manifest(d)  # a manifest that matches the tampered file: integrity checks alone would pass
    for level in ("sha256", "size", "none"):
        with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt would import (posix|os)\.system"):
            verify(d, level)
    from pretrain.checkpoint.safe_load import load_weights_only

    with pytest.raises(CheckpointError, match="cannot be read as weights only"):
        load_weights_only(d / "mp_rank_00_model_states.pt")
    from pretrain.checkpoint.consolidate import consolidated_state_dict

    with pytest.raises(CheckpointError, match="would import"):
        consolidated_state_dict(d)
    assert not marker.exists()
    torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)  # the payload is real: loading it runs code
    assert marker.exists()


class _Tokenizer:
    def __init__(self, sha256):
        self.sha256, self.path = sha256, "data/other/tokenizer.model"


def test_a_resume_with_another_tokenizer_is_refused_unless_allowed():
    """meta.json's tokenizer_sha256 against the run's tokenizer (end to end: tests/test_bad_input.py,
    tokenizer-changed and tokenizer-change-allowed)."""
    from pretrain.config import Config
    from pretrain.restore import check_tokenizer

    saved, cfg, logged = {"tokenizer_sha256": "a" * 64}, Config(), []
    check_tokenizer(saved, _Tokenizer("a" * 64), cfg, logged.append)  # the same one: nothing to say
    check_tokenizer({}, _Tokenizer("b" * 64), cfg, logged.append)  # a checkpoint from before the record
    assert logged == []
    with pytest.raises(CheckpointError, match=r"sha256 aaaaaaaaaaaa…, but data\.tokenizer .* has sha256 bbbbbbbbbbbb…"):
        check_tokenizer(saved, _Tokenizer("b" * 64), cfg, logged.append)
    cfg.checkpoint.allow_tokenizer_change = True
    check_tokenizer(saved, _Tokenizer("b" * 64), cfg, logged.append)
    assert len(logged) == 1 and "resuming anyway (checkpoint.allow_tokenizer_change=true)" in logged[0]


def test_schema_changes_name_keys_dropped_and_added_since_the_checkpoint():
    from pretrain.restore import schema_changes

    saved = {"model": {"hidden_size": 64, "old_switch": True}, "train": {"lr": 1e-3}, "legacy": {"x": 1}}
    now = {"model": {"hidden_size": 64}, "train": {"lr": 1e-3, "z_loss": 0.0}}
    assert schema_changes(saved, now) == (["model.old_switch", "legacy.x"], ["train.z_loss"])
