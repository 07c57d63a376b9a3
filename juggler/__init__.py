"""juggler: websocket-based, redis-backed RPC and pub-sub (the juggler.0 protocol).

A Python implementation of PuerkitoBio/juggler's protocol and redis layout, so Go and Python
servers, callees and clients can be mixed.
"""

from .broker import Broker, RedisBroker
from .callee import Callee
from .client import Client, Subscription
from .conn import Conn
from .exceptions import (
    AckTimeout,
    BrokerError,
    CallExpired,
    CapacityExceeded,
    ConfigError,
    ConnectionClosed,
    HandshakeError,
    JugglerError,
    RefuseConnection,
    JugglerTimeout,
    NackError,
    PayloadTooLarge,
    ProtocolError,
    Refusal,
    RemoteError,
    Stopped,
)
from .history import HistoryRule, publish
from .message import Ack, Call, Evnt, MessageType, Nack, Position, Pub, Res, Sub, Unsb
from .middleware import chain, log_messages, process_msg, recover
from .server import ConnState, Server

__version__ = "0.1.0"

__all__ = [
    "RedisBroker",
    "Broker",
    "Server",
    "ConnState",
    "Conn",
    "process_msg",
    "chain",
    "log_messages",
    "recover",
    "Callee",
    "Client",
    "Subscription",
    "MessageType",
    "Call",
    "Pub",
    "Sub",
    "Unsb",
    "Ack",
    "Nack",
    "Res",
    "Evnt",
    "Position",
    "HistoryRule",
    "publish",
    "JugglerError",
    "ProtocolError",
    "BrokerError",
    "CapacityExceeded",
    "PayloadTooLarge",
    "HandshakeError",
    "Refusal",
    "RefuseConnection",
    "ConnectionClosed",
    "NackError",
    "RemoteError",
    "ConfigError",
    "JugglerTimeout",
    "CallExpired",
    "AckTimeout",
    "Stopped",
]
