"""The LR search: Wortsman et al.'s LR sensitivity against a hand computation, the choice of the best
learning rate, and how a sweep with `lr_search` / `lr_from` expands into cells (search points first,
study cells once their group's search is evaluated)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pretrain.config import ConfigError
from pretrain.scaling.cell_files import EVAL_FILE, EVAL_VERSION
from pretrain.scaling.lrsearch import capped, choose, lr_sensitivity
from pretrain.scaling.spec import load_sweep

ROOT = Path(__file__).resolve().parent.parent


def test_lr_sensitivity_matches_a_hand_computation():
    # L0 = 7.0; the grid's losses: two finite below L0, the best 4.0, one diverged, one NaN, one above L0.
    losses = [5.0, 4.2, 4.0, None, float("nan"), 7.5]
    # By hand: min(L, L0) = 5.0, 4.2, 4.0, 7.0, 7.0, 7.0; minus the best finite 4.0 = 1.0, 0.2, 0.0, 3, 3, 3
    assert lr_sensitivity(losses, 7.0) == pytest.approx((1.0 + 0.2 + 0.0 + 3 + 3 + 3) / 6)
    # a run flagged diverged counts as L0 whatever loss it reported
    assert lr_sensitivity([5.0, 4.0], 7.0, diverged=[True, False]) == pytest.approx((3.0 + 0.0) / 2)
    assert lr_sensitivity([4.0, 4.0, 4.0], 7.0) == 0.0
    assert math.isnan(lr_sensitivity([None, None], 7.0))
    assert capped(9.0, 7.0) == 7.0 and capped(3.0, 7.0) == 3.0 and capped(3.0, 7.0, diverged=True) == 7.0


def ev(valid=None, init=7.0, diverged=False):
    out = {"version": EVAL_VERSION, "init": {"loss": init}, "diverged": diverged}
    if valid is not None:
        out["valid"] = {"loss": valid}
    return out


def test_best_lr_is_the_lowest_mean_capped_loss_and_waits_for_every_cell():
    key = (("placement", "pre"),)
    runs = [
        (1e-3, ev(5.0)),
        (1e-3, ev(5.2)),
        (1e-2, ev(4.9)),
        (1e-2, ev(None, diverged=True)),
        (3e-2, ev(6.0)),
        (3e-2, ev(5.9)),
    ]
    (choice,) = choose({key: runs}).values()
    # means of min(L, L0): 1e-3: 5.1; 1e-2: (4.9 + 7.0) / 2 = 5.95 (one seed diverged); 3e-2: 5.95
    assert [round(r["mean_capped_loss"], 6) for r in choice.table] == [5.1, 5.95, 5.95]
    assert choice.lr == 1e-3 and choice.at_edge and choice.table[1]["diverged"] == 1
    pending = choose({key: runs[:-1] + [(3e-2, None)]})[key]
    assert pending.lr is None and pending.why_pending == "5 of 6 LR-search cells evaluated"
    middle = choose({key: [(1e-3, ev(5.0)), (1e-2, ev(4.0)), (1e-1, ev(6.0))]})[key]
    assert middle.lr == 1e-2 and not middle.at_edge


def write_sweep(tmp_path: Path, extra: str, name: str = "search", placements=("pre", "post")) -> Path:
    path = tmp_path / f"{name}.yaml"
    lines = "\n".join(
        f"    {p}: {{model.placement: {p}, warmup_fraction: {0.1 if p != 'post' else 0.3}}}" for p in placements
    )
    path.write_text(f"""name: {name}
