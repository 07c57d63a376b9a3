"""A listening socket and the threads of its connections: what the juggler server, the
state-sync server and the metrics endpoints each serve their TCP connections with.

A :class:`Listener` owns one thread that blocks in ``accept()`` (no poll) and a thread per
connection, registered under its lock before it starts; what is beyond its thread limit, or
cannot get a thread because the process is out of them, is refused at once on the accept
thread (HTTP 503). Each connection's thread may register what wakes it at shutdown (shut its
socket down in the handshake, close its websocket once open); :meth:`Listener.close` stops
accepting, calls those, and joins every thread. It knows nothing of what the connections
speak.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from typing import Any, Callable, Optional

from . import gilsend
from .handshake import http_response

__all__ = ["Listener", "shut", "start_thread", "helper_thread", "AT_LIMIT", "OUT_OF_THREADS",
           "OUT_OF_THREADS_LOG_INTERVAL"]

#: The reason of the HTTP 503 a connection gets beyond the thread limit.
AT_LIMIT = "server at its connection limit"
#: The reason of the HTTP 503 a connection gets when the process cannot start a thread for it
#: (``kernel.pid_max``, ``kernel.threads-max``, ``vm.max_map_count`` or memory).
OUT_OF_THREADS = "server out of threads"
#: Seconds between two ERROR lines about connections refused for want of a thread.
OUT_OF_THREADS_LOG_INTERVAL = 10.0


class Listener:
    """Accept TCP connections on ``host:port`` (port 0: any free one, see :attr:`port`) and
    run ``serve(sock, address)`` for each on a thread of its own, which then closes the
    socket (an exception from ``serve`` is logged first).

    :param name: the accept thread's name.
    :param conn_name: the name of a connection's thread, formatted with its peer's ``host``
        and ``port`` and the connection's number ``n`` (from 1).
    :param max_threads: connection threads at most (0: no limit); a connection beyond it is
        refused with HTTP 503 (:data:`AT_LIMIT`).
    :param tls: whether the connections begin with a TLS handshake: a refused one is then
        closed without a word (a plain-text 503 would read as garbage to it).
    :param on_refused: ``on_refused(how)`` counts each refusal: ``"503"``, or ``"closed"``
        under ``tls``.
    :param reuse_port: set ``SO_REUSEPORT``, so that several processes listen on the port.
    :param helper_threads: the accept thread also makes, for each connection, a thread object
        that the connection's thread may start (:func:`helper_thread`: a websocket's writer).
    """

    def __init__(self, host: str, port: int, serve: Callable[[socket.socket, Any], None], *, name: str,
                 conn_name: str, logger: logging.Logger, max_threads: int = 0, tls: bool = False,
                 on_refused: Optional[Callable[[str], None]] = None, reuse_port: bool = False,
                 helper_threads: bool = False) -> None:  # fmt: skip
        self.name = name
        self.logger = logger
        self.max_threads = max_threads
        self._serve = serve
        self._conn_name = conn_name
        self._tls = tls
        self._on_refused = on_refused
        self._helper_threads = helper_threads
        self._sock = _bind(host, port, reuse_port)
        self.host, self.port = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        # what wakes a connection's thread at close, by id of what it registered
        self._members: dict[int, tuple[Any, Callable[[], None]]] = {}
        self._count = 0
        self._accept_thread: Optional[threading.Thread] = None
        self._closing = False
        self._closing_event = threading.Event()
        self._closed = threading.Event()
        self._thread_failures = 0  # connections refused for want of a thread (see out_of_threads)
        self._thread_failure_logged = -math.inf

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def start(self, before: Optional[Callable[[], None]] = None) -> bool:
        """Start the accept thread, after calling ``before`` (what the owner starts with it),
        once: ``False`` if it runs already. :class:`RuntimeError` once :meth:`close` was
        called (then ``before`` is not called: a close under way never misses what it
        started)."""
        with self._lock:
            if self._closing:
                raise RuntimeError("server was shut down")
            if self._accept_thread is not None:
                return False
            if before is not None:
                before()
            self._accept_thread = threading.Thread(target=self._accept_loop, name=self.name)
            self._accept_thread.start()
        return True

    def close(self, before_join: Optional[Callable[[], None]] = None,
              after_join: Optional[Callable[[], None]] = None) -> bool:  # fmt: skip
        """Stop accepting, wake every registered connection (:meth:`register`), call
        ``before_join``, join every thread, then call ``after_join`` (what the owner stops
        last). Idempotent: a second call waits for the first to end, and returns ``False``."""
        with self._lock:
            first = not self._closing
            self._closing = True
            accept = self._accept_thread
        if not first:
            self._closed.wait()
            return False
        try:
            self._closing_event.set()
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() (Linux: it fails with EINVAL)
            except OSError:
                pass
            if accept is not None:
                accept.join()
            self._sock.close()
            with self._lock:
                stops = [stop for _, stop in self._members.values()]
            for stop in stops:
                stop()
            if before_join is not None:
                before_join()
            with self._lock:
                threads = list(self._threads)
            for t in threads:
                t.join()
            if after_join is not None:
                after_join()
        finally:
            self._closed.set()
        return True

    def wait_closed(self) -> None:
        """Until :meth:`close` has ended."""
        self._closed.wait()

    # -- the registry --

    def register(self, member: Any, stop: Callable[[], None]) -> bool:
        """Register ``member`` (a socket in its handshake, an open connection), and ``stop``,
        which :meth:`close` calls to wake its thread; ``False`` (and not registered) once the
        listener is closing."""
        with self._lock:
            if self._closing:
                return False
            self._members[id(member)] = (member, stop)
        return True

    def unregister(self, member: Any) -> None:
        with self._lock:
            self._members.pop(id(member), None)

    def members(self) -> list[Any]:
        """What is registered (a snapshot)."""
        with self._lock:
            return [member for member, _ in self._members.values()]

    def thread_count(self) -> int:
        """Connection threads running (or starting)."""
        with self._lock:
            return len(self._threads)

    # -- accepting --

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, address = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                # e.g. EMFILE, out of file descriptors: the pending connection stays in the
                # backlog; wait a little (or for close) instead of spinning on the error
                self.logger.error("accept failed: %s", exc)
                self._closing_event.wait(0.1)
                continue
            try:
                self._spawn(sock, address)
            except Exception:  # (MemoryError, say): that connection is lost, not the accept loop
                self.logger.exception("cannot serve %s", address)
                sock.close()

    def _spawn(self, sock: socket.socket, address: Any) -> None:
        t = None
        with self._lock:
            closing = self._closing
            full = bool(self.max_threads) and len(self._threads) >= self.max_threads
            if not closing and not full:
                self._count += 1
                # A daemon thread, though close() joins it like every other: CPython keeps a
                # lock per non-daemon thread and scans all of them whenever one ends, which
                # made closing 10,000 connections take minutes (quadratic).
                name = self._conn_name.format(host=address[0], port=address[1], n=self._count)
                t = _ConnThread(self._run, sock, address, name)
                self._threads.add(t)
        if t is None:
            if closing:
                gilsend.shutdown_and_close(sock)
            else:
                self._refuse(sock, AT_LIMIT)
            return
        if self._helper_threads:  # (on the accept thread, for a connection served: see helper_thread)
            t.helper = _HelperThread()
        try:
            start_thread(t)
        except (RuntimeError, MemoryError) as exc:  # e.g. "can't start new thread": out of threads
            with self._lock:
                self._threads.discard(t)
            self.out_of_threads(address, exc)
            self._refuse(sock, OUT_OF_THREADS)

    def _run(self, sock: socket.socket, address: Any) -> None:
        try:
            self._serve(sock, address)
        except Exception:
            self.logger.exception("unexpected error serving %s", address)
        finally:
            gilsend.shutdown_and_close(sock)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        """Refuse a connection on the accept thread, without waiting on it."""
        if self._on_refused is not None:
            self._on_refused("closed" if self._tls else "503")
        if not self._tls:
            try:
                sock.settimeout(0)  # never block the accept thread on a client
                sock.send(http_response(503, "Service Unavailable", {}, reason + "\n"))
            except OSError:
                pass
        gilsend.shutdown_and_close(sock)

    def out_of_threads(self, address: Any, exc: BaseException) -> None:
        """Log that a connection is refused (503) because no thread could be started for it:
        at ERROR once, then at most every :data:`OUT_OF_THREADS_LOG_INTERVAL` seconds with the
        count of refusals since (a process out of threads refuses every connection)."""
        now = time.monotonic()
        with self._lock:
            self._thread_failures += 1
            if now < self._thread_failure_logged + OUT_OF_THREADS_LOG_INTERVAL:
                return
            count, self._thread_failures = self._thread_failures, 0
            self._thread_failure_logged = now
        self.logger.error("cannot start a thread for %s (%s): refused with HTTP 503 (%d refused since the "
                          "last report); see kernel.pid_max, vm.max_map_count and memory",
                          address, exc, count)  # fmt: skip


class _ConnThread(threading.Thread):
    """A connection's thread: ``run(sock, address)``, called without the ``*args`` call of
    :meth:`threading.Thread.run`, which costs a C stack frame for the thread's lifetime."""

    def __init__(self, run: Callable[[socket.socket, Any], None], sock: socket.socket, address: Any, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._conn: Any = (run, sock, address)
        self.helper: Optional[_HelperThread] = None  # what helper_thread() hands out, once

    def run(self) -> None:
        run, sock, address = self._conn
        self._conn = None
        run(sock, address)


class _HelperThread(threading.Thread):
    """A connection's second thread (see :func:`helper_thread`): ``work()``, called without
    the ``*args`` call of :meth:`threading.Thread.run`. A daemon thread, joined by the
    connection's thread (see :class:`_ConnThread` for why daemon)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.work: Optional[Callable[[], None]] = None

    def run(self) -> None:
        work, self.work = self.work, None
        if work is not None:
            work()


def helper_thread(work: Callable[[], None], name: str) -> threading.Thread:
    """A thread, not started yet, that runs ``work()``: the one the accept thread made for the
    calling connection's thread (a :class:`Listener` with ``helper_threads``), else a new one.

    Why the accept thread makes it: :class:`threading.Thread` makes its start
    :class:`threading.Event`, which makes a :class:`threading.Condition`, each a Python
    ``__init__`` called from C: three C-level calls deep, they touch a third page of the C
    stack of the thread that makes them, a page that stays in memory for as long as that
    thread lives. On a connection's thread (a websocket's reader) that was 4 KiB more per idle
    connection (12 KiB of stack instead of 8, measured in ``/proc/self/smaps``); the accept
    thread's is one page for all."""
    me = threading.current_thread()
    t = getattr(me, "helper", None)
    if type(t) is _HelperThread:
        me.helper = None  # type: ignore[attr-defined]  # (handed out once)
    else:
        t = _HelperThread()
    t.name = name
    t.work = work
    return t


