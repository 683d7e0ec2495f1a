"""A graceful stop: the first Ctrl-C / SIGTERM ends training after a whole step, with a checkpoint."""

from __future__ import annotations

import signal
import threading

from cvfm.runtime.progress import log


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM arrived; the run stopped after a whole step and saved a checkpoint."""


class GracefulStop:
    """While training, the first SIGINT / SIGTERM asks the loop to stop after the current step (so the
    checkpoint is consistent); a second one interrupts at once."""

    def __init__(self):
        self.requested, self._previous = False, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("stopping after this step (Ctrl-C again to abort without a checkpoint)")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
