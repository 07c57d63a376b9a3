"""A fake redis on a loopback port that answers what a test says: bad replies, none, or a cut.

It answers a client's handshake (``CLIENT ...``, ``HELLO``, ``PING``) as redis would, then each
other command with ``answer(command)``: the bytes to send (a reply, well formed or not),
``None`` (no reply: the client waits) or :data:`CUT` (the connection is closed).

``with ScriptedRedis(answer) as fake:`` listens on a free port (``fake.url``); leaving the
block closes every connection and joins every thread.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, Optional, Union

import hiredis

CUT = object()

Answer = Callable[[list[bytes]], Union[bytes, None, object]]

_HANDSHAKE = {b"CLIENT": b"+OK\r\n", b"HELLO": b"-ERR unknown command 'HELLO'\r\n", b"PING": b"+PONG\r\n",
              b"SELECT": b"+OK\r\n"}  # fmt: skip


class ScriptedRedis:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        #: Connections accepted so far, and the commands (past the handshake) they sent.
        self.accepted = 0
        self.commands: list[list[bytes]] = []
        #: Commands that came on a connection before its handshake (a client's first command
        #: is ``HELLO`` or ``CLIENT``): bytes sent on a socket meant for another connection.
        self.early: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept = threading.Thread(target=self._accept_loop, name="test-scripted-redis")
        self._accept.start()

    def __enter__(self) -> "ScriptedRedis":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cut_all(self) -> None:
        """Close every connection now (each client's next read sees the end)."""
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._accept.join(10)
        self.cut_all()
        for t in list(self._threads):
            t.join(10)

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self.accepted += 1
                self._socks.add(sock)
                t = threading.Thread(target=self._serve, args=(sock,), name="test-scripted-redis-conn")
                self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        reader = hiredis.Reader()
        greeted = False
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                reader.feed(data)
                while True:
                    command = reader.gets()
                    if command is False:
                        break
                    if not greeted and command[0].upper() not in (b"CLIENT", b"HELLO"):
                        with self._lock:
                            self.early.append(command)
                    greeted = True
                    reply = self._reply(command)
                    if reply is CUT:
                        return
                    if reply is not None:
                        sock.sendall(reply)  # type: ignore[arg-type]
        except OSError:
            return
        finally:
            with self._lock:
                self._socks.discard(sock)
            sock.close()

    def _reply(self, command: list[bytes]) -> Optional[object]:
        name = command[0].upper()
        # (CLIENT REPLY is not the handshake: the test answers it, as any other command)
        if name in _HANDSHAKE and not (name == b"CLIENT" and len(command) > 1 and command[1].upper() == b"REPLY"):
            return _HANDSHAKE[name]
        with self._lock:
            self.commands.append(command)
        return self.answer(command)
