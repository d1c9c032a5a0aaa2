"""Every parameter's initial value as one ordered list of steps, so that a rank can build only its own
part of the model and still hold exactly the values of the full build.

The full build (torch.manual_seed(seed); GPT(cfg, ops)) draws from the global generator twice: in the
modules' constructors (torch's own defaults: nn.Embedding N(0, 1), nn.Linear Kaiming-uniform weight and
uniform bias; the norms' constant gains) and in GPT.reset_parameters (N(0, std) matrices, residual outputs
std/sqrt(2L) or DeepNorm's beta), and keeps the last values. `init_steps(gpt)` lists both, in the order the
full build consumes the generator. `GPT.reset_parameters` runs its part of the list on the real parameters
(one description of the init, not two); `materialize` runs all of it on temporary full tensors, one
parameter at a time, and hands each parameter's final value to a sink that keeps this rank's share (a
tensor-parallel shard, a pipeline stage's layers, a ZeRO-3 partition).

Every draw is replayed in order -- values that a later step overwrites are drawn into a scratch tensor of
the same shape -- so the generator's stream, and therefore every value, is bit-identical to the full build
whatever the layout. The price: every rank draws every number of the model (a GPU draws ~1e11 a second,
a CPU core ~5e7), and holds at most two full parameters besides its own share.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from model.norms import Norm
from model.sigma_reparam import SigmaReparam, initial_sigma


@dataclass(frozen=True)
class InitStep:
    names: tuple[str, ...]  # parameters (their first name in named_parameters) the step writes, in fill's order
    fill: Callable[..., None]  # fills or changes the full tensors in place
    full: bool = True  # overwrites every element (earlier values of these parameters are dead)


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (a tied output layer's weight is the embedding's)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def construction_steps(gpt: nn.Module) -> list[InitStep]:
    """What the plain GPT's module constructors draw and set, in construction order (which is module order:
    the GPT registers its modules as it builds them, and a block's attention and MLP before its norms)."""
    names = parameter_names(gpt)
    steps = []
    for prefix, module in gpt.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.Linear):  # also model/sigma_reparam.py's ReparamLinear (its gamma: below)
            n = (names[id(module.weight)],) + ((names[id(module.bias)],) if module.bias is not None else ())
            steps.append(InitStep(n, _linear_default))
        elif type(module) is nn.Embedding:
            if module.padding_idx is not None:
                raise NotImplementedError(f"model/init.py: {prefix} has a padding_idx, which the replay does not set")
            steps.append(InitStep((names[id(module.weight)],), nn.init.normal_))
        elif isinstance(module, SigmaReparam):  # set to sigma(W) once W is final (reset_steps)
            steps.append(InitStep((names[id(module.gamma)],), lambda t: t.fill_(1.0)))
        elif isinstance(module, Norm):
            gain = 0.0 if module.zero_centered_gain else 1.0
            steps.append(InitStep((names[id(module.weight)],), lambda t, v=gain: t.fill_(v)))
            if module.bias is not None:
                steps.append(InitStep((names[id(module.bias)],), torch.Tensor.zero_))
        else:
            raise NotImplementedError(
                f"model/init.py: no construction rule for {prefix} ({type(module).__name__}: "
                f"{', '.join(n for n, _ in own)}); add one next to nn.Linear's"
            )
    return steps


def _linear_default(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """nn.Linear's own reset_parameters, run on stand-in tensors (torch's code, not a copy of it)."""
    nn.Linear.reset_parameters(types.SimpleNamespace(weight=weight, bias=bias))


def reset_steps(gpt: nn.Module) -> list[InitStep]:
    """GPT.reset_parameters: Normal(0, std) everywhere; residual-output projections get std/sqrt(2L) (GPT-2,
    Megatron), except under a placement with an init gain (DeepNorm's beta), which scales the value,
    attention-output and MLP weights by beta instead."""
    cfg, names = gpt.cfg, parameter_names(gpt)
    std = cfg.init_std

    def normal(p: nn.Parameter, s: float = std) -> InitStep:
        return InitStep((names[id(p)],), lambda t: nn.init.normal_(t, std=s))

    def scaled(p: nn.Parameter, beta: float) -> InitStep:
        return InitStep((names[id(p)],), lambda t: t.mul_(beta), full=False)

    steps = [normal(gpt.embed.weight)]
    if not cfg.tie_embeddings:
        steps.append(normal(gpt.head.weight))
    out_std = std / math.sqrt(2 * cfg.num_layers)
    for block, spec in zip(gpt.blocks, gpt.specs):
        attn, mlp = block.attn.fn, block.mlp.fn
        for lin in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2):
            steps.append(normal(lin.weight))
            if lin.bias is not None:
                steps.append(InitStep((names[id(lin.bias)],), torch.Tensor.zero_))
        if spec.init_gain != 1.0:
            beta, groups, q_per_kv, head_dim = spec.init_gain, attn.num_kv_heads, attn.q_per_kv, attn.head_dim

            def values(t: torch.Tensor, beta=beta, groups=groups, q_per_kv=q_per_kv, head_dim=head_dim) -> None:
                t.view(groups, q_per_kv + 2, head_dim, -1)[:, q_per_kv + 1].mul_(beta)  # the value rows

            steps.append(InitStep((names[id(attn.qkv.weight)],), values, full=False))
            steps += [scaled(lin.weight, beta) for lin in (attn.proj, mlp.fc1, mlp.fc2)]
        else:
            steps += [normal(attn.proj.weight, out_std), normal(mlp.fc2.weight, out_std)]
        for lin in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2):  # sigma-Reparam: gamma = sigma(W_init)
            if isinstance(getattr(lin, "sigma", None), SigmaReparam):
                names_ = (names[id(lin.weight)], names[id(lin.sigma.gamma)])
                steps.append(InitStep(names_, lambda w, g: g.copy_(initial_sigma(w)), full=False))
    return steps


