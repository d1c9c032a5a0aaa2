#!/usr/bin/env bash
# The GPU readiness check (issue 19): one script a person runs on a machine with one GPU (H100/H200),
# from the repository root or anywhere, in under 8 minutes:
#
#   bash bench/gpu_check.sh OUT_DIR --wheels WHEEL_DIR     # on the GPU machine (no network needed)
#   bash bench/gpu_check.sh OUT_DIR --smoke                # on CPU: tiny sizes, the same code paths
#   bash bench/gpu_check.sh --build-wheels WHEEL_DIR       # beforehand, on a machine with PyPI access
#   options: --python PY, --budget-s S, --stages "env install ...", --data DIR (a prepared dataset)
#
# The GPU machine is expected to have Python 3.12 with torch (2.11), triton, sentencepiece and
# tensorboard; what else the stack needs (deepspeed, megatron-core, transformers and their
# dependencies) is installed from WHEEL_DIR into a virtual environment OUT_DIR/venv that sees the
# system packages; our package is this repository (PYTHONPATH). Stages, in order:
#
#   env          python, torch, CUDA, the GPU (env.json)
#   install      what is missing, from the wheels (install.json)
#   train_run    the quickstart model trained 200 steps on the GPU: stopped at step 100 with a
#                checkpoint, resumed to 200, and an uninterrupted run to compare the curve (train_run.json)
#   kernels      fused norm kernels fwd/bwd GB/s against torch (and apex when importable) at hidden
#                1K-8K (kernels.json)
#   block_ops    the hand-written RoPE / SwiGLU / RMSNorm / attention / fused loss against the compositions they
#                replace, bf16 at a 1.3B layer's shape (block_ops.json): whether eager keeps them on a GPU
#   gpu_tests    the test suite's GPU-only cases (pytest -m gpu: compiled Triton kernels, NCCL
#                collectives, the fused loss, the GPU init replay, offload from GPU memory), each
#                against its torch reference (gpu_tests.xml, counts in summary.json)
#   train_step   ours at 125M, 350M and 1.3B, pre and peri, bf16, eager and compiled: tokens/s, MFU,
#                peak memory; Hugging Face Llama and our plain (unfused) loss beside ours at 125M;
#                compiled, also train.compile_scope model (ours:pre:model) beside the default blocks
#                (train_step_<size>_<mode>.json)
#
# Every stage has a time limit and the whole run a budget (--budget-s, default 470 s); a stage that
# fails or runs out of time is recorded as such and the next one runs. OUT_DIR/summary.json collects
# every stage's status, time and headline figures; OUT_DIR/logs/ holds each stage's output.
# --smoke runs the same stages on CPU at tiny sizes (tests/test_gpu_check.py runs it).
set -uo pipefail
{  # bash reads a script as it runs: inside these braces all of it is read first (an edit mid-run changes nothing)

usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=""
WHEELS=""
DATA=""
SMOKE=0
LIMIT_FACTOR=1
BUDGET=470
PY="${PYTHON:-python3}"
BUILD_WHEELS=""
STAGES="env install train_run kernels block_ops gpu_tests train_step"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --data) DATA="$(cd "$2" && pwd)" || exit 2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --python) PY="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --stages) STAGES="$2"; shift 2 ;;
    --build-wheels) BUILD_WHEELS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -z "$OUT" ]; then OUT="$1"; shift; else echo "gpu_check: one output folder, got '$OUT' and '$1'" >&2; exit 2; fi ;;
  esac
done

# The wheels to carry: this stack's pinned versions (requirements.txt) and their dependencies, for
# CPython 3.12 on x86-64 Linux. deepspeed is published as source only: built here (no CUDA ops; they
# are JIT-compiled where needed). torch, triton, sentencepiece and tensorboard are not carried.
PINNED="deepspeed==0.19.8 megatron-core==0.16.1 transformers==5.23.0 pyyaml==6.0.3 pytest==9.2.0 pytest-timeout==2.4.0"
DEPENDENCIES="annotated-doc annotated-types anyio click einops filelock fsspec h11 hf-xet hjson httpcore2 httpx2
huggingface-hub idna iniconfig markdown-it-py mdurl msgpack ninja numpy packaging psutil py-cpuinfo pydantic pydantic-core
pluggy pygments regex rich safetensors shellingham tokenizers tqdm truststore typer typing-extensions typing-inspection"
if [ -n "$BUILD_WHEELS" ]; then
  mkdir -p "$BUILD_WHEELS"
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
             --platform manylinux2014_x86_64 --platform any)
  # Dependencies at the versions this repository's .venv resolved (its tests ran against them).
  deps=$("$PY" - "$DEPENDENCIES" <<'EOF'
import importlib.metadata as md, sys
print(" ".join(f"{n}=={md.version(n)}" for n in sys.argv[1].split()))
EOF
) || { echo "gpu_check: --build-wheels needs the project's environment (--python .venv/bin/python)" >&2; exit 2; }
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$BUILD_WHEELS" \
    megatron-core==0.16.1 transformers==5.23.0 pyyaml==6.0.3 pytest==9.2.0 pytest-timeout==2.4.0 $deps || exit 5
  DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w "$BUILD_WHEELS" || exit 5
  echo "gpu_check: wheels for Python 3.12 in $BUILD_WHEELS ($(ls "$BUILD_WHEELS" | wc -l) files); do not commit them"
  exit 0
