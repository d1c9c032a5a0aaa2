"""How one optimizer step, one evaluation batch and one diagnostics probe run, for the two kinds of
DeepSpeed engine: the plain engine (data and tensor parallelism, ZeRO 0-3: forward/backward/step
per micro-batch) and the pipeline engine (train_batch / eval_batch over the 1F1B schedule). The
training loop in pretrain/train.py talks to either through the same four methods.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from pretrain.data import micro_batch_start
from pretrain.diagnostics import activation_stats, global_grad_norm, layer_grad_norms
from pretrain.ds_compat import before_pipeline_step


class StepResult:
    def __init__(self, loss: torch.Tensor, grad_norm: float | None, layer_grad_norms: list[float] | None):
        self.loss, self.grad_norm, self.layer_grad_norms = loss, grad_norm, layer_grad_norms


class _Runner:
    def __init__(self, engine, stream, cfg, layout, dp_rank: int, grad_accum: int, device, groups: dict, guard=None):
        """guard: a pretrain.guard.BadStepGuard, asked before every optimizer step."""
        self.engine, self.stream, self.cfg, self.layout, self.guard = engine, stream, cfg, layout, guard
        self.inject_at = set(cfg.train.inject_nonfinite_at)
        self.dp_rank, self.grad_accum, self.device = dp_rank, grad_accum, device
        self.tp_group, self.pp_group = groups.get("tp"), groups.get("pp")
        t = cfg.train
        # DeepSpeed reports no gradient norm for ZeRO-0 in fp32 (a plain torch optimizer): ours.
        self.own_grad_norm = cfg.zero.stage == 0 and t.precision == "fp32"
        self.compile_timer = CompileTimer(device) if t.compile else None

    def train_step(self, step: int, diagnose: bool) -> StepResult:
        if self.compile_timer is None or self.compile_timer.done:
            return self._train_step(step, diagnose)
        with self.compile_timer.timed():
            return self._train_step(step, diagnose)

    def compile_note(self) -> str | None:
        """Once, after the second step of a compiled model: how long compilation took (for the run log)."""
        return None if self.compile_timer is None else self.compile_timer.note()

    def micro_batch(self, step: int, micro: int):
        t = self.cfg.train
        start = micro_batch_start(step, micro, self.dp_rank, t.global_batch_size, t.micro_batch_size, self.layout.dp)
        b = self.stream.batch(start, t.micro_batch_size)
        return self.to_device(b.tokens), self.to_device(b.labels), self.to_device(b.loss_mask)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """To the GPU from pinned memory, without blocking the host (the caching host allocator keeps the
        pinned buffer alive until the copy is done); a plain copy elsewhere."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def grad_norm(self) -> float | None:
        return None if self.own_grad_norm else self.engine.get_global_grad_norm()


class CompileTimer:
    """torch.compile works at the first call: the first step's time minus the second's is about what
    compilation took (the backward graphs included, which dynamo's own counters miss)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.done = device, [], False

    @contextmanager
    def timed(self):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds.append(time.perf_counter() - t0)

    def note(self) -> str | None:
        if self.done or len(self.seconds) < 2:
            return None
        self.done = True
        from torch._dynamo.utils import compilation_time_metrics, counters

        first, second = self.seconds[:2]
        graphs = counters["stats"].get("unique_graphs", 0)
        traced = sum(compilation_time_metrics.get("_compile.compile_inner", []))
        return (
            f"[compile] first step {first:.1f} s, second {second:.2f} s: compilation took about {first - second:.1f} s "
            f"({graphs} graph(s); dynamo tracing and forward compilation {traced:.1f} s of it)"
        )


class EngineRunner(_Runner):
    """Data and tensor parallelism: the engine wraps the whole model."""

    def blocks(self):
        return list(self.engine.module.blocks)

    def _train_step(self, step: int, diagnose: bool) -> StepResult:
        loss_sum, norm, layer_norms = 0.0, None, None
        for micro in range(self.grad_accum):
            tokens, labels, mask = self.micro_batch(step, micro)
            loss = self.engine(tokens, labels, mask)
            if micro == 0 and step + 1 in self.inject_at and torch.distributed.get_rank() == 0:
                loss = loss * float("nan")  # train.inject_nonfinite_at: fault injection on one rank
            self.engine.backward(loss)
            loss_sum = loss_sum + loss.detach().float() / self.grad_accum  # a tensor: no sync per micro-step
            if micro == self.grad_accum - 1:  # gradients are reduced; clipping and the update come in step()
                if self.guard is not None:
                    self.guard.decide(loss_sum)
                if diagnose:
                    layer_norms = layer_grad_norms(self.blocks(), self.tp_group)
                if self.own_grad_norm:
                    norm = global_grad_norm(self.engine.module, self.tp_group)
            self.engine.step()
        return StepResult(loss_sum, norm if self.own_grad_norm else self.grad_norm(), layer_norms)

    def eval_loss(self, tokens, labels, mask) -> torch.Tensor:
        return self.engine(tokens, labels, mask)

    def probe(self, tokens) -> dict:
        return activation_stats(
            lambda x: self.engine(x),
            self.blocks(),
            tokens,
            self.tp_group,
            self.layout.sequence_parallel,
            model=self.engine.module,
        )


class PipelineRunner(_Runner):
    """Pipeline parallelism: DeepSpeed's PipelineEngine runs the micro-batches of a step (1F1B)."""

    def blocks(self):
        from model.pipeline import local_blocks

        return local_blocks(self.engine.module)

    def _train_step(self, step: int, diagnose: bool) -> StepResult:
        batches = iter(
            [
                (tokens, (labels, mask))
                for tokens, labels, mask in (self.micro_batch(step, m) for m in range(self.grad_accum))
            ]
        )
        layer_norms, norm = None, None

        def before_step():  # gradients reduced, weights not yet updated
            nonlocal layer_norms, norm
            if self.guard is not None:  # the last stage holds the step's summed loss
                self.guard.decide(getattr(self.engine, "total_loss", None))
            if diagnose:
                layer_norms = layer_grad_norms(self.blocks(), self.tp_group, self.pp_group)
            if self.own_grad_norm:
                norm = global_grad_norm(self.engine.module, self.tp_group, self.pp_group)

        with before_pipeline_step(self.engine, before_step):
            loss = self.engine.train_batch(data_iter=batches)
        return StepResult(loss.detach().float(), norm if self.own_grad_norm else self.grad_norm(), layer_norms)

    def eval_loss(self, tokens, labels, mask) -> torch.Tensor:
        out = self.engine.eval_batch(iter([(tokens, (labels, mask))]), num_micro_batches=1, bcast_loss=True)
        return out

    def probe(self, tokens) -> dict:
        def forward(x):
            self.engine.reset_activation_shape()  # the probe batch need not have the training shape
            no_labels = torch.zeros_like(x)  # a fully masked loss (DeepSpeed's eval needs one)
            self.engine.eval_batch(iter([(x, (no_labels, no_labels.float()))]), num_micro_batches=1)
            self.engine.reset_activation_shape()

        return activation_stats(
            forward,
            self.blocks(),
            tokens,
            self.tp_group,
            self.layout.sequence_parallel,
            self.pp_group,
            model=self.engine.module,
        )
