"""python -m pretrain.export --checkpoint DIR --out DIR [--format auto|llama|olmo2|custom]

Writes a training checkpoint as a Hugging Face model directory that `transformers` loads offline:
safetensors weights, config.json, generation_config.json, the tokenizer (tokenizer.json, converted
from our sentencepiece model, plus the original tokenizer.model) and a README.md.

  auto     `pre` + RMSNorm + SwiGLU (no bias, QK-norm, embedding norm, depth scale, zero-centred gain)
           -> Llama; `reordered` + RMSNorm + SwiGLU + layer-wide QK-norm (no bias, embedding norm)
           -> OLMo 2; anything else -> custom
  llama    LlamaForCausalLM (explicit: also lns, bias, zero-centred gain; those are folded into gains)
  olmo2    Olmo2ForCausalLM
  custom   PretrainGPTForCausalLM: configuration/modeling files copied next to the weights; load
           with trust_remote_code=True. Every placement and switch of our model.

--checkpoint takes a checkpoint directory (runs/NAME/checkpoints/step_000100), a run directory or
its checkpoints/ folder (the newest complete checkpoint). After writing, the export is loaded back
with transformers and its logits are compared with ours (--no-verify skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from kernels.errors import PretrainError
from model.hf_convert import (
    ARCHITECTURES,
    FORMATS,
    ConversionError,
    choose_format,
    folded_settings,
    hf_config,
    reparam_folded,
    to_hf_state_dict,
)

ROOT = Path(__file__).resolve().parent.parent
CUSTOM_CODE = ROOT / "model" / "hf_custom"
CUSTOM_FILES = ("configuration_pretrain_gpt.py", "modeling_pretrain_gpt.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VERIFY_ATOL = 1e-3  # fp32 export vs our model (the tests hold it to 1e-4); bf16/fp16: plus rounding_tolerance
SAMPLE_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak, speak. 1234 ünïcode\n"


class ExportError(PretrainError, RuntimeError):
    """Something the user can fix (paths, formats, a tokenizer that does not fit)."""

    exit_code = 2


# ------------------------------------------------------------------------------------ weights


def build_hf_model(model, m, fmt: str, token_ids: dict, dtype: torch.dtype = torch.float32):
    """A transformers model of format `fmt` holding our model's weights (sharing their storage where
    the dtype allows: built without a random init, then the tensors are assigned)."""
    config = hf_config(m, fmt, token_ids)
    config.dtype = dtype
    cls = _model_class(fmt)
    state = _unshared({k: v.detach().to(dtype) for k, v in to_hf_state_dict(model.state_dict(), m, fmt).items()})
    with _no_init_weights():  # not the meta device: buffers such as Llama's inv_freq must be real
        hf = cls(config)
    result = hf.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if m.tie_embeddings else set())
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"{fmt}: weights do not fit {cls.__name__}: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    if m.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    from transformers import GenerationConfig

    hf.generation_config = GenerationConfig(**{k: v for k, v in token_ids.items() if v is not None})
    return hf.eval()


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies tensors that share storage with another one (q/k/v and gate/up are views of our fused
    weights): safetensors would otherwise treat them as tied weights."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _model_class(fmt: str):
    if fmt == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM
    if fmt == "olmo2":
        from transformers import Olmo2ForCausalLM

        return Olmo2ForCausalLM
    from model.hf_custom.modeling_pretrain_gpt import PretrainGPTForCausalLM

    return PretrainGPTForCausalLM


def write_model(model, m, out: Path, fmt: str, token_ids: dict, dtype: torch.dtype = torch.float32) -> None:
    """Weights (safetensors), config.json, generation_config.json, and for `custom` the code."""
    hf = build_hf_model(model, m, fmt, token_ids, dtype)
    hf.save_pretrained(out, safe_serialization=True)
    if fmt == "custom":
        for name in CUSTOM_FILES:
            shutil.copy2(CUSTOM_CODE / name, out / name)


# ---------------------------------------------------------------------------------- tokenizer


def build_hf_tokenizer(sp_model: Path, model_max_length: int | None = None):
    """Our sentencepiece BPE model as a `tokenizers` tokenizer that encodes to the same ids.

    Built directly rather than through LlamaTokenizer, whose Metaspace pre-tokenizer skips the
    dummy prefix before leading spaces and would turn the user-defined "\\n" into an added token
    that restarts the prefix: here the whole text is one BPE word, as in sentencepiece (prefix "▁",
    spaces -> "▁", byte fallback, merges ordered by piece score, "\\n" a plain piece)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    proto = pb.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    _check_convertible(proto, sp_model)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=generate_merges(vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    norm = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    # Control pieces (<s>, </s>, <pad>) and <unk> are special; sentencepiece never matches them in text,
    # hence split_special_tokens=True below.
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in (2, 3)]
    )
    special = {}
    for name, i in (
        ("unk_token", proto.trainer_spec.unk_id),
        ("bos_token", proto.trainer_spec.bos_id),
        ("eos_token", proto.trainer_spec.eos_id),
        ("pad_token", proto.trainer_spec.pad_id),
    ):
        if i >= 0:
            special[name] = proto.pieces[i].piece
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, split_special_tokens=True, **special, **kwargs
    )


