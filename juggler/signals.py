"""Stopping a command on SIGINT/SIGTERM: shared by the CLI's long-running commands and
``juggler load`` (which the CLI imports lazily, so neither imports the other)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["StopSignal"]

log = logging.getLogger("juggler.cli")


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
        """Block until the first signal (on the main thread, where Python runs handlers).

        On Linux a signal sent to the process goes to its main thread when that thread is
        ready to take it, which interrupts its wait for the event, and the handler runs at once:
        no timeout is needed. Elsewhere the kernel may hand it to any thread, and nothing would
        wake the main thread, so there it looks again every second."""
        if sys.platform.startswith("linux"):
            self.event.wait()
            return
        while not self.event.wait(1.0):
            pass
