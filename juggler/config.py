"""Settings of the ``juggler`` command: flags, then environment, then a TOML file, then defaults.

One table (:data:`SETTINGS`) describes every setting once: its flag (``--read-limit``), its
environment variable (``JUGGLER_READ_LIMIT``), its key in the config file and its default.
The config file has shared top-level keys and a table per command; a command's table wins::

    redis = "redis://127.0.0.1:6379/0"

    [server]
    port = 9000
    read_limit = 1048576

    [callee]
    workers = 16
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from .exceptions import ConfigError

__all__ = ["ConfigError", "Setting", "SETTINGS", "COMMANDS", "load", "parse_duration", "format_config"]


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


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return seconds


def _int(minimum: int, maximum: Optional[int] = None) -> Callable[[Any], int]:
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


def _float(minimum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if not math.isfinite(x) or x < minimum:
            raise ValueError(f"{value!r} must be a number >= {minimum}")
        return x

    return parse


def _cpu(value: Any) -> Any:
    from .tuning import parse_cpu

    return parse_cpu(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _redis_url(value: Any) -> str:
    url = _str(value)
    if re.match(r"^rediss?\+sentinel://", url, re.IGNORECASE):
        from .redisconn import parse_sentinel_url

        parse_sentinel_url(url)  # a ValueError names what is wrong with it
        return url
    if not re.match(r"^(redis|rediss|unix)://", url):
        raise ValueError(f"{url!r} is not a redis URL (redis://host:port/db, rediss://..., unix://..., "
                         "redis+sentinel://host:port[,host:port...]/service_name[/db])")
    return url


def _str_list(value: Any) -> list[str]:
    """A list from a TOML array or a comma-separated string."""
    if isinstance(value, list):
        items = value
    else:
        items = _str(value).split(",")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a string")
        if item.strip():
            out.append(item.strip())
    return out


def _history(value: Any) -> list[str]:
    """History rules (``PATTERN=SIZE,TTL``): a list (repeated flags, a TOML array) or a string
    of rules separated by ``;`` or spaces (the environment)."""
    from .history import HistoryRule

    items = value if isinstance(value, list) else re.split(r"[;\s]+", _str(value))
    rules = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a history rule (PATTERN=SIZE,TTL)")
        if item.strip():
            rules.append(str(HistoryRule.parse(item)))
    return rules


def _host_port(value: Any) -> str:
    from .server import parse_host_port

    parse_host_port(_str(value))  # ValueError names the problem
    return value


def _optional_port(value: Any) -> Optional[int]:
    if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
        return None
    return _int(0, 65535)(value)


def _path(value: Any) -> str:
    path = _str(value)
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must start with '/'")
    return path


_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: Any) -> str:
    level = _str(value).lower()
    if level not in _LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(_LEVELS)}")
    return level


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    env: str = ""
    metavar: str = ""
    flag_name: str = ""  # the flag's name when it is not the setting's (--no-client: serve_client)

    @property
    def flag(self) -> str:
        return "--" + (self.flag_name or self.name.replace("_", "-"))

    @property
    def env_var(self) -> str:
        return self.env or "JUGGLER_" + self.name.upper()


def _s(name: str, parse: Callable[[Any], Any], default: Any, help: str, **kw: Any) -> Setting:
    return Setting(name, parse, default, help, **kw)


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        _s("redis", _redis_url, None, "redis URL for RPC (and pub-sub, unless --pubsub-redis): a "
           "standalone redis, any node of a Redis Cluster, or a master behind Redis Sentinel "
           "(redis+sentinel://host:port[,host:port...]/service_name[/db]); juggler server without one runs an embedded "
           "in-memory redis, juggler callee requires one", env="JUGGLER_REDIS_URL", metavar="URL"),
        _s("pubsub_redis", _redis_url, None, "a separate redis URL for pub-sub (standalone or any cluster node)",
           env="JUGGLER_PUBSUB_REDIS_URL", metavar="URL"),
        _s("log_level", _log_level, "info", "log level: debug, info, warning, error", metavar="LEVEL"),
        _s("host", _str, "127.0.0.1", "address to listen on", metavar="HOST"),
        _s("port", _int(0, 65535), 9000, "port to listen on (0: any free port)", metavar="PORT"),
        _s("path", _path, "/ws", "websocket path", metavar="PATH"),
        _s("allow_empty_subprotocol", _bool, False, "accept clients that offer no subprotocol at all"),
        _s("read_limit", _int(1), 1 << 20, "largest message in bytes (over it: close 1009)", metavar="BYTES"),
        _s("write_queue_size", _int(1), 256, "messages queued per connection", metavar="N"),
        _s("write_timeout", _positive_duration, 10.0, "a client that blocks writes this long is "
           "disconnected", metavar="DURATION"),
        _s("handshake_timeout", _positive_duration, 10.0, "time to complete the websocket handshake",
           metavar="DURATION"),
        _s("close_timeout", _positive_duration, 2.0, "time to wait for a peer's close frame", metavar="DURATION"),
        _s("max_connections", _int(0), None, "most open websockets (over it: HTTP 503; 0: no limit; none: "
           "what this process can hold, from its open-file and the machine's thread limits)", metavar="N"),
        _s("reuse_port", _bool, False, "set SO_REUSEPORT, so that several server processes share the port"),
        _s("cpu", _cpu, "auto", "keep the server's threads on one CPU: auto (one no other juggler process "
           "has claimed; none left: run anywhere), none, or a CPU number", metavar="CPU"),
        _s("switch_interval", _positive_duration, 1.0, "the process' GIL switch interval "
           "(sys.setswitchinterval): how long a thread waiting for the GIL sleeps before it asks for it",
           metavar="DURATION"),
        _s("write_limit", _int(1), 1 << 20, "largest message written in bytes (a RES over it becomes an "
           "error result, an EVNT is dropped)", metavar="BYTES"),
        _s("ping_interval", parse_duration, 30.0, "ping a connection silent this long (0: never)", metavar="DURATION"),
        _s("idle_timeout", parse_duration, 60.0, "close a connection silent this long, pongs included "
           "(0: never)", metavar="DURATION"),
        _s("max_call_timeout", _positive_duration, 600.0, "longest timeout a CALL may ask for (over it: "
           "NACK 400)", metavar="DURATION"),
        _s("max_subscriptions", _int(0), 100, "subscriptions one connection may hold (over it: NACK 429; "
           "0: no limit)", metavar="N"),
        _s("max_calls_in_flight", _int(0), 1000, "calls one connection may have in flight, neither answered "
           "nor expired (over it: NACK 429; 0: no limit)", metavar="N"),
        _s("max_args_size", _int(0), 64 * 1024, "largest args of a call stored in redis, in bytes of JSON "
           "(over it: NACK 413; 0: no limit)", metavar="BYTES"),
        _s("slow_threshold", _positive_duration, 0.1, "requests slower than this count as slow in the "
           "metrics", metavar="DURATION"),
        _s("history", _history, None, "keep the last SIZE events of each channel matching PATTERN (a redis "
           "glob), each history expiring TTL after its last event, so a client that reconnects recovers what "
           "it missed (repeatable; SIZE 1-10000, default 100; TTL up to 7 days, default 300s; the environment "
           "separates rules with ';'); none: no channel keeps history", metavar="PATTERN=SIZE,TTL"),
        _s("allowed_origins", _str_list, None, "comma-separated Origin patterns browsers may connect from "
           "(e.g. https://*.example.com); none: any", metavar="LIST"),
        _s("certfile", _str, None, "TLS certificate chain (PEM): serve wss://", metavar="FILE"),
        _s("keyfile", _str, None, "TLS private key (PEM)", metavar="FILE"),
        _s("http_endpoints", _bool, True, "serve GET /healthz and GET /metrics on the same port"),
        _s("serve_client", _bool, True, "serve the browser client at GET /juggler.js and /juggler.d.ts",
           flag_name="client"),
        _s("metrics_listen", _host_port, None, "serve GET /healthz and GET /metrics on this address "
           "instead, off the public port", metavar="HOST:PORT"),
        _s("log_messages", _bool, False, "log every message read and written (INFO, juggler.messages)"),
        _s("metrics_port", _optional_port, None, "serve the callee metrics at http://HOST:PORT/metrics "
           "(none: off)", metavar="PORT"),
        _s("metrics_host", _str, "127.0.0.1", "address of the callee metrics endpoint", metavar="HOST"),
        _s("metrics", _str, None, "the server's /metrics URL: print its metric changes over the run",
           metavar="URL"),
        _s("call_cap", _int(0), 0, "most pending calls per URI (0: no cap; over it: NACK 500)", metavar="N"),
        _s("result_cap", _int(0), 0, "most pending results per connection (0: no cap)", metavar="N"),
        _s("workers", _int(1), 8, "callee worker threads", metavar="N"),
        _s("processes", _int(1, 256), 1, "processes to run: callee, each with its own redis connections and "
           "--workers threads (metrics: --metrics-port + i for process i); load, each driving its share "
           "of the connections (one merged report)", metavar="N"),
        _s("grace", parse_duration, 10.0, "on SIGINT/SIGTERM, time running calls get to finish",
           metavar="DURATION"),
        # load tester
        _s("connections", _int(1), 10, "connections to open", metavar="N"),
        _s("rate", _float(0), 0.0, "calls per second per connection (0: auto, the next call "
           "leaves when the previous one ends)", metavar="PER_SECOND"),
        _s("duration", _positive_duration, 10.0, "how long to send calls", metavar="DURATION"),
        _s("timeout", _positive_duration, 5.0, "timeout of each call", metavar="DURATION"),
        _s("uri", _str, "test.echo", "URI to call", metavar="URI"),
        _s("payload", _str, '"hello"', "JSON args of each call", metavar="JSON"),
    ]
}  # fmt: skip

#: The settings of each command, in the order --print-config shows them.
COMMANDS: dict[str, list[str]] = {
    "demo": ["host", "port", "path", "workers", "grace", "switch_interval", "log_level"],
    "server": [
        "redis", "pubsub_redis", "host", "port", "path", "allow_empty_subprotocol", "allowed_origins",
        "certfile", "keyfile", "reuse_port", "cpu", "switch_interval", "max_connections", "read_limit", "write_limit", "write_queue_size",
        "write_timeout", "handshake_timeout", "ping_interval", "idle_timeout", "close_timeout",
        "max_call_timeout", "max_subscriptions", "max_calls_in_flight", "max_args_size", "slow_threshold",
        "call_cap", "result_cap", "history", "http_endpoints", "serve_client", "metrics_listen", "log_messages",
        "log_level",
    ],
    "publish": ["redis", "history", "log_level"],
    "callee": ["redis", "workers", "processes", "result_cap", "grace", "metrics_port", "metrics_host", "log_level"],
    "client": ["timeout", "log_level"],
    "load": ["connections", "processes", "rate", "duration", "timeout", "uri", "payload", "metrics", "log_level"],
    "statesync-demo": ["host", "port", "path", "certfile", "keyfile", "log_level"],
}  # fmt: skip


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in COMMANDS:
                raise ConfigError(f"config file {path}: unknown table [{key}] (one of: {', '.join(COMMANDS)})")
            for sub in value:
                if sub not in COMMANDS[key]:
                    raise ConfigError(f"config file {path}: [{key}] has no setting {sub!r}")
        elif key not in SETTINGS:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
    return data


def load(
    command: str,
    flags: Mapping[str, Any],
    env: Mapping[str, str] = os.environ,
    config_path: Optional[str] = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of ``command`` and where each came from (flag, env, file, default).

    ``flags`` maps setting names to the raw flag values (``None``: not given). The config file
    is ``config_path``, else ``$JUGGLER_CONFIG``, else none. Raises :class:`ConfigError`.
    """
    path = config_path or env.get("JUGGLER_CONFIG") or None
    file_data = read_file(path) if path else {}
    section = file_data.get(command, {})
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in COMMANDS[command]:
        setting = SETTINGS[name]
        if flags.get(name) is not None:
            raw, source = flags[name], f"flag {setting.flag}"
        elif setting.env_var in env:
            raw, source = env[setting.env_var], f"env {setting.env_var}"
        elif name in section:
            raw, source = section[name], f"file {path} [{command}]"
        elif name in file_data and not isinstance(file_data[name], dict):
            raw, source = file_data[name], f"file {path}"
        else:
            values[name], sources[name] = setting.default, "default"
            continue
        try:
            values[name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"bad value for {name} (from {source}): {exc}") from None
        sources[name] = source
    return values, sources


def format_config(command: str, values: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """The merged settings as a TOML table, each with where it came from."""
    lines = [f"[{command}]"]
    for name in COMMANDS[command]:
        value = values[name]
        if value is None:
            text = f"# {name} is not set"
        elif isinstance(value, bool):
            text = f"{name} = {str(value).lower()}"
        elif isinstance(value, str):
            text = f"{name} = {_toml_str(value)}"
        elif isinstance(value, list):
            text = f"{name} = [{', '.join(_toml_str(v) for v in value)}]"
        else:
            text = f"{name} = {value!r}"
        lines.append(f"{text:<44} # {sources[name]}")
    return "\n".join(lines)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
