"""Hostile and mistaken inputs, from one table (CASES): what the user does, the exit code, the one
line that must name the problem and what to do, and what must still hold afterwards.

Every case runs the real command in fresh processes (one, or several ranks started the way the
DeepSpeed launcher and srun start them: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT per process)
and checks, besides its own guarantee:
  * every rank exits with the case's code (a rank that the failing one left waiting in a collective
    is stopped by the launcher, as torchrun and deepspeed do, and must have printed nothing);
  * exactly one `error:` line across all ranks, matching the case's message; no traceback anywhere.
Where a checkpoint existed, the guarantee includes that it still verifies (sha256) and loads.

The same table as Markdown, for the README:   python -m tests.test_bad_input --markdown
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT, _env, check, faults_env, run_module, tiny_args, with_faults

pytestmark = pytest.mark.distributed

BASE = [
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "train.diagnostics_every=0",
    "checkpoint.every=2",
    "checkpoint.keep_last=0",
]


# ------------------------------------------------------------------------------------ the cases


@dataclass
class Invocation:
    args: list  # python arguments: ["-m", "pretrain.train", ...]
    nproc: int = 1
    env: dict = field(default_factory=dict)
    faults: tuple = ()  # tests/conftest.py fault-injection specs


@dataclass(frozen=True)
class Case:
    id: str
    does: str  # what the user does
    exit: int  # the exit code of every rank (-9: killed by SIGKILL)
    message: str | None  # regex for the one `error:` line (exit 0: a line of the log); None: no line
    guarantee: str  # what is checked afterwards
    setup: Callable[["Ctx"], Invocation]
    after: Callable[["Ctx", "Outcome"], None] | None = None
    slow: bool = False
    needs: str = ""  # a fix still to be made elsewhere: the case is a strict xfail until it lands


@dataclass
class Outcome:
    codes: list  # exit code per rank
    outputs: list  # stdout + stderr per rank

    @property
    def text(self) -> str:
        return "\n".join(self.outputs)


class Ctx:
    """One case's scratch space; the shared fixtures are copied, never changed."""

    def __init__(self, tmp: Path, data: Path, trained: Path):
        self.tmp, self.data, self._trained = tmp, data, trained
        self.run = tmp / "run"
        self.before: dict[str, str] = {}  # checkpoint -> manifest digest, taken when the run is copied
        self.cleanups: list[Callable[[], None]] = []

    def trained_run(self) -> Path:
        """A copy of the shared run: 4 steps, checkpoints step_000002 and step_000004."""
        shutil.copytree(self._trained, self.run, symlinks=True)
        self.before = {c.name: _digest(c / "manifest.json") for c in sorted((self.run / "checkpoints").glob("step_*"))}
        return self.run

    def train(self, *sets: str, resume: str | None = None, extra: tuple = (), **kw) -> Invocation:
        args = tiny_args(self.data, self.run, *BASE, *sets) + (["--resume", resume] if resume else []) + list(extra)
        return Invocation(args, **kw)

    def ckpt(self, step: int) -> Path:
        return self.run / "checkpoints" / f"step_{step:06d}"

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return path

    def data_copy(self, with_manifest: bool = True) -> Path:
        """A private copy of the prepared data (to damage); without its manifest on request."""
        out = self.tmp / "data"
        shutil.copytree(self.data, out, ignore=shutil.ignore_patterns("cache"))
        if not with_manifest:
            (out / "manifest.json").unlink()
        return out


def _digest(path: Path) -> str:
    from pretrain.fsutil import sha256_file

    return sha256_file(path)


# ----------------------------------------------------------------------- what is checked after


def checkpoints_intact(ctx: Ctx, outcome: Outcome, damaged: tuple = ()) -> None:
    """Every checkpoint that existed before still verifies, byte for byte the same (but the ones the
    case damaged on purpose, which must still be there, for inspection), and the newest good one loads."""
    from pretrain.checkpoint import verify
    from pretrain.checkpoint.consolidate import consolidated_state_dict

    assert ctx.before, "the case did not start from the trained run"
    good = []
    for name, digest in ctx.before.items():
        ckpt = ctx.run / "checkpoints" / name
        assert ckpt.is_dir(), f"{name} was lost"
        if name in damaged:
            continue
        verify(ckpt, "sha256")
        assert _digest(ckpt / "manifest.json") == digest, f"{name} was rewritten"
        good.append(ckpt)
    assert good and consolidated_state_dict(good[-1])


def newest_intact(ctx: Ctx, outcome: Outcome) -> None:
    checkpoints_intact(ctx, outcome, damaged=("step_000004",))


def nothing_written(ctx: Ctx, outcome: Outcome) -> None:
    """Refused before any process group: no run log, no checkpoint."""
    assert not (ctx.run / "train.log").exists() and not (ctx.run / "checkpoints").exists()


def resumes_after(ctx: Ctx, outcome: Outcome, expect_from: str) -> None:
    """The next `--resume auto` loads the newest complete checkpoint and finishes the run."""
    proc = check(run_module(tiny_args(ctx.data, ctx.run, *BASE, "train.max_steps=8") + ["--resume", "auto"]))
    assert f"resumed from {ctx.run / 'checkpoints' / expect_from}" in proc.stdout, proc.stdout[-2000:]
    assert not [p.name for p in (ctx.run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-", ".del-"))]


# ----------------------------------------------------------------------------------- set-ups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_port(ctx: Ctx) -> int:
    sock = socket.socket()
    sock.bind(("", 0))
    sock.listen()
    ctx.cleanups.append(sock.close)
    return sock.getsockname()[1]


def changed_tokenizer(ctx: Ctx) -> Path:
    """The bundled tokenizer with one piece's score changed: loads, same vocabulary, another sha256
    (what a re-trained tokenizer looks like to a checkpoint)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((ctx.data / "tokenizer.model").read_bytes())
    proto.pieces[500].score += 0.5
    return ctx.write("other/tokenizer.model", proto.SerializeToString())


def data_without_manifest(ctx: Ctx) -> tuple[str, str]:
    """train and valid prefixes outside a prepared directory (nothing records their tokenizer)."""
    out = ctx.tmp / "loose"
    out.mkdir()
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            shutil.copyfile(ctx.data / f"{split}{ext}", out / f"{split}{ext}")
    return f"data.train=[{out / 'train'}]", f"data.valid=[{out / 'valid'}]"


def ids_outside_vocabulary(ctx: Ctx) -> Invocation:
    train, valid = data_without_manifest(ctx)
    path = ctx.tmp / "loose" / "train.bin"
    raw = bytearray(path.read_bytes())
    raw[1000:1002] = (4000).to_bytes(2, "little")  # uint16 tokens: one id of a 4,096-token tokenizer
    path.write_bytes(bytes(raw))
    return ctx.train(train, valid)


def rewrite_meta(ctx: Ctx, step: int, change: Callable[[dict], None]) -> None:
    """Edits a checkpoint's meta.json and writes a manifest that agrees (a consistent forgery)."""
    from pretrain.checkpoint import write_manifest

    ckpt = ctx.ckpt(step)
    meta = json.loads((ckpt / "meta.json").read_text())
    change(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    write_manifest(ckpt)
    ctx.before[ckpt.name] = _digest(ckpt / "manifest.json")


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def manifest_edit(ctx: Ctx, step: int, change: Callable[[dict], None]) -> Path:
    ckpt = ctx.ckpt(step)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    change(manifest["files"])
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt


def optim_file(ckpt: Path) -> str:
    return next(p.name for p in ckpt.glob("*optim_states.pt"))


def tampered_pickle(ctx: Ctx) -> Invocation:
    import torch

    from pretrain.checkpoint import write_manifest

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ctx.tmp / 'pwned'}",))

    ckpt = ctx.ckpt(4)
    torch.save({"torch": Payload()}, ckpt / "rng_rank00000.pt")
    write_manifest(ckpt)  # the forgery comes with a matching manifest: integrity checks alone pass
    return ctx.train(resume=str(ckpt))


@contextmanager
def small_filesystem(path: Path, size: str, read_only: bool = False):
    """A tmpfs of `size` at `path` (root only); yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def on_tmpfs(ctx: Ctx, size: str) -> bool:
    """Mounts a tmpfs at the case's run directory for the case's life; False if not allowed here."""
    cm = small_filesystem(ctx.tmp / "fs", size)
    mounted = cm.__enter__()
    ctx.cleanups.append(lambda: cm.__exit__(None, None, None))
    if mounted:
        ctx.run = ctx.tmp / "fs" / "run"
    return mounted


def disk_too_small(ctx: Ctx) -> Invocation:
    if on_tmpfs(ctx, "1m"):
        return ctx.train()
    return ctx.train(faults=("disk-free:bytes=1000000",))


def disk_full_during_save(ctx: Ctx) -> Invocation:
    """6 MiB: one checkpoint of the tiny model (3.8 MiB) fits, the second does not."""
    if on_tmpfs(ctx, "6m"):
        return ctx.train()
    return ctx.train(faults=("save:phase=ds-write,step=4,action=enospc",))


def after_disk_full(ctx: Ctx, outcome: Outcome) -> None:
    from pretrain.checkpoint import verify
    from pretrain.checkpoint.consolidate import consolidated_state_dict

    ckpts = ctx.run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_000002"]  # nothing partial left
    verify(ckpts / "step_000002")
    assert consolidated_state_dict(ckpts / "step_000002")


def read_only_run(ctx: Ctx) -> Invocation:
    if on_tmpfs(ctx, "64m"):
        shutil.copytree(ctx._trained, ctx.run, symlinks=True)
        subprocess.run(["mount", "-o", "remount,ro", str(ctx.tmp / "fs")], check=True)
    else:  # not root: permissions do it
        shutil.copytree(ctx._trained, ctx.run, symlinks=True)
        for p in [ctx.run, *ctx.run.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        ctx.cleanups.append(lambda: [p.chmod(p.stat().st_mode | 0o200) for p in [ctx.run, *ctx.run.rglob("*")]])
    return ctx.train(resume="auto")


def locked_by_another_job(ctx: Ctx) -> Invocation:
    from pretrain.rundir import RunLock

    ctx.trained_run()
    lock = RunLock(ctx.run).acquire()  # this test process is "the other job"
    ctx.cleanups.append(lock.release)
    return ctx.train(resume="auto")


def save_fault(phase: str, action: str) -> Callable[[Ctx], Invocation]:
    """Continues the trained run to step 8 (saves at 6 and 8) with the fault at the save of step 6."""

    def setup(ctx: Ctx) -> Invocation:
        ctx.trained_run()
        return ctx.train("train.max_steps=8", resume="auto", faults=(f"save:phase={phase},step=6,action={action}",))

    return setup


def after_kill(phase: str) -> Callable[[Ctx, Outcome], None]:
    """Killed during the save of step 6: step 4 is intact, and --resume auto continues from step 6 if
    the kill came after its rename, else from step 4."""

    def after(ctx: Ctx, outcome: Outcome) -> None:
        checkpoints_intact(ctx, outcome)
        resumes_after(ctx, outcome, "step_000006" if phase in ("latest", "retention") else "step_000004")

    return after


def after_term(ctx: Ctx, outcome: Outcome) -> None:
    """SIGTERM during the save of step 6: that save finishes, step 7 is trained and saved, exit 0."""
    from pretrain.checkpoint import verify

    checkpoints_intact(ctx, outcome)
    for step in (6, 7):
        verify(ctx.ckpt(step))
    assert (ctx.run / "checkpoints" / "latest").read_text().strip() == "step_000007"


def slurm_render(*extra: str) -> Invocation:
    return Invocation(
        ["-m", "launch.slurm", "render", "--config", str(ROOT / "configs" / "tiny.yaml"), "--vocab-size", "2048"]
        + ["--nodes", "1", "--gpus-per-node", "2", "--no-check", *extra]
    )


def one_rank_save_fails(ctx: Ctx) -> Invocation:
    return ctx.train(nproc=2, faults=("save:phase=ds-write,step=4,action=enospc,rank=1",))


def after_one_rank_failed(ctx: Ctx, outcome: Outcome) -> None:
    from pretrain.checkpoint import verify

    ckpts = ctx.run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_000002"]
    verify(ckpts / "step_000002")


def schema_unknown_key(section: str) -> Callable[[Ctx], Invocation]:
    def setup(ctx: Ctx) -> Invocation:
        ctx.trained_run()
        rewrite_meta(ctx, 4, lambda m: m["config"][section].update(retired_knob=7))
        rewrite_meta(ctx, 2, lambda m: m["config"][section].update(retired_knob=7))
        return ctx.train("train.max_steps=5", resume="auto")

    return setup


def eval_schema_changed(ctx: Ctx) -> Invocation:
    ctx.trained_run()
    rewrite_meta(ctx, 4, lambda m: (m["config"]["train"].update(retired_knob=7), m["config"].update(gone={"x": 1})))
    return Invocation(["-m", "pretrain.eval", "--checkpoint", str(ctx.ckpt(4)), "--set", "eval.max_tokens=2000"])


def printed_nothing_else(ctx: Ctx, outcome: Outcome) -> None:
    """Only the error line (and interpreter warnings): no script, host or export reached stdout."""
    lines = [line for line in outcome.text.splitlines() if line.strip() and not ERROR_LINE.match(line)]
    assert not [line for line in lines if line.startswith(("#SBATCH", "export ", "node"))], lines


def nothing_in_run_dir(ctx: Ctx, outcome: Outcome) -> None:
    """Nothing but the lock file rank 0 took: no log, no metrics, no checkpoints."""
    assert not ctx.run.exists() or {p.name for p in ctx.run.iterdir()} <= {".lock"}, list(ctx.run.iterdir())


def no_checkpoint(ctx: Ctx, outcome: Outcome) -> None:
    assert not list(ctx.run.rglob("step_*")), list(ctx.run.rglob("step_*"))


# what a guarantee of the table means when the case names no check of its own
GENERIC = {
    "nothing written": nothing_in_run_dir,
    "no script printed": printed_nothing_else,
    "no host printed": printed_nothing_else,
    "no exports printed": printed_nothing_else,
    "refused before any launch": printed_nothing_else,
    "refused while reading the config": lambda ctx, outcome: None,  # (the config names no run directory yet)
    "no checkpoint written": no_checkpoint,
}


def resumed_from(step: int) -> Callable[[Ctx, Outcome], None]:
    def after(ctx: Ctx, outcome: Outcome) -> None:
        assert f"resumed from {ctx.ckpt(step)} " in outcome.text, outcome.text[-3000:]

    return after


def absent(*names: str) -> Callable[[Ctx, Outcome], None]:
    def after(ctx: Ctx, outcome: Outcome) -> None:
        for name in names:
            assert not (ctx.tmp / name).exists(), f"{name} exists"

    return after


def after_stop(ctx: Ctx, outcome: Outcome) -> None:
    """Stopped at step 3: the checkpoint of step 2 verifies and loads."""
    ctx.before = {"step_000002": _digest(ctx.ckpt(2) / "manifest.json")}
    checkpoints_intact(ctx, outcome)


def config_file(text: str | bytes, name: str = "c.yaml") -> Callable[[Ctx], Invocation]:
    return lambda ctx: Invocation(["-m", "pretrain.train", "--config", str(ctx.write(name, text))])


def truncated_tiny_yaml() -> str:
    return (ROOT / "configs" / "tiny.yaml").read_text().split("micro_batch_size:")[0] + "micro_batch_size:"


def ds_config(text: str) -> Callable[[Ctx], Invocation]:
    return lambda ctx: ctx.train(f"zero.ds_config={ctx.write('ds.json', text)}")


def damaged_data(damage: Callable[[Path], object]) -> Callable[[Ctx], Invocation]:
    """Trains on a private copy of the prepared data, damaged first."""

    def setup(ctx: Ctx) -> Invocation:
        damage(ctx.data_copy())
        return ctx.train(f"data.dir={ctx.tmp / 'data'}")

    return setup


def empty_corpus(ctx: Ctx) -> Invocation:
    ctx.write("empty.bin", b"")
    shutil.copyfile(ctx.data / "train.idx", ctx.tmp / "empty.idx")
    return ctx.train(f"data.train=[{ctx.tmp / 'empty'}]")


def prepare_empty(ctx: Ctx) -> Invocation:
    text = str(ctx.write("e.txt", ""))
    out = str(ctx.tmp / "prepared")
    return Invocation(["-m", "pretrain.data", "prepare", "--no-bundled", "--input", text, "--out", out])


def prepare_vocab_too_small(ctx: Ctx) -> Invocation:
    """A corpus of 400 distinct characters (CJK): 99.95% character coverage needs a piece for each, plus the
    256 byte pieces and the specials -- more than --vocab-size 300."""
    chars = [chr(0x4E00 + i) for i in range(400)]
    lines = ["".join(chars[(7 * n + 13 * k) % 400] for k in range(40)) for n in range(2000)]
    text = str(ctx.write("cjk.txt", "\n".join(lines)))
    out = str(ctx.tmp / "prepared")
    args = ["-m", "pretrain.data", "prepare", "--no-bundled", "--input", text, "--vocab-size", "300", "--out", out]
    return Invocation(args)


def blend(weight: str) -> Callable[[Ctx], Invocation]:
    return lambda ctx: ctx.train(f"data.train=['{weight} {ctx.data / 'train'}', '1 {ctx.data / 'train'}']")


def on_trained(*sets: str, resume: str | None = "auto", damage=None, **kw) -> Callable[[Ctx], Invocation]:
    """Runs on a copy of the trained run, after `damage(ctx)`; resume="ckpt4" resumes that checkpoint."""

    def setup(ctx: Ctx) -> Invocation:
        ctx.trained_run()
        if damage is not None:
            damage(ctx)
        more = [s(ctx) if callable(s) else s for s in sets]
        return ctx.train(*more, resume=str(ctx.ckpt(4)) if resume == "ckpt4" else resume, **kw)

    return setup


def truncate_optim(ctx: Ctx) -> None:
    truncate(ctx.ckpt(4) / optim_file(ctx.ckpt(4)))


def forge_meta(ctx: Ctx) -> None:
    rewrite_meta(ctx, 4, lambda m: [m.pop(k) for k in ("config", "world_size", "zero_stage")])


def other_tokenizer(ctx: Ctx) -> list[str]:
    return [f"data.tokenizer={changed_tokenizer(ctx)}", *data_without_manifest(ctx)]


def tokenizer_changed(*sets: str) -> Callable[[Ctx], Invocation]:
    def setup(ctx: Ctx) -> Invocation:
        ctx.trained_run()
        return ctx.train(*other_tokenizer(ctx), *sets, resume="auto")

    return setup


def init_from_other_tokenizer(ctx: Ctx) -> Invocation:
    """A new run (its own directory) whose tokenizer is not the one the init_from checkpoint records."""
    ctx.trained_run()
    return ctx.train(*other_tokenizer(ctx), f"run.dir={ctx.tmp / 'new'}", f"checkpoint.init_from={ctx.ckpt(4)}")


def nothing_new_and_intact(ctx: Ctx, outcome: Outcome) -> None:
    assert not (ctx.tmp / "new").exists(), list((ctx.tmp / "new").rglob("*"))
    checkpoints_intact(ctx, outcome)


def init_from_other_shape(ctx: Ctx) -> Invocation:
    ctx.trained_run()
    return ctx.train("model.hidden_size=128", f"run.dir={ctx.tmp / 'new'}", f"checkpoint.init_from={ctx.ckpt(4)}")


def rendezvous(**env: str) -> Callable[[Ctx], Invocation]:
    return lambda ctx: ctx.train(env={k: v(ctx) if callable(v) else v for k, v in env.items()})


def same_file(ctx: Ctx, outcome: Outcome) -> None:
    assert (ctx.tmp / "afile").read_text() == "keep"


def slurm(*args: str, env: dict | None = None) -> Callable[[Ctx], Invocation]:
    return lambda ctx: Invocation(["-m", "launch.slurm", *args], env=env or {})


def hostfile(text: str) -> Callable[[Ctx], Invocation]:
    return lambda ctx: Invocation(["-m", "launch.hostfile", "check", str(ctx.write("hosts", text))])


NO_HOST = {"MASTER_ADDR": "no-such-host.invalid", "WORLD_SIZE": "2", "RANK": "0"}

# fmt: off
CASES = [
    # --------------------------------------------------------------------- the config file and --set
    Case("yaml-malformed", "config file with an unclosed `{`", 2,
         r"c\.yaml' is not valid YAML at line 2, column 1: expected ',' or '}', but got '<stream end>'",
         "refused while reading the config", config_file("model: {hidden_size: 64\n"), nothing_written),
    Case("yaml-truncated", "config file cut off after `micro_batch_size:`", 2,
         r"train\.micro_batch_size: expected an integer, got None", "refused while reading the config",
         lambda c: config_file(truncated_tiny_yaml())(c), nothing_written),
    Case("yaml-not-a-mapping", "config file that is a YAML list", 2, r"expected a mapping at the top level",
         "refused while reading the config", config_file("- a\n- b\n")),
    Case("yaml-binary", "config file of random bytes", 2, r"c\.yaml' (cannot be read|is not valid YAML)",
         "refused while reading the config", config_file(bytes(range(128, 256)))),
    Case("config-missing", "--config pointing nowhere", 2, r"config file '/nonexistent\.yaml' does not exist",
         "refused while reading the config",
         lambda c: Invocation(["-m", "pretrain.train", "--config", "/nonexistent.yaml"])),
    Case("base-loop", "a config whose `base:` is itself", 2, r"'base' chain loops back to itself",
         "refused while reading the config", config_file("base: loop.yaml\n", "loop.yaml")),
    Case("unknown-section", "--set trian.max_steps=3", 2, r"trian: unknown section; did you mean 'train'\?",
         "nothing written", lambda c: c.train("trian.max_steps=3"), nothing_written),
    Case("misspelt-key", "--set train.max_step=3", 2, r"train\.max_step: unknown key; did you mean 'max_steps'\?",
         "nothing written", lambda c: c.train("train.max_step=3"), nothing_written),
    Case("wrong-type-int", "--set train.max_steps=ten", 2, r"train\.max_steps: expected an integer, got 'ten'",
         "nothing written", lambda c: c.train("train.max_steps=ten")),
    Case("float-for-int", "--set model.hidden_size=64.5", 2, r"model\.hidden_size: expected an integer, got 64\.5",
         "nothing written", lambda c: c.train("model.hidden_size=64.5")),
    Case("wrong-type-bool", "--set parallel.sequence_parallel=maybe", 2,
         r"parallel\.sequence_parallel: expected true or false, got 'maybe'", "nothing written",
         lambda c: c.train("parallel.sequence_parallel=maybe")),
    Case("not-allowed", "--set train.precision=fp64", 2, r"train\.precision: 'fp64' is not allowed; allowed: fp32",
         "nothing written", lambda c: c.train("train.precision=fp64")),
    Case("nan-learning-rate", "--set train.lr=.nan (NaN into the optimizer)", 2,
         r"train\.lr: expected a finite number, got nan", "nothing written", lambda c: c.train("train.lr=.nan")),
    Case("below-minimum", "--set train.max_steps=-1", 2, r"train\.max_steps: -1 is below the minimum 1",
         "nothing written", lambda c: c.train("train.max_steps=-1")),
    Case("set-without-value", "--set train.max_steps", 2, r"--set 'train\.max_steps': expected KEY=VALUE",
         "nothing written", lambda c: c.train("train.max_steps")),
    Case("unknown-placement", "--set model.placement=peri-ln", 2,
         r"model\.placement: 'peri-ln' is not a placement; allowed: pre, .*; did you mean 'peri'\?", "nothing written",
         lambda c: c.train("model.placement=peri-ln")),
    Case("uncatchable-signal", "--set checkpoint.preempt_signals=[SIGKILL]", 2,
         r"checkpoint\.preempt_signals: 'SIGKILL' is not a signal that can be caught", "nothing written",
         lambda c: c.train("checkpoint.preempt_signals=[SIGKILL]")),
    # ---------------------------------------------------------------------------- impossible layouts
    Case("tp-does-not-divide-heads", "--set parallel.tp=3 (4 heads)", 2,
         r"parallel\.tp: 3 does not divide model\.num_heads=4; tensor-parallel sizes that would: 1, 2, 4",
         "nothing written", lambda c: c.train("parallel.tp=3")),
    Case("gqa-kv-heads-vs-tp", "GQA with 2 KV heads on tp=4", 2,
         r"parallel\.tp: 4 does not divide model\.num_kv_heads=2; tensor-parallel sizes that would: 1, 2",
         "nothing written", lambda c: c.train("model.num_kv_heads=2", "parallel.tp=4")),
    Case("world-not-multiple", "3 ranks for tp=2 (WORLD_SIZE=3, one process: none may wait for the others)", 2,
         r"world size 3 is not a multiple of parallel\.tp x parallel\.pp = 2 x 1 = 2; world sizes that work: 2, 4",
         "nothing written", lambda c: c.train("parallel.tp=2", env={"WORLD_SIZE": "3", "RANK": "0"}), nothing_written),
    Case("batch-not-divisible", "--set train.global_batch_size=10 (micro 4)", 2,
         r"train\.global_batch_size: 10 is not a multiple of micro_batch_size x data-parallel size = 4 x 1 = 4",
         "nothing written", lambda c: c.train("train.global_batch_size=10")),
    Case("pp-more-than-layers", "--set parallel.pp=3 on a 2-layer model", 2,
         r"parallel\.pp: 3 stages for model\.num_layers=2; at most one stage per layer", "nothing written",
         lambda c: c.train("parallel.pp=3")),
    Case("pp-with-zero3", "--set parallel.pp=2 zero.stage=3", 2,
         r"zero\.stage: 3 cannot be combined with pipeline parallelism", "nothing written",
         lambda c: c.train("parallel.pp=2", "zero.stage=3")),
    Case("sp-without-tp", "--set parallel.sequence_parallel=true on tp=1", 2,
         r"parallel\.sequence_parallel: true needs parallel\.tp > 1", "nothing written",
         lambda c: c.train("parallel.sequence_parallel=true")),
    Case("ds-config-missing", "zero.ds_config pointing nowhere", 2, r"/nonexistent\.json", "nothing written",
         lambda c: c.train("zero.ds_config=/nonexistent.json")),
    Case("ds-config-not-json", "zero.ds_config that is not JSON", 2, r"ds\.json", "nothing written",
         ds_config("{stage: 3")),
    Case("ds-config-conflict", "zero.ds_config setting ZeRO-3 while zero.stage=1", 2, r"zero_optimization\.stage",
         "nothing written", ds_config(json.dumps({"zero_optimization": {"stage": 3}}))),
    # ------------------------------------------------------------------------- the machine (exit 5)
    Case("fp16-on-cpu", "--set train.precision=fp16 without a GPU", 2, r"'fp16' needs a CUDA GPU",
         "nothing written", lambda c: c.train("train.precision=fp16")),
    Case("triton-without-gpu", "kernels.backend=triton on a CPU machine, 2 ranks", 5,
         r"kernels\.backend: 'triton' cannot run on device 'cpu'", "refused before any process group (none started)",
         # TRITON_INTERPRET=0: the kernel tests set it to 1 for the whole session, which would let Triton run here
         lambda c: c.train("kernels.backend=triton", nproc=2, env={"TRITON_INTERPRET": "0"}), nothing_written),
    Case("apex-missing", "kernels.backend=apex where apex is not installed", 5, r"kernels\.backend: 'apex' cannot run",
         "refused before any process group", lambda c: c.train("kernels.backend=apex"), nothing_written),
    Case("disk-too-small", "run.dir on a 1 MiB filesystem", 5,
         r"run\.dir .*: 0\.00 GiB free on its filesystem, a checkpoint of this model needs about 0\.00 GiB",
         "refused before training", disk_too_small),
    Case("master-addr-unresolvable", "MASTER_ADDR=no-such-host.invalid (torch would retry for 30 minutes)", 5,
         r"MASTER_ADDR='no-such-host\.invalid' does not resolve", "refused before any process group",
         rendezvous(**NO_HOST, MASTER_PORT=lambda c: str(free_port())), nothing_written),
    Case("master-port-in-use", "MASTER_PORT of a port another process listens on", 5,
         r"MASTER_PORT=\d+ is in use on this node", "refused before any process group",
         rendezvous(MASTER_PORT=lambda c: str(listening_port(c))), nothing_written),
    Case("master-port-garbage", "MASTER_PORT=http", 5, r"MASTER_PORT='http' is not a port number",
         "refused before any process group", rendezvous(MASTER_PORT="http"), nothing_written),
    # -------------------------------------------------------------------------------------- the data
    Case("data-dir-missing", "data.dir pointing nowhere", 2, r"tokenizer '/nonexistent/tokenizer\.model' does not",
         "nothing written", lambda c: c.train("data.dir=/nonexistent"), nothing_written),
    Case("tokenizer-corrupt", "data.tokenizer that is not a sentencepiece model", 2,
         r"tok\.model' is not a sentencepiece model", "nothing written",
         lambda c: c.train(f"data.tokenizer={c.write('tok.model', b'not a model' * 100)}")),
    Case("idx-truncated", ".idx cut to 20 bytes", 2, r"train\.idx is not a Megatron index \(no MMIDIDX header; trunc",
         "nothing written", damaged_data(lambda d: truncate(d / "train.idx", 20))),
    Case("idx-garbage", ".idx overwritten with other bytes", 2, r"valid\.idx is not a Megatron index \(no MMIDIDX",
         "nothing written", damaged_data(lambda d: (d / "valid.idx").write_bytes(os.urandom(4096)))),
    Case("bin-truncated", ".bin cut in half", 2,
         r"train\.bin has [\d,]+ bytes, its index describes [\d,]+: the \.bin is truncated", "nothing written",
         damaged_data(lambda d: truncate(d / "train.bin"))),
    Case("bin-missing", ".bin deleted", 2, r"missing .*train\.bin; prepare data", "nothing written",
         damaged_data(lambda d: (d / "train.bin").unlink())),
    Case("empty-corpus", "a training prefix with no documents", 2, r"empty\.bin is empty \(no tokens",
         "nothing written", empty_corpus),
    Case("prepare-empty-corpus", "`pretrain.data prepare` of an empty text file", 2, r"no training documents",
         "no dataset directory that looks prepared", prepare_empty, absent("prepared/manifest.json")),
    Case("prepare-vocab-too-small", "`pretrain.data prepare --vocab-size 300` of a corpus of 400 characters", 2,
         r"--vocab-size 300: this corpus needs a vocabulary of at least \d+ tokens .*; use --vocab-size \d+ or more",
         "no dataset directory that looks prepared", prepare_vocab_too_small, absent("prepared/manifest.json")),
    Case("tokenizer-of-other-data", "data.tokenizer other than the one the data was prepared with", 2,
         r"was tokenized with a tokenizer of sha256 .* but this run's tokenizer", "nothing written",
         lambda c: c.train(f"data.tokenizer={changed_tokenizer(c)}"), nothing_written),
    Case("ids-outside-vocabulary", "a .bin holding token ids of a larger vocabulary (no manifest)", 2,
         r"holds token id 4000, outside data\.tokenizer's vocabulary of 2048", "nothing written",
         ids_outside_vocabulary, nothing_written),
    Case("blend-weight-nan", "data.train=['nan PREFIX'] (NaN into the sampler)", 2,
         r"data\.train: the weight nan of '.*train' is not a finite positive number", "nothing written",
         blend("nan")),
    Case("blend-weight-inf", "data.train=['inf PREFIX']", 2, r"the weight inf of .* is not a finite positive number",
         "nothing written", blend("inf")),
    Case("nonfinite-loss-stop", "a NaN loss at step 3 with train.bad_step_policy=stop", 4,
         r"step 3: the loss or a gradient is not finite \(train\.bad_step_policy=stop\)",
         "the checkpoint of step 2 verifies and loads",
         lambda c: c.train("train.inject_nonfinite_at=[3]", "train.bad_step_policy=stop"), after_stop),
    # ------------------------------------------------------------------------------ the checkpoints
    Case("resume-must-nothing", "--resume must on an empty run directory", 3, r"--resume must: no complete checkpoint",
         "no checkpoint written", lambda c: c.train(resume="must")),
    Case("resume-path-missing", "--resume /nonexistent", 3, r"--resume /nonexistent: no such checkpoint directory",
         "no checkpoint written", lambda c: c.train(resume="/nonexistent")),
    Case("other-model", "--resume auto with model.num_layers=3 (checkpoint: 2), 2 ranks", 3,
         r"the checkpoint's model differs from the config: model\.num_layers: checkpoint 2, now 3",
         "both checkpoints verify and load", on_trained("model.num_layers=3", nproc=2), checkpoints_intact),
    Case("other-placement", "--resume auto with model.placement=pre (checkpoint: peri)", 3,
         r"model\.placement: checkpoint 'peri', now 'pre'", "both checkpoints verify and load",
         on_trained("model.placement=pre"), checkpoints_intact),
    Case("truncated-checkpoint", "--resume PATH of a checkpoint whose optimizer file was truncated", 3,
         r"step_000004: file .*optim_states\.pt has \d+ bytes, the manifest says \d+ \(truncated\?\)",
         "step 2 verifies and loads; step 4 is left for inspection",
         on_trained(resume="ckpt4", damage=truncate_optim), newest_intact),
    Case("truncated-checkpoint-auto", "--resume auto while the newest checkpoint is truncated", 0,
         r"skipping damaged checkpoint: .*step_000004: file .* \(truncated\?\); trying the previous one",
         "resumed from step 2", on_trained(damage=truncate_optim), resumed_from(2)),
    Case("manifest-lies-sha256", "a manifest whose sha256 for the model file is wrong", 3,
         r"file mp_rank_00_model_states\.pt does not match its sha256 in the manifest \(corrupt\)",
         "step 2 verifies and loads", on_trained(resume="ckpt4", damage=lambda c: manifest_edit(
             c, 4, lambda f: f["mp_rank_00_model_states.pt"].update(sha256="0" * 64))), newest_intact),
    Case("manifest-lies-size", "a manifest that gives the RNG file another size", 3,
         r"file rng_rank00000\.pt has \d+ bytes, the manifest says 7 \(truncated\?\)", "step 2 verifies and loads",
         on_trained(resume="ckpt4", damage=lambda c: manifest_edit(c, 4, lambda f: f["rng_rank00000.pt"].update(
             size=7))), newest_intact),
    Case("manifest-lists-missing-file", "a manifest listing a file that is not there", 3,
         r"file extra\.pt listed in the manifest is missing", "step 2 verifies and loads",
         on_trained(resume="ckpt4", damage=lambda c: manifest_edit(c, 4, lambda f: f.update(
             {"extra.pt": {"size": 1, "sha256": "0"}}))), newest_intact),
    Case("manifest-garbage", "manifest.json that is not JSON", 3, r"manifest\.json: unreadable manifest",
         "step 2 verifies and loads",
         on_trained(resume="ckpt4", damage=lambda c: (c.ckpt(4) / "manifest.json").write_text("{")), newest_intact),
    Case("manifest-missing", "--resume PATH of a checkpoint without manifest (a save that died)", 3,
         r"step_000004: no manifest\.json; the checkpoint is partial", "step 2 verifies and loads",
         on_trained(resume="ckpt4", damage=lambda c: (c.ckpt(4) / "manifest.json").unlink()), newest_intact),
    Case("meta-forged", "meta.json without config (and a manifest forged to match)", 3,
         r"meta\.json: no valid config, world_size, zero_stage; not a checkpoint of this stack",
         "step 2 verifies and loads", on_trained(resume="ckpt4", damage=forge_meta), newest_intact),
    Case("tampered-pickle", "a checkpoint file carrying a pickle that runs a command (manifest forged to match)", 3,
         r"rng_rank00000\.pt would import (posix|os)\.system when loaded", "the command never ran; step 2 verifies",
         lambda c: (c.trained_run(), tampered_pickle(c))[1],
         lambda c, o: (absent("pwned")(c, o), newest_intact(c, o))),
    Case("verify-none-truncated", "checkpoint.verify=none and a truncated optimizer file", 3,
         r"optim_states\.pt: not a readable torch checkpoint file \(RuntimeError: .*\); truncated or damaged",
         "step 2 verifies and loads", on_trained("checkpoint.verify=none", resume="ckpt4", damage=truncate_optim),
         newest_intact),
    Case("tokenizer-changed", "--resume with another tokenizer (data without a manifest)", 3,
         r"the checkpoint was trained with a tokenizer of sha256 \w+…, but data\.tokenizer .* has sha256 .*"
         r"checkpoint\.allow_tokenizer_change=true", "both checkpoints verify and load",
         tokenizer_changed(), checkpoints_intact),
    Case("tokenizer-change-allowed", "the same with checkpoint.allow_tokenizer_change=true", 0,
         r"warning: the checkpoint was trained with a tokenizer of sha256 .*resuming anyway",
         "resumed from step 4", tokenizer_changed("checkpoint.allow_tokenizer_change=true", "train.max_steps=5"),
         resumed_from(4)),
    Case("schema-unknown-key", "resume a checkpoint whose config has a key this version dropped (train.*)", 0,
         r"the checkpoint's config has keys this version does not know \(ignored\): train\.retired_knob",
         "resumed from step 4", schema_unknown_key("train"), resumed_from(4)),
    Case("schema-unknown-model-key", "the same for a model key (the model may have changed)", 3,
         r"the checkpoint's model has settings this version of the code does not know: model\.retired_knob",
         "both checkpoints verify and load", schema_unknown_key("model"), checkpoints_intact),
    Case("eval-schema-changed", "`pretrain.eval` of a checkpoint written by a version with other keys", 0,
         r"the saved config has keys this version does not know \(dropped\): train\.retired_knob, gone",
         "evaluated; the checkpoint verifies", eval_schema_changed, checkpoints_intact),
    Case("init-from-missing", "checkpoint.init_from pointing nowhere", 3,
         r"checkpoint\.init_from: '/nonexistent/model\.pt' is neither a checkpoint directory nor a file",
         "no checkpoint written", lambda c: c.train("checkpoint.init_from=/nonexistent/model.pt")),
    Case("init-from-other-tokenizer", "checkpoint.init_from of a checkpoint trained with another tokenizer", 2,
         r"checkpoint\.init_from .*step_000004 was trained with the tokenizer recorded in .*meta\.json "
         r"\(sha256 \w+…\), but this run's tokenizer .* has sha256",
         "nothing written; the source checkpoint verifies and loads", init_from_other_tokenizer,
         nothing_new_and_intact),
    Case("init-from-other-shape", "checkpoint.init_from of a model of another width", 3,
         r"checkpoint\.init_from: .* does not fit the model: mismatched", "the source checkpoint verifies",
         init_from_other_shape, checkpoints_intact),
    # --------------------------------------------------------------------------- the run directory
    Case("fresh-over-checkpoints", "a fresh start (no --resume) in a directory holding checkpoints", 2,
         r"holds checkpoints of an earlier run \(step_000002, step_000004\); continue it with --resume auto",
         "both checkpoints verify and load", on_trained(resume=None), checkpoints_intact),
    Case("locked-by-another-job", "a run on a directory another job holds", 2,
         r"is in use by another job \(pid \d+ on .*, since .*\); wait for it", "both checkpoints verify and load",
         locked_by_another_job, checkpoints_intact),
    Case("read-only-run-dir", "--resume auto on a read-only run directory", 2,
         r"run\.dir .*: cannot write there \((Read-only file system|Permission denied)", "nothing changed",
         read_only_run),
    Case("run-dir-is-a-file", "run.dir below a file", 2, r"cannot write there \(Not a directory",
         "the file is untouched", lambda c: c.train(f"run.dir={c.write('afile', 'keep')}/run"), same_file),
    # --------------------------------------------------------------------- a full disk, signals in a save
    Case("disk-full-during-save", "the disk fills up while checkpoint 4 is written (6 MiB tmpfs)", 3,
         r"saving checkpoint step_000004 failed: rank 0: no space left on the device .* the previous checkpoints "
         r"\(step_000002\) are untouched", "step 2 verifies and loads; nothing partial left",
         disk_full_during_save, after_disk_full),
    Case("disk-full-one-rank", "rank 1's write fails (disk full) while checkpoint 4 is written, 2 ranks", 3,
         r"saving checkpoint step_000004 failed: rank 1: no space left on the device", "step 2 verifies; no rank hangs",
         one_rank_save_fails, after_one_rank_failed),
    *[
        Case(f"sigkill-{phase}", f"SIGKILL during a save: {phase}", -9, None,
             "step 4 verifies and loads; --resume auto continues from the newest complete one",
             save_fault(phase, "kill"), after_kill(phase))
        for phase in ("ds-write", "rng", "hash", "manifest", "latest", "retention")
    ],
    *[
        Case(f"sigterm-{phase}", f"SIGTERM during a save: {phase}", 0,
             r"\[preempt\] SIGTERM: saved step 7 and exiting 0", "steps 4, 6, 7 verify; latest is step 7",
             save_fault(phase, "term"), after_term)
        for phase in ("ds-write", "rng", "hash", "manifest", "latest", "retention")
    ],
    # ------------------------------------------------------------------------------ launching
    Case("slurm-partition-newline", "launch.slurm render --partition 'gpu<newline>rm -rf ~'", 2,
         r"--partition: 'gpu\\nrm -rf ~' is not a SLURM name", "no script printed",
         lambda c: slurm_render("--partition", "gpu\nrm -rf ~")),
    Case("slurm-sbatch-newline", "launch.slurm render --sbatch '--qos=x<newline>echo pwned'", 2,
         r"--sbatch: '--qos=x\\necho pwned' holds a newline", "no script printed",
         lambda c: slurm_render("--sbatch=--qos=x\necho pwned")),
    Case("slurm-nodelist-metachar", "SLURM host list 'node[1-2],$(reboot)'", 2, r"bad host name '\$\(reboot\)'",
         "no host printed", slurm("nodes", "node[1-2],$(reboot)")),
    Case("slurm-env-nodelist-newline", "SLURM_JOB_NODELIST with a newline, `launch.slurm env`", 2,
         r"bad host name 'node1\\nnode2'", "no exports printed",
         slurm("env", env={"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "node1\nnode2"})),
    Case("hostfile-metachar", "hostfile line `node1;reboot slots=8`", 2, r"hosts:1: 'node1;reboot' is not a host name",
         "refused before any launch", hostfile("node1;reboot slots=8\n")),
    Case("hostfile-unresolvable", "hostfile naming a host that does not resolve", 2,
         r"hosts:2: 'no-such-host\.invalid' does not resolve", "refused before any launch",
         hostfile("localhost slots=1\nno-such-host.invalid slots=1\n")),
]
# fmt: on
# The default suite runs one case of each kind (~3 minutes on 2 CPU cores: every case starts fresh
# processes, and the ones that load or train a checkpoint take 10-20 s apiece); `-m slow` runs them all.
DEFAULT = {
    # the config
    *("yaml-truncated", "misspelt-key", "wrong-type-int", "nan-learning-rate", "unknown-placement"),
    # impossible layouts; the machine, before any process group
    *("gqa-kv-heads-vs-tp", "world-not-multiple", "triton-without-gpu", "master-port-in-use"),
    # the data
    *("idx-truncated", "bin-truncated", "tokenizer-of-other-data", "prepare-vocab-too-small"),
    # checkpoints
    *("truncated-checkpoint", "tampered-pickle", "tokenizer-changed", "init-from-other-tokenizer"),
    # the run directory; a save that fails or dies; launching
    *("locked-by-another-job", "read-only-run-dir", "disk-full-during-save", "sigkill-hash"),
    *("slurm-partition-newline", "hostfile-metachar"),
}
CASES = [dataclasses.replace(c, slow=c.id not in DEFAULT) for c in CASES]


# ------------------------------------------------------------------------------------ running


def run_ranks(inv: Invocation, cwd: Path, timeout: float = 600, grace: float = 30) -> Outcome:
    """Starts inv.nproc processes as the DeepSpeed launcher and srun do (one per rank, each told its
    RANK, WORLD_SIZE and the rendezvous), waits, and -- as those launchers do -- stops the others
    once one has failed and `grace` seconds have passed."""
    args = with_faults(inv.args) if inv.faults else inv.args
    env = _env({**inv.env, **(faults_env(*inv.faults) if inv.faults else {})})
    procs, logs = [], []
    port = str(free_port())
    for rank in range(inv.nproc):
        rank_env = dict(env)
        if inv.nproc > 1:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(inv.nproc),
                            LOCAL_WORLD_SIZE=str(inv.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        log = open(cwd / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable] + args, cwd=ROOT, env=rank_env, stdout=log,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    start, failed_at = time.monotonic(), None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if now - start > timeout or (failed_at is not None and now - failed_at > grace):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return Outcome([p.returncode for p in procs], outputs)


ERROR_LINE = re.compile(r"^(\[rank \d+\] )?error: (.*)$", re.M)


def check_outcome(case: Case, outcome: Outcome) -> None:
    shown = "\n---\n".join(o[-3000:] for o in outcome.outputs)
    for rank, out in enumerate(outcome.outputs):
        assert "Traceback" not in out, f"rank {rank} printed a traceback:\n{out[-4000:]}"
    errors = [m.group(2) for out in outcome.outputs for m in ERROR_LINE.finditer(out)]
    if case.exit in (0, -9):
        assert not errors, errors
        if case.message:
            assert re.search(case.message, outcome.text), f"no line matches {case.message!r}:\n{shown}"
    else:
        assert len(errors) == 1, f"{len(errors)} error lines (expected one):\n{shown}"
        assert re.search(case.message, errors[0]), f"{errors[0]!r} does not match {case.message!r}"
    # every rank exits with the code; a rank left waiting for a failed peer is stopped by the launcher
    stopped = [rc == -9 and case.exit != -9 for rc in outcome.codes]
    assert all(rc == case.exit or s for rc, s in zip(outcome.codes, stopped)), (outcome.codes, shown)
    assert not all(stopped), (outcome.codes, shown)


@pytest.fixture(scope="module")
def trained(bundled_dir, tmp_path_factory) -> Path:
    """The run every checkpoint case starts from: 4 steps of configs/tiny.yaml on one process,
    checkpoints step_000002 and step_000004."""
    run_dir = tmp_path_factory.mktemp("bad-input") / "trained"
    check(run_module(tiny_args(bundled_dir, run_dir, *BASE)))
    return run_dir


def _marks(case: Case) -> list:
    marks = [pytest.mark.slow] if case.slow else []
    if case.needs:
        marks.append(pytest.mark.xfail(reason=f"needs: {case.needs}", strict=True))
    return marks


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_bad_input(case: Case, bundled_dir, trained, tmp_path):
    ctx = Ctx(tmp_path, bundled_dir, trained)
    try:
        inv = case.setup(ctx)
        outcome = run_ranks(inv, tmp_path)
        check_outcome(case, outcome)
        if case.after is not None:
            case.after(ctx, outcome)
        elif case.guarantee in GENERIC:
            GENERIC[case.guarantee](ctx, outcome)
    finally:
        for cleanup in reversed(ctx.cleanups):
            cleanup()


def test_the_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert DEFAULT <= {c.id for c in CASES}  # a renamed case must not drop out of the default suite


# ----------------------------------------------------------------------------------- Markdown


def markdown() -> str:
    """The table for the README (generated from CASES, so the two cannot drift)."""
    rows = [
        "| # | what the user does | exit | the one line says (regex) | checked afterwards | suite |",
        "|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(CASES, 1):
        message = "—" if c.message is None else "`" + c.message.replace("|", "\\|").replace("`", "'") + "`"
        exit_code = "killed (-9)" if c.exit == -9 else str(c.exit)
        rows.append(
            f"| {i} | {c.does.replace('|', '/')} | {exit_code} | {message} | {c.guarantee} | "
            f"{'slow' if c.slow else 'default'}{' (needs a fix: ' + c.needs + ')' if c.needs else ''} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        raise SystemExit("usage: python -m tests.test_bad_input --markdown")
    print(markdown())
