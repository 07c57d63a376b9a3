"""Settings of the ``juggler`` command: flags, then environment, then a TOML file, then defaults.

One table (:data:`SETTINGS`) describes every setting once: its flag (``--read-limit``), its
environment variable (``JUGGLER_READ_LIMIT``), its key in the config file and its default.
The server's settings come from the fields of :class:`~juggler.settings.ServerSettings`, which
:class:`~juggler.Server` takes too: a setting added there is a flag, a variable and a key here.
The config file has shared top-level keys and a table per command; a command's table wins::

    redis = "redis://127.0.0.1:6379/0"

    [server]
    port = 9000
    read_limit = 1048576

    [callee]
    workers = 16
"""

from __future__ import annotations

import dataclasses
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
from .settings import ServerSettings, boolean, parse_duration, positive_duration, string, whole

__all__ = ["ConfigError", "Setting", "SETTINGS", "SERVER_SETTINGS", "COMMANDS", "load", "parse_duration",
           "format_config"]  # fmt: skip


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


def _sched(value: Any) -> str:
    from .tuning import parse_sched

    return parse_sched(value)


def _redis_url(value: Any) -> str:
    url = string(value)
    if re.match(r"^rediss?\+sentinel://", url, re.IGNORECASE):
        from .redisconn import parse_sentinel_url

        parse_sentinel_url(url)  # a ValueError names what is wrong with it
        return url
    if not re.match(r"^(redis|rediss|unix)://", url):
        raise ValueError(f"{url!r} is not a redis URL (redis://host:port/db, rediss://..., unix://..., "
                         "redis+sentinel://host:port[,host:port...]/service_name[/db])")
    return url


def _optional_port(value: Any) -> Optional[int]:
    if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
        return None
    return whole(0, 65535)(value)


def _waiting(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    return whole(1)(value)


_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: Any) -> str:
    level = string(value).lower()
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
    group: str = ""  # its section of ``juggler server --help``
    repeatable: bool = False  # the flag may be given several times (a list)

    @property
    def flag(self) -> str:
        return "--" + (self.flag_name or self.name.replace("_", "-"))

    @property
    def env_var(self) -> str:
        return self.env or "JUGGLER_" + self.name.upper()

    @property
    def switch(self) -> bool:
        """Whether it is on or off: a flag with no value (``--reuse-port``, or ``--no-client``
        for one that is on by default)."""
        return self.parse is boolean


def _s(name: str, parse: Callable[[Any], Any], default: Any, help: str, **kw: Any) -> Setting:
    return Setting(name, parse, default, help, **kw)


def _from_fields(settings_class: type) -> list[Setting]:
    """The settings of a dataclass' fields (see :func:`juggler.settings.setting`)."""
    return [
        Setting(f.name, f.metadata["parse"], f.metadata["cli_default"], f.metadata["help"], metavar=f.metadata["metavar"],
                flag_name=f.metadata["flag_name"], group=f.metadata["group"],
                repeatable=f.metadata["repeatable"])  # fmt: skip
        for f in dataclasses.fields(settings_class)
        if f.metadata["cli"]
    ]


#: The settings of :class:`~juggler.settings.ServerSettings` the ``juggler server`` command
#: passes to its :class:`~juggler.Server`, in their order.
SERVER_SETTINGS: list[str] = [s.name for s in _from_fields(ServerSettings)]

