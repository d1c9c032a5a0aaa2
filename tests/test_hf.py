"""Hugging Face interop, offline: export (Llama, OLMo 2, the custom remote-code model for every
placement), import of Llama checkpoints, the tokenizer conversion, and the CLIs end to end on real
checkpoints. Every model comparison is logits, fp32, within 1e-4."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import json
from pathlib import Path

import pytest
import torch
import transformers  # a dependency (launch/setup.sh): missing, the suite must fail, not skip

from model import build_model
from model.hf_convert import ConversionError, auto_format, choose_format, custom_layer_slots, fuse_qkv, split_qkv
from model.placement import PLACEMENTS
from pretrain import export as hf_export
from pretrain import import_hf
from tests.conftest import ROOT, run_module, tiny_args
from tests.test_model import make_cfg, perturbed

ATOL = 1e-4
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def ours(**kw):
    """A small random model of ours with perturbed gains/biases, and its resolved ModelConfig."""
    cfg = make_cfg(**kw)
    torch.manual_seed(0)
    model, _ = build_model(cfg, "torch")
    return perturbed(model).eval(), cfg


def tokens_for(cfg, batch=2):
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(1))


def max_diff(model, hf, tokens) -> float:
    with torch.no_grad():
        return (model(tokens) - hf(tokens).logits).abs().max().item()


# ----------------------------------------------------------------------------- choosing formats


def test_auto_format_rules():
    assert auto_format(make_cfg(placement="pre")) == "llama"
    assert auto_format(make_cfg(placement="reordered", qk_norm=True, qk_norm_scope="layer")) == "olmo2"
    custom = [
        dict(placement="peri"),
        dict(placement="pre", bias=True),
        dict(placement="pre", zero_centered_gain=True),
        dict(placement="lns"),
        dict(placement="pre", qk_norm=True),
        dict(placement="pre", norm="layernorm"),
        dict(placement="pre", mlp="gelu"),
        dict(placement="pre", embedding_norm=True),
        dict(placement="reordered"),
        dict(placement="reordered", qk_norm=True, qk_norm_scope="head"),
        dict(placement="reordered", qk_norm=True, qk_norm_scope="layer", bias=True),
    ]
    for kw in custom:
        assert auto_format(make_cfg(**kw)) == "custom", kw


def test_explicit_format_that_cannot_represent_the_model_names_the_settings():
    with pytest.raises(ConversionError, match=r"model.placement='peri'.*model.embedding_norm=true"):
        choose_format(make_cfg(placement="peri"), "llama")
    with pytest.raises(ConversionError, match=r"model.norm='layernorm'.*model.qk_norm=false"):
        choose_format(make_cfg(placement="reordered", norm="layernorm"), "olmo2")
    with pytest.raises(ConversionError, match=r"model.bias=true"):
        choose_format(make_cfg(placement="reordered", qk_norm=True, qk_norm_scope="layer", bias=True), "olmo2")
    with pytest.raises(ConversionError, match=r"allowed: auto, llama, olmo2, custom"):
        choose_format(make_cfg(placement="pre"), "gpt2")


def test_qkv_split_and_fuse_are_inverse_and_follow_the_grouped_layout():
    h, kv, hd, d = 4, 2, 3, 5
    w = torch.arange((h + 2 * kv) * hd * d, dtype=torch.float32).view(-1, d)
    q, k, v = split_qkv(w, h, kv, hd)
    g = w.view(kv, h // kv + 2, hd, d)
    torch.testing.assert_close(q[hd : 2 * hd], g[0, 1])  # query head 1 = group 0, second query
    torch.testing.assert_close(k[hd:], g[1, 2])  # key head of group 1
    torch.testing.assert_close(fuse_qkv(q, k, v, h, kv, hd), w)
    b = torch.arange((h + 2 * kv) * hd, dtype=torch.float32)
    torch.testing.assert_close(fuse_qkv(*split_qkv(b, h, kv, hd), h, kv, hd), b)


# -------------------------------------------------------------------- export: the custom model

CUSTOM_CASES = [dict(placement=p) for p in PLACEMENTS] + [
    dict(placement="peri", norm="layernorm"),
    dict(placement="pre", qk_norm=True, qk_norm_scope="head"),
    dict(placement="peri", qk_norm=True, qk_norm_scope="layer", norm="layernorm"),
    dict(placement="peri", zero_centered_gain=True, tie_embeddings=True),
    dict(placement="post", mlp="gelu", bias=True, norm="layernorm"),
    dict(placement="lns", bias=True, num_kv_heads=1),
    dict(placement="mix", num_layers=8, mix_alpha=0.5, norm="layernorm", zero_centered_gain=True),
    dict(placement="deepnorm", mlp="gelu", qk_norm=True, num_kv_heads=4),
    dict(placement="peri", depth_scale="inv_sqrt_layer", embedding_norm=False, mlp="gelu"),
    dict(placement="reordered", qk_norm=True, qk_norm_scope="head", bias=True, tie_embeddings=True),
]


@pytest.mark.parametrize("kw", CUSTOM_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_custom_model_matches_ours(kw):
    model, cfg = ours(**kw)
    hf = hf_export.build_hf_model(model, cfg, "custom", IDS)
    assert max_diff(model, hf, tokens_for(cfg)) <= ATOL


def test_custom_model_sees_a_wrong_slot():
    """The parity above is not vacuous: the same weights with one slot moved give other logits."""
    model, cfg = ours(placement="peri")
    hf = hf_export.build_hf_model(model, cfg, "custom", IDS)
    layer = hf.model.layers[1]
    layer.attn_post_norm, layer.attn_out_norm = layer.attn_out_norm, None
    assert max_diff(model, hf, tokens_for(cfg)) > 1e-2


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_registry_entry_round_trips_through_the_export(tmp_path, placement):
    """The exported code has no placement table of its own: config.json carries the registry's slots,
    and the model loaded back from disk (remote code) gives our logits, for every registry entry."""
    model, cfg = ours(placement=placement, num_layers=5)
    out = tmp_path / "hf"
    hf_export.export(model, cfg, out, "custom", sp_model=None, info={"step": 1, "tokens": 1})
    saved = json.loads((out / "config.json").read_text())
    assert saved["layer_slots"] == custom_layer_slots(cfg)
    assert saved["final_norm"] == PLACEMENTS[placement].final_norm and saved["embedding_norm"] == cfg.embedding_norm
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert max_diff(model, hf, tokens_for(cfg)) <= ATOL


def test_custom_config_without_slots_cannot_build_a_model():
    from model.hf_custom.configuration_pretrain_gpt import PretrainGPTConfig
    from model.hf_custom.modeling_pretrain_gpt import PretrainGPTForCausalLM

    config = PretrainGPTConfig(placement="peri", num_hidden_layers=2, hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match="written by `python -m pretrain.export`"):
        PretrainGPTForCausalLM(config)


def test_custom_generate_with_and_without_cache_and_with_left_padding():
    model, cfg = ours(placement="peri", qk_norm=True, seq_len=32)
    hf = hf_export.build_hf_model(model, cfg, "custom", IDS)
    prompt = torch.randint(4, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    no_cache = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    cached = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert no_cache.tolist() == cached.tolist()
    x = prompt  # greedy decoding with our model
    for _ in range(8):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert x.tolist() == cached.tolist()
    short = prompt[:, :3]
    batch = torch.cat([prompt, torch.cat([torch.full((1, 3), 3), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    padded = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    alone = hf.generate(short, max_new_tokens=8, do_sample=False)
    assert padded[1, 6:].tolist() == alone[0, 3:].tolist()
    assert padded[0].tolist() == cached[0].tolist()


def test_custom_loss_uses_the_hf_shift_convention():
    model, cfg = ours(placement="mix")
    hf = hf_export.build_hf_model(model, cfg, "custom", IDS)
    tokens = tokens_for(cfg)
    labels = tokens.clone()
    labels[0, 5:9] = -100
    mask = (labels[:, 1:] != -100).float()
    with torch.no_grad():
        expected = model(tokens[:, :-1], labels[:, 1:].clamp(min=0), mask)
        torch.testing.assert_close(hf(tokens, labels=labels).loss, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- export: Llama and OLMo 2


@pytest.mark.parametrize(
    "kw",
    [
        dict(placement="pre"),
        dict(placement="pre", tie_embeddings=True, num_kv_heads=1),
        dict(placement="lns", bias=True, zero_centered_gain=True),
    ],
    ids=["pre-gqa-untied", "pre-mqa-tied", "lns-bias-zero_centered-folded"],
)
def test_llama_export_matches_ours(kw):
    model, cfg = ours(**kw)
    hf = hf_export.build_hf_model(model, cfg, choose_format(cfg, "llama"), IDS)
    assert isinstance(hf, transformers.LlamaForCausalLM)
    assert max_diff(model, hf, tokens_for(cfg)) <= ATOL


def test_olmo2_export_with_zero_centred_gain_folded_matches_ours():
    model, cfg = ours(placement="reordered", qk_norm=True, qk_norm_scope="layer", zero_centered_gain=True)
    hf = hf_export.build_hf_model(model, cfg, "olmo2", IDS)
    assert isinstance(hf, transformers.Olmo2ForCausalLM)
    assert max_diff(model, hf, tokens_for(cfg)) <= ATOL


@pytest.mark.parametrize(
    "kw, cls",
    [
        (dict(placement="pre", num_kv_heads=1), "LlamaForCausalLM"),  # MQA: q, k, v are views of one weight
        (dict(placement="reordered", qk_norm=True, qk_norm_scope="layer", tie_embeddings=True), "Olmo2ForCausalLM"),
        (dict(placement="peri"), "PretrainGPTForCausalLM"),
        (
            dict(
                placement="deepnorm",
                norm="layernorm",
                mlp="gelu",
                bias=True,
                zero_centered_gain=True,
                qk_norm=True,
                qk_norm_scope="layer",
            ),
            "PretrainGPTForCausalLM",
        ),
    ],
    ids=["pre-mqa-llama", "reordered-olmo2", "peri-custom", "deepnorm-custom-switches"],
)
def test_export_directory_loads_with_auto_classes(tmp_path, kw, cls):
    model, cfg = ours(**kw)
    out = tmp_path / "hf"
    summary = hf_export.export(model, cfg, out, "auto", sp_model=None, info={"step": 7, "tokens": 896})
    assert summary["max_abs_logit_diff"] <= ATOL
    remote = summary["format"] == "custom"
    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=remote)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    assert type(hf).__name__ == cls and config.architectures == [cls]
    assert max_diff(model, hf, tokens_for(cfg)) <= ATOL
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    readme = (out / "README.md").read_text()
    assert f"`{cfg.placement}`" in readme and "step 7" in readme
    if remote:
        assert config.placement == cfg.placement
        assert {"configuration_pretrain_gpt.py", "modeling_pretrain_gpt.py"} <= {p.name for p in out.iterdir()}
        assert "trust_remote_code=True" in readme
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export_is_verified_against_rounded_weights(tmp_path, dtype):
    """A bf16/fp16 export is loaded back upcast to fp32 and compared with our model on the same
    rounded weights: the exported logits stay within a few rounding units of the largest logit of
    a direct computation here (folded LNS scale and zero-centred gain included)."""
    model, cfg = ours(placement="lns", bias=True, zero_centered_gain=True)
    out = tmp_path / "hf"
    summary = hf_export.export(model, cfg, out, "llama", sp_model=None, dtype=dtype, info={"step": 1, "tokens": 1})
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert next(hf.parameters()).dtype == torch.float32
    unit = torch.finfo(getattr(torch, dtype)).eps / 2  # unit roundoff: 2^-8 (bf16), 2^-11 (fp16)
    rounded = hf_export.rounded_copy(model, getattr(torch, dtype))
    for p, q in zip(rounded.parameters(), model.parameters()):
        assert (p - q).abs().max() <= unit * q.abs().max()  # rounded, not changed
    tokens = tokens_for(cfg)
    with torch.no_grad():
        reference = rounded(tokens)
    assert max_diff(rounded, hf, tokens) <= 4 * unit * reference.abs().max().item()
    assert summary["max_abs_logit_diff"] < 4 * unit * reference.abs().max().item()  # the export's own check ran


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_wrong_export_fails_verification_in_every_dtype(tmp_path, monkeypatch, dtype):
    """The logit check runs for half-precision exports too (it used to be skipped for them): an
    export whose weights were damaged on the way (here the last block's MLP output zeroed) is refused."""
    model, cfg = ours(placement="pre")
    write = hf_export.write_model

    def damaging_write(model, m, out, fmt, token_ids, dtype=torch.float32):
        write(model, m, out, fmt, token_ids, dtype)
        from safetensors.torch import load_file, save_file

        weights = load_file(out / "model.safetensors")
        key = f"model.layers.{cfg.num_layers - 1}.mlp.down_proj.weight"
        weights[key] = torch.zeros_like(weights[key])
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(hf_export, "write_model", damaging_write)
    with pytest.raises(hf_export.ExportError, match="verification failed"):
        hf_export.export(model, cfg, tmp_path / "hf", "llama", sp_model=None, dtype=dtype)
    assert not (tmp_path / "hf").exists()  # only the temporary directory, left for inspection


def test_custom_code_imports_nothing_from_the_project():
    for name in hf_export.CUSTOM_FILES:
        text = (hf_export.CUSTOM_CODE / name).read_text()
        assert not any(f"{kw} {pkg}" in text for kw in ("import", "from") for pkg in ("model", "pretrain", "kernels"))


# --------------------------------------------------------------------------------- import


def random_llama(tie: bool, num_kv_heads: int = 2, vocab: int = 128, **kw):
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **kw,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize(
    "tie, kv, bias", [(False, 2, False), (True, 2, False), (False, 1, True)], ids=["gqa-untied", "gqa-tied", "mqa-bias"]
)
def test_import_llama_matches_hf(tie, kv, bias):
    hf = random_llama(tie, kv, attention_bias=bias, mlp_bias=bias)
    m, section = import_hf.model_config(hf.config, None)
    assert (section["placement"], section["vocab_size"], section["vocab_multiple"], section["rope_theta"]) == (
        "pre",
        128,
        1,
        50000.0,
    )
    assert (m.tie_embeddings, m.num_kv_heads, m.bias, m.seq_len) == (tie, kv, bias, 64)
    state = import_hf.convert(hf, m)
    assert ("head.weight" in state) is not tie
    model, _ = build_model(m, "torch")
    model.load_state_dict(state, strict=not tie)
    assert max_diff(model.eval(), hf, torch.randint(0, 128, (2, 48))) <= ATOL


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type 'linear'"),
        (dict(attention_bias=True, mlp_bias=False), "attention_bias=True, mlp_bias=False"),
        (dict(hidden_act="gelu"), "hidden_act: 'gelu'"),
        (dict(head_dim=32), "head_dim: 32"),
    ],
)
def test_import_rejects_what_our_model_cannot_express(kw, message):
    from model.hf_convert import llama_model_section

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, **kw
    )
    with pytest.raises(ConversionError, match=message):
        llama_model_section(config)


