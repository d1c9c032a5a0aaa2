"""python -m pretrain.import_hf --model HF_DIR --out DIR [--base CONFIG] [--seq-len N]

Imports a Hugging Face Llama checkpoint (LlamaForCausalLM, loaded offline) into our model:
writes DIR/model.pt (a state dict in our naming) and DIR/config.yaml (a complete config whose
model section reproduces it: placement pre, RMSNorm, SwiGLU, the sizes, rope_theta, norm_eps,
tied or untied embeddings, vocab_size = the HF vocabulary with vocab_multiple 1). Then

    python -m pretrain.train --config DIR/config.yaml --set checkpoint.init_from=DIR/model.pt

starts from those weights. The rest of config.yaml comes from --base (default: every default).
The training data must be tokenized with the model's tokenizer: when HF_DIR has a sentencepiece
tokenizer.model (or a tokenizer.json) it is copied to DIR, for `python -m pretrain.data prepare --tokenizer DIR/<it>`.

Rejected with a message: other architectures, RoPE scaling, attention and MLP biases that differ,
a head_dim other than hidden_size / num_heads, activations other than SiLU.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from model.hf_convert import ConversionError, from_llama_state_dict, llama_model_section
from pretrain.data.tokenizer import tokenizer_file_in

MAX_DEFAULT_SEQ_LEN = 4096  # default training length when the HF context is longer (--seq-len overrides)
VERIFY_ATOL = 1e-3


def load_llama(hf_dir: Path):
    """(config, model) of a local Llama checkpoint, offline; ConversionError for anything else."""
    from transformers import AutoConfig, LlamaForCausalLM

    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"--model {hf_dir}: no config.json (a Hugging Face model directory is expected)")
    try:
        hf_cfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except (ValueError, KeyError) as e:  # unknown model type, or remote code we will not run
        raise ConversionError(
            f"--model {hf_dir}: transformers cannot read its config ({e}); only Llama "
            "(LlamaForCausalLM) can be imported"
        ) from None
    llama_model_section(hf_cfg)  # rejects what we cannot express before loading any weight
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    return hf_cfg, hf


def model_config(hf_cfg, seq_len: int | None):
    """Our resolved ModelConfig for a Llama config (sizes from the checkpoint, seq_len as given)."""
    from pretrain.config import Config, ModelConfig, resolve

    section = llama_model_section(hf_cfg)
    section["seq_len"] = seq_len or min(int(hf_cfg.max_position_embeddings), MAX_DEFAULT_SEQ_LEN)
    cfg = Config()
    cfg.model = ModelConfig(**section)
    return resolve(cfg).model, section


def convert(hf, m) -> dict[str, torch.Tensor]:
    return from_llama_state_dict({k: v.detach().float() for k, v in hf.state_dict().items()}, m)


def verify(hf, m, state: dict[str, torch.Tensor]) -> float:
    """Max |logit difference| between the HF model and ours holding the converted weights."""
    from model import build_model

    model, _ = build_model(m, "torch")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - ({"head.weight"} if m.tie_embeddings else set()) or unexpected:
        raise ConversionError(f"converted weights do not fit our model: missing {missing}, unexpected {unexpected}")
    tokens = torch.randint(0, m.vocab_size, (2, min(m.seq_len, 64)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model.eval()(tokens) - hf(tokens).logits).abs().max().item()


def write_config(section: dict, out: Path, base: str | None, name: str) -> Path:
    """config.yaml: --base (or every default) with this model section. Left unresolved on purpose, so
    `--set data.dir=...` still moves the tokenizer and splits with it; validated like training does."""
    import yaml

    from pretrain.config import config_from_dict, read_yaml

    data = read_yaml(base) if base else {}
    data["model"] = dict(section)
    data["run"] = {**(data.get("run") or {}), "name": name}
    data["checkpoint"] = {**(data.get("checkpoint") or {}), "init_from": str((out / "model.pt").resolve())}
    cfg = config_from_dict(data)  # ConfigError if the base does not fit (e.g. tp/pp)
    path = out / "config.yaml"
    header = "# Imported from a Hugging Face Llama checkpoint (python -m pretrain.import_hf)\n"
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.import_hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json + weights)")
    p.add_argument("--out", required=True, help="directory for model.pt and config.yaml")
    p.add_argument("--base", help="config file for everything but the model section (e.g. configs/tiny.yaml)")
    p.add_argument(
        "--seq-len", type=int, help=f"training sequence length (default: the HF context, at most {MAX_DEFAULT_SEQ_LEN})"
    )
    p.add_argument("--no-verify", action="store_true", help="skip comparing logits with the HF model")
    p.add_argument("--force", action="store_true", help="overwrite model.pt/config.yaml in --out")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return import_model(args)


def import_model(args) -> int:
    hf_dir, out = Path(args.model), Path(args.out)
    if not hf_dir.is_dir():
        raise ConversionError(f"--model {hf_dir}: no such directory")
    if (out / "model.pt").exists() and not args.force:
        raise ConversionError(f"--out {out}: model.pt exists (use --force to overwrite)")
    hf_cfg, hf = load_llama(hf_dir)
    m, section = model_config(hf_cfg, args.seq_len)
    state = convert(hf, m)
    diff = None if args.no_verify else verify(hf, m, state)
    if diff is not None and diff > VERIFY_ATOL:
        raise ConversionError(f"verification failed: our model's logits differ from the HF model's by {diff:.3g}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "model.pt")
    config = write_config(section, out, args.base, out.resolve().name)
    n = sum(v.numel() for v in state.values())
    print(
        f"[import] {hf_dir} (LlamaForCausalLM) -> {out / 'model.pt'} ({n:,} parameters) and {config}"
        + (f"; verified, max |logit diff| {diff:.2e}" if diff is not None else "")
    )
    _tokenizer_hint(hf_dir, out)
    print(f"[import] train: python -m pretrain.train --config {config} --set checkpoint.init_from={out / 'model.pt'}")
    return 0


def _tokenizer_hint(hf_dir: Path, out: Path) -> None:
    found = tokenizer_file_in(hf_dir)  # sentencepiece's tokenizer.model first, else tokenizer.json
    if found:
        shutil.copy2(found, out / found.name)
        print(
            f"[import] the model's tokenizer is {out / found.name}: tokenize the data with it, "
            f"python -m pretrain.data prepare --tokenizer {out / found.name} --out data/NAME, then "
            "--set data.dir=data/NAME"
        )
    else:
        print(
            "[import] warning: no tokenizer.model or tokenizer.json in the HF directory; the training data must be "
            "tokenized with this model's tokenizer (Megatron .bin/.idx via data.train/valid/test and a matching "
            "data.tokenizer), or the token ids will not mean what the weights learned"
        )


if __name__ == "__main__":
    from pretrain.cli import run

    raise SystemExit(run(main))