fi

[ -n "$OUT" ] || { usage >&2; exit 2; }
mkdir -p "$OUT/logs" || exit 2
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/stages.jsonl"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  BUDGET=100000  # on a (shared) CPU the stages take what they take: 10x their GPU time limits
  LIMIT_FACTOR=10
fi
START=$(date +%s)

# stage NAME LIMIT_S COMMAND...: runs COMMAND with at most LIMIT_S seconds (less when the budget is
# nearly spent), its output in logs/NAME.log; appends {"stage", "status", "seconds", ...} to stages.jsonl.
stage() {
  local name="$1" limit=$(($2 * LIMIT_FACTOR)); shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "{\"stage\": \"$name\", \"status\": \"skipped\", \"reason\": \"budget of ${BUDGET}s spent\"}" >> "$OUT/stages.jsonl"
    echo "[gpu_check] $name: skipped (budget spent)"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu_check] $name (at most ${limit}s; $(($(date +%s) - START))s elapsed)"
  local t0; t0=$(date +%s.%N)
  # The stage functions run in a child bash (timeout runs commands, not functions): exported below.
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local secs; secs=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}")
  local status=ok
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
  echo "{\"stage\": \"$name\", \"status\": \"$status\", \"exit_code\": $rc, \"seconds\": $secs, \"limit_s\": $limit}" >> "$OUT/stages.jsonl"
  echo "[gpu_check] $name: $status in ${secs}s"
  [ "$status" = ok ] || tail -5 "$OUT/logs/$name.log" | sed 's/^/    /'
  return 0
}

want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ------------------------------------------------------------------------------------- the stages
env_stage() {
  "$PY" - "$OUT/env.json" "$SMOKE" <<'EOF'
import json, platform, subprocess, sys
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "smoke": sys.argv[2] == "1"}
try:
    import triton
    out["triton"] = triton.__version__
except ImportError as e:
    out["triton"] = f"missing: {e}"
try:
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
    out["nvidia_smi"] = f"not available ({type(e).__name__})"
if out["gpu"] is None and sys.argv[2] != "1":
    print("no CUDA GPU visible to torch; use --smoke on a CPU machine", file=sys.stderr)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    sys.exit(5)
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
EOF
}

missing_modules() {
  "$PY" - <<'EOF'
import importlib.util
need = {"deepspeed": "deepspeed==0.19.8", "megatron.core": "megatron-core==0.16.1",
        "transformers": "transformers==5.23.0", "yaml": "pyyaml==6.0.3",
        "pytest": "pytest==9.2.0", "pytest_timeout": "pytest-timeout==2.4.0"}
print(" ".join(req for mod, req in need.items() if importlib.util.find_spec(mod.split(".")[0]) is None
               or (mod == "megatron.core" and importlib.util.find_spec(mod) is None)))
EOF
}

install_stage() {
  local missing; missing=$(missing_modules)
  if [ -n "$missing" ]; then
    [ -n "$WHEELS" ] || { echo "missing: $missing; pass --wheels DIR (built with --build-wheels)"; return 5; }
    local pip
    if "$PY" -m venv --system-site-packages "$OUT/venv"; then
      pip=("$OUT/venv/bin/python" -m pip)
    else  # no ensurepip (Debian without python3-venv): an empty venv, filled by the system's pip
      rm -rf "$OUT/venv"
      "$PY" -m venv --system-site-packages --without-pip "$OUT/venv" || return 5
      pip=("$PY" -m pip --python "$OUT/venv/bin/python")
    fi
    PY="$OUT/venv/bin/python"
    # shellcheck disable=SC2086
    "${pip[@]}" install --no-index --find-links "$WHEELS" $missing || return 5
  fi
  "$PY" - "$OUT/install.json" "$missing" "$PY" <<'EOF'
import json, sys
import deepspeed, megatron.core, transformers
out = {"installed_from_wheels": sys.argv[2].split(), "python": sys.argv[3], "deepspeed": deepspeed.__version__,
       "megatron_core": megatron.core.__version__, "transformers": transformers.__version__}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
EOF
}

