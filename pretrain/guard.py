"""Bad steps and loss spikes.

BadStepGuard: a step whose loss or gradients are not finite never reaches the optimizer. Before
the optimizer step, every rank checks its loss and the gradients it holds, and all ranks agree
(one all-reduce); on a bad step the innermost torch optimizer's step() (what ZeRO 1-3, the bf16
optimizer and plain ZeRO-0 all end up calling) does nothing at all: parameters, Adam moments and
step counts stay as they were. DeepSpeed's own overflow check (on the global gradient norm, under
ZeRO 1-3 and bf16) may skip the step first; both count the same. The LR schedule stays tied to
the step index (a skipped step uses up its learning rate), as the data position does.
Policy: `skip` (up to train.max_bad_steps in the run, then stop) or `stop` at the first one.

SpikeDetector: logs a step whose loss is more than `sigma` standard deviations above the mean
of the previous `window` steps (spikes are reported, not acted on).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from kernels.errors import PretrainError
from pretrain.distributed import all_reduce


class TrainingStopped(PretrainError, RuntimeError):
    """Training cannot continue; the message says why and what to do."""

    exit_code = 4


class BadStepGuard:
    def __init__(self, engine, policy: str, max_bad_steps: int, device: torch.device):
        self.engine, self.policy, self.max_bad_steps, self.device = engine, policy, max_bad_steps, device
        self.count = 0  # bad steps so far in the run (saved in checkpoints)
        self._decision = False  # this step's agreed verdict: True = bad, skip the update
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer
        original = inner.step

        def guarded_step(*args, **kwargs):
            return None if self._decision else original(*args, **kwargs)

        inner.step = guarded_step  # ZeRO-3 calls it once per parameter sub-group: the verdict holds for all

    def decide(self, loss: torch.Tensor | None) -> bool:
        """A collective, called by every rank after the step's backward passes and before the
        optimizer step: is this rank's loss or any gradient it holds in full not finite? All ranks
        agree (one all-reduce). Gradients held only as ZeRO-2/3 partitions are checked by
        DeepSpeed's own overflow test on the global gradient norm, which then skips the step."""
        checks = [torch.isfinite(p.grad).all() for p in self.engine.module.parameters() if p.grad is not None]
        if loss is not None:
            checks.append(torch.isfinite(loss.detach()).all())
        bad = torch.stack(checks).logical_not().any().float().reshape(1) if checks else torch.zeros(1)
        bad = all_reduce(bad.to(self.device))
        self._decision = bool(bad.item() > 0)
        return self._decision

    def after_step(self, step: int) -> bool:
        """True when the step just taken was skipped (by us or by DeepSpeed's overflow check);
        applies the policy."""
        skipped = self._decision or not getattr(self.engine, "_step_applied", True)
        self._decision = False
        if not skipped:
            return False
        self.count += 1
        if self.policy == "stop":
            raise TrainingStopped(
                f"step {step}: the loss or a gradient is not finite (train.bad_step_policy=stop); "
                "the update was not applied. Resume from the last checkpoint with --resume auto, "
                "e.g. with a lower train.lr or train.grad_clip"
            )
        if self.count > self.max_bad_steps:
            raise TrainingStopped(
                f"step {step}: {self.count} steps with a non-finite loss or gradient exceed "
                f"train.max_bad_steps={self.max_bad_steps}; stopping. The skipped steps changed "
                "nothing; resume from the last checkpoint with --resume auto after a fix "
                "(lower train.lr, train.grad_clip, fp32)"
            )
        return True

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict | None) -> None:
        self.count = int((state or {}).get("count", 0))


class SpikeDetector:
    def __init__(self, sigma: float, window: int):
        self.sigma, self.window = sigma, window
        self.history: deque = deque(maxlen=window)

    def observe(self, loss: float) -> float | None:
        """How many standard deviations `loss` lies above the window's mean when that exceeds
        `sigma` (a spike), else None. Non-finite losses are not added to the history."""
        spike = None
        if self.sigma > 0 and len(self.history) >= min(16, self.window) and math.isfinite(loss):
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / max(1, n - 1))
            if std > 0 and (loss - mean) / std > self.sigma:
                spike = (loss - mean) / std
        if math.isfinite(loss):
            self.history.append(loss)
        return spike

    def mean_std(self) -> tuple[float, float]:
        n = len(self.history)
        mean = sum(self.history) / max(1, n)
        return mean, math.sqrt(sum((x - mean) ** 2 for x in self.history) / max(1, n - 1))

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict | None) -> None:
        self.history = deque((state or {}).get("history", []), maxlen=self.window)
