"""Helpers of the state-sync tests: waiting on remote data, a wire tap that counts frames, and
hat-juggler (the real peer, on asyncio) driven from the test's thread."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import struct
import threading
from typing import Any, Callable, Optional

from juggler import statesync
from juggler.frames import unmask

from .conftest import T


def same(a: Any, b: Any) -> bool:
    """Equal as JSON (``1`` and ``True`` differ, as they do on the wire)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class Watch:
    """Waits, without sleeping, for a condition on a connection's remote data: woken by the
    connection's change callback (ours, or hat-juggler's)."""

    def __init__(self, conn: Any, register: Optional[Callable[[Callable[[], None]], Any]] = None) -> None:
        self.conn = conn
        self.cond = threading.Condition()
        self.changes = 0
        self.handle = (register or conn.register_change_cb)(self._changed)

    def _changed(self) -> None:
        with self.cond:
            self.changes += 1
            self.cond.notify_all()

    def until(self, predicate: Callable[[Any], bool], timeout: float = 10) -> Any:
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate(self.conn.remote_data), T(timeout))
        assert ok, f"remote data is still {self.conn.remote_data!r}"
        return self.conn.remote_data

    def equals(self, value: Any, timeout: float = 10) -> Any:
        return self.until(lambda data: same(data, value), timeout)


class WireTap:
    """A TCP relay for one connection between a client and a server, keeping every byte that
    crosses it each way, so a test can count the websocket frames on the wire."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = bytearray()  # client -> server
        self.down = bytearray()  # server -> client
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="test-wiretap-accept")]
        self._threads[0].start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.target_port))
        with self._lock:
            self._socks += [client, server]
        for src, dst, buf, name in ((client, server, self.up, "up"), (server, client, self.down, "down")):
            t = threading.Thread(target=self._pump, args=(src, dst, buf), name=f"test-wiretap-{name}")
            self._threads.append(t)
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self._lock:
                buf += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        """Drop the connection abruptly, both ways (no close frame)."""
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.cut()
        for t in list(self._threads):
            t.join()
        for s in self._socks:
            s.close()

    def frames(self, direction: str) -> list[tuple[int, bytes]]:
        """The complete frames seen so far one way (``"up"`` or ``"down"``): (opcode, payload)."""
        with self._lock:
            data = bytes(self.up if direction == "up" else self.down)
        pos = data.find(b"\r\n\r\n") + 4  # after the HTTP head
        out = []
        while pos + 2 <= len(data):
            b1, b2 = data[pos], data[pos + 1]
            length, p = b2 & 0x7F, pos + 2
            if length == 126:
                (length,) = struct.unpack(">H", data[p : p + 2])
                p += 2
            elif length == 127:
                (length,) = struct.unpack(">Q", data[p : p + 8])
                p += 8
            mask = None
            if b2 & 0x80:
                mask, p = data[p : p + 4], p + 4
            if p + length > len(data):
                break
            payload = data[p : p + length]
            out.append((b1 & 0x0F, unmask(payload, mask) if mask else payload))
            pos = p + length
        return out

    def messages(self, direction: str, mtype: Optional[str] = None) -> list[dict]:
        """The state-sync messages (text frames) seen one way, of ``mtype`` if given."""
        msgs = [json.loads(p) for op, p in self.frames(direction) if op == 1]
        return [m for m in msgs if mtype is None or m["type"] == mtype]


class HatLoop:
    """An asyncio loop on a thread of its own, running hat-juggler for the tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-hat-loop")
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(T(timeout))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the loop's thread (hat-juggler is not thread-safe)."""

        async def wrapper() -> Any:
            return fn(*args)

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class OurPeer:
    """Our side of a pairing: a connection and its RpcConnection."""

    name = "ours"

    def __init__(self, conn: statesync.Connection, actions: dict) -> None:
        self.conn = conn
        self.rpc = statesync.RpcConnection(conn, actions)

    @property
    def remote_data(self) -> Any:
        return self.conn.remote_data

    def watch(self) -> Watch:
        return Watch(self.conn)

    def set_local_data(self, data: Any) -> None:
        self.conn.set_local_data(data)

    def flush(self) -> None:
        self.conn.flush_local_data()

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    def receive(self, timeout: float = 10) -> Any:
        return self.rpc.receive(T(timeout))

    def call(self, action: str, *args: Any) -> Any:
        return self.rpc.call(action, *args, timeout=T(10))

    def close(self) -> None:
        self.conn.close()

    def wait_closed(self, timeout: float = 10) -> bool:
        return self.conn.wait_closed(T(timeout))


class HatPeer:
    """hat-juggler's side of a pairing, driven through its loop."""

    name = "theirs"

    def __init__(self, hat: HatLoop, conn: Any, rpc: Any) -> None:
        self.hat, self.conn, self.rpc = hat, conn, rpc

    @property
    def remote_data(self) -> Any:
        return self.conn.remote_data

    def watch(self) -> Watch:
        return Watch(self.conn, lambda cb: self.hat.call(self.conn.register_change_cb, cb))

    def set_local_data(self, data: Any) -> None:
        self.hat.call(self.conn.set_local_data, data)

    def flush(self) -> None:
        self.hat.run(self.conn.flush_local_data())

    def send(self, msg: Any) -> None:
        self.hat.run(self.conn.send(msg))

    def receive(self, timeout: float = 10) -> Any:
        return self.hat.run(self.rpc.receive(), timeout)

    def call(self, action: str, *args: Any) -> Any:
        return self.hat.run(self.rpc.call(action, *args))

    def close(self) -> None:
        self.hat.run(self.conn.async_close())

    def wait_closed(self, timeout: float = 10) -> bool:
        try:
            self.hat.run(self.conn.wait_closed(), timeout)
            return True
        except TimeoutError:
            return False


def get(q: "queue.Queue[Any]", timeout: float = 10) -> Any:
    return q.get(timeout=T(timeout))