train_run_stage() {
  local cfg=configs/quickstart.yaml steps=200 every=100 vocab=8192
  local extra=(--set train.eval_every=100 --set train.diagnostics_every=100 --set train.log_every=10)
  if [ "$SMOKE" = 1 ]; then
    cfg=configs/tiny.yaml; steps=4; every=2; vocab=2048
    extra=(--set train.eval_every=2 --set train.diagnostics_every=2 --set train.warmup_steps=1 --set train.log_every=1)
  fi
  local data="$DATA"
  if [ -z "$data" ]; then
    data="$OUT/data"
    "$PY" -m pretrain.data prepare --out "$data" --vocab-size "$vocab" || return 1
  fi
  local common=(--config "$cfg" --set data.dir="$data" --set train.max_steps=$steps --set checkpoint.every=$every "${extra[@]}")
  "$PY" -m pretrain.train "${common[@]}" --set run.dir="$OUT/runs/resumed" --set train.exit_at_step=$every || return 1
  "$PY" -m pretrain.train "${common[@]}" --set run.dir="$OUT/runs/resumed" --resume auto || return 1
  "$PY" -m pretrain.train "${common[@]}" --set run.dir="$OUT/runs/uninterrupted" || return 1
  "$PY" - "$OUT" "$steps" <<'EOF'
import json, sys
from pathlib import Path
from pretrain.metrics import read_metrics
out, steps = Path(sys.argv[1]), int(sys.argv[2])
curve = {name: {r["step"]: r for r in read_metrics(out / "runs" / name / "metrics.jsonl", "train")}
         for name in ("resumed", "uninterrupted")}
a, b = curve["resumed"], curve["uninterrupted"]
common = sorted(set(a) & set(b))
last = b[max(b)]
result = {
    "steps": steps, "logged_steps": common,
    "max_abs_loss_diff_resumed_vs_uninterrupted": max(abs(a[s]["loss"] - b[s]["loss"]) for s in common),
    "final_loss": last["loss"], "tokens_per_s_last": last.get("tokens_per_s"), "mfu_last": last.get("mfu"),
    "mem_mb_last": last.get("mem_mb"),
    "checkpoints": sorted(p.name for p in (out / "runs" / "resumed" / "checkpoints").glob("step_*")),
    "valid": [r for r in read_metrics(out / "runs" / "uninterrupted" / "metrics.jsonl", "valid")][-1:],
    "diag_logged": any("diag" in line for line in (out / "runs" / "uninterrupted" / "train.log").read_text().splitlines()),
}
json.dump(result, open(out / "train_run.json", "w"), indent=1)
print(json.dumps(result))
if len(common) < 2 or not result["checkpoints"]:
    sys.exit("the runs did not log enough steps or wrote no checkpoint")
EOF
}

kernels_stage() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" bench/kernels.py --cpu-dry-run --no-compile > "$OUT/kernels.json"
  else
    "$PY" bench/kernels.py --hidden 1024 2048 4096 8192 --rows 16384 --rep 50 --no-compile > "$OUT/kernels.json"
  fi
}

block_ops_stage() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" bench/block_ops.py --tokens 256 --batch 2 --hidden 64 --heads 4 --ffn 192 --vocab 512 --reps 3 > "$OUT/block_ops.json"
  else  # gpt-1.3b's layer: d 2048, 16 heads, SwiGLU 5504, vocabulary 50304; 8 x 2048 tokens
    "$PY" bench/block_ops.py --tokens 16384 --batch 8 --hidden 2048 --heads 16 --ffn 5504 --vocab 50304 \
      --dtype bf16 --reps 20 > "$OUT/block_ops.json"
  fi
}

train_step_stage() {  # train_step_stage SIZE MODE: one mode per stage, so a compiled run that runs out of
  # time keeps the eager figures; the sides' warm-up steps (compilation) run at once, not one after another
  local size="$1" mode="$2" cfg sets=() sides=(ours:pre ours:peri) micro=4 warmup=2 steps=5
  case "$size" in
    125m) cfg=configs/gpt-125m.yaml; micro=8; sides+=(hf:pre ours:pre:plain-loss) ;;  # + the fused loss's gain
    350m) cfg=configs/gpt-350m.yaml ;;
    1.3b) cfg=configs/gpt-1.3b.yaml ;;
    tiny) cfg=configs/tiny.yaml; sets=(--set model.vocab_size=512); sides+=(hf:pre); warmup=1; steps=2 ;;
  esac
  [ "$mode" = compiled ] && sides+=(ours:pre:model)  # train.compile_scope model beside the config's blocks
  local dtype=bf16
  [ "$SMOKE" = 1 ] && dtype=fp32
  "$PY" bench/train_step.py --config "$cfg" "${sets[@]}" --dtype "$dtype" --micro-batch "$micro" \
    --sides "${sides[@]}" --modes "$mode" --warmup "$warmup" --steps "$steps" --concurrent-warmup \
    > "$OUT/train_step_${size}_$mode.json"
}

