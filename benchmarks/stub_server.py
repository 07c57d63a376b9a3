"""A stub juggler server for measuring the load tool itself: it answers every CALL at once with
an ACK and a RES echoing the args, with no redis and no callee, in one asyncio thread.

A real server on the same machine is usually slower than ``juggler load``; against this stub,
the load tool is the bottleneck, so its own ceiling (calls/s, CPU per call) can be measured:

    python benchmarks/stub_server.py --port 9412 &
    juggler load --duration 5 --connections 16 ws://127.0.0.1:9412/ws

Not a server to deploy: no limits, no pings, no origin checks, no validation beyond framing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack(">BB", 0x80 | opcode, n) + payload
    if n < 65536:
        return struct.pack(">BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack(">BBQ", 0x80 | opcode, 127, n) + payload


class Stub(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""
        self.open = False
        self.n = 0

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
            key = next(l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.lower().startswith("sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
            self.t.write(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: juggler.0\r\n\r\n"
                ).encode()
            )
            self.open = True
        out = []
        buf = self.buf
        while len(buf) >= 2:
            b1, b2 = buf[0], buf[1]
            n, pos = b2 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, pos = struct.unpack(">H", buf[2:4])[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, pos = struct.unpack(">Q", buf[2:10])[0], 10
            if len(buf) < pos + 4 + n:
                break
            payload = unmask(buf[pos + 4 : pos + 4 + n], buf[pos : pos + 4])
            buf = buf[pos + 4 + n :]
            op = b1 & 0x0F
            if op == 8:  # close: echo it and hang up
                out.append(frame(payload[:2], 8))
                self.t.write(b"".join(out))
                self.t.close()
                return
            if op == 9:
                out.append(frame(payload, 10))
                continue
            if op != 1:
                continue
            msg = json.loads(payload)
            if msg["meta"]["type"] != 1:
                continue
            self.n += 1
            u, p = msg["meta"]["uuid"], msg["payload"]
            ack = {"meta": {"type": 8, "uuid": u[:-6] + "a%05d" % (self.n % 100000)},
                   "payload": {"for": u, "for_type": 1, "uri": p["uri"]}}  # fmt: skip
            res = {"meta": {"type": 9, "uuid": u[:-6] + "b%05d" % (self.n % 100000)},
                   "payload": {"for": u, "uri": p["uri"], "args": p.get("args")}}  # fmt: skip
            out.append(frame(json.dumps(ack).encode()))
            out.append(frame(json.dumps(res).encode()))
        self.buf = buf
        if out:
            self.t.write(b"".join(out))


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Stub, "127.0.0.1", port)
    print(f"websocket: ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(main(ap.parse_args().port))
    except KeyboardInterrupt:
        pass
