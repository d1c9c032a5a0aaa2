"""Where the norms go: one registry entry per published placement (DESIGN.md §4, §9).

Every placement is the same sublayer shape with optional slots:

    y = post_norm(alpha * x + out_norm(F(in_norm(x) * in_scale)))

A placement is a small function `(layer, num_layers, cfg) -> LayerSpec` saying which slots a
block fills, evaluated once when the model is built. The block's forward never looks at the
placement name. Adding a placement = one `@register(...)` function here + the tests that
already parametrize over `PLACEMENTS`.

Layer indices are GLOBAL and 1-based (l = 1..L), also under pipeline parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from kernels.errors import ConfigError


@dataclass(frozen=True)
class SublayerSpec:
    """The slots of one residual branch (attention or MLP)."""

    in_norm: bool = False  # N(x) before the sublayer
    out_norm: bool = False  # N(F(.)) on the branch output
    post_norm: bool = False  # N(alpha*x + branch) after the residual add
    in_scale: float = 1.0  # constant on the input norm's output (LNS: 1/sqrt(l)); a plain float
    residual_alpha: float = 1.0  # multiplier on the skip path (DeepNorm)


@dataclass(frozen=True)
class LayerSpec:
    attn: SublayerSpec
    mlp: SublayerSpec
    # Multiplier on the init std of the value, attention-output and MLP weights (DeepNorm's beta).
    init_gain: float = 1.0


@dataclass(frozen=True)
class Placement:
    """A registry entry: the per-layer slot function and the rules of the model switches around it."""

    name: str
    summary: str
    layer: Callable[[int, int, object], LayerSpec]
    final_norm: bool  # a norm before the output layer
    embedding_norm: bool  # default for the `embedding_norm` switch
    depth_scale: str  # default for the `depth_scale` switch
    has_input_norms: bool  # whether depth_scale (which scales input norms) can apply
    requires: dict = dataclasses.field(default_factory=dict)  # switch -> the only value it may take
    options: tuple = ()  # model keys that only this placement reads (others must leave them at default)
    check: Callable[[object], str | None] | None = None  # a rule of its own: the problem, or None


PLACEMENTS: dict[str, Placement] = {}


def register(
    name: str,
    summary: str,
    *,
    final_norm: bool,
    embedding_norm: bool = False,
    depth_scale: str = "none",
    has_input_norms: bool = True,
    requires: dict | None = None,
    options: tuple = (),
    check: Callable | None = None,
):
    def wrap(fn: Callable[[int, int, object], LayerSpec]) -> Callable:
        PLACEMENTS[name] = Placement(
            name,
            summary,
            fn,
            final_norm,
            embedding_norm,
            depth_scale,
            has_input_norms,
            dict(requires or {}),
            tuple(options),
            check,
        )
        return fn

    return wrap


def _both(spec: SublayerSpec, init_gain: float = 1.0) -> LayerSpec:
    return LayerSpec(attn=spec, mlp=spec, init_gain=init_gain)


@register("pre", "x + F(N(x)) (GPT-2, Llama)", final_norm=True)
def _pre(layer: int, num_layers: int, cfg) -> LayerSpec:
    return _both(SublayerSpec(in_norm=True))


@register("post", "N(x + F(x)) (original Transformer, BERT)", final_norm=False, has_input_norms=False)
def _post(layer: int, num_layers: int, cfg) -> LayerSpec:
    return _both(SublayerSpec(post_norm=True))


@register("peri", "x + N_out(F(N_in(x))) (Peri-LN; Gemma 2/3)", final_norm=True, embedding_norm=True)
def _peri(layer: int, num_layers: int, cfg) -> LayerSpec:
    return _both(SublayerSpec(in_norm=True, out_norm=True))


@register(
    "lns",
    "x + F(N(x) / sqrt(l)) (LayerNorm Scaling, The Curse of Depth)",
    final_norm=True,
    depth_scale="inv_sqrt_layer",
    requires={"depth_scale": ("inv_sqrt_layer", "lns = pre + inv_sqrt_layer; use placement 'pre' for plain Pre-LN")},
)
def _lns(layer: int, num_layers: int, cfg) -> LayerSpec:
    return _both(SublayerSpec(in_norm=True))


def _mix_has_post_blocks(m) -> str | None:
    if mix_post_layers(m.num_layers, m.mix_alpha) == 0:
        return (
            f"model.mix_alpha: {m.mix_alpha} x {m.num_layers} layers leaves no Post-LN block; "
            "use placement 'pre' or a larger mix_alpha"
        )
    return None


@register(
    "mix",
    "Post-LN for the first round(alpha*L) blocks, Pre-LN after (Mix-LN)",
    final_norm=True,
    options=("mix_alpha",),
    check=_mix_has_post_blocks,
)
def _mix(layer: int, num_layers: int, cfg) -> LayerSpec:
    if layer <= mix_post_layers(num_layers, cfg.mix_alpha):
        return _post(layer, num_layers, cfg)
    return _pre(layer, num_layers, cfg)


@register(
    "deepnorm",
    "N(alpha*x + F(x)), alpha=(2L)^(1/4), beta=(8L)^(-1/4) init (DeepNet)",
    final_norm=False,
    has_input_norms=False,
)
def _deepnorm(layer: int, num_layers: int, cfg) -> LayerSpec:
    alpha = (2 * num_layers) ** 0.25
    beta = (8 * num_layers) ** -0.25
    return _both(SublayerSpec(post_norm=True, residual_alpha=alpha), init_gain=beta)


@register("reordered", "x + N(F(x)) (OLMo 2, Swin v2)", final_norm=True, has_input_norms=False)
def _reordered(layer: int, num_layers: int, cfg) -> LayerSpec:
    return _both(SublayerSpec(out_norm=True))


def mix_post_layers(num_layers: int, alpha: float) -> int:
    """How many of the bottom blocks Mix-LN runs as Post-LN."""
    return int(math.floor(alpha * num_layers + 0.5))


# ------------------------------------------------------------------------ the switches' rules


def check_placement_switches(m, defaults) -> None:
    """Applies the registry's rules to a model config `m` (model/config.py ModelConfig): the switches a
    placement requires, the keys only some placements read, the switches that need input norms,
    and each entry's own check. `defaults`: a ModelConfig with every default, to tell set from unset."""
    p = PLACEMENTS[m.placement]
    for switch, (value, why) in p.requires.items():
        if getattr(m, switch) not in (None, value):
            raise ConfigError(f"model.{switch}: '{getattr(m, switch)}' contradicts model.placement='{p.name}' ({why})")
    for other in PLACEMENTS.values():
        for key in other.options:
            if key not in p.options and getattr(m, key) != getattr(defaults, key):
                readers = [q.name for q in PLACEMENTS.values() if key in q.options]
                raise ConfigError(
                    f"model.{key}: {getattr(m, key)} is set but only applies to placement "
                    f"{', '.join(repr(r) for r in readers)} (placement is '{p.name}'); remove it or "
                    f"use placement {readers[0]!r}"
                )
    if m.depth_scale == "inv_sqrt_layer" and not p.has_input_norms:
        raise ConfigError(
            f"model.depth_scale: 'inv_sqrt_layer' scales the input norms, but placement '{p.name}' has "
            f"none; use it with: {', '.join(n for n, q in PLACEMENTS.items() if q.has_input_norms)}"
        )
    problem = p.check(m) if p.check is not None else None
    if problem:
        raise ConfigError(problem)


def layer_specs(m) -> list[LayerSpec]:
    """The per-block slot specs of a resolved model config, with the depth scale applied."""
    p = PLACEMENTS[m.placement]
    specs = []
    for layer in range(1, m.num_layers + 1):
        spec = p.layer(layer, m.num_layers, m)
        if m.depth_scale == "inv_sqrt_layer":
            scale = 1.0 / math.sqrt(layer)
            spec = dataclasses.replace(
                spec,
                attn=dataclasses.replace(spec.attn, in_scale=scale) if spec.attn.in_norm else spec.attn,
                mlp=dataclasses.replace(spec.mlp, in_scale=scale) if spec.mlp.in_norm else spec.mlp,
            )
        specs.append(spec)
    return specs
