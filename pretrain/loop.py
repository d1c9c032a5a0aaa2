"""The training loop: step, record, log, evaluate, save, stop.

One optimizer step at a time through the runner (pretrain/runner.py), then, in this order: agree
on the step's loss and on whether any rank was asked to stop (one small all-reduce), account for a
skipped step or a loss spike, report memory once, run the depth diagnostics when due, log
progress, validate, save, and stop on exit_at_step or a preemption signal. Each of these is one
method below; new per-step signals (stability metrics, schedules) go in the same places.
"""

from __future__ import annotations

import json
import math
import time

import torch

from pretrain.distributed import all_reduce_sum
from pretrain.heldout import evaluate_stream
from pretrain.job import Job
from pretrain.metrics import MetricsWriter, Progress, device_peak_tflops, format_duration, peak_memory_mb
from pretrain.preemption import Preemption
from pretrain.restore import TrainState


class TrainLoop:
    def __init__(self, job: Job, state: TrainState):
        run, t = job.run, job.cfg.train
        self.job, self.run, self.t, self.log = job, run, t, run.log
        self.engine = job.engine
        self.start_step = state.start_step
        self.step = state.start_step
        self.tokens_per_step = t.global_batch_size * job.cfg.model.seq_len
        self.metrics = MetricsWriter(
            run.run_dir, run.dist.is_main, resume_step=state.start_step if state.resumed else None
        )
        self.metrics.text("config", job.cfg.to_yaml())
        self.token_bytes = run.tokenizer.token_bytes()
        self.peak_tflops = device_peak_tflops(run.dist.device, t.peak_tflops)
        self.progress = Progress(state.start_step, t.max_steps, self.tokens_per_step)
        self.probe_tokens = job.valid.batch(list(range(t.diagnostics_sequences)), run.tokenizer.pad).tokens.to(
            run.dist.device
        )
        self.loss_acc, self.steps_acc = 0.0, 0
        self.preempt = Preemption(job.cfg.checkpoint.preempt_signals, job.cfg.checkpoint.grace_period_s, self.log)

    # ------------------------------------------------------------------------------ the loop
    def run_to_end(self) -> None:
        layout, t = self.run.layout, self.t
        self.log(
            f"[run] {self.run.run_dir}: world {self.run.dist.world_size} ({self.run.dist.backend}); "
            f"ZeRO-{self.job.cfg.zero.stage}, {t.precision}; batch {t.global_batch_size} = micro "
            f"{t.micro_batch_size} x dp {layout.dp} x accumulation {self.run.grad_accum}; "
            f"{self.tokens_per_step:,} tokens/step; steps {self.start_step}->{t.max_steps} "
            f"({(t.max_steps - self.start_step) * self.tokens_per_step:,} tokens); train epoch = "
            f"{self.job.stream.epoch_size:,} samples"
        )
        self.engine.train()
        self.preempt.install()
        try:
            while self.step < t.max_steps:
                if self.one_step():
                    break
        finally:
            self.preempt.uninstall()
        self.metrics.close()
        if self.step == t.max_steps:
            self.log(f"[done] trained to step {t.max_steps}; run directory {self.run.run_dir}")

    def one_step(self) -> bool:
        """Trains one step and does what is due after it; True when the run must stop here."""
        t = self.t
        diagnose_now = bool(t.diagnostics_every) and (self.step + 1) % t.diagnostics_every == 0
        result = self.job.runner.train_step(self.step, diagnose_now)
        self.step += 1
        if note := self.job.runner.compile_note():  # train.compile: once, after the second step
            self.log(note)
        step = self.step
        skipped = self.job.guard.after_step(step)  # raises TrainingStopped when the policy says so
        preempting = self.record(result, skipped)
        if step == self.start_step + 1:  # optimizer states exist once the first update has run
            with self.progress.excluded():
                self.report_memory()
        if result.layer_grad_norms is not None:
            with self.progress.excluded():
                self.diagnose(result.layer_grad_norms)
        if step % t.log_every == 0 or step == t.max_steps:
            self.log_progress(result)
        if not preempting and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            with self.progress.excluded():
                self.validate()
        exiting = step == t.exit_at_step or preempting
        every = self.job.cfg.checkpoint.every
        if (every and step % every == 0) or step == t.max_steps or exiting:
            with self.progress.excluded():
                self.save()
        if preempting:
            self.log(
                f"[preempt] {self.preempt.describe()}: saved step {step} and exiting 0; the same command with "
                "--resume auto continues the run"
            )
        elif exiting:
            self.log(f"[exit] train.exit_at_step={step} reached; continue with --resume auto")
        return exiting

    # ------------------------------------------------------------------------- after a step
    def record(self, result, skipped: bool) -> bool:
        """Agrees on the step's loss across ranks and accounts for it; returns whether any rank was
        asked to stop (one small collective per step)."""
        from pretrain.ds_compat import set_lr_schedule_step

        step, dist = self.step, self.run.dist
        local = float(result.loss)
        finite = math.isfinite(local)
        loss_sum, finite_ranks, stop_votes = all_reduce_sum(
            [local if finite else 0.0, float(finite), float(self.preempt.requested)], dist.device
        )
        step_loss = loss_sum / finite_ranks if finite_ranks else float("nan")
        if skipped:
            set_lr_schedule_step(self.engine, step)  # the schedule follows the step index, skipped or not
            guard = self.job.guard
            self.log(
                f"[bad step] step {step}: non-finite loss or gradient; the update was skipped "
                f"({guard.count} in this run, at most train.max_bad_steps={self.t.max_bad_steps}; "
                f"{dist.world_size - int(finite_ranks)} rank(s) had a non-finite loss)"
            )
            self.metrics.log({"step": step, "skipped": 1, "bad_steps": guard.count}, prefix="bad_step")
        else:
            self.loss_acc += step_loss
            self.steps_acc += 1
            spikes = self.job.spikes
            sigmas = spikes.observe(step_loss)
            if sigmas is not None:
                mean, std = spikes.mean_std()
                self.log(
                    f"[spike] step {step}: loss {step_loss:.4f} is {sigmas:.1f} sigma above the mean of the "
                    f"last {len(spikes.history)} steps ({mean:.4f} +- {std:.4f})"
                )
                self.metrics.log({"step": step, "loss": step_loss, "sigma": sigmas}, prefix="spike")
        if stop_votes > 0:
            self.preempt.start_grace()
        return stop_votes > 0

    def log_progress(self, result) -> None:
        t, step = self.t, self.step
        mean_loss = self.loss_acc / self.steps_acc if self.steps_acc else float("nan")
        timing = self.progress.interval(step)
        lr = self.engine.get_lr()[0]
        tps = timing["tokens_per_s"]
        grad_norm = None if result.grad_norm is None else float(result.grad_norm)
        world = self.run.dist.world_size
        self.metrics.log(
            {
                "step": step,
                "tokens": step * self.tokens_per_step,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tps,
                "step_time": timing["step_time"],
                "mfu": (
                    self.job.flops_per_token * tps / (world * self.peak_tflops * 1e12) if self.peak_tflops else None
                ),
                "mem_mb": peak_memory_mb(self.run.dist.device),
            }
        )
        self.log(
            f"[train] step {step}/{t.max_steps} ({100 * step / t.max_steps:.0f}%) | loss {mean_loss:.4f} | "
            f"lr {lr:.2e} | grad {'n/a' if grad_norm is None else f'{grad_norm:.3f}'} | "
            f"{tps:,.0f} tok/s | {timing['step_time']:.2f} s/step | ETA {format_duration(timing['eta_s'])}"
        )
        self.loss_acc, self.steps_acc = 0.0, 0

    def validate(self) -> None:
        run, t = self.run, self.t
        self.engine.eval()
        result = evaluate_stream(
            self.job.runner.eval_loss,
            self.job.valid,
            self.token_bytes,
            t.micro_batch_size,
            run.dp_rank,
            run.layout.dp,
            run.dist.device,
            run.tokenizer.pad,
            group=run.groups["dp"],
        )
        self.engine.train()
        self.metrics.log(
            {
                "step": self.step,
                "loss": result["loss"],
                "perplexity": result["perplexity"],
                "bits_per_byte": result["bits_per_byte"],
                "tokens": result["tokens"],
            },
            prefix="valid",
        )
        self.log(
            f"[valid] step {self.step}: loss {result['loss']:.4f} | ppl {result['perplexity']:.2f} | "
            f"bpb {result['bits_per_byte']:.4f} ({result['tokens']:,} tokens)"
        )

    def diagnose(self, grad_norms: list[float]) -> None:
        self.engine.eval()
        stats = self.job.runner.probe(self.probe_tokens)
        self.engine.train()
        self.metrics.log(
            {
                "step": self.step,
                "layer_var": stats["var"],
                "layer_rms": stats["rms"],
                "layer_max_abs": stats["max_abs"],
                "layer_attn_entropy": stats["attn_entropy"],
                "layer_grad_norm": grad_norms,
            },
            prefix="diag",
        )

        # Training-stability signals (Wortsman et al. 2023; Zhai et al. 2023): per-layer lists indexed like
        # layer_attn_entropy (entry i = block i+1), their extreme over layers, and the output logits.
        def extreme(pick, xs):  # a non-finite layer makes the summary non-finite (max/min would skip a nan)
            return float("nan") if any(math.isnan(x) for x in xs) else pick(xs)

        attn_logit_max = extreme(max, stats["attn_logit_max"])
        attn_entropy_min = extreme(min, stats["attn_entropy_min"])
        self.metrics.log(
            {
                "step": self.step,
                "attn_logit_max": attn_logit_max,
                "attn_entropy_min": attn_entropy_min,
                "logit_mean": stats["logit_mean"],
                "logit_max": stats["logit_max"],
                "log_z_mean": stats["log_z_mean"],
                "layer_attn_logit_max": stats["attn_logit_max"],
                "layer_attn_entropy_min": stats["attn_entropy_min"],
            },
            prefix="stability",
        )

        def fmt(xs):
            return " ".join(f"{x:.3g}" for x in xs)

        self.log(
            f"[diag] step {self.step}: residual var by layer [{fmt(stats['var'])}] | max|x| "
            f"[{fmt(stats['max_abs'])}] | grad norm [{fmt(grad_norms)}] | attn entropy "
            f"[{fmt(stats['attn_entropy'])}]"
        )
        self.log(
            f"[stability] step {self.step}: attn logit max {attn_logit_max:.3g} [{fmt(stats['attn_logit_max'])}] | "
            f"head entropy min {attn_entropy_min:.3g} [{fmt(stats['attn_entropy_min'])}] | output logits mean "
            f"{stats['logit_mean']:.3g} max {stats['logit_max']:.3g} | log Z mean {stats['log_z_mean']:.3g}"
        )

    def save(self) -> None:
        run, t, step = self.run, self.t, self.step
        layout, cfg = run.layout, self.job.cfg
        run.checkpointer.save(
            self.engine,
            step,
            {
                "step": step,
                "consumed_samples": step * t.global_batch_size,
                "tokens": step * self.tokens_per_step,
                "world_size": run.dist.world_size,
                "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ulysses": layout.ulysses},
                "zero_stage": cfg.zero.stage,
                "config": cfg.to_dict(),
                "bad_step_guard": self.job.guard.state_dict(),
                "spike_detector": self.job.spikes.state_dict(),
                "tokenizer_sha256": run.tokenizer.sha256,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            extra_files={run.tokenizer.filename: run.tokenizer.path},
        )

    def report_memory(self) -> None:
        """Parameter and optimizer-state bytes on every rank, against the ZeRO formula (memory.json)."""
        from pretrain.memory import expected_bytes, held_bytes

        cfg, layout = self.job.cfg, self.run.layout
        per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(
            per_rank, {"held": held_bytes(self.engine), "local_params": self.job.local_params}
        )
        if torch.distributed.get_rank() != 0:
            return
        report = {
            "zero_stage": cfg.zero.stage,
            "precision": cfg.train.precision,
            "dp": layout.dp,
            "zero_partitions": layout.zero_partitions,  # dp x ulysses: DeepSpeed's sequence-data-parallel group
            "ranks": [
                dict(r, expected=expected_bytes(r["local_params"], cfg.zero.stage, layout.zero_partitions))
                for r in per_rank
            ],
        }
        (self.run.run_dir / "memory.json").write_text(json.dumps(report, indent=1))
        r0 = report["ranks"][0]
        note = "" if cfg.train.precision == "fp32" else " (formula for fp32; mixed precision adds fp32 masters)"
        self.log(
            f"[memory] rank 0 holds {r0['held']['parameters'] / 2**20:.2f} MiB of parameters and "
            f"{r0['held']['optimizer'] / 2**20:.2f} MiB of optimizer state; ZeRO-{cfg.zero.stage} over "
            f"{layout.zero_partitions} ranks predicts {r0['expected']['parameters'] / 2**20:.2f} and "
            f"{r0['expected']['optimizer'] / 2**20:.2f}{note} (all ranks: memory.json)"
        )
