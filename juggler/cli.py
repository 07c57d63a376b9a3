"""The ``juggler`` command (also ``python -m juggler``).

Subcommands: ``demo``, ``server``, ``callee``, ``client``, ``load``, ``statesync-demo``. See ``juggler --help`` and
docs/cli.rst. Exit status: 0 on success and after a graceful stop, 2 for a usage or
configuration error, 1 for other failures, 130 when Ctrl-C interrupts a command that does not
stop gracefully on it (the one-shot client, see :mod:`juggler.shell` for its own codes), and
141 when the reader of stdout went away (``juggler ... | head``), quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import re
import select
import signal
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .config import COMMANDS, GROUPS, SERVER_SETTINGS, SETTINGS, ConfigError, format_config, load
from .signals import StopSignal

__all__ = ["main", "DEMO_FUNCTIONS"]

log = logging.getLogger(__name__)


# -- demo functions --------------------------------------------------------------------------


def demo_echo(args: Any) -> Any:
    """test.echo: returns its argument."""
    return args


def demo_reverse(args: Any) -> str:
    """test.reverse: reverses a string."""
    if not isinstance(args, str):
        raise TypeError("test.reverse takes a string")
    return args[::-1]


def demo_delay(args: Any) -> int:
    """test.delay: sleeps N milliseconds (0 to 600000), returns N. N is a number, or a string
    of one (``"1200"``) as the reference's callee and load tool send it."""
    if isinstance(args, str):
        try:
            args = float(args.strip())
        except ValueError:
            args = None
    if isinstance(args, bool) or not isinstance(args, (int, float)) or not 0 <= args <= 600_000:
        raise ValueError("test.delay takes a number of milliseconds from 0 to 600000 (or a string of one)")
    time.sleep(args / 1000)
    return int(args) if float(args).is_integer() else args


DEMO_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "test.echo": demo_echo,
    "test.reverse": demo_reverse,
    "test.delay": demo_delay,
}


# -- building blocks ---------------------------------------------------------------------------


def _broker(url: str, **caps: int) -> Any:
    from .broker import RedisBroker
    from .exceptions import BrokerError

    try:
        # cluster=None: ask redis (INFO cluster) whether it is a Redis Cluster node, so one
        # --redis URL takes a standalone redis or any node of a cluster.
        broker = RedisBroker.from_url(url, cluster=None, **caps)
    except BrokerError as exc:
        raise _Fail(str(exc)) from None
    if broker.cluster:
        log.info("redis at %s is a Redis Cluster of %d primaries", url, len(broker.client.get_primaries()))
    if not broker.ping():
        try:
            broker.client.ping()
        except Exception as exc:  # the reason, for the one line we print
            reason = str(exc)
        else:  # pragma: no cover - it answered the second time
            reason = "no answer"
        broker.close()
        raise _Fail(f"cannot reach redis at {url}: {reason}")
    return broker


class _Fail(Exception):
    """A failure to report in one line, exit status 1."""


def _brokers(cfg: dict[str, Any], embedded: Any = None) -> tuple[Any, Any, list[Any]]:
    """The RPC and pub-sub brokers the settings ask for, and the ones to close at the end."""
    from .broker import RedisBroker

    caps = {"call_cap": cfg.get("call_cap", 0), "result_cap": cfg.get("result_cap", 0)}
    if "max_args_size" in cfg:
        caps["max_args_size"] = cfg["max_args_size"]
    if cfg.get("redis"):
        rpc = _broker(cfg["redis"], **caps)
    else:
        rpc = RedisBroker(embedded.client(), **caps)
    owned = [rpc]
    pubsub = rpc
    if cfg.get("pubsub_redis"):
        pubsub = _broker(cfg["pubsub_redis"])
        owned.append(pubsub)
    return rpc, pubsub, owned