gpu_tests_stage() {  # on CPU (--smoke) every case skips: the stage then checks that they are collected
  "$PY" -m pytest -q -m gpu -p no:cacheprovider --timeout=300 --junitxml "$OUT/gpu_tests.xml" tests
  local rc=$?
  [ "$rc" -eq 5 ] && { echo "no test is marked gpu"; return 1; }  # pytest: nothing collected
  return $rc
}

export OUT WHEELS SMOKE PY DATA
export -f env_stage missing_modules install_stage train_run_stage kernels_stage block_ops_stage train_step_stage \
  gpu_tests_stage

want env && stage env 60 env_stage
if [ "$SMOKE" = 0 ] && want env && ! grep -q '"stage": "env", "status": "ok"' "$OUT/stages.jsonl"; then
  echo "[gpu_check] no usable GPU (see $OUT/logs/env.log); on a CPU machine use --smoke" >&2
  exit 5
fi
if want install; then
  stage install 120 install_stage
  [ -x "$OUT/venv/bin/python" ] && PY="$OUT/venv/bin/python" && export PY
fi
want train_run && stage train_run 150 train_run_stage
want kernels && stage kernels 90 kernels_stage
want block_ops && stage block_ops 45 block_ops_stage
want gpu_tests && stage gpu_tests 90 gpu_tests_stage
if want train_step; then
  if [ "$SMOKE" = 1 ]; then
    stage train_step_tiny_eager 300 train_step_stage tiny eager
    stage train_step_tiny_compiled 600 train_step_stage tiny compiled
  else
    # eager first at every size (the figures that need no compiler), then compiled: sides compile at once
    stage train_step_125m_eager 45 train_step_stage 125m eager
    stage train_step_350m_eager 45 train_step_stage 350m eager
    stage train_step_1.3b_eager 60 train_step_stage 1.3b eager
    stage train_step_125m_compiled 120 train_step_stage 125m compiled
    stage train_step_350m_compiled 90 train_step_stage 350m compiled
    stage train_step_1.3b_compiled 120 train_step_stage 1.3b compiled
  fi
fi

"$PY" - "$OUT" "$(($(date +%s) - START))" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
summary = {"seconds": int(sys.argv[2]), "stages": [json.loads(l) for l in (out / "stages.jsonl").read_text().splitlines()],
           "env": load("env.json"), "install": load("install.json"), "train_run": load("train_run.json")}
k = load("kernels.json")
if k:
    summary["kernels"] = {"gpu": k.get("gpu"), "copy_bandwidth_gbps": k.get("copy_bandwidth_gbps"),
                          "targets": k.get("targets"), "peri_junction_vs_unfused": k.get("peri_junction_vs_unfused")}
b = load("block_ops.json")
if b:
    summary["block_ops"] = {"dtype": b["dtype"], "shape": b["shape"],
                            "speedup": {op: r["speedup"] for op, r in b["ops"].items()}}
rows = []
for p in sorted(out.glob("train_step_*.json")):
    r = load(p.name)
    if not r:
        continue
    size = p.stem.removeprefix("train_step_").rsplit("_", 1)[0]  # train_step_<size>_<mode>.json
    for mode, m in r["modes"].items():
        for side, s in m["sides"].items():
            rows.append({"size": size, "side": side, "mode": mode,
                         "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "step_s": s["step_s"],
                         "peak_memory_gib": round(s["peak_memory_bytes"] / 2**30, 2),
                         "compile_s": s.get("compile_s_approx"), "param_dtype": s["param_dtype"]})
        for key in ("peri_over_pre_step_time", "ours_over_hf_tokens_per_s", "loss_curves_max_abs_diff",
                    "fused_over_plain_loss_tokens_per_s"):
            if key in m:
                rows.append({"size": size, "mode": mode, key: m[key]})
        if m.get("skipped"):
            rows.append({"size": size, "mode": mode, "skipped": m["skipped"]})
summary["train_step"] = rows
try:  # pytest's JUnit XML: one <testsuite> with the counts
    import xml.etree.ElementTree as ET
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["gpu_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["gpu_tests"]["failed"] = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
                                      if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError, AttributeError):
    summary["gpu_tests"] = None
(out / "summary.json").write_text(json.dumps(summary, indent=1))
bad = [s["stage"] for s in summary["stages"] if s["status"] != "ok"]
print(f"[gpu_check] {len(summary['stages']) - len(bad)}/{len(summary['stages'])} stages ok in {summary['seconds']}s"
      + (f"; not ok: {', '.join(bad)}" if bad else "") + f"; summary: {out / 'summary.json'}")
sys.exit(1 if bad else 0)
EOF
exit $?
}
