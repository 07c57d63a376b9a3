"""The settings of a server, each written once: its default, how a value is checked, and what
the command line says of it.

:class:`ConnSettings` holds the limits a connection works by, :class:`ServerSettings` (one of
them) adds the server's own. :class:`~juggler.Server` takes every field as a keyword argument
(``Server(broker, read_limit=4096)``), the connections it opens read its settings, and
:mod:`juggler.config` builds the ``juggler server`` flags, environment variables and config
file keys from the same fields (the field's ``metadata``). Adding a setting is adding a field
here: with ``cli=False`` in its :func:`setting` it stays off the command line.

A value is checked when the dataclass is made, by the same function that parses the command
line's text, so both refuse the same values (:class:`ValueError` naming the setting).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["ConnSettings", "ServerSettings", "setting", "parse_duration", "parse_host_port"]


# -- parsing and checking a value (from Python, a flag, an environment variable or TOML) ----------

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1, "m": 60, "h": 3600}
_DURATION_PART = r"([0-9]*\.?[0-9]+)\s*(ns|us|µs|ms|s|m|h)"


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``250ms``, ``10s``, ``2m``, ``1h``, ``1.5``, or
    a Go duration such as ``1m30s`` (what the reference's tools take)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        if re.fullmatch(r"[0-9]*\.?[0-9]+", text):
            seconds = float(text)
        elif re.fullmatch(rf"(?:{_DURATION_PART}\s*)+", text):
            seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in re.findall(_DURATION_PART, text))
        else:
            raise ValueError(f"{value!r} is not a duration (e.g. 500ms, 10s, 2m, 1m30s)")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration")
    return seconds


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return seconds


def whole(minimum: int, maximum: Optional[int] = None) -> Callable[[Any], int]:
    """A parser of whole numbers from ``minimum`` to ``maximum``."""

    def parse(value: Any) -> int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"{value!r} is not a whole number")
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a whole number") from None
        if n < minimum or (maximum is not None and n > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"{n} is out of range ({bound})")
        return n

    return parse


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def file_path(value: Any) -> str:
    """A file name: a string, or a path object (from Python)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return string(value)