def test_import_cli_rejects_other_architectures(tmp_path, capsys):
    config = transformers.Olmo2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    config.save_pretrained(tmp_path / "olmo")
    from pretrain.cli import run

    assert run(import_hf.main, ["--model", str(tmp_path / "olmo"), "--out", str(tmp_path / "out")]) == 2
    assert "only Llama" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ tokenizer

EDGE_TEXTS = [
    "",
    " ",
    "\n",
    "\nLeading newline",
    "  two spaces\n\n  indented",
    "trailing  \n\n",
    "tabs\tand\r\nCRLF",
    "ünïcödé 中文 😀 emoji",
    "1234567 3.14159",
    "<s> </s> <pad> <unk> written out",
    "a\n b\n\n\nc",
]


def test_tokenizer_encodes_real_text_like_ours(bundled_dir, tmp_path):
    from pretrain.data import Tokenizer
    from pretrain.data.indexed import open_indexed

    ours_tok = Tokenizer(bundled_dir / "tokenizer.model")
    hf_export.write_tokenizer(bundled_dir / "tokenizer.model", tmp_path, 256)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    docs = open_indexed(str(bundled_dir / "test"))
    texts = [ours_tok.decode(docs[i]) for i in range(3)] + EDGE_TEXTS
    assert sum("\n" in t for t in texts[:3]) == 3
    for text in texts:
        ids = ours_tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, repr(text[:80])
        assert hf_tok.decode(ids) == text
    assert hf_tok.encode("Hi") == ours_tok.encode("Hi")  # no BOS added: documents start after </s> in training
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (ours_tok.eod, ours_tok.pad, ours_tok.bos)
    assert hf_tok.decode([ours_tok.eod] + ours_tok.encode("x\ny"), skip_special_tokens=True) == "x\ny"


