"""The callee's side of the redis broker: a worker's connection that pops calls in batches and
stores their results (:class:`CallPopper`)."""

from __future__ import annotations

import hashlib
import logging
import math
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import gilsend, resp
from .exceptions import BrokerError
from .layout import (
    CONSUME_SCRIPT,
    POP_CALLS_SCRIPT,
    STORE_SCRIPT,
    WAKE_MARKER,
    call_slot,
    call_timeout_key,
    calls_key,
    ms,
    result_timeout_key,
    results_key,
)
from .message import CallPayload, ResultPayload, new_uuid
from .redisconn import REDIS_FAILURES, broker_error, text
from .rpc import Popped

if TYPE_CHECKING:
    from .broker import RedisBroker

__all__ = ["CallPopper"]

logger = logging.getLogger(__name__)

# TCP keepalive for a callee worker's connection, which blocks with no read timeout: a redis
# host that vanished without closing the connection is noticed in about a minute.
_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


Stored = Optional[Callable[[list[Optional[BrokerError]]], None]]


def _reply_error(reply: Any) -> Optional[BrokerError]:
    if isinstance(reply, BrokerError):
        return reply
    if isinstance(reply, redis.exceptions.ResponseError):
        return broker_error(reply)
    return None


def _report(stored: Stored, results: Sequence[Any], errors: list[Optional[BrokerError]]) -> None:
    if stored is not None and results:
        stored(errors)


