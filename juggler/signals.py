"""Stopping a command on SIGINT/SIGTERM: shared by the CLI's long-running commands and
``juggler load`` (which the CLI imports lazily, so neither imports the other)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

__all__ = ["StopSignal"]

log = logging.getLogger(__name__)


class StopSignal:
    """The first SIGINT/SIGTERM asks for a graceful stop; a second one exits at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._count = 0

    def install(self) -> "StopSignal":
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self._count += 1
        if self._count > 1:
            os.write(2, b"juggler: second signal, exiting now\n")
            os._exit(1)
        log.info("got %s: stopping (send it again to exit at once)", signal.Signals(signum).name)
        self.event.set()

    def wait(self) -> None:
        """Block until the first signal, looking again every second.

        Python runs signal handlers on the main thread only, and a signal the kernel hands to
        another thread does not interrupt the main thread's wait for a lock. That happens even
        on Linux: a ``juggler demo`` waiting with no timeout once missed its SIGINT in CI. The
        second's wait lets the handler run whichever thread caught the signal."""
        while not self.event.wait(1.0):
            pass
