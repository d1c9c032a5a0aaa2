"""train.compile: the model under torch.compile without graph breaks, the Triton norm kernels and the
fused loss as torch.library custom ops (checked with torch.library.opcheck; on CPU the kernels run
under the Triton interpreter), and compiled training equal to eager training.

In-process checks compile with the "aot_eager" backend (dynamo + AOT autograd, the graph capture that
graph breaks and custom-op registrations depend on, without inductor's code generation, which takes
minutes on 2 cores); the end-to-end runs (-m slow) use the real inductor backend, as train.compile does.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():  # before the Triton kernels are first imported (see tests/kernels/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model import build_model
from model.loss import LossSpec
from model.recompute import apply_activation_checkpointing
from pretrain.config import Config, ModelConfig, resolve
from tests.conftest import run_module, saved_for_backward_bytes, tiny_args
from tests.conftest import train_losses as losses

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def triton_runs_here() -> str | None:
    """Why the Triton kernels cannot run in this process, or None."""
    from kernels.backend import triton_missing

    return triton_missing(DEVICE)


needs_triton = pytest.mark.skipif(
    triton_runs_here() is not None, reason=f"the Triton kernels cannot run here: {triton_runs_here()}"
)


def tiny(placement="peri", backend="torch", layers=3, **kw):
    cfg = Config()
    cfg.model = ModelConfig(
        vocab_size=96, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2, seq_len=16, placement=placement,
        **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(resolve(cfg).model, backend, DEVICE)[0]


def batch():
    g = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, 96, (2, 16), generator=g).to(DEVICE) for _ in range(2))
    return tokens, labels, (torch.rand(2, 16, generator=g) > 0.2).float().to(DEVICE)


def graph_breaks(fn, *args) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_break_count, [str(r.reason)[:200] for r in explained.break_reasons]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("placement", ["pre", "peri", "post"])
def test_no_graph_breaks_in_a_block_and_the_whole_model(placement, backend):
    model = tiny(placement, backend)
    x = torch.randn(16, 2, 32, device=DEVICE)
    assert graph_breaks(model.blocks[1], x, None) == (0, [])
    assert graph_breaks(model, *batch()) == (0, [])  # embedding, blocks, the fused loss
    assert graph_breaks(model, batch()[0]) == (0, [])  # the logits path (evaluation)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_no_graph_breaks_with_activation_recomputation(mode):
    model = tiny("peri")
    apply_activation_checkpointing(model.blocks, mode)
    assert graph_breaks(model, *batch()) == (0, [])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_compiled_blocks_train_like_eager(backend, recompute):
    eager = tiny("peri", backend)
    compiled = copy.deepcopy(eager)
    for m in (eager, compiled):
        apply_activation_checkpointing(m.blocks, recompute)
        m.loss_spec = LossSpec(fused=True, z_loss=1e-3)
    torch._dynamo.reset()
    compiled.compile_blocks(backend="aot_eager")
    assert_train_alike(eager, compiled, rtol=1e-5, atol=1e-6)


def assert_train_alike(eager, compiled, rtol, atol):
    """Loss and every gradient equal over three steps, the later ones running the cached graphs: a
    recompilation there is an error (state the first call's trace mutates, like a cache, fails a guard)."""
    for step in range(3):
        out = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                loss = m(*batch())
            loss.backward()
            out.append([loss.detach()] + [p.grad for p in m.parameters()])
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_whole_model_compilation_trains_like_eager(placement):
    """train.compile_scope: model, under inductor itself (the graph the benchmark times)."""
    eager = tiny(placement)
    compiled = copy.deepcopy(eager)
    for m in (eager, compiled):
        m.loss_spec = LossSpec(fused=True, z_loss=1e-3)
    torch._dynamo.reset()
    compiled.compile_model()
    assert_train_alike(eager, compiled, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="activation recomputation: use compile_blocks"):
        apply_activation_checkpointing(eager.blocks, "full")
        eager.compile_model()


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_a_memory_budget_keeps_less_for_backward_and_trains_like_eager(scope):
    """train.compile_memory_budget: the same compiled model keeps far less for backward at budget 0.1 than at
    1, trains like eager, and leaves the process's own setting alone. The backend is AOT autograd with
    inductor's partitioner (min-cut, where the budget acts) without its code generation."""
    from torch._functorch import config as functorch_config

    eager = tiny("peri")
    eager.loss_spec = LossSpec(fused=True)
    kept = {}
    for budget in (1.0, 0.1):
        compiled = copy.deepcopy(eager)
        compile_ = compiled.compile_model if scope == "model" else compiled.compile_blocks
        compile_(memory_budget=budget, backend="aot_eager_decomp_partition")
        torch._dynamo.reset()  # copies of one model share compiled code: each budget compiles its own
        kept[budget] = saved_for_backward_bytes(compiled, *batch())
        assert functorch_config.activation_memory_budget == 1.0
    assert kept[0.1] < 0.5 * kept[1.0], kept
    torch._dynamo.reset()
    assert_train_alike(eager, compiled, rtol=1e-5, atol=1e-6)  # the budget-0.1 model
    if scope == "blocks":
        apply_activation_checkpointing(eager.blocks, "full")
        with pytest.raises(ValueError, match="memory_budget < 1.* with activation recomputation"):
            eager.compile_blocks(memory_budget=0.5)


def test_a_memory_budget_prices_the_fused_loss_by_its_flops():
    """Under a memory budget the partitioner weighs our custom ops by their FLOPs: the fused loss (the
    output layer's three matmuls) is kept, not recomputed in backward. Priced as free, as torch prices an
    op without a FLOP formula, it is run again in backward (the control)."""
    from torch.profiler import profile
    from torch.utils.flop_counter import flop_registry

    def loss_op_runs(model) -> int:
        model(*batch()).backward()  # compiles
        with profile() as prof:
            model(*batch()).backward()
        return sum(e.name == "pretrain::linear_cross_entropy" for e in prof.events())

    eager = tiny("pre")
    eager.loss_spec = LossSpec(fused=True)
    runs = {}
    for priced in (True, False):
        torch._dynamo.reset()
        saved = {k: flop_registry.pop(k) for k in list(flop_registry) if "pretrain" in str(k) and not priced}
        try:
            compiled = copy.deepcopy(eager)
            compiled.compile_model(memory_budget=0.5, backend="aot_eager_decomp_partition")
            runs[priced] = loss_op_runs(compiled)
        finally:
            flop_registry.update(saved)
    torch._dynamo.reset()
    assert runs == {True: 1, False: 2}


# ------------------------------------------------------------------------------------------ custom ops


def leaf(t):
    return t.detach().clone().requires_grad_()


@needs_triton
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_custom_ops_pass_opcheck(kind):
    from kernels.autograd import norm_fwd_op, peri_fwd_op  # with their autograd formulas
    from kernels.custom_ops import norm_bwd_op, peri_bwd_op

    g = torch.Generator().manual_seed(0)
    is_rms = kind == "rmsnorm"
    x, r, f = (leaf(torch.randn(3, 5, 40, generator=g).to(DEVICE)) for _ in range(3))
    w1, w2 = (leaf(torch.rand(40, generator=g).to(DEVICE) + 0.5) for _ in range(2))
    b1, b2 = (None, None) if is_rms else (leaf(0.1 * torch.randn(40, generator=g).to(DEVICE)) for _ in range(2))
    for residual in (None, r):
        torch.library.opcheck(norm_fwd_op, (x, residual, w1, b1, 1e-5, 0.5, is_rms))
    torch.library.opcheck(peri_fwd_op, (f, r, w1, b1, w2, b2, 1e-5, 0.5, is_rms))
    # The backward ops are not differentiable themselves (no double backward): plain inputs.
    with torch.no_grad():
        y, s, mean, rstd = norm_fwd_op(x, r, w1, b1, 1e-5, 0.5, is_rms)
        s_p, _, *stats = peri_fwd_op(f, r, w1, b1, w2, b2, 1e-5, 0.5, is_rms)
    dy, w1, w2, f = torch.randn_like(y), w1.detach(), w2.detach(), f.detach()
    torch.library.opcheck(norm_bwd_op, (dy, dy.clone(), s, w1, mean, rstd, b1 is not None, 0.5, is_rms))
    for ds in (None, dy.clone()):
        args = (dy, ds, s_p, f, w1, w2, *stats, b1 is not None, b2 is not None, 0.5, is_rms, r.dtype)
        torch.library.opcheck(peri_bwd_op, args)


def test_fused_loss_custom_op_passes_opcheck():
    from model.loss import _linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h, w = leaf(torch.randn(20, 8, generator=g)), leaf(torch.randn(30, 8, generator=g))
    y, weights = torch.randint(0, 30, (20,), generator=g), torch.full((20,), 1 / 20)
    torch.library.opcheck(_linear_cross_entropy, (h, w, y, weights, 1e-3, 6, 0, "", True))
    torch.library.opcheck(_linear_cross_entropy, (h.detach(), w.detach(), y, weights, 1e-3, 6, 0, "", False))


# ------------------------------------------------------------------------- end to end (inductor), -m slow

STEPS = 4
COMMON = [
    f"train.max_steps={STEPS}",
    "train.warmup_steps=1",
    "checkpoint.every=0",
    "train.eval_every=0",
    "train.diagnostics_every=0",
]


def train(bundled_dir, run_dir, nproc, *sets):
    proc = run_module(tiny_args(bundled_dir, run_dir, *COMMON, *sets), nproc=nproc, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(run_dir), (run_dir / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, layout",
    [
        (1, ["zero.stage=0"]),
        (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.activation_checkpointing=full"]),
        (2, ["parallel.pp=2"]),
        (2, ["zero.stage=3", "train.activation_checkpointing=selective"]),
        (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.compile_scope=model"]),
        (2, ["parallel.pp=2", "train.compile_memory_budget=0.5"]),
        (2, ["zero.stage=3", "train.compile_scope=model", "train.compile_memory_budget=0.5"]),
    ],
    ids=[
        "one-process",
        "tp2-sp-recompute",
        "pp2",
        "dp2-zero3",
        "tp2-sp-whole-model",
        "pp2-memory-budget",
        "dp2-zero3-whole-model-memory-budget",
    ],
)
def test_compiled_training_equals_eager(nproc, layout, bundled_dir, tmp_path):
    compiler_keys = ("train.compile_scope", "train.compile_memory_budget")  # need train.compile: true
    eager_layout = [k for k in layout if not k.startswith(compiler_keys)]
    eager, _ = train(bundled_dir, tmp_path / "eager", nproc, *eager_layout)
    compiled, log = train(bundled_dir, tmp_path / "compiled", nproc, *layout, "train.compile=true")
    assert "[compile] first step" in log and "compilation took about" in log
    if "train.compile_memory_budget=0.5" in layout:
        assert "activation memory budget 0.5" in log
    assert sorted(compiled) == sorted(eager) == list(range(1, STEPS + 1))
    assert max(abs(compiled[s] - eager[s]) for s in eager) <= 1e-4
