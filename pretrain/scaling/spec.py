"""A sweep definition (configs/sweeps/*.yaml): a base run config, a grid of axes, and the
resources the cells may use. Parsed and validated once; every cell's config is then built and
validated by pretrain.config before anything runs, so a typo fails the whole sweep up front.

    name: placement-scaling
    base: ../quickstart.yaml          # run config every cell starts from (relative to this file)
    out: runs/sweeps/placement-scaling
    set:                              # overrides common to every cell
      model.seq_len: 256
      warmup_fraction: 0.1            # pseudo-key: train.warmup_steps as a fraction of the steps
    axes:                             # the grid: the cartesian product, first axis outermost
      size:                           # a named axis: value name -> overrides
        xs: {model.hidden_size: 64, model.num_layers: 5, model.num_heads: 2}
        s:  {model.hidden_size: 96, model.num_layers: 6, model.num_heads: 3}
      model.placement: [pre, peri]    # a config key: a list of values
      run.seed: [1234]
      tokens: [1.2e6]                 # pseudo-key: token budget -> train.max_steps
    resources: {cpus: 2, gpus: 0, nproc_per_cell: 1, threads_per_proc: 1}
    checkpoints_per_cell: 4           # checkpoint.every = max_steps / this (what an interruption loses)
    hold_out: {size: s}               # cells the fit leaves out and predicts (pretrain.scaling fit)

Pseudo-keys (anywhere an override goes): `tokens` (training tokens; max_steps = tokens /
(global_batch_size * seq_len), rounded up), `tokens_per_parameter` (tokens = this x the model's
non-embedding parameters, e.g. 20) and `warmup_fraction`. A named axis may carry any overrides, so a
per-placement recipe is one axis: `placement: {post: {model.placement: post, warmup_fraction: 0.2}}`.

Learning rates: `lr_search` trains `train.lr` on a grid at part of the grid, then every cell at its
group's best learning rate; `lr_from` takes another sweep's best learning rates (see
pretrain/scaling/lrsearch.py). `kind: depth` marks a sweep whose size axis varies depth at fixed
width (the report shows depth, not scaling-law fits).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import (
    Config,
    ConfigError,
    _build,
    _did_you_mean,
    apply_override,
    load_config,
    read_yaml,
    read_yaml_mapping,
)
from pretrain.scaling.lrsearch import LrFrom, LrSearch

PSEUDO_KEYS = ("tokens", "tokens_per_parameter", "warmup_fraction")
TOP_LEVEL = (
    "name",
    "base",
    "out",
    "set",
    "axes",
    "resources",
    "checkpoints_per_cell",
    "hold_out",
    "order",
    "lr_search",
    "lr_from",
    "kind",
)
KINDS = ("scaling", "depth")
LR_KEY = "train.lr"
RESOURCE_KEYS = ("cpus", "gpus", "nproc_per_cell", "threads_per_proc")
ORDERS = ("grid", "largest-first")
# Short names used in cell names for common axes.
AXIS_LABELS = {
    "model.placement": "placement",
    "run.seed": "seed",
    "train.lr": "lr",
    "tokens": "tokens",
    "model.norm": "norm",
}


@dataclass(frozen=True)
class Resources:
    cpus: int = 2
    gpus: int = 0
    nproc_per_cell: int = 1
    threads_per_proc: int = 1

    def cell_cpus(self) -> int:
        return self.nproc_per_cell * self.threads_per_proc

    def cell_gpus(self) -> int:
        return self.nproc_per_cell if self.gpus else 0


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its name, its labels (axis -> value name) and its config overrides."""

    name: str
    labels: dict
    overrides: tuple  # ("section.key=value", ...), applied on top of the base config
    config: Config = field(compare=False, repr=False)
    study: bool = True  # a cell of the study proper (fits, tables); False: only an LR-search point
    search: bool = False  # a point of the sweep's LR search

    @property
    def max_steps(self) -> int:
        return self.config.train.max_steps

    @property
    def tokens(self) -> int:
        return self.max_steps * self.config.train.global_batch_size * self.config.model.seq_len


