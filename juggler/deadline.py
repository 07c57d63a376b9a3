"""One timeout carried across several blocking steps.

A request that first waits for a lock, then for a queue, then for an answer must not wait
``timeout`` at each step: :meth:`Deadline.after` fixes the moment once, and each step waits
for what :meth:`~Deadline.remaining` says is left. (Where the moment itself is the data, e.g.
in a heap of call expiries or in the per-call bookkeeping of a connection, the code keeps the
bare ``time.monotonic()`` float: that path pays for no object.)
"""

from __future__ import annotations

import time

__all__ = ["Deadline"]


class Deadline:
    """A moment on the ``time.monotonic()`` clock, :attr:`at`."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        """Seconds left until it passes; ``0.0`` once it has."""
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        """Whether it has passed."""
        return time.monotonic() >= self.at

    def __repr__(self) -> str:
        return f"Deadline(in {self.at - time.monotonic():.3f} s)"
