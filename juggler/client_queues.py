"""The client's two structures its threads share: the writer's bounded outbox, and the heap
of its calls' deadlines that its timer thread serves (see :mod:`juggler.client`)."""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from typing import Any, Optional

__all__ = ["Outbox", "Expiries"]


class Outbox:
    """The writer's queue of at most ``maxsize`` messages; :meth:`put_last` always gets in."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: Any, timeout: Optional[float]) -> bool:
        """Queue ``item``, waiting up to ``timeout`` seconds for room; whether it went in
        (not once closed)."""
        with self._cond:
            if len(self._items) >= self.maxsize and not self._closed:
                if timeout is not None and timeout <= 0:
                    return False
                self._cond.wait_for(lambda: len(self._items) < self.maxsize or self._closed, timeout)
            if self._closed or len(self._items) >= self.maxsize:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def put_last(self, item: Any, close: bool = False) -> None:
        """Queue ``item`` (an end marker) whatever the bound; with ``close``, nothing more
        goes in after it."""
        with self._cond:
            self._items.append(item)
            self._closed = self._closed or close
            self._cond.notify_all()

    def get(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._items)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def clear(self) -> None:
        """Drop what is queued (a lost connection's: what it was for has ended)."""
        with self._cond:
            self._items.clear()
            self._cond.notify_all()


class Expiries:
    """Deadlines of pending calls, served by the client's timer thread."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stopped = False

    def add(self, deadline: float, msg_uuid: str) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, msg_uuid))
            if self._heap[0][1] == msg_uuid:
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def __len__(self) -> int:
        return len(self._heap)

    def compact(self, live: "dict[str, Any]") -> None:
        """Forget the deadlines of calls that have already ended."""
        with self._cond:
            self._heap = [item for item in self._heap if item[1] in live]
            heapq.heapify(self._heap)
            self._cond.notify()

    def next_expired(self) -> Optional[list[str]]:
        """Block until some deadlines pass; their uuids, or ``None`` once stopped."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[1])
                if due:
                    return due
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None
