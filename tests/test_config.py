"""Config loading, overrides and validation errors (no process group involved)."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, apply_override, check_world, load_config, resolve
from tests.conftest import ROOT, run_module


def test_repo_configs_load_and_resolve():
    for name in ("tiny", "quickstart"):
        cfg = resolve(load_config(ROOT / "configs" / f"{name}.yaml"), vocab_size=8000)
        assert cfg.model.vocab_size == 8064  # padded up to a multiple of 128
        assert cfg.model.placement == "peri" and cfg.model.embedding_norm is True
        assert cfg.run.dir == f"runs/{name}"


def test_override_types_and_sections():
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        ["model.placement=pre", "train.lr=1e-4", "train.max_steps=7", "model.qk_norm=true"],
    )
    assert (cfg.model.placement, cfg.train.lr, cfg.train.max_steps, cfg.model.qk_norm) == ("pre", 1e-4, 7, True)
    assert isinstance(cfg.train.lr, float)


def test_misspelt_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"model\.placment: unknown key; did you mean 'placement'\?"):
        load_config(ROOT / "configs" / "tiny.yaml", ["model.placment=pre"])
    with pytest.raises(ConfigError, match=r"modle: unknown section; did you mean 'model'\?"):
        load_config(None, ["modle.placement=pre"])


def test_misspelt_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: " + str(ROOT / "configs" / "tiny.yaml") + "\ntrain:\n  max_step: 5\n")
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key; did you mean 'max_steps'\?"):
        load_config(f)


@pytest.mark.parametrize(
    "assignment, message",
    [
        (
            "model.placement=perri",
            r"model\.placement: 'perri' is not a placement; allowed: pre, post, peri, lns.*did you mean 'peri'",
        ),
        ("train.precision=fp8", r"train\.precision: 'fp8' is not allowed; allowed: fp32, bf16, fp16"),
        ("train.lr=-1", r"train\.lr: -1\.0 must be greater than 0"),
        ("zero.stage=4", r"zero\.stage: 4 is above the maximum 3"),
        ("train.max_steps=ten", r"train\.max_steps: expected an integer, got 'ten'"),
        ("model.qk_norm=maybe", r"model\.qk_norm: expected true or false"),
        (
            "model.num_heads=5",
            r"model\.hidden_size: 64 is not divisible by model\.num_heads=5; head counts that divide it: 1, 2, 4, 8",
        ),
        ("model.depth_scale=inv_sqrt_layer", None),  # valid with peri
        (
            "parallel.tp=3",
            r"parallel\.tp: 3 does not divide model\.num_heads=4; tensor-parallel sizes that would: 1, 2, 4",
        ),
        (
            "parallel.pp=3",
            r"parallel\.pp: 3 stages for model\.num_layers=2; at most one stage per layer: allowed 1\.\.2",
        ),
        ("parallel.sequence_parallel=true", r"sequence_parallel: true needs parallel\.tp > 1"),
        ("kernels.backend=cuda", r"kernels\.backend: 'cuda' is not allowed"),
        ("train.compile_scope=graph", r"train\.compile_scope: 'graph' is not allowed; allowed: blocks, model"),
    ],
)
def test_bad_values_name_field_value_and_allowed(assignment, message):
    if message is None:
        load_config(ROOT / "configs" / "tiny.yaml", [assignment])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", [assignment])


def test_placement_switch_combinations_rejected():
    with pytest.raises(ConfigError, match="placement 'post' has none"):
        load_config(None, ["model.placement=post", "model.depth_scale=inv_sqrt_layer"])
    with pytest.raises(ConfigError, match="contradicts model.placement='lns'"):
        load_config(None, ["model.placement=lns", "model.depth_scale=none"])
    with pytest.raises(ConfigError, match="model.mix_alpha: 0.5 is set but only applies to placement 'mix'"):
        load_config(None, ["model.placement=pre", "model.mix_alpha=0.5"])
    with pytest.raises(ConfigError, match="model.qk_norm_scope: 'layer' is set but model.qk_norm is false"):
        load_config(None, ["model.qk_norm_scope=layer"])
    with pytest.raises(ConfigError, match="leaves no Post-LN block"):
        load_config(None, ["model.placement=mix", "model.mix_alpha=0.01"])
    cfg = resolve(load_config(None, ["model.placement=lns"]), vocab_size=100)
    assert cfg.model.depth_scale == "inv_sqrt_layer" and cfg.model.embedding_norm is False


def test_malformed_set():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "model.placement")
    with pytest.raises(ConfigError, match="keys are SECTION.KEY"):
        apply_override({}, "placement=pre")


def test_batch_arithmetic_lists_valid_sizes():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.global_batch_size=12"])
    with pytest.raises(
        ConfigError, match=r"global_batch_size: 12 is not a multiple of .* 4 x 2 = 8; valid sizes include 8, 16"
    ):
        check_world(cfg, 2)
    assert check_world(load_config(ROOT / "configs" / "tiny.yaml", ["train.global_batch_size=16"]), 2) == 2


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = resolve(load_config(ROOT / "configs" / "quickstart.yaml"), vocab_size=8192)
    f = tmp_path / "config.yaml"
    f.write_text(cfg.to_yaml())
    again = load_config(f)
    assert again == cfg
    assert cfg.model.ffn_hidden_size == 704 and cfg.model.num_kv_heads == 4


def test_train_rejects_bad_config_before_any_process_group():
    """The CLI exits 2 with the message; nothing distributed has started (it would hang or warn)."""
    proc = run_module(["-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--set",
                       "trian.max_steps=3"], timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "trian: unknown section; did you mean 'train'?" in proc.stderr
    assert "DeepSpeed" not in proc.stdout + proc.stderr


def test_fp16_on_cpu_is_refused_before_start():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is allowed")
    proc = run_module(["-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--set",
                       "train.precision=fp16"], timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "train.precision: 'fp16' needs a CUDA GPU" in proc.stderr


def test_pipeline_refuses_zero_2_and_3_and_world_sizes_must_divide():
    with pytest.raises(ConfigError, match=r"zero\.stage: 2 cannot be combined with pipeline parallelism"):
        load_config(ROOT / "configs" / "tiny.yaml", ["parallel.pp=2", "zero.stage=2"])
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(
        ConfigError,
        match=r"world size 6 is not a multiple of parallel\.tp x parallel\.pp = 2 x 2 = 4; "
        r"world sizes that work: 4, 8, 12",
    ):
        check_world(cfg, 6)
    assert check_world(cfg, 8) == 1  # dp 2: 8 sequences = micro 4 x dp 2


def test_rank_layout_matches_deepspeed_topology():
    """Ranks are (pp, dp, tp) with tp fastest, as DeepSpeed's pipeline topology numbers them."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from pretrain.parallel import Layout

    for tp, pp, dp in ((2, 2, 2), (4, 1, 2), (1, 3, 2), (2, 4, 1)):
        layout, topo = Layout(tp=tp, pp=pp, dp=dp), PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        for rank in range(tp * pp * dp):
            c = topo.get_coord(rank)
            assert layout.coords(rank) == (c.pipe, c.data, c.model)
    assert "rank   5: pp 1 dp 0 tp 1" in Layout(tp=2, pp=2, dp=2).rank_map()