def init_steps(gpt: nn.Module) -> list[InitStep]:
    """The full build's initialisation of the plain GPT, in the order it consumes the generator."""
    return construction_steps(gpt) + reset_steps(gpt)


@torch.no_grad()
def run_steps(steps: list[InitStep], tensors: dict[str, torch.Tensor]) -> None:
    """Applies the steps to real, whole tensors (GPT.reset_parameters)."""
    for step in steps:
        step.fill(*(tensors[n] for n in step.names))


@torch.no_grad()
def materialize(
    steps: list[InitStep],
    shapes: dict[str, tuple[torch.Size, torch.dtype]],
    wanted: set[str],
    sink: Callable[[str, torch.Tensor], None],
    device: torch.device | str,
) -> None:
    """Replays `steps` on `device`, holding one parameter's full tensor at a time (two while a step writes
    two, e.g. a weight and its bias), and calls sink(name, full value) for each wanted parameter once its
    value is final. The generator must be in the state the full build starts from (seeded)."""
    last_full, last_use = {}, {}
    for i, step in enumerate(steps):
        for n in step.names:
            if n not in last_full and not step.full:
                raise ValueError(f"model/init.py: the first step on {n} changes values it never set")
            last_use[n] = i
            if step.full:
                last_full[n] = i
    missing = wanted - set(last_use)
    if missing:
        raise ValueError(f"model/init.py: no initial value for {', '.join(sorted(missing))}")
    live: dict[str, torch.Tensor] = {}
    for i, step in enumerate(steps):
        targets = []
        for n in step.names:
            shape, dtype = shapes[n]
            if n not in live and n in wanted and last_full[n] == i:
                live[n] = torch.empty(shape, dtype=dtype, device=device)  # the value it keeps starts here
            # values overwritten later are drawn anyway (the generator's stream), into scratch
            targets.append(live[n] if n in live else torch.empty(shape, dtype=dtype, device=device))
        step.fill(*targets)
        for n in step.names:
            if n in live and last_use[n] == i:
                sink(n, live.pop(n))


def transient_peak(
    steps: list[InitStep], shapes: dict[str, tuple[torch.Size, torch.dtype]], copy_bytes: int = 4
) -> int:
    """The most bytes `materialize` holds at once besides the rank's own share, whatever that share is
    (every parameter counted as kept: its full tensor lives from its last full draw to its last step): the
    live full tensors, a step's scratch draws, and the copy made of a finished parameter (`copy_bytes` per
    element of it: 4 for an fp32 copy, more when it is cast too)."""
    last_full, last_use = {}, {}
    for i, step in enumerate(steps):
        for n in step.names:
            last_use[n] = i
            if step.full:
                last_full[n] = i

    def nbytes(n: str) -> int:
        shape, dtype = shapes[n]
        return math.prod(shape) * dtype.itemsize

    live, peak = set(), 0
    for i, step in enumerate(steps):
        scratch = 0
        for n in step.names:
            if n not in live and last_full[n] == i:
                live.add(n)
            elif n not in live:
                scratch += nbytes(n)
        done = [n for n in step.names if n in live and last_use[n] == i]
        copies = sum(math.prod(shapes[n][0]) * copy_bytes for n in done)
        peak = max(peak, sum(nbytes(n) for n in live) + scratch + copies)
        live -= set(done)
    return peak