# ------------------------------------------------------------------------------ CLIs end to end


def _checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow  # 40 s; test_cli_import_train_export_round_trip covers the CLI by default
def test_cli_export_of_a_trained_peri_checkpoint(bundled_dir, tmp_path):
    """configs/tiny.yaml (peri) trained 2 steps -> export (auto = custom) -> transformers, offline."""
    from pretrain.checkpoint.consolidate import load_checkpoint_model
    from pretrain.data import Tokenizer

    run = tmp_path / "run"
    proc = run_module(tiny_args(bundled_dir, run, "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "hf"
    proc = run_module(["-m", "pretrain.export", "--checkpoint", str(run), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "custom (PretrainGPTForCausalLM); verified" in proc.stdout

    model, cfg, meta = load_checkpoint_model(_checkpoint(run))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = tokens_for(cfg.model)
    assert max_diff(model, hf, tokens) <= ATOL
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ours_tok = Tokenizer(cfg.data.tokenizer)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    assert tok.encode(text, add_special_tokens=False) == ours_tok.encode(text)
    ids = tok(text, return_tensors="pt").input_ids
    assert hf.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, ids.shape[1] + 5)
    readme = (out / "README.md").read_text()
    assert "`peri`" in readme and f"step {meta['step']}" in readme and "trust_remote_code=True" in readme
    summary = json.loads((out / "export.json").read_text())
    assert summary["format"] == "custom" and summary["step"] == 2

    proc = run_module(
        ["-m", "pretrain.export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--format", "llama"]
    )
    assert proc.returncode == 2 and "model.placement='peri'" in proc.stderr and "model.embedding_norm" in proc.stderr
    proc = run_module(["-m", "pretrain.export", "--checkpoint", str(run), "--out", str(out)])
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_cli_import_train_export_round_trip(bundled_dir, tmp_path):
    """A random HF Llama -> import_hf -> train 2 steps from it (lr ~ 0) -> export (auto = llama):
    the exported LlamaForCausalLM reproduces the original's logits."""
    original = random_llama(tie=False, vocab=2048)  # the bundled fixture's tokenizer has 2048 tokens
    original.save_pretrained(tmp_path / "llama")
    imported = tmp_path / "imported"
    proc = run_module(
        [
            "-m",
            "pretrain.import_hf",
            "--model",
            str(tmp_path / "llama"),
            "--out",
            str(imported),
            "--base",
            str(ROOT / "configs" / "tiny.yaml"),
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (imported / "model.pt").is_file() and "verified" in proc.stdout

    run = tmp_path / "run"
    proc = run_module(
        [
            "-m",
            "pretrain.train",
            "--config",
            str(imported / "config.yaml"),
            "--set",
            f"checkpoint.init_from={imported / 'model.pt'}",
            "--set",
            f"data.dir={bundled_dir}",
            "--set",
            f"run.dir={run}",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "train.lr=1e-9",
            "--set",
            "train.eval_every=0",
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "initialised the model from" in (run / "train.log").read_text()

    out = tmp_path / "hf"
    proc = run_module(["-m", "pretrain.export", "--checkpoint", str(_checkpoint(run)), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(exported, transformers.LlamaForCausalLM)
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (exported(tokens).logits - original(tokens).logits).abs().max().item() <= ATOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("Speak, speak.\n") == hf_export.build_hf_tokenizer(bundled_dir / "tokenizer.model").encode(
        "Speak, speak.\n"
    )