class CallPopper:
    """A callee worker's own redis connection: it takes calls in batches and stores results.

    :meth:`pop` waits with ``BRPOP`` and no timeout (so an idle worker costs redis and Python
    nothing) until a call comes or :meth:`wake` is called from another thread, which unblocks
    it with ``CLIENT UNBLOCK``. Once a call comes, one script (:data:`POP_CALLS_SCRIPT`) takes
    up to ``n - 1`` more already waiting and consumes every one's timeout key.
    :meth:`exchange` stores results (each with the store script, as
    :meth:`RedisBroker.store_result` does) and takes the next batch, all in one round trip.

    The commands go straight to the connection, without redis-py's pool, retries and
    per-command bookkeeping: a worker is their only user, and a failed command must not be
    re-sent behind its back (a re-sent BRPOP would block again after :meth:`wake`). Any
    failure raises :class:`BrokerError`; the connection is then unusable: close it and make
    a new one.

    On a cluster the connection goes to the primary of the URIs' slot, by the cluster
    client's slot map (refreshed first with ``refresh``: a worker whose node failed finds the
    promoted replica), and checks that the node serves the slot (a node that answers
    ``MOVED`` puts its new node in the map, and the connection goes there). When a command
    later gets ``MOVED``, ``ASK`` (the slot moved; see :meth:`RedisBroker.redirected`) or
    ``UNBLOCKED``, :attr:`moved` is set: the next popper goes to the slot's node, at once.
    """

    #: The last failure was a ``MOVED``, ``ASK`` or ``UNBLOCKED`` reply: redis answers, the
    #: slot moved (or its node became a replica).
    moved = False

    def __init__(self, broker: "RedisBroker", uris: Sequence[str], refresh: bool = False) -> None:
        self._broker = broker
        self.uris = list(uris)
        if not self.uris:
            raise ValueError("no URI to pop calls for")
        self._keys = [calls_key(u) for u in self.uris]
        self._result_cap = broker.result_cap
        if broker.cluster and refresh:
            broker.refresh_slots()
        for redirects in range(2):  # (a node that answers MOVED: once more, to the one it names)
            try:
                self._connect(broker)
                return
            except BrokerError:
                if not (self.moved and redirects == 0):
                    raise
            self.moved = False

    def _connect(self, broker: "RedisBroker") -> None:
        client = broker.client
        try:
            if broker.cluster:
                node = client.nodes_manager.get_node_from_slot(call_slot(self.uris[0]))
                if node is None:
                    raise BrokerError(f"redis unavailable: no cluster node serves the slot of {self.uris[0]!r}")
                client = client.get_redis_connection(node)
            # CLIENT UNBLOCK goes through the shared client (on a cluster: the node's pool)
            self._control = client
            pool = client.connection_pool
            kwargs = dict(pool.connection_kwargs, socket_timeout=None, retry=Retry(NoBackoff(), 0))
            cls = pool.connection_class
            # A real connection (TCP, TLS or unix socket); fakeredis runs a blocking command in
            # the write itself, so the results before a BRPOP are sent on their own there.
            self._pipelined = cls.__module__.startswith("redis.") and issubclass(cls, redis.connection.AbstractConnection)
            if self._pipelined and issubclass(cls, redis.connection.Connection):  # TCP (or TLS)
                kwargs.update(socket_keepalive=True, socket_keepalive_options=_KEEPALIVE)
            if not self._pipelined and kwargs.get("server") is None:
                # fakeredis finds a client's in-memory server by host and port, and workers
                # starting at once can each make one (a check-then-set): join the pool's.
                shared = pool.get_connection()
                try:
                    kwargs["server"] = getattr(shared, "_server", None)
                finally:
                    pool.release(shared)
            self._conn = pool.connection_class(**kwargs)
            # connect() before the first command: it is where a Sentinel-managed connection
            # asks for the master (send_command alone would dial its default, localhost:6379)
            self._conn.connect()
            self._conn.send_command("CLIENT", "ID")
            self.client_id = int(self._conn.read_response())
            if broker.cluster:  # the node serves the slot, and the cluster is up
                self._conn.send_command("EXISTS", self._keys[0])
                self._conn.read_response()
        except REDIS_FAILURES as exc:
            self._close_quietly()
            if broker.cluster:
                self.moved = broker.redirected(exc)
                if not self.moved and not isinstance(exc, redis.exceptions.ResponseError):
                    broker.refresh_slots()  # (its node is down: the next popper looks again)
            raise broker_error(exc) from exc
        self._lock = threading.Lock()
        # a plain TCP or unix socket with no Python timeout (SSL and stand-ins go through
        # redis-py)
        sock = getattr(self._conn, "_sock", None)
        self._plain_socket = gilsend.AVAILABLE and type(sock) is socket.socket and sock.gettimeout() is None
        self._blocked = False  # a BRPOP is (about to be) sent and not answered yet
        self._woken = False
        self._store_sha = hashlib.sha1(STORE_SCRIPT.encode()).hexdigest()
        self._consume_sha = hashlib.sha1(CONSUME_SCRIPT.encode()).hexdigest()
        self._pop_sha = hashlib.sha1(POP_CALLS_SCRIPT.encode()).hexdigest()
        self._store_body = STORE_SCRIPT.encode()
        # fakeredis only (see _fake_brpop); the hash tag of the first URI keeps it in its slot
        self._wake_key = f"juggler:callee:wake:{{{self.uris[0]}}}:{new_uuid()}"

    def __repr__(self) -> str:
        return f"<CallPopper {self.uris} client_id={getattr(self, 'client_id', None)}>"

    def pop(self, n: int, results: Sequence[tuple[ResultPayload, float, str]] = (), stored: Stored = None) -> list[Popped]:
        """Store ``results`` (payload, seconds left, its JSON), then wait for a call and take
        up to ``n`` in all; ``[]`` after :meth:`wake`.

        ``stored`` is called once, as soon as the results are stored, with one entry per
        result: ``None`` or the :class:`BrokerError` (e.g. :class:`CapacityExceeded`) that
        kept it from being stored (each gets the error when the connection failed). Raises
        :class:`BrokerError` when redis fails; the connection is then unusable.

        On a standalone redis the results go in the same write as the BRPOP, and the call
        that comes is taken with the others waiting by one script: two round trips. On a
        cluster the results go through the cluster client (each result list lives on the node
        of its connection's slot).
        """
        with self._lock:
            woken = self._woken
        if woken or not self._pipelined or self._broker.cluster:
            self.exchange(results, 0, stored)
            commands: list[tuple[Any, ...]] = []
            results = ()
        else:
            # EVAL, not EVALSHA: a NOSCRIPT could only be handled after the BRPOP returns
            commands = self._store_commands(results, eval_=True)
        with self._lock:
            if self._woken:
                return []
            self._blocked = True
        try:
            if not self._pipelined:
                item = self._fake_brpop()
            else:
                try:
                    self._write(commands + [("BRPOP", *self._keys, 0)])
                    replies = [self._read() for _ in commands]
                except BrokerError as exc:
                    _report(stored, results, [exc] * len(results))
                    raise
                _report(stored, results, [_reply_error(r) for r in replies])
                item = self._read()
        finally:
            with self._lock:
                self._blocked = False
        if isinstance(item, Exception):  # (UNBLOCKED: its node became a replica)
            self.moved = self._broker.redirected(item) or str(item).startswith("UNBLOCKED")
            raise broker_error(item)
        if item is None:  # unblocked
            return []
        popped = self._run([self._pop_command(n, item[1])])[0]
        if isinstance(popped, BrokerError):
            raise popped
        return popped

    def _fake_brpop(self) -> Any:
        """fakeredis: BRPOP with no timeout on the call lists and this popper's own wake list,
        onto which :meth:`wake` pushes a marker (fakeredis wakes a blocked command on any write).
        Its CLIENT IDs are not unique across the connections of one ``FakeRedis()`` made
        without a shared ``FakeServer`` (each connection gets a server object of its own), so
        CLIENT UNBLOCK could wake another client. ``None`` once woken."""
        self._write([("BRPOP", *self._keys, self._wake_key, 0)])
        item = self._read()
        if isinstance(item, (list, tuple)) and text(item[0]) == self._wake_key:
            return None
        return item

    def exchange(self, results: Sequence[tuple[ResultPayload, float, str]], n: int, stored: Stored = None) -> list[Popped]:
        """As :meth:`pop`, but without waiting: takes up to ``n`` calls already waiting (none
        when ``n`` is 0). On a standalone redis it is one round trip."""
        if self._broker.cluster:
            errors: list[Optional[BrokerError]] = []
            for p, remaining, data in results:
                try:
                    self._broker._run_store(result_timeout_key(p.conn_uuid, p.msg_uuid), results_key(p.conn_uuid),
                                            remaining, data, self._result_cap)  # fmt: skip
                    errors.append(None)
                except BrokerError as exc:
                    errors.append(exc)
            _report(stored, results, errors)
            commands: list[tuple[Any, ...]] = []
            results = ()
        else:
            commands = self._store_commands(results, eval_=False)
        if n > 0:
            commands.append(self._pop_command(n, ""))
        if not commands:
            return []
        try:
            replies = self._run(commands)
        except BrokerError as exc:
            _report(stored, results, [exc] * len(results))
            raise
        _report(stored, results, [_reply_error(r) for r in replies[: len(results)]])
        if n == 0:
            return []
        if isinstance(replies[-1], BrokerError):
            raise replies[-1]
        return replies[-1]

    def _store_commands(self, results: Sequence[tuple[ResultPayload, float, str]], eval_: bool) -> list[tuple[Any, ...]]:
        script = self._store_body if eval_ else self._store_sha
        command = "EVAL" if eval_ else "EVALSHA"
        cap = self._result_cap
        return [
            (command, script, 2, result_timeout_key(p.conn_uuid, p.msg_uuid), results_key(p.conn_uuid), ms(left), data, cap)
            for p, left, data in results
        ]  # fmt: skip

    def wake(self) -> bool:
        """Make :meth:`pop` return ``[]`` now and from now on (from any thread). Returns
        ``False`` when a ``BRPOP`` may be on its way to redis: call it again a little later."""
        with self._lock:
            self._woken = True
            blocked = self._blocked
        if not self._pipelined:  # fakeredis: the marker ends the BRPOP now or the next one at once
            try:
                self._control.rpush(self._wake_key, WAKE_MARKER)
            except REDIS_FAILURES as exc:
                logger.debug("waking a fakeredis callee worker failed: %s", exc)
            return True
        if not blocked:
            return True
        try:
            return bool(self._control.client_unblock(self.client_id))
        except REDIS_FAILURES as exc:
            # redis is unreachable: end the BRPOP by shutting its socket down
            logger.debug("CLIENT UNBLOCK failed (%s): closing the blocked connection", exc)
            sock = getattr(self._conn, "_sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return True

    def close(self) -> None:
        if not getattr(self, "_pipelined", True):  # fakeredis: drop a marker nobody popped
            try:
                self._control.delete(self._wake_key)
            except REDIS_FAILURES:
                pass
        self._close_quietly()

    def _close_quietly(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            try:
                conn.disconnect()
            except REDIS_FAILURES:
                pass

    def _pop_command(self, n: int, first: Any) -> tuple[Any, ...]:
        return ("EVALSHA", self._pop_sha, len(self._keys), *self._keys, max(1, n), first, *self.uris)

    def _run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write, read every reply; the replies of the pop script are
        made :class:`Popped` lists, error replies :class:`BrokerError`. A script redis does
        not know (NOSCRIPT) is loaded and its command sent again."""
        replies = self._send(commands)
        again = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
        if again:
            sent = self._send([("SCRIPT", "LOAD", s) for s in (STORE_SCRIPT, POP_CALLS_SCRIPT)] + [commands[i] for i in again])
            for err in sent[:2]:
                if isinstance(err, Exception):
                    raise broker_error(err)
            for i, r in zip(again, sent[2:]):
                replies[i] = r
        out: list[Any] = []
        for command, reply in zip(commands, replies):
            if isinstance(reply, redis.exceptions.ResponseError):
                self.moved = self._broker.redirected(reply) or self.moved
                out.append(broker_error(reply))
            elif command[1] == self._pop_sha:
                out.append(self._popped(reply))
            else:
                out.append(reply)
        return out

    def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        self._write(commands)
        return [self._read() for _ in commands]

    def _write(self, commands: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        try:
            sock = conn._sock
            if self._plain_socket and sock is not None:
                # what send_packed_command does, less its overhead, in a send that keeps
                # the GIL when the socket takes it all (see juggler.gilsend)
                data = b"".join(resp.pack(c) for c in commands)
                try:
                    gilsend.sendall(sock, data)
                except BaseException:  # (as redis-py: a command half sent ends the connection)
                    conn.disconnect()
                    raise
            else:
                conn.send_packed_command(conn.pack_commands(commands))
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    def _read(self) -> Any:
        """The next reply; an error reply is returned (read in full: the next one follows)."""
        try:
            return self._conn.read_response()
        except redis.exceptions.ResponseError as exc:
            return exc
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    def _popped(self, reply: list[Any]) -> list[Popped]:
        out = []
        for data, ttl in zip(reply[::2], reply[1::2]):
            try:
                payload = CallPayload.from_json(data)
            except ValueError as exc:
                logger.warning("dropping undecodable call payload: %s", exc)
                continue
            ttl = int(ttl)
            if ttl == -3:  # the script did not consume its timeout key
                if payload.uri not in self.uris:
                    # not ours: the callee drops it; its timeout key (if any) expires by itself
                    out.append(Popped(payload, math.inf))
                    continue
                reply = self._send([("EVALSHA", self._consume_sha, 1, call_timeout_key(payload.uri, payload.msg_uuid))])[0]
                if isinstance(reply, redis.exceptions.NoScriptError):
                    reply = self._send([("EVAL", CONSUME_SCRIPT, 1, call_timeout_key(payload.uri, payload.msg_uuid))])[0]
                if isinstance(reply, Exception):
                    raise reply if isinstance(reply, BrokerError) else broker_error(reply)
                ttl = int(reply)
            out.append(Popped(payload, ttl / 1000.0 if ttl > 0 else 0.0))
        return out