def test_user_deepspeed_json_must_agree_with_the_config(tmp_path):
    from pretrain.engine import deepspeed_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    ok = tmp_path / "ok.json"
    ok.write_text('{"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000000}, "gradient_clipping": 1.0}')
    merged = deepspeed_config(load_config(ROOT / "configs" / "tiny.yaml", [f"zero.ds_config={ok}"]), 1)
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000000}
    assert merged["train_batch_size"] == cfg.train.global_batch_size
    bad = tmp_path / "bad.json"
    bad.write_text('{"gradient_clipping": 0.5}')
    with pytest.raises(ConfigError, match=r"sets gradient_clipping=0\.5 but this run's config implies 1\.0"):
        deepspeed_config(load_config(ROOT / "configs" / "tiny.yaml", [f"zero.ds_config={bad}"]), 1)
    owned = tmp_path / "owned.json"
    owned.write_text('{"scheduler": {"type": "WarmupLR"}}')
    with pytest.raises(ConfigError, match="sets 'scheduler', which this stack owns"):
        deepspeed_config(load_config(ROOT / "configs" / "tiny.yaml", [f"zero.ds_config={owned}"]), 1)


def test_whole_model_compilation_refuses_pipeline_stages_and_recomputation():
    tiny = ROOT / "configs" / "tiny.yaml"
    load_config(tiny, ["train.compile=true", "train.compile_scope=model", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"compile_scope: .model. with parallel\.pp=2: .*compile_scope: blocks"):
        load_config(tiny, ["train.compile=true", "train.compile_scope=model", "parallel.pp=2"])
    with pytest.raises(ConfigError, match=r"with train\.activation_checkpointing=full: .*compile_scope: blocks"):
        load_config(tiny, ["train.compile=true", "train.compile_scope=model", "train.activation_checkpointing=full"])
    with pytest.raises(ConfigError, match=r"train\.compile_scope: 'model' is set but train\.compile is false"):
        load_config(tiny, ["train.compile_scope=model"])


def test_compile_memory_budget_needs_the_compiler_and_no_recomputation():
    tiny = ROOT / "configs" / "tiny.yaml"
    budget = "train.compile_memory_budget"
    for scope in ("blocks", "model"):
        cfg = load_config(tiny, ["train.compile=true", f"train.compile_scope={scope}", f"{budget}=0.5"])
        assert cfg.train.compile_memory_budget == 0.5
    with pytest.raises(ConfigError, match=r"train\.compile_memory_budget: 1\.5 is above the maximum 1"):
        load_config(tiny, ["train.compile=true", f"{budget}=1.5"])
    with pytest.raises(ConfigError, match=r"compile_memory_budget: 0\.5 is the compiler's; .*train\.compile: true"):
        load_config(tiny, [f"{budget}=0.5"])
    with pytest.raises(ConfigError, match=r"checkpointing=selective: both decide what backward recomputes"):
        load_config(tiny, ["train.compile=true", f"{budget}=0.5", "train.activation_checkpointing=selective"])
