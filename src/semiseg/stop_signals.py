"""Stopping a training run cleanly: SIGINT and SIGTERM end it at a step boundary after a
checkpoint, so the same command resumes it."""

from __future__ import annotations

import os
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


def leave_stops_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the main process, which stops at a step
    boundary after a checkpoint and then shuts its workers down.

    Ctrl-C in a terminal and job schedulers (SLURM, `kill -- -PGID`, `pkill -f`) signal every
    process of the job. A worker killed by it would end the run with PyTorch's "DataLoader
    worker is killed by signal", raised in the main process wherever it is (mid-backward),
    and no checkpoint. SIGTERM sent by the main process itself still ends the worker: that is
    how multiprocessing stops daemonic workers at exit, and ignoring it would hang the exit.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS cannot tell who sent a signal
        return
    # A worker forked inside `StopSignals` inherits its handler, which means nothing here.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Workers start with one thread; blocking SIGTERM here blocks it in every later thread too,
    # so the waiting thread is the only one that receives it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(
        target=_die_of_sigterm_from, args=(os.getppid(),), name="sigterm", daemon=True
    ).start()


def _die_of_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    # Die of it as an unblocked SIGTERM kills, so the parent sees the exit status it expects.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
