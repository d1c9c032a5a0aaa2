"""ZeRO-Offload and ZeRO-Infinity as config keys (zero.offload_optimizer, zero.offload_params, zero.nvme_path,
pin_memory, aio; pretrain/zero.py): the rules at start-up, the DeepSpeed JSON they become, the machine checks
before any process group (exit 5, naming what is missing), and training runs whose losses equal the same run
without offloading -- DeepSpeed's CPU Adam for the optimizer, NVMe files in a temporary folder for
ZeRO-Infinity where the async_io op builds (libaio), the GPU-only combinations skipped with their reason."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.errors import EnvironmentCheckError
from pretrain.cli import run as cli_run
from pretrain.config import ConfigError, load_config, resolve
from pretrain.engine import deepspeed_config
from pretrain.zero import LIBAIO_HINT, check_offload_environment
from tests.conftest import ROOT, run_module, tiny_args, train_losses

TINY = str(ROOT / "configs" / "tiny.yaml")


def cfg_with(*sets):
    return resolve(load_config(TINY, list(sets)), 2048)


# ------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    "sets, message",
    [
        (["zero.offload_params=cpu", "zero.stage=2"], "zero.offload_params: 'cpu' needs zero.stage=3"),
        (["zero.offload_optimizer=cpu", "zero.stage=0"], "zero.offload_optimizer: 'cpu' needs zero.stage 1, 2 or 3"),
        (["zero.offload_optimizer=nvme", "zero.stage=2", "zero.nvme_path=/x"], "'nvme' needs zero.stage=3"),
        (["zero.offload_params=nvme", "zero.stage=3"], "zero.nvme_path: empty"),
        (["zero.nvme_path=/x"], "zero.nvme_path: set, but nothing it applies to is offloaded"),
        (["zero.aio_queue_depth=16", "zero.offload_optimizer=cpu"], "zero.aio_queue_depth: set, but nothing"),
        (["zero.pin_memory=false"], "zero.pin_memory: set, but nothing it applies to is offloaded"),
        (["zero.offload_optimizer=disk"], "zero.offload_optimizer: 'disk' is not allowed; allowed: none, cpu, nvme"),
    ],
)
def test_offload_settings_that_cannot_apply_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, sets)


def test_offload_keys_become_deepspeeds_zero_optimization_and_aio_blocks(tmp_path):
    ds = deepspeed_config(cfg_with("zero.stage=1", "zero.offload_optimizer=cpu", "zero.pin_memory=false"), 1)
    assert ds["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert "aio" not in ds
    cfg = cfg_with(
        "zero.stage=3",
        "zero.offload_optimizer=nvme",
        "zero.offload_params=nvme",
        f"zero.nvme_path={tmp_path}",
        "zero.aio_queue_depth=16",
        "zero.nvme_param_buffers=3",
    )
    ds = deepspeed_config(cfg, 1)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": str(tmp_path)}
    # the buffers must each hold the largest partition: the 2048 x 64 embedding over WORLD_SIZE (1 here)
    assert z["offload_param"] == {
        "device": "nvme",
        "pin_memory": True,
        "nvme_path": str(tmp_path),
        "max_in_cpu": 1_000_000_000,
        "buffer_count": 3,
        "buffer_size": 2048 * 64,
    }
    assert ds["aio"] == {
        "block_size": 1048576,
        "queue_depth": 16,
        "intra_op_parallelism": 1,
        "single_submit": False,
        "overlap_events": True,
    }


def test_a_user_ds_config_that_disagrees_with_the_offload_keys_is_refused(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}')
    cfg = cfg_with("zero.offload_optimizer=cpu", f"zero.ds_config={user}")
    with pytest.raises(ConfigError, match="zero_optimization.offload_optimizer.device='nvme' but this run's"):
        deepspeed_config(cfg, 1)


# ------------------------------------------------------------------ what the machine must offer


def test_an_nvme_path_that_cannot_be_written_fails_before_any_process_group(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anywhere: take a path under a file instead
        folder = tmp_path / "a-file"
        folder.write_text("")
    cfg = cfg_with("zero.stage=3", "zero.offload_params=nvme", f"zero.nvme_path={folder}/sub")
    with pytest.raises(EnvironmentCheckError, match="zero.nvme_path: .* is not a folder this user can write") as e:
        check_offload_environment(cfg)
    assert e.value.exit_code == 5


def test_missing_async_io_is_named_with_how_to_get_it(tmp_path, monkeypatch):
    """Without libaio DeepSpeed's AsyncIOBuilder is not compatible: the run stops before any process group
    with exit 5 and a line that names libaio-dev (the real builder is asked; here it is told to say no)."""
    from deepspeed.accelerator import get_accelerator

    builder = type(get_accelerator().create_op_builder("AsyncIOBuilder"))
    monkeypatch.setattr(builder, "is_compatible", lambda self, verbose=False: False)
    cfg = cfg_with("zero.stage=3", "zero.offload_optimizer=nvme", f"zero.nvme_path={tmp_path}")
    with pytest.raises(EnvironmentCheckError, match="async_io op") as e:
        check_offload_environment(cfg)
    assert "libaio-dev" in str(e.value) and LIBAIO_HINT in str(e.value)
    assert cli_run(lambda argv: check_offload_environment(cfg)) == 5


def aio_builds() -> bool:
    from pretrain.distributed import prefer_cpu_accelerator_if_no_gpu

    prefer_cpu_accelerator_if_no_gpu()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False)


NO_AIO = "DeepSpeed's async_io op cannot be built here: apt-get install libaio-dev (README, ZeRO-Offload)"


# ------------------------------------------------------------------------- equal losses

STEPS = 3
COMMON = [f"train.max_steps={STEPS}", "train.warmup_steps=1", "checkpoint.every=0", "train.eval_every=0"]
COMMON += ["train.diagnostics_every=0"]
TOLERANCE = 1e-5  # DeepSpeed's CPU Adam (C++, AVX) against torch's AdamW: the same update in another order


def losses_of(bundled_dir, run_dir, sets):
    proc = run_module(tiny_args(bundled_dir, run_dir, *COMMON, *sets), nproc=2, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return train_losses(run_dir)


def assert_same(curve, reference):
    assert sorted(curve) == sorted(reference) == list(range(1, STEPS + 1))
    assert max(abs(curve[s] - reference[s]) for s in reference) <= TOLERANCE


@pytest.mark.distributed
@pytest.mark.slow
def test_zero1_optimizer_offload_to_cpu_trains_like_no_offload(bundled_dir, tmp_path):
    """ZeRO-Offload: the fp32 master weights and Adam states in CPU memory, stepped by DeepSpeed's CPU Adam (a
    C++ op built on first use); 2 processes."""
    plain = losses_of(bundled_dir, tmp_path / "plain", ["zero.stage=1"])
    offloaded = losses_of(bundled_dir, tmp_path / "off", ["zero.stage=1", "zero.offload_optimizer=cpu"])
    assert_same(offloaded, plain)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_parameter_and_optimizer_offload_to_cpu_trains_like_no_offload(bundled_dir, tmp_path):
    plain = losses_of(bundled_dir, tmp_path / "plain", ["zero.stage=3"])
    sets = ["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_params=cpu"]
    offloaded = losses_of(bundled_dir, tmp_path / "off", sets)
    assert_same(offloaded, plain)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero_infinity_to_nvme_files_trains_like_no_offload(bundled_dir, tmp_path):
    """ZeRO-Infinity: parameters and optimizer states swapped through DeepSpeed's async_io op to files in a
    temporary folder (standing in for an NVMe drive), no parameter kept in CPU memory by choice. DeepSpeed swaps
    only partitions of at least 1 MiB (partitioned_param_swapper.py swappable_tensor: the aio block size, 1 MiB
    at least) and keeps smaller ones in CPU memory: hidden 256 makes the embedding's fp32 partition on each of
    the 2 ranks 2048 x 256 / 2 x 4 B = 1 MiB, so it goes to the drive."""
    if not aio_builds():
        pytest.skip(NO_AIO)
    nvme = tmp_path / "nvme"
    wider = ["model.hidden_size=256", "zero.stage=3"]
    plain = losses_of(bundled_dir, tmp_path / "plain", wider)
    sets = [*wider, "zero.offload_optimizer=nvme", "zero.offload_params=nvme", f"zero.nvme_path={nvme}"]
    sets += ["zero.nvme_params_in_cpu=0"]
    offloaded = losses_of(bundled_dir, tmp_path / "off", sets)
    assert_same(offloaded, plain)
    swapped = {p.parent.parent.name for p in nvme.rglob("*.swp")}
    assert swapped == {"optimizer", "float32params"}, f"swap files under zero.nvme_path: {sorted(nvme.rglob('*'))}"


@pytest.mark.distributed
@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: offloading from GPU memory to pinned CPU memory"
)
def test_gpu_optimizer_and_parameter_offload_trains_like_no_offload(bundled_dir, tmp_path):
    """On a GPU: bf16, ZeRO-3 with parameters and optimizer in pinned CPU memory, against the same run
    without offloading (one process: the GPU is shared by nothing else)."""
    common = ["zero.stage=3", "train.precision=bf16"]

    def curve(name, sets):
        proc = run_module(tiny_args(bundled_dir, tmp_path / name, *COMMON, *common, *sets), nproc=1, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return train_losses(tmp_path / name)

    plain = curve("plain", [])
    offloaded = curve("off", ["zero.offload_optimizer=cpu", "zero.offload_params=cpu"])
    assert sorted(offloaded) == sorted(plain)
    assert max(abs(offloaded[s] - plain[s]) for s in plain) <= 2e-2  # bf16 weights, rounded alike