@dataclass
class Sweep:
    name: str
    path: Path
    base: Path
    out: Path
    common: dict
    axes: dict  # axis name -> {value name: overrides dict}
    resources: Resources
    checkpoints_per_cell: int
    hold_out: dict
    order: str
    kind: str = "scaling"
    lr_search: LrSearch | None = None
    lr_from: LrFrom | None = None
    cells: list = field(default_factory=list)
    lr_choices: dict = field(default_factory=dict)  # group key -> lrsearch.Choice
    waiting: dict = field(default_factory=dict)  # group key -> cells that wait for that group's best LR

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(name)

    def is_held_out(self, cell: Cell) -> bool:
        return bool(self.hold_out) and all(str(cell.labels.get(k)) == str(v) for k, v in self.hold_out.items())


def _err(path: Path, where: str, msg: str) -> ConfigError:
    return ConfigError(f"sweep '{path}': {where}: {msg}")


def _axis_values(path: Path, axis: str, values: Any) -> dict[str, dict]:
    """{value name: overrides} for one axis."""
    if isinstance(values, dict):  # named values, e.g. sizes
        if not values:
            raise _err(path, f"axes.{axis}", "no values")
        out = {}
        for name, overrides in values.items():
            if not isinstance(overrides, dict):
                raise _err(path, f"axes.{axis}.{name}", f"expected a mapping of overrides, got {overrides!r}")
            out[str(name)] = dict(overrides)
        return out
    if isinstance(values, list):
        if not values:
            raise _err(path, f"axes.{axis}", "no values")
        if "." not in axis and axis not in PSEUDO_KEYS:
            raise _err(
                path,
                f"axes.{axis}",
                "a list axis must be a config key (SECTION.KEY) or one of "
                f"{', '.join(PSEUDO_KEYS)}; named axes take a mapping",
            )
        return {_value_name(v): {axis: v} for v in values}
    raise _err(path, f"axes.{axis}", f"expected a list of values or a mapping of named values, got {values!r}")


def _value_name(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", s)


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """The sweep file at `path`, its cells expanded; `out`: where its cells are, instead of the file's
    `out` (a copy elsewhere, e.g. an archive)."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file")
    for key in data:
        if key not in TOP_LEVEL:
            raise _err(
                path, str(key), f"unknown key{_did_you_mean(str(key), list(TOP_LEVEL))} (known: {', '.join(TOP_LEVEL)})"
            )
    for key in ("base", "axes"):
        if key not in data:
            raise _err(path, key, "missing")
    base = (path.parent / data["base"]).resolve()
    if not base.is_file():
        raise _err(path, "base", f"'{data['base']}' (resolved to {base}) does not exist")
    name = str(data.get("name") or path.stem)
    res = data.get("resources") or {}
    if not isinstance(res, dict):
        raise _err(path, "resources", f"expected a mapping, got {res!r}")
    for key, value in res.items():
        if key not in RESOURCE_KEYS:
            raise _err(
                path,
                f"resources.{key}",
                f"unknown key{_did_you_mean(str(key), list(RESOURCE_KEYS))} (known: {', '.join(RESOURCE_KEYS)})",
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "gpus" else 1):
            raise _err(
                path,
                f"resources.{key}",
                f"expected a {'non-negative' if key == 'gpus' else 'positive'} integer, got {value!r}",
            )
    resources = Resources(**res)
    if resources.gpus and resources.nproc_per_cell > resources.gpus:
        raise _err(
            path,
            "resources.nproc_per_cell",
            f"{resources.nproc_per_cell} processes per cell but only {resources.gpus} GPUs",
        )
    if not resources.gpus and resources.cell_cpus() > resources.cpus:
        raise _err(
            path,
            "resources",
            f"a cell needs nproc_per_cell x threads_per_proc = {resources.cell_cpus()} "
            f"CPUs but cpus is {resources.cpus}",
        )
    axes_raw = data["axes"]
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise _err(path, "axes", "expected a non-empty mapping of axis -> values")
    axes = {str(axis): _axis_values(path, str(axis), values) for axis, values in axes_raw.items()}
    common = data.get("set") or {}
    if not isinstance(common, dict):
        raise _err(path, "set", f"expected a mapping of overrides, got {common!r}")
    order = data.get("order", "grid")
    if order not in ORDERS:
        raise _err(path, "order", f"'{order}' is not allowed; allowed: {', '.join(ORDERS)}")
    cpc = data.get("checkpoints_per_cell", 4)
    if isinstance(cpc, bool) or not isinstance(cpc, int) or cpc < 1:
        raise _err(path, "checkpoints_per_cell", f"expected a positive integer, got {cpc!r}")
    hold_out = data.get("hold_out") or {}
    if not isinstance(hold_out, dict):
        raise _err(path, "hold_out", f"expected a mapping axis -> value name, got {hold_out!r}")
    for axis, value in hold_out.items():
        if axis not in axes:
            raise _err(
                path, f"hold_out.{axis}", f"not an axis{_did_you_mean(str(axis), list(axes))} (axes: {', '.join(axes)})"
            )
        if str(value) not in axes[axis]:
            raise _err(
                path, f"hold_out.{axis}", f"'{value}' is not a value of the axis; values: {', '.join(axes[axis])}"
            )
    out = Path(out or data.get("out") or Path("runs") / "sweeps" / name)
    kind = data.get("kind", "scaling")
    if kind not in KINDS:
        raise _err(path, "kind", f"'{kind}' is not allowed; allowed: {', '.join(KINDS)}")
    if "lr_search" in data and "lr_from" in data:
        raise _err(path, "lr_from", "a sweep has either its own lr_search or lr_from another sweep, not both")
    search = _lr_search(path, data["lr_search"], axes) if "lr_search" in data else None
    lr_from = _lr_from(path, data["lr_from"], axes) if "lr_from" in data else None
    for where, spec in (("lr_search", search), ("lr_from", lr_from)):
        if spec and (LR_KEY in common or any(LR_KEY in o for v in axes.values() for o in v.values())):
            raise _err(path, where, f"{LR_KEY} is chosen by {where}; remove it from `set` and the axes")
    sweep = Sweep(
        name, path, base, out, dict(common), axes, resources, cpc, dict(hold_out), order, kind, search, lr_from
    )
    sweep.cells = expand(sweep)
    return sweep


def _axis_values_list(path: Path, where: str, axes: dict, axis: str, values) -> tuple:
    if axis not in axes:
        raise _err(
            path, f"{where}.{axis}", f"not an axis{_did_you_mean(str(axis), list(axes))} (axes: {', '.join(axes)})"
        )
    values = values if isinstance(values, list) else [values]
    names = tuple(_value_name(v) for v in values)
    for v in names:
        if v not in axes[axis]:
            raise _err(path, f"{where}.{axis}", f"'{v}' is not a value of the axis; values: {', '.join(axes[axis])}")
    return names


def _per(path: Path, where: str, raw, axes: dict) -> tuple:
    per = raw if isinstance(raw, list) else [raw]
    for axis in per:
        if axis not in axes:
            raise _err(
                path,
                f"{where}.per",
                f"'{axis}' is not an axis{_did_you_mean(str(axis), list(axes))} (axes: {', '.join(axes)})",
            )
    return tuple(str(a) for a in per)


def _lr_search(path: Path, raw, axes: dict) -> LrSearch:
    known = ("values", "at", "per")
    if not isinstance(raw, dict):
        raise _err(path, "lr_search", f"expected a mapping with {', '.join(known)}, got {raw!r}")
    for key in raw:
        if key not in known:
            raise _err(
                path,
                f"lr_search.{key}",
                f"unknown key{_did_you_mean(str(key), list(known))} (known: {', '.join(known)})",
            )
    values = raw.get("values")
    if not isinstance(values, list) or len(values) < 2:
        raise _err(path, "lr_search.values", f"expected a list of at least 2 learning rates, got {values!r}")
    floats = []
    for v in values:
        try:
            f = float(v)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            f = -1.0
        if isinstance(v, bool) or not f > 0:
            raise _err(path, "lr_search.values", f"{v!r} is not a positive number")
        floats.append(f)
    if len(set(floats)) != len(floats):
        raise _err(path, "lr_search.values", "a learning rate is listed twice")
    at = raw.get("at") or {}
    if not isinstance(at, dict):
        raise _err(path, "lr_search.at", f"expected a mapping axis -> value names, got {at!r}")
    at = {str(axis): _axis_values_list(path, "lr_search.at", axes, str(axis), v) for axis, v in at.items()}
    per = _per(path, "lr_search", raw.get("per", []), axes)
    return LrSearch(tuple(sorted(floats)), at, per)


def _lr_from(path: Path, raw, axes: dict) -> LrFrom:
    if not isinstance(raw, dict) or "sweep" not in raw or not set(raw) <= {"sweep", "out"}:
        raise _err(path, "lr_from", f"expected {{sweep: OTHER.yaml}} or {{sweep: OTHER.yaml, out: DIR}}, got {raw!r}")
    other = (path.parent / str(raw["sweep"])).resolve()
    if not other.is_file():
        raise _err(path, "lr_from.sweep", f"'{raw['sweep']}' (resolved to {other}) does not exist")
    out = None
    if "out" in raw:  # resolved like the sweep's own `out`: from the working directory
        out = Path(str(raw["out"]))
        if not out.is_dir():
            raise _err(path, "lr_from.out", f"'{raw['out']}' is not a directory (the other sweep's cells)")
    return LrFrom(other, (), out)


def _overrides_to_sets(path: Path, where: str, overrides: dict) -> tuple[list[str], dict]:
    """Splits a mapping of overrides into `--set` strings and pseudo-keys."""
    sets, pseudo = [], {}
    for key, value in overrides.items():
        key = str(key)
        if key in PSEUDO_KEYS:
            if isinstance(value, str):  # YAML 1.1 reads 1.2e6 (no sign in the exponent) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise _err(path, f"{where}.{key}", f"expected a positive number, got {value!r}")
            if key == "warmup_fraction" and value >= 1:
                raise _err(path, f"{where}.{key}", f"{value} must be below 1")
            pseudo[key] = value
        elif "." in key:
            sets.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
        else:
            raise _err(
                path,
                f"{where}.{key}",
                f"overrides are SECTION.KEY (e.g. model.hidden_size) or one of {', '.join(PSEUDO_KEYS)}",
            )
    return sets, pseudo


def _grid(sweep: Sweep) -> list[tuple[dict, list[str], dict]]:
    """(labels, --set overrides, pseudo-keys) of every combination of the axes, first axis outermost."""
    common_sets, common_pseudo = _overrides_to_sets(sweep.path, "set", sweep.common)
    names = list(sweep.axes)
    out = []
    for combo in itertools.product(*(sweep.axes[a].items() for a in names)):
        labels = {axis: value_name for axis, (value_name, _) in zip(names, combo, strict=True)}
        sets, pseudo = list(common_sets), dict(common_pseudo)
        for axis, (value_name, overrides) in zip(names, combo, strict=True):
            s, p = _overrides_to_sets(sweep.path, f"axes.{axis}.{value_name}", overrides)
            sets += s
            pseudo.update(p)
        out.append((labels, sets, pseudo))
    return out


def _cell(sweep: Sweep, labels: dict, sets: list[str], pseudo: dict, **flags) -> Cell:
    cell_name = "_".join(f"{_safe(AXIS_LABELS.get(a, a.split('.')[-1]))}-{_safe(v)}" for a, v in labels.items())
    sets = list(sets)
    try:
        cfg = _unvalidated(sweep.base, sets)  # the pseudo-keys need seq_len and the batch first
        sets += _derived_sets(cfg, pseudo, sweep.checkpoints_per_cell, sets)
        sets.append(f"run.dir={(sweep.out / cell_name).as_posix()}")
        sets.append(f"run.name={sweep.name}-{cell_name}")
        cfg = load_config(sweep.base, sets)
    except ConfigError as e:
        raise ConfigError(f"sweep '{sweep.path}', cell {cell_name}: {e}") from None
    return Cell(cell_name, labels, tuple(sets), cfg, **flags)


def _with_lr(sweep: Sweep, labels: dict, sets: list[str], lr: float) -> tuple[dict, list[str]]:
    lr_sets, _ = _overrides_to_sets(sweep.path, "lr", {LR_KEY: lr})
    return {**labels, LR_KEY: _value_name(lr)}, sets + lr_sets


def group_key(labels: dict, per: tuple) -> tuple:
    return tuple((a, labels[a]) for a in per)


def expand(sweep: Sweep) -> list[Cell]:
    """The cartesian product of the axes (first axis outermost), each cell's config validated. With an LR
    search: its cells first, then every cell of the grid at its group's best learning rate, where that is
    decided (the others are counted in sweep.waiting)."""
    grid = _grid(sweep)
    if sweep.lr_search is None and sweep.lr_from is None:
        cells = [_cell(sweep, labels, sets, pseudo) for labels, sets, pseudo in grid]
    else:
        cells = _expand_with_lr(sweep, grid)
    if len({c.name for c in cells}) != len(cells):
        raise _err(sweep.path, "axes", "two cells get the same name; give the axes distinct value names")
    return cells


def _expand_with_lr(sweep: Sweep, grid: list) -> list[Cell]:
    from pretrain.scaling import lrsearch
    from pretrain.scaling.cell_files import read_evaluation

    cells: dict[str, Cell] = {}
    if sweep.lr_search is not None:
        search, per = sweep.lr_search, sweep.lr_search.per
        runs: dict[tuple, list] = {}
        for labels, sets, pseudo in grid:
            if not all(labels[a] in names for a, names in search.at.items()):
                continue
            for lr in search.values:
                cell = _cell(sweep, *_with_lr(sweep, labels, sets, lr), pseudo, study=False, search=True)
                cells[cell.name] = cell
                runs.setdefault(group_key(labels, per), []).append((lr, read_evaluation(sweep.out / cell.name)))
        missing = {group_key(labels, per) for labels, _, _ in grid} - set(runs)
        if missing:
            raise _err(
                sweep.path,
                "lr_search.at",
                "no cell of "
                + ", ".join("/".join(f"{a}={v}" for a, v in key) for key in sorted(missing))
                + " is searched; widen `at`",
            )
        choices = lrsearch.choose(runs)
    else:
        other = load_sweep(sweep.lr_from.sweep, out=sweep.lr_from.out)
        if other.lr_search is None:
            raise _err(sweep.path, "lr_from.sweep", f"{sweep.lr_from.sweep} has no lr_search")
        per = other.lr_search.per
        for axis in per:
            if axis not in sweep.axes:
                raise _err(
                    sweep.path,
                    "lr_from",
                    f"{other.path} chooses a learning rate per '{axis}', which is not "
                    f"an axis here (axes: {', '.join(sweep.axes)})",
                )
        sweep.lr_from = LrFrom(sweep.lr_from.sweep, per, sweep.lr_from.out)
        choices = other.lr_choices
    sweep.lr_choices, sweep.waiting = choices, {}
    for labels, sets, pseudo in grid:
        key = group_key(labels, per)
        choice = choices.get(key)
        if choice is None:
            raise _err(
                sweep.path,
                "lr_from",
                "the other sweep has no learning rate for " + ", ".join(f"{a}={v}" for a, v in key),
            )
        if choice.lr is None:
            sweep.waiting[key] = sweep.waiting.get(key, 0) + 1
            continue
        cell = _cell(sweep, *_with_lr(sweep, labels, sets, choice.lr), pseudo)
        cells[cell.name] = dataclasses.replace(cells[cell.name], study=True) if cell.name in cells else cell
    return list(cells.values())


def _unvalidated(base: Path, sets: list[str]) -> Config:
    data = read_yaml(base)
    for assignment in sets:
        data = apply_override(data, assignment)
    return _build(Config, data, "")


def _derived_sets(cfg: Config, pseudo: dict, checkpoints_per_cell: int, explicit: list[str]) -> list[str]:
    t = cfg.train
    steps = t.max_steps
    out = []
    tokens = pseudo.get("tokens")
    if "tokens_per_parameter" in pseudo:
        if tokens is not None:
            raise ConfigError("both `tokens` and `tokens_per_parameter` set the token budget; keep one")
        tokens = pseudo["tokens_per_parameter"] * non_embedding_parameters(cfg)
    if tokens is not None:
        steps = max(1, math.ceil(tokens / (t.global_batch_size * cfg.model.seq_len)))
        out.append(f"train.max_steps={steps}")
    if "warmup_fraction" in pseudo:
        out.append(f"train.warmup_steps={int(round(pseudo['warmup_fraction'] * steps))}")
    if not any(s.startswith("checkpoint.every=") for s in explicit):
        out.append(f"checkpoint.every={max(1, math.ceil(steps / checkpoints_per_cell))}")
    return out


def non_embedding_parameters(cfg: Config) -> int:
    """N of the model a config builds (on the meta device: no memory, no tokenizer needed: the count
    leaves the token embedding, and a tied output layer, out, so the vocabulary does not enter)."""
    import torch

    from model import build_model
    from pretrain.config import resolve

    resolved = resolve(cfg, 256 if cfg.model.vocab_size == 0 else None)
    with torch.device("meta"):
        model, _ = build_model(resolved.model, "torch", "meta")
    return model.num_params(embedding=False)