#: ``--sched``'s default (docs/deployment.rst, "gil-convoy").
SCHED_DEFAULT = "normal"

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        _s("redis", _redis_url, None, "redis URL for RPC (and pub-sub, unless --pubsub-redis): a "
           "standalone redis, any node of a Redis Cluster, or a master behind Redis Sentinel "
           "(redis+sentinel://host:port[,host:port...]/service_name[/db]); juggler server without one runs an embedded "
           "in-memory redis, juggler callee requires one", env="JUGGLER_REDIS_URL", metavar="URL", group="redis"),
        _s("pubsub_redis", _redis_url, None, "a separate redis URL for pub-sub (standalone or any cluster node)",
           env="JUGGLER_PUBSUB_REDIS_URL", metavar="URL", group="redis"),
        _s("log_level", _log_level, "info", "log level: debug, info, warning, error", metavar="LEVEL", group="logging"),
        *_from_fields(ServerSettings),
        _s("cpu", _cpu, "auto", "keep the server's threads on one CPU: auto (one no other juggler process "
           "has claimed; none left: run anywhere), none, or a CPU number", metavar="CPU", group="tuning"),
        _s("sched", _sched, SCHED_DEFAULT, "the server's scheduling policy: batch (Linux's SCHED_BATCH: a thread "
           "woken for the GIL does not preempt the one that let it go) or normal (left as started)",
           metavar="POLICY", group="tuning"),
        _s("switch_interval", positive_duration, 1.0, "the process' GIL switch interval "
           "(sys.setswitchinterval): how long a thread waiting for the GIL sleeps before it asks for it",
           metavar="DURATION", group="tuning"),
        _s("max_args_size", whole(0), 64 * 1024, "largest args of a call stored in redis, in bytes of JSON "
           "(over it: NACK 413; 0: no limit)", metavar="BYTES", group="limits"),
        _s("log_messages", boolean, False, "log every message read and written (INFO, juggler.messages)",
           group="logging"),
        _s("metrics_port", _optional_port, None, "serve the callee metrics at http://HOST:PORT/metrics "
           "(none: off)", metavar="PORT"),
        _s("metrics_host", string, "127.0.0.1", "address of the callee metrics endpoint", metavar="HOST"),
        _s("metrics", string, None, "the server's /metrics URL: print its metric changes over the run",
           metavar="URL"),
        _s("call_cap", whole(0), 0, "most pending calls per URI (0: no cap; over it: NACK 500)", metavar="N",
           group="redis"),
        _s("result_cap", whole(0), 0, "most pending results per connection (0: no cap)", metavar="N", group="redis"),
        _s("workers", whole(1), 8, "callee worker threads", metavar="N"),
        _s("waiting", _waiting, 2, "callee workers that wait on redis while calls are quick, the others "
           "parked until a call needs them (all: every worker waits, as each call then comes alone)",
           metavar="N|all"),
        _s("processes", whole(1, 256), 1, "processes to run: callee, each with its own redis connections and "
           "--workers threads (metrics: --metrics-port + i for process i); load, each driving its share "
           "of the connections (one merged report)", metavar="N"),
        _s("grace", parse_duration, 10.0, "on SIGINT/SIGTERM, time running calls get to finish",
           metavar="DURATION"),
        # load tester
        _s("connections", whole(1), 10, "connections to open", metavar="N"),
        _s("rate", _float(0), 0.0, "calls per second per connection (0: auto, the next call "
           "leaves when the previous one ends)", metavar="PER_SECOND"),
        _s("duration", positive_duration, 10.0, "how long to send calls", metavar="DURATION"),
        _s("timeout", positive_duration, 5.0, "timeout of each call", metavar="DURATION"),
        _s("uri", string, "test.echo", "URI to call", metavar="URI"),
        _s("payload", string, '"hello"', "JSON args of each call", metavar="JSON"),
    ]
}  # fmt: skip

#: The sections of ``juggler server --help``, in order (each server setting names its own).
GROUPS = ("listening", "redis", "limits", "TLS", "HTTP", "tuning", "logging")

#: The settings of each command, in the order --print-config shows them.
COMMANDS: dict[str, list[str]] = {
    "demo": ["host", "port", "path", "workers", "grace", "switch_interval", "log_level"],
    "server": sorted(["redis", "pubsub_redis", "call_cap", "result_cap", *SERVER_SETTINGS, "max_args_size", "cpu",
                      "sched", "switch_interval", "log_messages", "log_level"], key=lambda name: GROUPS.index(SETTINGS[name].group)),
    "publish": ["redis", "history", "log_level"],
    "callee": ["redis", "workers", "waiting", "processes", "result_cap", "grace", "metrics_port", "metrics_host", "log_level"],
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
