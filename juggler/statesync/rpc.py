"""Remote procedure calls over ``MESSAGE``: hat-juggler's ``RpcConnection`` convention.

A request is the payload ``{"type": "rpc", "id": N, "direction": "request", "action": NAME,
"args": [...]}``; its response ``{"type": "rpc", "id": N, "direction": "response", "success":
BOOL, "result": ...}``, where a failed action's result is the text of its error. Other messages
still reach :meth:`RpcConnection.receive`.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterator, Mapping, Optional

from ..exceptions import CallExpired, ConnectionClosed, RemoteError
from . import protocol
from .connection import ChangeHandle, Connection, run_inside

__all__ = ["RpcConnection"]

Action = Callable[..., Any]


class RpcConnection:
    """Calls to the peer's actions, and the peer's calls to ``actions``, over ``conn``.

    ``actions`` maps action names to functions called with the request's ``args``; an action
    not in it goes to ``default_action(name, *args)`` if given, and fails otherwise. Actions
    run on a pool of ``max_workers`` threads (``juggler-statesync-<id>-rpc_<n>``), so a slow one
    does not hold up the connection's reader; a request that finds ``max_pending`` calls
    already running or waiting is answered at once with a failure. An action's exception
    answers the call with ``success: false`` and the exception's text.

    The data and message methods are the connection's own. Closing the connection (either
    side) ends the calls still waiting with :class:`~juggler.exceptions.ConnectionClosed`
    and joins the pool, after the actions still running have returned.
    """

    def __init__(
        self,
        conn: Connection,
        actions: Optional[Mapping[str, Action]] = None,
        default_action: Optional[Callable[..., Any]] = None,
        *,
        call_timeout: float = 60.0,
        max_workers: int = 4,
        max_pending: int = 64,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        if not call_timeout > 0:
            raise ValueError(f"call_timeout must be a positive number of seconds, got {call_timeout!r}")
        if max_workers <= 0 or max_pending <= 0:
            raise ValueError("max_workers and max_pending must be positive")
        with conn._lock:
            if conn._rpc is not None:
                raise ValueError(f"{conn!r} already has an RpcConnection: its RPC messages go to that one")
            conn._rpc = self
        self.conn = conn
        self.actions = dict(actions or {})
        self.default_action = default_action
        self.call_timeout = call_timeout
        self.max_pending = max_pending
        self.logger = logger or conn.logger
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._calls: dict[Any, Future] = {}
        self._running = 0  # requests of the peer submitted and not yet answered
        self._closed: Optional[ConnectionClosed] = None
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix=f"juggler-statesync-{conn.id}-rpc")
        conn.add_message_filter(self._on_message)
        conn.add_close_hook(self._on_closed)

    def __repr__(self) -> str:
        return f"<statesync.RpcConnection on {self.conn!r}>"

    # -- calls to the peer --

    def call(self, action: str, *args: Any, timeout: Optional[float] = None) -> Any:
        """Call the peer's ``action(*args)`` and block for its result. Raises
        :class:`~juggler.exceptions.RemoteError` when the action failed (its ``message`` is
        the peer's error text), :class:`~juggler.exceptions.CallExpired` (a
        :class:`TimeoutError`) when no response came within ``timeout`` seconds (default:
        ``call_timeout``), :class:`~juggler.exceptions.ConnectionClosed` when the connection
        closed first. Each call ends exactly once: a late response is dropped."""
        timeout = self.call_timeout if timeout is None else timeout
        msg_id = next(self._ids)
        request = protocol.rpc_request(msg_id, action, list(args))
        fut: Future = Future()
        with self._lock:
            if self._closed is not None:
                raise self._closed
            self._calls[msg_id] = fut
        try:
            self.conn.send(request)  # TypeError/ValueError when args are not JSON
            return fut.result(timeout)
        except FutureTimeout:
            raise CallExpired(f"rpc call {action!r} #{msg_id} got no response within {timeout:g} s") from None
        finally:
            with self._lock:
                self._calls.pop(msg_id, None)

    # -- the peer's calls --

    def _on_message(self, payload: Any) -> bool:
        """The connection's message filter (on its reader thread): takes the RPC messages."""
        # a ProtocolError (an RPC message of the wrong shape) closes the connection with 1007
        msg = protocol.parse_rpc(payload)
        if msg is None:
            return False
        if isinstance(msg, protocol.RpcResponse):
            with self._lock:
                fut = self._calls.pop(msg.id, None)
            if fut is None:
                self.logger.debug("statesync connection %d: response to rpc #%s after its call ended", self.conn.id, msg.id)
            elif msg.success:
                fut.set_result(msg.result)
            else:
                text = msg.result if isinstance(msg.result, str) else json.dumps(msg.result)
                fut.set_exception(RemoteError(text, msg.result))
            return True
        with self._lock:
            busy = self._running >= self.max_pending
            if not busy:
                self._running += 1
        if busy:
            self._respond(msg.id, False, f"too many calls in progress (max_pending={self.max_pending})")
            return True
        try:
            self._pool.submit(run_inside, self.conn, self._run, msg)
        except RuntimeError:  # the pool was shut down: the connection is over
            with self._lock:
                self._running -= 1
        return True

    def _run(self, req: protocol.RpcRequest) -> None:
        try:
            action = self.actions.get(req.action)
            if action is None and self.default_action is not None:
                action = functools.partial(self.default_action, req.action)
            if action is None:
                self._respond(req.id, False, f"invalid action {req.action!r}")
                return
            try:
                result = action(*req.args)
            except Exception as exc:
                self.logger.info("statesync connection %d: rpc action %r failed: %s", self.conn.id, req.action, exc,
                                 exc_info=self.logger.isEnabledFor(logging.DEBUG))  # fmt: skip
                self._respond(req.id, False, str(exc) or type(exc).__name__)
                return
            self._respond(req.id, True, result)
        finally:
            with self._lock:
                self._running -= 1

    def _respond(self, msg_id: Any, success: bool, result: Any) -> None:
        try:
            try:
                self.conn.send(protocol.rpc_response(msg_id, success, result))
            except (TypeError, ValueError) as exc:  # the action returned something that is not JSON
                self.conn.send(protocol.rpc_response(msg_id, False, f"result is not JSON: {exc}"))
        except ConnectionClosed:
            pass  # nobody to answer any more

    def _on_closed(self) -> None:
        """The connection is over (on its reader thread): end the waiting calls, join the pool."""
        closed = self.conn._closed_error()
        with self._lock:
            self._closed = closed
            calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(closed)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the connection's own methods --

    @property
    def local_data(self) -> Any:
        return self.conn.local_data

    @property
    def remote_data(self) -> Any:
        return self.conn.remote_data

    def set_local_data(self, data: Any) -> None:
        self.conn.set_local_data(data)

    def flush_local_data(self) -> None:
        self.conn.flush_local_data()

    def register_change_cb(self, cb: Callable[[], None]) -> ChangeHandle:
        return self.conn.register_change_cb(cb)

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    def receive(self, timeout: Optional[float] = None) -> Any:
        return self.conn.receive(timeout)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.conn)

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def close(self) -> None:
        """Close the connection (see :meth:`Connection.close`)."""
        self.conn.close()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        return self.conn.wait_closed(timeout)

