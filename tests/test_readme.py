"""The README as a test: its runnable command blocks, in order, in a fresh copy of the repository.

A block is runnable when the line before its ```bash fence is an HTML comment
    <!-- runnable -->            must exit 0
    <!-- runnable: exit=2 -->    must exit 2 (a documented refusal)
    <!-- runnable: writes=PATH PATH ... -->   and these files must exist afterwards
Each block runs in its own `bash -e` with .venv activated (the README says commands assume it), in a
copy of the checkout's files (what git tracks or would track: no runs/, data/, exports/), with the
checkout's .venv linked in. 137 s on 2 quiet cores (in -m slow); a README change that breaks a command fails it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, _env

MARKER = re.compile(r"^<!-- runnable(?::\s*(?P<opts>.*?))?\s*-->\s*$")


@dataclass
class Block:
    line: int
    code: str
    exit: int = 0
    writes: tuple[str, ...] = ()


def runnable_blocks(text: str) -> list[Block]:
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if not m:
            continue
        assert i + 1 < len(lines) and lines[i + 1].startswith("```bash"), (
            f"README line {i + 1}: marker without a bash block"
        )
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        block = Block(line=i + 1, code="\n".join(lines[i + 2 : end]))
        for opt in (m.group("opts") or "").split():
            key, _, value = opt.partition("=")
            if key == "exit":
                block.exit = int(value)
            elif key == "writes":
                block.writes = tuple(value.split(","))
            else:  # a path continuing writes=
                assert block.writes, f"README line {i + 1}: unknown marker option {opt!r}"
                block.writes += (opt,)
        blocks.append(block)
    return blocks


def test_markers_are_parsed():
    text = "<!-- runnable: exit=2 writes=a b -->\n```bash\necho hi\n```\n<!-- runnable -->\n```bash\ntrue\n```\n"
    blocks = runnable_blocks(text)
    assert [(b.exit, b.writes, b.code) for b in blocks] == [(2, ("a", "b"), "echo hi"), (0, (), "true")]


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    os.symlink(ROOT / ".venv", dest / ".venv")
    return dest


@pytest.mark.slow  # 137 s on 2 quiet cores: run it with -m slow, and whenever the README changes
@pytest.mark.distributed
def test_the_readme_commands_run_as_documented(tmp_path):
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 10
    repo = fresh_copy(tmp_path / "repo")
    env = _env()
    env.pop("PYTHONPATH")  # the README's commands must work from the activated environment alone
    for block in blocks:
        script = "set -eo pipefail\nsource .venv/bin/activate\n" + block.code
        proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        where = f"README line {block.line}:\n{block.code}\n--- exit {proc.returncode}, output:\n"
        assert proc.returncode == block.exit, where + (proc.stdout + proc.stderr)[-4000:]
        if block.exit:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in proc.stderr, where + proc.stderr[-3000:]
        missing = [p for p in block.writes if not (repo / p).exists()]
        assert not missing, where + f"the README says it writes {missing}, which do not exist"