def string_list(value: Any) -> list[str]:
    """A list from a sequence of strings (a TOML array) or a comma-separated string."""
    items = _str_items(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a string")
        if item.strip():
            out.append(item.strip())
    return out


def _str_items(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    return string(value).split(",")


def history_rules(value: Any) -> Any:
    """History rules (``PATTERN=SIZE,TTL``, see :mod:`juggler.history`), each checked: a list
    (repeated flags, a TOML array; from Python, :class:`~juggler.history.HistoryRule` objects
    too) or a string of rules separated by ``;`` or spaces (the environment); a
    :class:`~juggler.history.History` is kept as it is."""
    from .history import History, HistoryRule

    if isinstance(value, History):
        return value
    if isinstance(value, HistoryRule):
        return [str(value)]
    items = value if isinstance(value, (list, tuple)) else re.split(r"[;\s]+", string(value))
    rules = []
    for item in items:
        if isinstance(item, HistoryRule):
            item = str(item)
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a history rule (PATTERN=SIZE,TTL)")
        if item.strip():
            rules.append(str(HistoryRule.parse(item)))
    return rules


def parse_host_port(value: str) -> tuple[str, int]:
    """``("HOST", PORT)`` from ``"HOST:PORT"`` (``"[::1]:9100"`` for IPv6); :class:`ValueError`
    naming the problem."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9100)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def host_port(value: Any) -> str:
    parse_host_port(string(value))  # ValueError names the problem
    return value


def url_path(value: Any) -> str:
    path = string(value)
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must start with '/'")
    return path


# -- the settings --------------------------------------------------------------------------------


def setting(default: Any, parse: Callable[[Any], Any], help: str, *, metavar: str = "", group: str = "",
            flag_name: str = "", repeatable: bool = False, cli: bool = True,
            cli_default: Any = dataclasses.MISSING) -> Any:  # fmt: skip
    """A settings field: its ``default`` (``None`` allowed only where it is the default),
    ``parse`` (checks a value and makes it from the command line's text; :class:`ValueError`
    for a bad one), and for the command line: the ``help`` line, the flag's ``metavar``, the
    ``group`` of ``juggler server --help`` it shows in, its ``flag_name`` when it is not the
    field's name, ``repeatable`` for a flag given once per item of a list, ``cli=False`` to
    leave it off, and ``cli_default`` where the command's default differs from the library's."""
    meta = {"parse": parse, "help": help, "metavar": metavar, "group": group, "flag_name": flag_name, "cli": cli,
            "repeatable": repeatable, "cli_default": default if cli_default is dataclasses.MISSING else cli_default}  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


def _check(settings: Any) -> None:
    """Check (and normalise: ``10`` seconds becomes ``10.0``) every field of ``settings``."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None and f.default is None:
            continue
        try:
            object.__setattr__(settings, f.name, f.metadata["parse"](value))
        except ValueError as exc:
            raise ValueError(f"bad {f.name}: {exc}") from None


@dataclass(frozen=True)
class ConnSettings:
    """The limits a connection works by: the server's settings of the same names (a
    :class:`ServerSettings` is one)."""

    #: Largest message (after reassembly) in bytes; over it: close 1009.
    read_limit: int = setting(1 << 20, whole(1), "largest message in bytes (over it: close 1009)",
                              metavar="BYTES", group="limits")
    #: Messages queued per connection before ``send`` blocks.
    write_queue_size: int = setting(256, whole(1), "messages queued per connection", metavar="N", group="limits")
    #: Seconds ``send`` waits on a full queue, and a socket write may take, before the client is
    #: deemed too slow and disconnected (1008).
    write_timeout: float = setting(10.0, positive_duration, "a client that blocks writes this long is disconnected",
                                   metavar="DURATION", group="limits")
    #: Ping a connection after this many seconds without a frame from it (0: never).
    ping_interval: float = setting(30.0, parse_duration, "ping a connection silent this long (0: never)",
                                   metavar="DURATION", group="limits")
    #: Close a connection (1001) after this many seconds without any frame from it, pongs
    #: included (0: never). With pings on, this closes the unresponsive ones.
    idle_timeout: float = setting(60.0, parse_duration, "close a connection silent this long, pongs included "
                                  "(0: never)", metavar="DURATION", group="limits")
    #: Seconds to wait for the peer's close frame, or for the writer to flush, once closing starts.
    close_timeout: float = setting(2.0, positive_duration, "time to wait for a peer's close frame",
                                   metavar="DURATION", group="limits")
    #: The longest timeout (seconds) a CALL may ask for; over it: NACK 400. It bounds how long a
    #: call to a URI nobody serves stays in redis.
    max_call_timeout: float = setting(600.0, positive_duration, "longest timeout a CALL may ask for (over it: "
                                      "NACK 400)", metavar="DURATION", group="limits")
    #: A request whose processing takes longer than this (seconds) is counted as slow
    #: (``juggler_slow_messages_total``) and logged at DEBUG.
    slow_threshold: float = setting(0.1, positive_duration, "requests slower than this count as slow in the "
                                    "metrics", metavar="DURATION", group="HTTP")
    #: Subscriptions one connection may hold; a SUB over it gets NACK 429 (0: no limit).
    max_subscriptions: int = setting(100, whole(0), "subscriptions one connection may hold (over it: NACK 429; "
                                     "0: no limit)", metavar="N", group="limits")
    #: Calls one connection may have in flight (stored, and neither answered nor expired); a
    #: CALL over it gets NACK 429 (0: no limit). With the broker's ``max_args_size`` and
    #: ``max_call_timeout`` it bounds what one connection keeps in redis.
    max_calls_in_flight: int = setting(1000, whole(0), "calls one connection may have in flight, neither "
                                       "answered nor expired (over it: NACK 429; 0: no limit)", metavar="N",
                                       group="limits")

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True)
class ServerSettings(ConnSettings):
    """Every setting of a :class:`~juggler.Server`, each also one of its keyword arguments;
    the ``juggler server`` command has a flag for each (docs/cli.rst)."""

    #: Address to listen on.
    host: str = setting("127.0.0.1", string, "address to listen on", metavar="HOST", group="listening")
    #: Port to listen on; 0 picks a free one (see :attr:`Server.url <juggler.Server.url>`).
    port: int = setting(0, whole(0, 65535), "port to listen on (0: any free port)", metavar="PORT",
                        group="listening", cli_default=9000)
    #: The websocket path; other paths get HTTP 404 (but ``/healthz`` and ``/metrics``, see
    #: ``http_endpoints``).
    path: str = setting("/ws", url_path, "websocket path", metavar="PATH", group="listening")
    #: Accept handshakes that offer no subprotocol at all (the ones that offer others but not
    #: ``juggler.0`` are still refused).
    allow_empty_subprotocol: bool = setting(False, boolean, "accept clients that offer no subprotocol at all",
                                            group="listening")
    #: If given, a handshake whose ``Origin`` header matches none of these (``fnmatch``
    #: patterns such as ``https://*.example.com``) gets HTTP 403. Requests without ``Origin``
    #: (not from a browser) are not affected.
    allowed_origins: Optional[list[str]] = setting(None, string_list, "comma-separated Origin patterns browsers "
                                                   "may connect from (e.g. https://*.example.com); none: any",
                                                   metavar="LIST", group="listening")
    #: Set ``SO_REUSEPORT`` on the listening socket, so that several server processes can
    #: listen on the same port (the kernel spreads connections among them).
    reuse_port: bool = setting(False, boolean, "set SO_REUSEPORT, so that several server processes share the "
                               "port", group="listening")
    #: Serve TLS (``wss://``) with this certificate chain (with ``keyfile``); or pass the
    #: server an ``ssl_context``.
    certfile: Optional[str] = setting(None, file_path, "TLS certificate chain (PEM): serve wss://", metavar="FILE",
                                      group="TLS")
    #: The private key of ``certfile``.
    keyfile: Optional[str] = setting(None, file_path, "TLS private key (PEM)", metavar="FILE", group="TLS")
    #: Open websockets at most; a handshake over it gets HTTP 503 (0: no limit; ``None``: what
    #: this machine can hold, see :func:`~juggler.tuning.default_max_connections`).
    max_connections: Optional[int] = setting(None, whole(0), "most open websockets (over it: HTTP 503; 0: no "
                                             "limit; none: what this process can hold, from its open-file and the "
                                             "machine's thread limits)", metavar="N", group="limits")
    #: Largest message written, in bytes: a RES over it is replaced by an error result (so
    #: its call still ends), an ACK or NACK is sent without its ``uri`` or ``channel``, an
    #: EVNT over it is dropped.
    write_limit: int = setting(1 << 20, whole(1), "largest message written in bytes (a RES over it becomes an "
                               "error result, an EVNT is dropped)", metavar="BYTES", group="limits")
    #: Seconds a client has to complete TLS and the HTTP handshake.
    handshake_timeout: float = setting(10.0, positive_duration, "time to complete the websocket handshake",
                                       metavar="DURATION", group="limits")
    #: Serve ``GET /healthz`` and ``GET /metrics`` on the same port (unless ``metrics_listen``
    #: is given).
    http_endpoints: bool = setting(True, boolean, "serve GET /healthz and GET /metrics on the same port",
                                   group="HTTP")
    #: Serve the browser client, ``GET /juggler.js`` (and its types, ``/juggler.d.ts``), on
    #: the same port (see :mod:`juggler.web`).
    serve_client: bool = setting(True, boolean, "serve the browser client at GET /juggler.js and /juggler.d.ts",
                                 group="HTTP", flag_name="client")
    #: ``"HOST:PORT"``: serve ``/healthz`` and ``/metrics`` there instead, off the public port
    #: (port 0: any free one, see ``Server.metrics_url``).
    metrics_listen: Optional[str] = setting(None, host_port, "serve GET /healthz and GET /metrics on this "
                                            "address instead, off the public port", metavar="HOST:PORT",
                                            group="HTTP")
    #: Keep the last events of the channels matching these rules for recovery
    #: (``"PATTERN=SIZE,TTL"`` strings or :class:`~juggler.history.HistoryRule`, or a
    #: :class:`~juggler.history.History`; first match wins; see :mod:`juggler.history`);
    #: ``None``: no channel has history, and pub-sub costs redis what it costs without the
    #: feature. Recorded in redis on :meth:`Server.start <juggler.Server.start>` for
    #: :func:`juggler.publish`.
    history: Any = setting(None, history_rules, "keep the last SIZE events of each channel matching PATTERN (a "
                           "redis glob), each history expiring TTL after its last event, so a client that reconnects "
                           "recovers what it missed (repeatable; SIZE 1-10000, default 100; TTL up to 7 days, default "
                           "300s; the environment separates rules with ';'); none: no channel keeps history",
                           metavar="PATTERN=SIZE,TTL", group="redis", repeatable=True)
    #: Serve the demo page at ``GET /`` (``juggler demo`` does).
    demo_page: bool = setting(False, boolean, "serve the demo page at GET /", cli=False)