def _print(*lines: str) -> None:
    # one write: the callee processes of --processes share a stdout, and a line and its
    # newline written apart could be split by another process' line
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def _stop_callee(callee: Any, grace: float) -> None:
    if not callee.stop(timeout=grace):
        busy = callee.stats.snapshot()["busy"]
        log.warning("grace period of %.1f s is over with %d call(s) still running: exiting anyway", grace, busy)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _server_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    from .middleware import chain, log_messages, recover

    kwargs = {n: cfg[n] for n in SERVER_SETTINGS if n in cfg}
    if cfg.get("certfile") and not cfg.get("keyfile") or cfg.get("keyfile") and not cfg.get("certfile"):
        raise _Usage("--certfile and --keyfile go together")
    kwargs["handler"] = chain(recover(), log_messages()) if cfg.get("log_messages") else chain(recover())
    return kwargs


def _make_server(broker: Any, cfg: dict[str, Any], **kwargs: Any) -> Any:
    from .server import Server

    try:
        return Server(broker, **_server_kwargs(cfg), **kwargs)
    except OSError as exc:  # the port is taken, or the certificate cannot be read
        raise _Fail(_cannot_serve(cfg, exc)) from None


def _cannot_serve(cfg: dict[str, Any], exc: OSError) -> str:
    where = f"{cfg['host']}:{cfg['port']}"
    if exc.errno != errno.EADDRINUSE:
        return f"cannot serve on {where}: {exc.strerror or exc}"
    # demo, server and statesync-demo all default to 9000: the second one started meets this
    return (f"cannot serve on {where}: {os.strerror(exc.errno)} (juggler demo, server and statesync-demo all "
            "default to port 9000): choose another with --port PORT, or --port 0 for any free one")


# -- commands ----------------------------------------------------------------------------------


