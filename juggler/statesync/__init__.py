"""The state-sync protocol: JSON data kept in sync between two peers, and messages.

The second protocol named Juggler (hat-juggler's): a back-end and a GUI front-end, or any two
peers, each keep local and remote JSON data over one websocket. A change of local data is sent
as an RFC 6902 JSON Patch (``DATA``) and applied to the peer's remote data; changes within
``autoflush_delay`` go out as one patch. ``MESSAGE`` passes any JSON, and
:class:`RpcConnection` layers calls on it. Interoperable with ``hat-juggler`` 0.5. See
docs/statesync.rst.

Synchronous and threaded, on the websocket layer of the juggler server::

    from juggler import statesync

    server = statesync.listen("127.0.0.1", 0, lambda conn: conn.set_local_data({"count": 0}))
    conn = statesync.connect(server.url)
    statesync.wait_remote_data(conn, timeout=5)  # {"count": 0}
    ...
    conn.close(); server.close()
"""

from ..exceptions import CallExpired, ConnectionClosed, HandshakeError, JugglerTimeout, ProtocolError, RemoteError
from .client import connect, wait_remote_data
from .connection import ChangeHandle, Connection, Settings
from .rpc import RpcConnection
from .server import Server, listen

__all__ = [
    "listen",
    "connect",
    "wait_remote_data",
    "Server",
    "Connection",
    "Settings",
    "ChangeHandle",
    "RpcConnection",
    "ConnectionClosed",
    "RemoteError",
    "CallExpired",
    "JugglerTimeout",
    "HandshakeError",
    "ProtocolError",
]