def _check_convertible(proto, path: Path) -> None:
    """The conversion above is exact for our tokenizers (pretrain/data/tokenizer.py); say so when
    another sentencepiece model differs in a way it does not handle."""
    t, n = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if t.model_type != 2:
        problems.append(f"model_type {t.model_type} (only BPE = 2 is converted)")
    if n.precompiled_charsmap or n.name not in ("identity", ""):
        problems.append(f"normalization '{n.name}' (only identity)")
    if n.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if t.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true")
    if problems:
        raise ExportError(f"tokenizer {path}: cannot convert exactly: {'; '.join(problems)}")


def token_ids(sp_model: Path | None) -> dict:
    """bos/eos/pad ids for the configs: the tokenizer's, else our convention (pretrain/data/tokenizer.py)."""
    if sp_model is None:
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    from pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer(sp_model)
    ids = {"bos_token_id": tok.bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def write_tokenizer(sp_model: Path, out: Path, model_max_length: int | None) -> None:
    """A sentencepiece model is converted to tokenizer.json (and kept beside it); a tokenizer.json we
    trained with is the Hugging Face tokenizer already: it is written with its special tokens named."""
    if sp_model.suffix == ".json":
        _fast_tokenizer_from_json(sp_model, model_max_length).save_pretrained(out)
    else:
        build_hf_tokenizer(sp_model, model_max_length).save_pretrained(out)
        shutil.copy2(sp_model, out / "tokenizer.model")  # the original, for sentencepiece users
    # transformers 5 writes its own class name (TokenizersBackend); PreTrainedTokenizerFast loads the
    # same tokenizer.json in 5.x and in 4.x.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _fast_tokenizer_from_json(path: Path, model_max_length: int | None):
    from transformers import PreTrainedTokenizerFast

    from pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer(path)
    name = tok.hf.hf.id_to_token
    specials = {"eos_token": name(tok.eod), "pad_token": name(tok.pad)}
    if tok.bos >= 0:
        specials["bos_token"] = name(tok.bos)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), model_max_length=model_max_length, **specials)


# ------------------------------------------------------------------------------ the whole export


def export(
    model,
    m,
    out: Path,
    fmt: str = "auto",
    sp_model: Path | None = None,
    dtype: str = "float32",
    info: dict | None = None,
    verify: bool = True,
    force: bool = False,
    log=print,
) -> dict:
    """Writes `out` (via a temporary sibling renamed at the end, so a failed export leaves nothing
    that looks complete). Returns a summary: format, verified max |logit diff|, folded settings."""
    fmt = choose_format(m, fmt)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype '{dtype}': allowed: {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: exists and is not empty (use --force to replace it)")
    if sp_model is not None:
        _check_tokenizer_fits(sp_model, m.vocab_size)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    summary = {
        "format": fmt,
        "architecture": ARCHITECTURES[fmt],
        "dtype": dtype,
        "folded": folded_settings(m, fmt) + reparam_folded(m),
        "tokenizer": sp_model is not None,
        **(info or {}),
    }
    try:
        write_model(model, m, tmp, fmt, token_ids(sp_model), DTYPES[dtype])
        if sp_model is not None:
            write_tokenizer(sp_model, tmp, m.seq_len)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verify:  # a failed verification keeps the directory for inspection (the error says where)
        summary["max_abs_logit_diff"] = verify_export(model, m, tmp, fmt, DTYPES[dtype])
        if sp_model is not None:
            verify_tokenizer(sp_model, tmp)
    (tmp / "README.md").write_text(readme(m, summary))
    (tmp / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return summary


def _check_tokenizer_fits(sp_model: Path, vocab_size: int) -> None:
    from pretrain.data.tokenizer import Tokenizer

    n = Tokenizer(sp_model).vocab_size
    if n > vocab_size:
        raise ExportError(
            f"tokenizer {sp_model}: {n} tokens, more than the model's vocab_size {vocab_size}: "
            "not the tokenizer this model was trained with (pass --tokenizer)"
        )


def rounding_tolerance(dtype: torch.dtype) -> float:
    """How far, relative to the largest logit, a correct export in `dtype` may stray from our model
    run on the same weights rounded to `dtype`: a few units of `dtype`'s rounding (2^-8 for bf16,
    2^-11 for fp16), for the gains that were folded (LNS scale, zero-centred gain) before rounding
    rather than after. A conversion bug moves logits by a good fraction of their size."""
    return 0.0 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps / 2


def rounded_copy(model, dtype: torch.dtype):
    """Our model with every weight rounded to `dtype` and back to fp32: what an export in `dtype`
    holds, computed in fp32."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.to(dtype).float())
    return twin


def verify_export(model, m, out: Path, fmt: str, dtype: torch.dtype) -> float:
    """Loads `out` with transformers, offline, upcast to fp32, and compares its logits with ours on
    random tokens: with our model itself for an fp32 export, with our model on weights rounded to the
    export's dtype for a bf16/fp16 one (then within rounding_tolerance of the largest logit)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=fmt == "custom", dtype=torch.float32, local_files_only=True
    ).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.vocab_size, (2, min(m.seq_len, 64)), generator=gen)
    with torch.no_grad():
        reference = (model if dtype == torch.float32 else rounded_copy(model, dtype))(tokens).float()
        diff = (reference - hf(tokens).logits.float()).abs().max().item()
    allowed = VERIFY_ATOL + rounding_tolerance(dtype) * reference.abs().max().item()
    if not diff <= allowed:  # (a NaN fails too)
        raise ExportError(
            f"verification failed: the exported {fmt} model's logits ({str(dtype).removeprefix('torch.')} weights, "
            f"run in fp32) differ from ours by {diff:.3g} (> {allowed:.3g}); the export was left in {out}"
        )
    return diff


