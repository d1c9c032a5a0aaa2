"""Preemption: a signal to any rank (SIGTERM from a scheduler or `kill`, SIGUSR1 from SLURM's
`--signal=B:USR1@120`) makes every rank save a checkpoint at the end of the current step and
exit 0, within a grace period.

The handler only records the signal (nothing else is safe inside a handler). The training loop
sums the flag over all ranks once per step, in the same collective as the step's loss, so every
rank sees the request at the same step and they all save together. If the save cannot finish
within the grace period (a hung collective, a slow filesystem), a watchdog exits the process with
PREEMPT_TIMEOUT_EXIT instead of letting the scheduler's SIGKILL arrive mid-write; the previous
checkpoint is intact either way.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PREEMPT_TIMEOUT_EXIT = 124


class Preemption:
    def __init__(self, signals: list[str], grace_period_s: float, log):
        self.signals = [getattr(signal, name) for name in signals]
        self.grace_period_s, self.log = grace_period_s, log
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous = {}
        self._watchdog: threading.Timer | None = None

    def install(self) -> "Preemption":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
            self._watchdog = threading.Timer(self.grace_period_s, self._out_of_time)
            self._watchdog.daemon = True
            self._watchdog.start()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "another rank's signal"

    def _out_of_time(self) -> None:
        print(
            f"[preempt] the grace period of {self.grace_period_s:.0f}s after {self.describe()} ran out before "
            f"the checkpoint was written; exiting with {PREEMPT_TIMEOUT_EXIT} (the previous checkpoint is intact)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(PREEMPT_TIMEOUT_EXIT)

    def start_grace(self) -> None:
        """A rank that learns of the request from another rank starts its own watchdog now."""
        if self._watchdog is None:
            self.received_at = time.monotonic()
            self._watchdog = threading.Timer(self.grace_period_s, self._out_of_time)
            self._watchdog.daemon = True
            self._watchdog.start()
