"""Leaving a sublayer: the residual add and every norm between one sublayer's output and the
next sublayer's input, as one kernel call where the backend has a fused op (DESIGN.md §5, §9).

Given the residual stream x and the branch output f of sublayer k, a junction returns
(x_{k+1}, h_{k+1}) where

    x_{k+1} = post_norm(alpha * x + out_norm(f))      (slots of sublayer k)
    h_{k+1} = next_norm(x_{k+1}) * next_scale         (input norm of sublayer k+1, or the final norm)

The fused op is chosen once, when the model is built, from which slots are filled:
    out_norm + next norm          -> peri_junction (Peri-LN)
    next norm only                -> add_norm      (Pre-LN, LNS, Mix-LN's Pre-LN blocks)
    post_norm                     -> add_norm on the post norm (Post-LN, Mix-LN's early blocks)
    anything else (DeepNorm's alpha, dropout, OLMo 2's out_norm alone) -> the plain composition.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from model.norms import Norm
from model.parallel_rng import TP_RNG


def _norm_or_none(module: nn.Module) -> Norm | None:
    return module if isinstance(module, Norm) else None


class Junction:
    """A plain object, not a module: it references norms owned by the sublayers, so the
    state dict keeps every norm under the sublayer it belongs to."""

    def __init__(
        self, out_norm: nn.Module, post_norm: nn.Module, alpha: float, next_norm: nn.Module | None, dropout: nn.Dropout
    ):
        self.out = _norm_or_none(out_norm)
        self.post = _norm_or_none(post_norm)
        self.next = _norm_or_none(next_norm) if next_norm is not None else None
        self.alpha = alpha
        self.dropout = dropout
        self.sequence_parallel = False  # set by model.parallelize
        self.kind, self.fn = self._choose()

    def norms(self) -> list[Norm]:
        return [n for n in (self.out, self.post, self.next) if n is not None]

    def _choose(self) -> tuple[str, Callable]:
        if self.alpha != 1.0 or self.dropout.p > 0:
            return "composed", self._composed
        if self.out is not None and self.post is None and self.next is not None:
            return "peri_junction", self._peri
        if self.out is None and self.post is None and self.next is not None:
            return "add_norm", self._add_next
        if self.out is None and self.post is not None:
            return "add_norm(post)", self._add_post
        return "composed", self._composed

    def __call__(self, x: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(x, f)

    # --- the paths
    @staticmethod
    def _bias(n: Norm):
        return n.bias if n.kind == "layernorm" else None

    def _peri(self, x, f):
        o, n = self.out, self.next
        return o.ops.peri_junction(f, x, o.gain(), self._bias(o), n.gain(), self._bias(n), n.eps, n.scale, n.kind)

    def _add_next(self, x, f):
        n = self.next
        return n.ops.add_norm(f, x, n.gain(), self._bias(n), n.eps, n.scale, n.kind)

    def _add_post(self, x, f):
        p = self.post
        _, y = p.ops.add_norm(f, x, p.gain(), self._bias(p), p.eps, p.scale, p.kind)
        return y, (self.next(y) if self.next is not None else y)

    def _composed(self, x, f):
        g = self.out(f) if self.out is not None else f
        # Under sequence parallelism the branch is this rank's sequence shard: its own dropout stream.
        with TP_RNG.fork() if self.sequence_parallel and self.dropout.p > 0 else nullcontext():
            g = self.dropout(g)
        # torch.add(g, x, alpha=a) = g + a * x in one op (a = 1 except DeepNorm).
        y = torch.add(g, x, alpha=self.alpha)
        if self.post is not None:
            y = self.post(y)
        return y, (self.next(y) if self.next is not None else y)