def verify_tokenizer(sp_model: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    from pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer(sp_model)
    # trust_remote_code: AutoTokenizer reads config.json first, and a custom export's names our code.
    hf = AutoTokenizer.from_pretrained(out, local_files_only=True, trust_remote_code=True)
    ours, theirs = tok.encode(SAMPLE_TEXT), hf.encode(SAMPLE_TEXT, add_special_tokens=False)
    text = hf.decode(theirs, clean_up_tokenization_spaces=False)
    if ours != theirs or text != SAMPLE_TEXT:
        raise ExportError(
            f"verification failed: the exported tokenizer encodes a sample to {theirs[:16]}..., "
            f"ours to {ours[:16]}...; the export was left in {out}"
        )


# ------------------------------------------------------------------------------------- README


def readme(m, s: dict) -> str:
    fmt = s["format"]
    remote = ", trust_remote_code=True" if fmt == "custom" else ""
    n_params = s.get("parameters")
    lines = [
        f"# {s.get('name', 'GPT')} ({m.placement}) — exported from the `pretrain` stack",
        "",
        f"* format: **{fmt}** (`{s['architecture']}`), weights in {s['dtype']} safetensors",
        f"* norm placement: `{m.placement}`; norm {m.norm} (eps {m.norm_eps}), MLP {m.mlp}, "
        f"qk_norm {str(m.qk_norm).lower()}"
        + (f" ({m.qk_norm_scope})" if m.qk_norm else "")
        + f", embedding_norm {str(bool(m.embedding_norm)).lower()}, depth_scale {m.depth_scale}, "
        f"zero_centered_gain {str(m.zero_centered_gain).lower()}, bias {str(m.bias).lower()}",
        f"* sizes: d={m.hidden_size}, L={m.num_layers}, heads {m.num_heads} (kv {m.num_kv_heads}), "
        f"ffn {m.ffn_hidden_size}, vocab {m.vocab_size}, trained context {m.seq_len}, RoPE theta {m.rope_theta:g}, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings" + (f"; {n_params:,} parameters" if n_params else ""),
    ]
    if "step" in s:
        lines.append(
            f"* training: step {s['step']:,}, {s.get('tokens', 0):,} tokens; "
            f"source checkpoint `{s.get('checkpoint', '?')}`"
        )
    for note in s["folded"]:
        lines.append(f"* folded into the gains (same function, plain gains): {note}")
    if "max_abs_logit_diff" in s:
        lines.append(
            f"* verified after writing: max |logit difference| vs the training model = "
            f"{s['max_abs_logit_diff']:.2e} (fp32 forward"
            + (
                ""
                if s["dtype"] == "float32"
                else f", against the training model with its weights rounded to {s['dtype']}"
            )
            + ")"
        )
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(PATH{remote})",
    ]
    if s["tokenizer"]:
        lines += [
            f"tok = AutoTokenizer.from_pretrained(PATH{remote})",
            'ids = tok("First Citizen:\\n", return_tensors="pt").input_ids',
            "print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))",
        ]
    lines += ["```", ""]
    if fmt == "custom":
        lines += [
            "`trust_remote_code=True` is needed for the tokenizer too, only because AutoTokenizer reads "
            "config.json first (the tokenizer itself is a plain `tokenizer.json`; "
            "`PreTrainedTokenizerFast.from_pretrained(PATH)` loads it without).",
            "",
        ]
        lines += [
            "The model code is `modeling_pretrain_gpt.py` / `configuration_pretrain_gpt.py` in this directory "
            "(plain torch + transformers); `config.json` lists the norm slots of every layer "
            "(`layer_slots`: y = post_norm(alpha·x + out_norm(F(in_norm(x)·in_scale)))).",
            "",
        ]
    if s["tokenizer"]:
        lines += [
            "The tokenizer is the training sentencepiece model (`tokenizer.model`) converted to `tokenizer.json` "
            "(same ids on any text; newlines are one token, unknown characters fall back to bytes). As in "
            "training, no `<s>` is added: documents are separated by `</s>` (id "
            f"{s.get('eos_token_id', 2)}), so a prompt that starts a new document may be prefixed with it.",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory; a run directory or checkpoints/ folder -> its newest complete one."""
    from pretrain.checkpoint import META, find_resumable, verify

    if not path.is_dir():
        raise ExportError(f"--checkpoint {path}: no such directory")
    if (path / META).is_file():
        verify(path, "size")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpt = find_resumable(root, "size", lambda msg: print(msg, file=sys.stderr))
    if ckpt is None:
        raise ExportError(f"--checkpoint {path}: neither a checkpoint (no meta.json) nor a run with a complete one")
    return ckpt


def find_tokenizer(cfg, ckpt: Path, explicit: str | None) -> Path:
    """--tokenizer, else the copy saved in the checkpoint, else the config's data.tokenizer (relative
    paths: from here, then the project root)."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ExportError(f"--tokenizer {p}: no such file")
        return p
    from pretrain.data.tokenizer import tokenizer_file_in

    if tokenizer_file_in(ckpt):
        return tokenizer_file_in(ckpt)
    from pretrain.config import tokenizer_path

    name = tokenizer_path(cfg.data)
    for p in (Path(name), ROOT / name):
        if p.is_file():
            return p
    raise ExportError(
        f"data.tokenizer '{name}' of {ckpt} not found (tried it relative to {Path.cwd()} and {ROOT}); "
        "pass --tokenizer PATH, or --no-tokenizer to export the model alone"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, run directory or checkpoints/ folder")
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent unless --force)")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="default auto")
    p.add_argument("--tokenizer", help="sentencepiece model (default: data.tokenizer of the checkpoint's config)")
    p.add_argument("--no-tokenizer", action="store_true", help="export the model without a tokenizer")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype (default float32)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the export back to compare logits")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
    summary = export_checkpoint(args)
    diff = summary.get("max_abs_logit_diff")
    print(
        f"[export] {summary['checkpoint']} -> {args.out}: {summary['format']} ({summary['architecture']})"
        + (f"; verified, max |logit diff| {diff:.2e}" if diff is not None else "; not verified")
    )
    for note in summary["folded"]:
        print(f"[export] folded: {note}")
    load = ", trust_remote_code=True" if summary["format"] == "custom" else ""
    print(f"[export] load: AutoModelForCausalLM.from_pretrained('{args.out}'{load})")
    return 0


def export_checkpoint(args) -> dict:
    from pretrain.checkpoint.consolidate import load_checkpoint_model

    ckpt = resolve_checkpoint(Path(args.checkpoint))
    model, cfg, meta = load_checkpoint_model(ckpt)
    sp_model = None if args.no_tokenizer else find_tokenizer(cfg, ckpt, args.tokenizer)
    ids = token_ids(sp_model)
    info = {
        "name": cfg.run.name,
        "checkpoint": str(ckpt),
        "step": meta["step"],
        "tokens": meta.get("tokens", 0),
        "parameters": model.num_params(),
        "eos_token_id": ids["eos_token_id"],
    }
    return export(
        model,
        cfg.model,
        Path(args.out),
        args.format,
        sp_model,
        args.dtype,
        info,
        verify=not args.no_verify,
        force=args.force,
    )


if __name__ == "__main__":
    from pretrain.cli import run

    raise SystemExit(run(main))
