"""Authentication and per-URI authorization for a juggler server.

- ``authenticate`` is an ``on_state`` hook: a handshake without a valid bearer token is refused
  with HTTP 401 before the websocket opens, so no CALL, SUB or PUB can come from it.
- ``authorize`` is a middleware: each CALL, PUB and SUB is checked against the user's
  permissions (fnmatch patterns), and refused with NACK 403 when not allowed.

Run: python examples/auth.py [--port 9000], then connect with the header:

    juggler client -H 'Authorization: Bearer alice-token' ws://127.0.0.1:9000/ws call test.echo '"hi"'

Ctrl-C stops it.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from juggler import Call, ConnState, Nack, Pub, RefuseConnection, Server, Sub, chain, log_messages, recover

# In a real service: look tokens up in your session store or verify a JWT.
TOKENS = {"alice-token": "alice", "bob-token": "bob"}

# What each user may do: CALL URIs, PUB and SUB channels, as fnmatch patterns.
PERMISSIONS: dict[str, dict[str, list[str]]] = {
    "alice": {"call": ["test.*"], "pub": ["news.*"], "sub": ["*"]},
    "bob": {"call": ["test.echo"], "pub": [], "sub": ["news.*"]},
}


def authenticate(conn: Any, state: ConnState) -> None:
    """on_state hook: require ``Authorization: Bearer <token>`` on the handshake."""
    if state is not ConnState.ACCEPTING:
        return
    scheme, _, token = conn.request.headers.get("authorization", "").partition(" ")
    user = TOKENS.get(token.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        raise RefuseConnection(401, "a valid bearer token is required")
    conn.state["user"] = user  # the handler below reads it on every message


def authorize(next_handler: Any) -> Any:
    """Middleware: NACK 403 for a CALL, PUB or SUB the connection's user may not make."""

    def handle(conn: Any, msg: Any) -> None:
        if isinstance(msg, (Call, Pub, Sub)):
            kind = {Call: "call", Pub: "pub", Sub: "sub"}[type(msg)]
            target = msg.uri if isinstance(msg, Call) else msg.channel
            user = conn.state.get("user")
            allowed = PERMISSIONS.get(user, {}).get(kind, [])
            if not any(fnmatch.fnmatchcase(target, pattern) for pattern in allowed):
                conn.send(Nack(msg, 403, f"{user} may not {kind} {target}"))
                return
        next_handler(conn, msg)

    return handle


def make_server(broker: Any, **kwargs: Any) -> Server:
    """A server that authenticates handshakes and authorizes every request."""
    return Server(broker, on_state=authenticate, handler=chain(recover(), log_messages(), authorize), **kwargs)


if __name__ == "__main__":
    import argparse
    import logging

    import fakeredis

    from juggler import Callee, RedisBroker

    parser = argparse.ArgumentParser(description="a juggler server that authenticates and authorizes")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (0: any free port)")
    port = parser.parse_args().port
    logging.basicConfig(level=logging.INFO)
    broker = RedisBroker(fakeredis.FakeRedis())
    callee = Callee(broker, workers=2)
    callee.register("test.echo", lambda args: args)
    with make_server(broker, port=port) as server, callee:
        print("listening on", server.url, "- tokens:", ", ".join(TOKENS), flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C: leaving the with-block shuts both down
            print("stopping", flush=True)
