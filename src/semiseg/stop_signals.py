"""Stopping a training run cleanly: SIGINT and SIGTERM end it at a step boundary after a
checkpoint, so the same command resumes it."""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training at a step boundary, after writing the checkpoint
    the same command resumes from."""

    def __init__(self, signal_name: str, iteration: int, checkpoint: Path):
        super().__init__(
            f"stopped by {signal_name} at iteration {iteration}; {checkpoint} holds the run: "
            "run the same command to resume it"
        )
        self.exit_code = 128 + getattr(signal, signal_name, signal.SIGTERM).value


class StopSignals:
    """SIGINT and SIGTERM ask the training loop to stop at the next step boundary (with a
    checkpoint) instead of ending the process; a second SIGINT stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.received: int | None = None
        self.previous: dict = {}
        # Handlers can only be installed from the main thread (not, say, in a notebook worker).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def name(self) -> str:
        return (
            signal.Signals(self.received).name
            if self.received is not None
            else "a signal of another process"
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