base: {ROOT / "configs" / "tiny.yaml"}
out: {tmp_path / name}
set: {{model.vocab_size: 512, train.max_steps: 20}}
axes:
  size:
    a: {{model.num_layers: 2}}
    b: {{model.num_layers: 3}}
  placement:
{lines}
  run.seed: [1, 2]
{extra}
""")
    return path


SEARCH = """lr_search:
  values: [1.0e-3, 1.0e-2, 1.0e-1]
  at: {size: [a], run.seed: [1]}
  per: [placement]"""


def evaluate_fake(sweep, cell_name: str, valid: float) -> None:
    d = sweep.out / cell_name / "eval"
    d.mkdir(parents=True, exist_ok=True)
    (d / EVAL_FILE).write_text(json.dumps(ev(valid)))


def test_a_search_expands_first_and_study_cells_follow_their_groups_best_lr(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, SEARCH))
    names = [c.name for c in sweep.cells]
    # 3 learning rates x 2 placements at size a, seed 1; every study cell waits
    assert names == [f"size-a_placement-{p}_seed-1_lr-{lr}" for p in ("pre", "post") for lr in ("0.001", "0.01", "0.1")]
    assert all(c.search and not c.study for c in sweep.cells)
    assert sweep.waiting == {(("placement", "pre"),): 4, (("placement", "post"),): 4}
    cell = sweep.cell("size-a_placement-post_seed-1_lr-0.01")
    assert cell.config.train.lr == 0.01 and cell.config.train.warmup_steps == 6  # post's own warmup: 0.3 x 20
    # pre's search is evaluated: 0.01 is best; post's is not
    for lr, loss in (("0.001", 5.0), ("0.01", 4.5), ("0.1", 6.0)):
        evaluate_fake(sweep, f"size-a_placement-pre_seed-1_lr-{lr}", loss)
    sweep = load_sweep(sweep.path)
    study = [c for c in sweep.cells if c.study]
    assert sorted(c.name for c in study) == sorted(
        f"size-{s}_placement-pre_seed-{seed}_lr-0.01" for s in ("a", "b") for seed in (1, 2)
    )
    reused = sweep.cell("size-a_placement-pre_seed-1_lr-0.01")
    assert reused.search and reused.study  # the searched cell at the best rate is a study cell, trained once
    assert all(c.config.train.lr == 0.01 and c.config.train.warmup_steps == 2 for c in study)
    assert sweep.waiting == {(("placement", "post"),): 4}
    assert sweep.lr_choices[(("placement", "pre"),)].lr == 0.01


def test_lr_from_takes_another_sweeps_choice(tmp_path):
    study = load_sweep(write_sweep(tmp_path, SEARCH, name="study"))
    for p, best in (("pre", "0.01"), ("post", "0.001")):
        for lr in ("0.001", "0.01", "0.1"):
            evaluate_fake(study, f"size-a_placement-{p}_seed-1_lr-{lr}", 4.0 if lr == best else 5.0)
    depth = load_sweep(write_sweep(tmp_path, "lr_from: {sweep: study.yaml}", name="depth"))
    assert {c.name.split("_lr-")[1] for c in depth.cells if "placement-pre" in c.name} == {"0.01"}
    assert {c.config.train.lr for c in depth.cells if "placement-post" in c.name} == {0.001}
    assert len(depth.cells) == 8 and all(c.study and not c.search for c in depth.cells)
    # the same choice read from the study's cells moved elsewhere (an archive), named by lr_from.out
    archive = tmp_path / "archive"
    study.out.rename(archive)
    unread = load_sweep(write_sweep(tmp_path, "lr_from: {sweep: study.yaml}", name="depth"))
    assert unread.cells == [] and sum(unread.waiting.values()) == 8  # the study's own out is empty now
    moved = load_sweep(write_sweep(tmp_path, f"lr_from: {{sweep: study.yaml, out: {archive}}}", name="depth"))
    assert sorted(c.name for c in moved.cells) == sorted(c.name for c in depth.cells)
    with pytest.raises(ConfigError, match=r"lr_from.out: '.*nowhere' is not a directory"):
        load_sweep(write_sweep(tmp_path, f"lr_from: {{sweep: study.yaml, out: {tmp_path / 'nowhere'}}}", name="d"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            SEARCH.replace("per:", "pre:"),
            r"lr_search.pre: unknown key; did you mean 'per'\? \(known: values, at, per\)",
        ),
        (SEARCH.replace("size: [a]", "size: [z]"), r"lr_search.at.size: 'z' is not a value of the axis; values: a, b"),
        (SEARCH.replace("[1.0e-3, 1.0e-2, 1.0e-1]", "[1.0e-3]"), r"lr_search.values: expected a list of at least 2"),
        (SEARCH.replace("size: [a]", "placement: [pre]"), r"no cell of placement=post is searched"),
        (SEARCH + "\nlr_from: {sweep: x.yaml}", r"either its own lr_search or lr_from"),
    ],
)
def test_search_definition_errors_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, extra))


def test_lr_set_elsewhere_conflicts_with_the_search(tmp_path):
    path = write_sweep(tmp_path, SEARCH)
    path.write_text(path.read_text().replace("train.max_steps: 20}", "train.max_steps: 20, train.lr: 0.003}"))
    with pytest.raises(ConfigError, match=r"train.lr is chosen by lr_search; remove it"):
        load_sweep(path)


def test_tokens_per_parameter_sets_the_budget_from_n(tmp_path):
    path = write_sweep(tmp_path, "", placements=("pre",))
    path.write_text(path.read_text().replace("train.max_steps: 20}", "tokens_per_parameter: 20}"))
    sweep = load_sweep(path)
    d, ffn = 64, 192  # tiny.yaml's width; SwiGLU's 8/3 d rounded up to a multiple of 64
    for layers, size in ((2, "a"), (3, "b")):
        cell = sweep.cell(f"size-{size}_placement-pre_seed-1")
        # N by hand: per block q, k, v, o (4 d^2), the SwiGLU MLP (3 d ffn) and two RMSNorm gains; a final norm
        n = layers * (4 * d * d + 3 * d * ffn + 2 * d) + d
        tokens_per_step = 8 * 64  # tiny.yaml: global batch 8 x seq 64
        assert cell.max_steps == math.ceil(20 * n / tokens_per_step)
        assert cell.tokens >= 20 * n
