"""Stop signals: SIGTERM / SIGINT (cluster preemption, Ctrl-C) end the run cleanly after the current optimizer step."""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger("orpo")


class StopSignal:
    """SIGTERM / SIGINT (cluster preemption, Ctrl-C) ask the loop to stop after the current optimizer step.

    A second signal of the same kind stops at once, as if no handler were installed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        logger.warning(
            "%s received: stopping at the next safe point (after the current optimizer step or evaluation "
            "batch) with a checkpoint, or the final model, saved "
            "(send it again to stop at once)",
            self.received,
        )

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which stops cleanly and then ends them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