# What start_thread gives every thread it starts instead of an Event and a closure of its own.
_STARTED = threading.Event()
_STARTED.set()
try:  # (CPython's private hook maker: where it is missing or fails, each thread makes its own)
    _INVOKE_EXCEPTHOOK = threading._make_invoke_excepthook()  # type: ignore[attr-defined]
except (AttributeError, RuntimeError, TypeError):
    _INVOKE_EXCEPTHOOK = None


def start_thread(t: threading.Thread) -> None:
    """``t.start()``, for a thread of which there is one or two per connection: it then
    drops what a :class:`threading.Thread` keeps only for its start (its ``_started``
    :class:`threading.Event`, a :class:`threading.Condition` with its deque and lock, set
    once for good) and its own copy of the closure that reports an exception in it, sharing
    one of each instead: about 1.5 KiB and 15 objects for the garbage collector per thread.
    CPython only reads ``_started`` after the start to see that it is set, and that closure
    captures nothing of the thread; where either is not what this expects, nothing changes."""
    if _INVOKE_EXCEPTHOOK is not None and callable(getattr(t, "_invoke_excepthook", None)):
        t._invoke_excepthook = _INVOKE_EXCEPTHOOK  # type: ignore[attr-defined]
    t.start()
    if type(getattr(t, "_started", None)) is threading.Event:
        t._started = _STARTED  # type: ignore[attr-defined]


def shut(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways, waking a thread blocked on it (what a connection in its
    handshake registers to be woken with); never raises."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket (IPv6 for a host with a colon), with ``SO_REUSEADDR``."""
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("SO_REUSEPORT is not available on this system")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock
