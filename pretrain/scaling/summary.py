"""summary.json beside REPORT.md: the study in a form a program can read.

cells    every evaluated cell: size, placement, seed, lr, N, D, valid_loss, test_bpb, diverged, and
         its role (study: a cell of the study proper; search: a point of the LR search) and recipe
fits     per placement: heldout_error (the law's relative error on the held-out size), naive_error
         (the largest fitted size's loss as the prediction), power_law_error (A N^-alpha), winner,
         at_bound (the parameters at an edge of their range), status
claims   every claim: claim, verdict (holds | does not hold | not resolved | not measured), source,
         decided_by
lr       the best learning rate per group and the LR sensitivity per group and size
seed_noise  the pooled seed-to-seed sd of the fitted metric
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pretrain.fsutil import atomic_write_text

SUMMARY_FILE = "summary.json"


def _num(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def recipe(cell) -> dict:
    """The training recipe of a cell, from its validated config."""
    t, m = cell.config.train, cell.config.model
    return {
        "lr": t.lr,
        "warmup_steps": t.warmup_steps,
        "schedule": t.schedule,
        "min_lr_ratio": t.min_lr_ratio,
        "steps": t.max_steps,
        "global_batch_size": t.global_batch_size,
        "seq_len": m.seq_len,
        "tokens": cell.tokens,
        "weight_decay": t.weight_decay,
        "embedding_weight_decay": getattr(t, "embedding_weight_decay", None),
        "grad_clip": t.grad_clip,
        "betas": [t.beta1, t.beta2],
        "precision": t.precision,
    }


def cell_record(r, size: str) -> dict:
    ev = r.evaluation
    return {
        "name": r.name,
        "size": size,
        "placement": ev.get("placement"),
        "group": r.label,
        "seed": r.seed,
        "lr": r.lr,
        "N": r.N,
        "D": r.D,
        "valid_loss": _num(r.metric("valid_loss")),
        "test_loss": _num(r.metric("test_loss")),
        "test_bpb": _num(r.metric("test_bpb")),
        "valid_bpb": _num(r.metric("valid_bpb")),
        "initial_loss": _num(r.initial_loss),
        "diverged": r.diverged,
        "held_out": r.held_out,
        "study": r.cell.study,
        "search": r.cell.search,
        "recipe": recipe(r.cell),
    }


def fit_record(f: dict) -> dict:
    held = [h for h in f.get("held_out", []) if h.get("actual") is not None]
    h = held[0] if held else {}
    err = lambda key: (h.get(key) or {}).get("relative_error")
    return {
        "placement": f["label"],
        "group": f["group"],
        "status": f["status"],
        "at_bound": f.get("at_bound", []),
        "params": f.get("params"),
        "ci95": f.get("ci95"),
        "heldout_size": h.get("size"),
        "heldout_error": h.get("relative_error"),
        "naive_error": err("naive"),
        "power_law_error": err("power_law"),
        "winner": h.get("winner"),
        "winner_resolved": h.get("winner_resolved"),
    }


def build(results, size_of, fit: dict | None, claims: list[dict], lr: dict) -> dict:
    return {
        "cells": [cell_record(r, size_of(r)) for r in results if r.evaluation is not None],
        "fits": [fit_record(f) for f in (fit or {}).get("fits", [])],
        "fit_metric": (fit or {}).get("metric"),
        "seed_noise": (fit or {}).get("seed_noise"),
        "claims": [
            {"claim": c["claim"], "verdict": c["verdict"], "source": c.get("source"), "decided_by": c.get("decided_by")}
            for c in claims
        ],
        "lr": lr,
    }


def write(summary: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(summary, indent=1, default=_num))
    return path