def cmd_demo(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    from .broker import RedisBroker
    from .callee import Callee
    from .embedded import EmbeddedRedis

    stop = StopSignal().install()
    _tune(cfg, "none")  # (its callee runs in the process too: left free)
    embedded = EmbeddedRedis().start()
    try:
        broker = RedisBroker(embedded.client())
        server = _make_server(broker, cfg, demo_page=True)
        callee = Callee(broker, workers=cfg["workers"], name="juggler-callee-demo")
        for uri, fn in DEMO_FUNCTIONS.items():
            callee.register(uri, fn)
        server.start()
        callee.start()
        _print(
            "juggler demo: a server, an in-memory redis and a callee pool serving "
            + ", ".join(DEMO_FUNCTIONS),
            f"browser:   http://{_url_host(server.host)}:{server.port}/  (the demo page)",
            f"websocket: {server.url}",
            f"redis:     {embedded.url}  (embedded, in memory)",
            f"try:       juggler client {server.url} call test.echo '\"hello\"'",
            f"           juggler client {server.url}        (interactive)",
            f"callees:   juggler callee --redis {embedded.url} --demo",
            "stop:      Ctrl-C",
        )
        stop.wait()
        server.shutdown()
        _stop_callee(callee, cfg["grace"])
    finally:
        embedded.close()
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def cmd_server(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    from .embedded import EmbeddedRedis

    stop = StopSignal().install()
    _tune(cfg, cfg["cpu"])
    embedded = None
    if not cfg["redis"]:
        embedded = EmbeddedRedis().start()
    brokers: list[Any] = []
    try:
        rpc, pubsub, brokers = _brokers(cfg, embedded)
        server = _make_server(rpc, cfg, pubsub_broker=pubsub)
        server.start()
        _print(f"websocket: {server.url}")
        if server.metrics_url is not None:
            _print(f"metrics:   {server.metrics_url}/metrics and {server.metrics_url}/healthz")
        if embedded is not None:
            _print(
                f"redis:     {embedded.url}  (embedded, in memory: no --redis given)",
                f"callees:   juggler callee --redis {embedded.url} --demo",
            )
        stop.wait()
        server.shutdown()
    finally:
        for b in brokers:
            b.close()
        if embedded is not None:
            embedded.close()
    return 0


def _tune(cfg: dict[str, Any], cpu: Any) -> None:
    """Tune the process (it is ours) before any thread starts, as :mod:`juggler.tuning`
    describes: small thread stacks, the GIL switch interval, one CPU, the open-file limit and
    the futex table, and the scheduling policy (``--sched``); then say when the limits cap
    ``max_connections``."""
    from .tuning import set_sched, tune_process

    wanted = cfg.get("max_connections")
    try:
        tuned = tune_process(wanted, cpu=cpu, switch_interval=cfg["switch_interval"])
    except ValueError as exc:
        raise _Fail(f"--cpu: {exc}") from None
    set_sched(cfg.get("sched", "normal"))  # (juggler demo: its callee runs in the process too)
    slots = tuned.futex_hash_slots
    log.info("process tuned: thread stacks of %d KiB, GIL switch interval %s s, futex hash slots %s, "
             "malloc arenas %s, GC young generation %s", (tuned.stack_size or 0) // 1024, tuned.switch_interval,
             "(none on this kernel)" if slots is None else slots,
             "(unchanged)" if tuned.malloc_arenas is None else tuned.malloc_arenas, tuned.gc_young)  # fmt: skip
    before, after = tuned.open_files
    if after != before:
        log.info("open-file limit raised from %d to %d (the hard limit)", before, after)
    capacity = tuned.capacity
    if "max_connections" not in cfg:
        return
    if wanted is None:
        log.info("max connections: %d (what this process can hold; --max-connections to change it)", capacity)
    elif wanted == 0 or wanted > capacity:
        log.warning(
            "--max-connections %s is more than this process can hold: about %d, with %d open files "
            "allowed (hard limit; raise it with ulimit -Hn or LimitNOFILE=) and this machine's thread "
            "limits; connections past that will fail",
            wanted or "0 (no limit)", capacity, after,
        )  # fmt: skip


def _load_target(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _Usage(f"{spec!r} is not of the form module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise _Usage(f"cannot import {module_name!r}: {exc}") from None
    except SyntaxError as exc:
        raise _Usage(f"cannot import {module_name!r}: {type(exc).__name__}: {exc.msg} ({exc.filename}, line "
                     f"{exc.lineno})") from None  # fmt: skip
    except Exception as exc:  # the module raised as it ran: say where, in one line
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise _Usage(f"cannot import {module_name!r}: {type(exc).__name__}: {exc} ({where.filename}, line "
                     f"{where.lineno})") from None  # fmt: skip
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _Usage(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


class _Usage(Exception):
    """A usage error to report in one line, exit status 2."""


def callee_functions(targets: Sequence[str], uris: Sequence[str], demo: bool) -> dict[str, Callable[[Any], Any]]:
    """The URI -> function map a ``juggler callee`` command line asks for."""
    functions: dict[str, Callable[[Any], Any]] = {}
    if demo:
        functions.update(DEMO_FUNCTIONS)
    for spec in targets:
        obj = _load_target(spec)
        if not isinstance(obj, dict) or not all(isinstance(k, str) and callable(v) for k, v in obj.items()):
            raise _Usage(f"{spec} must be a dict mapping URIs to functions")
        functions.update(obj)
    for item in uris:
        uri, sep, target = item.partition("=")
        if not sep or not uri:
            raise _Usage(f"--uri {item!r} is not of the form URI=module:function")
        fn = _load_target(target)
        if not callable(fn):
            raise _Usage(f"{target} is not callable")
        functions[uri] = fn
    if not functions:
        raise _Usage("nothing to serve: give module:dict targets, --uri URI=module:function or --demo")
    return functions


def cmd_callee(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    from .callee import Callee

    functions = callee_functions(args.targets, args.uri, args.demo)
    if not cfg["redis"]:
        raise _Usage("it needs --redis URL (or JUGGLER_REDIS_URL): the redis its server uses")
    if cfg["processes"] > 1:
        return _run_processes(cfg, args.argv)
    stop = StopSignal().install()
    parent = os.environ.pop(_PARENT_ENV, None)
    if parent is not None:
        _stop_with_parent(int(parent))
    rpc, _, brokers = _brokers(cfg)
    metrics = None
    try:
        callee = Callee(rpc, **_callee_kwargs(cfg))
        for uri, fn in functions.items():
            callee.register(uri, fn)
        if cfg["metrics_port"] is not None:
            from .metrics import CalleeMetrics

            metrics = CalleeMetrics(callee)
            try:
                port = metrics.serve(cfg["metrics_host"], cfg["metrics_port"])
            except OSError as exc:
                metrics = None
                raise _Fail(f"cannot serve metrics on {cfg['metrics_host']}:{cfg['metrics_port']}: {exc.strerror or exc}") from None
            _print(f"metrics: http://{cfg['metrics_host']}:{port}/metrics")
        callee.start()
        _print(f"callee: serving {', '.join(functions)} with {cfg['workers']} workers on {cfg['redis']}")
        stop.wait()
        _stop_callee(callee, cfg["grace"])
    finally:
        if metrics is not None:
            metrics.close()
        for b in brokers:
            b.close()
    return 0


_PARENT_ENV = "JUGGLER_CALLEE_PARENT"  # set by --processes for its children: the parent's pid
_PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """A callee process of ``--processes``: when its parent dies (even by SIGKILL, which it
    cannot pass on), the kernel sends it SIGTERM, a graceful stop, so that no child outlives
    it. Linux only."""
    from .tuning import libc_prctl

    prctl = libc_prctl()
    if prctl is None:
        return
    if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # it died before that took effect


def _run_processes(cfg: dict[str, Any], argv: Sequence[str]) -> int:
    """``juggler callee --processes N``: run N callees (this command line with
    ``--processes 1``) as child processes, each in a session of its own so that a Ctrl-C
    reaches them once, through us. SIGINT/SIGTERM are passed on to every child (the first
    asks for a graceful stop, a second one for an immediate exit, as for one callee). If a
    child fails before a stop was asked for, the others are stopped. Returns once all have
    exited: 0 if every one exited with 0."""
    import subprocess

    n = cfg["processes"]
    pids: dict[int, int] = {}  # pid -> index
    stopping = []

    def forward(signum: int, frame: Any = None) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM):
            stopping.append(signum)
            log.info("got %s: passing it on to %d callee process(es)", signal.Signals(signum).name, len(pids))
        for pid in list(pids):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = 0
    try:
        for i in range(n):
            child = [sys.executable, "-m", "juggler", *argv, "--processes", "1"]
            if cfg["metrics_port"]:
                child += ["--metrics-port", str(cfg["metrics_port"] + i)]
            env = {**os.environ, _PARENT_ENV: str(os.getpid())}
            pids[subprocess.Popen(child, start_new_session=True, env=env).pid] = i
            if stopping:  # a signal came while we were starting them
                forward(stopping[-1])
        _print(f"callee: {n} processes (pids {', '.join(map(str, pids))})")
        while pids:
            pid, wait_status = os.wait()  # a signal runs forward() and the wait goes on
            if pid not in pids:
                continue
            i = pids.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if code != 0:
                status = 1
                if not stopping:
                    log.error("callee process %d (pid %d) exited with %d: stopping the others", i, pid, code)
                    forward(signal.SIGTERM)
    finally:
        for pid in pids:  # we are failing ourselves: leave no child behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return status


def _websocket_url(url: str) -> str:
    from .dial import check_url

    try:
        return check_url(url)
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    """``-H 'Name: value'`` options as a dict; a name given twice gets its values joined
    with ", " (what HTTP takes a repeated header to mean)."""
    headers: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or not name or any(c.isspace() for c in name):
            raise _Usage(f"--header {item!r} is not of the form 'Name: value'")
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def cmd_client(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    from .shell import run_client

    url = _websocket_url(args.url)
    headers = parse_headers(args.header)
    return run_client(url, args.words, cfg, allowed=args.allowed_messages, headers=headers)


def cmd_load(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    from .load import run_load

    if args.url and args.addr and args.url != args.addr:
        raise _Usage(f"two URLs: {args.url} and -addr {args.addr}")
    url = args.url or args.addr
    if not url:
        raise _Usage("which server? give its URL (or -addr URL)")
    return run_load(_websocket_url(url), cfg, as_json=args.json, progress=not args.quiet)


# -- the reference's load tool flags ----------------------------------------------------------

#: ``juggler load`` takes the flag names of the reference's load tool (cmd/juggler-load) too,
#: so its users keep their commands: ``-c``, ``-d``, ``-t`` and ``-u`` mean what ours do;
#: ``-r`` and ``-p`` (below) differ in form. The defaults stay ours.
_LOAD_ALIASES = {"connections": "-c", "duration": "-d", "timeout": "-t", "uri": "-u"}


class _IntervalAsRate(argparse.Action):
    """``-r DURATION``: the time between two calls of a connection, as the reference takes it
    (``100ms``), stored as ``--rate`` (calls per second per connection; ``0``: 0, auto)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: Optional[str] = None) -> None:  # fmt: skip
        from .config import parse_duration

        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            parser.error(f"argument -r: {exc}")
        setattr(namespace, self.dest, 1.0 / seconds if seconds else 0.0)


class _StringPayload(argparse.Action):
    """``-p STRING``: the args of each call are this string, as the reference sends them
    (``-p 100`` sends ``"100"``), stored as ``--payload`` (JSON)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: Optional[str] = None) -> None:  # fmt: skip
        setattr(namespace, self.dest, json.dumps(value))


def cmd_statesync_demo(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    from .statesync.demo import serve_demo

    if bool(cfg.get("certfile")) != bool(cfg.get("keyfile")):
        raise _Usage("--certfile and --keyfile go together")
    stop = StopSignal().install()
    try:
        server = serve_demo(cfg["host"], cfg["port"], ws_path=cfg["path"], certfile=cfg.get("certfile"), keyfile=cfg.get("keyfile"))
    except OSError as exc:  # the port is taken, or the certificate cannot be read
        raise _Fail(_cannot_serve(cfg, exc)) from None
    _print(
        "juggler statesync-demo: a counter shared by every open page, synced with JSON Patch (DATA)",
        f"page:      {server.http_url}",
        f"websocket: {server.url}",
        "stop:      Ctrl-C",
    )
    stop.wait()
    server.close()
    return 0


# -- argument parsing ----------------------------------------------------------------------------

_DESCRIPTIONS = {
    "demo": "Run a server, an in-memory redis and the demo callees (test.echo, test.reverse, "
    "test.delay) in one process.",
    "server": "Run a juggler server. Without a redis URL it starts an embedded in-memory redis "
    "and prints its URL.",
    "callee": "Run a callee pool. TARGET is module:attribute naming a dict of URI -> function.",
    "client": "Connect to a server: an interactive shell, or one command such as "
    "'call URI JSON', 'pub CHANNEL JSON', 'sub CHANNEL'.",
    "load": "Load-test a server with calls and report throughput and latency.",
    "publish": "Publish JSON on a channel from a backend, with no websocket: every server's subscribers get "
    "it, and a channel with history keeps it (the history rules are --history, else the ones the servers "
    "recorded in redis).",
    "statesync-demo": "Serve a page whose counter every open copy shares, kept in sync by the state-sync "
    "protocol (juggler.statesync, hat-juggler's).",
}


#: Settings a command cannot do without, though other commands have a default for them.
_REQUIRED = {("callee", "redis"), ("publish", "redis")}

#: What a setting means to one command, where the shared text of juggler.config would mix
#: several commands' meanings.
_COMMAND_HELP = {
    ("server", "redis"): "redis URL for RPC (and pub-sub, unless --pubsub-redis): a standalone redis or any "
    "node of a Redis Cluster; none: an embedded in-memory redis, whose URL it prints",
    ("callee", "redis"): "the redis URL of the servers whose calls it serves: a standalone redis or any node "
    "of a Redis Cluster",
    ("publish", "redis"): "the servers' pub-sub redis URL: a standalone redis, any node of a Redis Cluster, or a "
    "master behind Redis Sentinel",
    ("publish", "history"): "history rules, as juggler server takes them (repeatable); none: the ones the "
    "servers recorded in redis",
    ("callee", "processes"): "callee processes to run, each with its own redis connections and --workers "
    "threads (with --metrics-port P, process i serves its metrics on P + i)",
    ("load", "processes"): "load processes to run, each driving its share of the connections (one merged "
    "report)",
}

#: The sections of ``juggler server --help``, in order, each with its settings (a setting says
#: which: :attr:`juggler.config.Setting.group`). The other commands have few settings, all under
#: "options".
_SERVER_GROUPS: dict[str, tuple[str, ...]] = {
    title: tuple(name for name in COMMANDS["server"] if SETTINGS[name].group == title)
    for title in GROUPS
}


def _default_help(command: str, name: str, default: Any) -> str:
    return "required" if (command, name) in _REQUIRED else f"default {default}"


def _first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not the dot inside "test.echo")."""
    return re.split(r"\.(?:\s|$)", text, maxsplit=1)[0]


def _add_setting(where: Any, command: str, name: str) -> None:
    """The flag of setting ``name`` of ``command``, in a parser or an argument group."""
    s = SETTINGS[name]
    default = "none" if s.default is None else s.default
    text = _COMMAND_HELP.get((command, name), s.help)
    help_text = f"{text} (env {s.env_var}; {_default_help(command, name, default)})"
    if s.repeatable:
        where.add_argument(s.flag, dest=name, action="append", default=None, metavar=s.metavar, help=help_text)
    elif s.switch and s.default:
        where.add_argument("--no-" + s.flag[2:], dest=name, action="store_const", const=False, default=None,
                           help=f"do not {text} (env {s.env_var}=false)")  # fmt: skip
    elif s.switch:
        where.add_argument(s.flag, dest=name, action="store_const", const=True, default=None, help=help_text)
    else:
        alias = [_LOAD_ALIASES[name]] if command == "load" and name in _LOAD_ALIASES else []
        where.add_argument(s.flag, *alias, dest=name, default=None, metavar=s.metavar or None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="juggler",
        description="Websocket-based, redis-backed RPC and pub-sub (the juggler.0 protocol).",
        epilog="Settings: flags, then JUGGLER_* environment variables, then the --config file "
        "(TOML), then defaults.",
    )
    parser.add_argument("--version", action="version", version=f"juggler {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, names in COMMANDS.items():
        extra: dict[str, Any] = {}
        if command == "client":
            from .shell import ONE_SHOT_HELP

            extra = {"epilog": ONE_SHOT_HELP, "formatter_class": argparse.RawDescriptionHelpFormatter,
                     "usage": "juggler client [OPTIONS] URL [COMMAND ...]"}  # fmt: skip
        elif command == "server":
            extra = {"usage": "juggler server [OPTIONS]  (the options by section below)"}
        p = subs.add_parser(command, help=_first_sentence(_DESCRIPTIONS[command]), description=_DESCRIPTIONS[command],
                            **extra)  # fmt: skip
        groups = {title: p.add_argument_group(title) for title in _SERVER_GROUPS} if command == "server" else {}
        group_of = {name: groups[title] for title, members in _SERVER_GROUPS.items() for name in members if groups}
        for name in names:
            _add_setting(group_of.get(name, p), command, name)
        p.add_argument("--config", metavar="FILE", help="TOML config file (env JUGGLER_CONFIG)")
        p.add_argument("--print-config", action="store_true", help="print the merged settings and exit")
        if command == "callee":
            p.add_argument("targets", nargs="*", metavar="TARGET", help="module:attribute, a dict of URI -> function")
            p.add_argument("--uri", action="append", default=[], metavar="URI=module:function",
                           help="serve URI with a function (repeatable)")  # fmt: skip
            p.add_argument("--demo", action="store_true", help="serve test.echo, test.reverse and test.delay")
        if command == "client":
            p.add_argument("url", metavar="URL", help="the server's websocket URL, e.g. ws://127.0.0.1:9000/ws")
            p.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                           help="one command to run, e.g.: call test.echo '\"hi\"'; none: interactive")  # fmt: skip
            p.add_argument("--allowed-messages", metavar="LIST", help="send Juggler-Allowed-Messages, e.g. call,sub")
            p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                           help="send this header with the handshake, e.g. 'Authorization: Bearer TOKEN' "
                           "(repeatable)")  # fmt: skip
        if command == "publish":
            p.add_argument("channel", metavar="CHANNEL", help="the channel")
            p.add_argument("json", metavar="JSON", help="the event's args, as JSON")
        if command == "load":
            p.add_argument("url", nargs="?", metavar="URL", help="the server's websocket URL")
            p.add_argument("-addr", "--addr", metavar="URL", help="the server's websocket URL, as the reference's "
                           "load tool takes it")  # fmt: skip
            p.add_argument("-r", dest="rate", action=_IntervalAsRate, metavar="DURATION",
                           help="the reference's -r: time between two calls of a connection, e.g. 100ms "
                           "(--rate 10); 0: --rate 0")  # fmt: skip
            p.add_argument("-p", dest="payload", action=_StringPayload, metavar="STRING",
                           help="the reference's -p: a string sent as the args of each call (-p 100 sends "
                           "the JSON string \"100\")")  # fmt: skip
            p.add_argument("--json", action="store_true", help="print the report as one JSON object")
            p.add_argument("--quiet", action="store_true", help="no live progress line")
    return parser


def cmd_publish(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    import redis

    from .history import publish

    try:
        data = json.loads(args.json)
    except ValueError as exc:
        raise _Usage(f"JSON is not valid JSON: {exc}") from None
    if not cfg["redis"]:
        raise _Usage("--redis URL (or JUGGLER_REDIS_URL) is required: the servers' pub-sub redis")
    broker = _broker(cfg["redis"])  # (a standalone redis, a cluster, or behind Sentinel)
    try:
        offset = publish(broker.client, args.channel, data, history=cfg["history"])
    except (redis.RedisError, ValueError) as exc:
        raise _Fail(f"cannot publish on {args.channel!r}: {exc}") from None
    finally:
        broker.close()
    _print(f"published on {args.channel}" + (f" at offset {offset}" if offset is not None else " (no history)"))
    return 0


_RUN = {"demo": cmd_demo, "server": cmd_server, "callee": cmd_callee, "client": cmd_client, "load": cmd_load,
        "statesync-demo": cmd_statesync_demo, "publish": cmd_publish}  # fmt: skip


#: The exit status when the reader of stdout went away (128 + SIGPIPE, what a shell reports for a
#: tool that SIGPIPE stopped).
EXIT_BROKEN_PIPE = 141


def _callee_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~juggler.callee.Callee` keywords that ``juggler callee``'s settings give."""
    return {"workers": cfg["workers"], "waiting": None if cfg["waiting"] == "all" else cfg["waiting"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from .shell import EXIT_INTERRUPTED

    try:
        return _main(argv)
    except KeyboardInterrupt:  # a command that does not stop gracefully on Ctrl-C (StopSignal)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a socket's, not stdout's: a bug to see
        # `juggler ... | head`: stop quietly, as Unix tools do. What Python still holds for
        # stdout would fail again at exit, with a message: send it nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll(), or no real stdout
        return False


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for juggler callee --processes
    flags = {name: getattr(args, name, None) for name in COMMANDS[args.command]}
    try:
        cfg, sources = load(args.command, flags, config_path=args.config)
    except ConfigError as exc:
        print(f"juggler {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(format_config(args.command, cfg, sources))
        return 0
    logging.basicConfig(
        level=cfg["log_level"].upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _RUN[args.command](cfg, args)
    except _Usage as exc:
        print(f"juggler {args.command}: {exc}", file=sys.stderr)
        return 2
    except _Fail as exc:
        print(f"juggler {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
