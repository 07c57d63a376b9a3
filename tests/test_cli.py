"""The `juggler` command, run as real subprocesses."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import websocket

from juggler.config import ConfigError, load

from .conftest import T

ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("JUGGLER_") or k == "JUGGLER_TEST_TIMEOUT_SCALE"}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def juggler(*args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", env())
    return subprocess.run([sys.executable, "-m", "juggler", *args], capture_output=True, text=True, timeout=T(timeout), **kw)


class Proc:
    """A long-running `juggler ...` process; its stdout and stderr are drained by threads (a
    full pipe would block the child) into queues that :meth:`expect` reads."""

    def __init__(self, *args: str, **kw) -> None:
        kw.setdefault("env", env())
        self.p = subprocess.Popen(
            [sys.executable, "-m", "juggler", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
        )  # fmt: skip
        self.streams = {"out": queue.Queue(), "err": queue.Queue()}
        self.seen: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.p.stdout, self.streams["out"]), name="test-proc-stdout"),
            threading.Thread(target=self._read, args=(self.p.stderr, self.streams["err"]), name="test-proc-stderr"),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(pipe, lines: queue.Queue) -> None:
        for line in pipe:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def expect(self, pattern: str, timeout: float = 20, stream: str = "out") -> re.Match:
        """Wait for a line of stdout (or ``stream="err"``) matching ``pattern``."""
        lines = self.streams[stream]
        deadline = time.monotonic() + T(timeout)
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {self.seen}") from None
            if line is None:
                lines.put(None)
                raise AssertionError(f"exited {self.p.wait()} before {pattern!r}: {self.seen}")
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        self.p.send_signal(sig)
        try:
            return self.p.wait(T(timeout))
        finally:
            self.close()

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        for t in self._readers:
            t.join()
        for pipe in (self.p.stdin, self.p.stdout, self.p.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(*args: str, **kw) -> Proc:
        p = Proc(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


def raw_call(url: str, uri: str, args, timeout_ns: int = 5 * 10**9) -> dict:
    ws = websocket.create_connection(url, subprotocols=["juggler.0"], timeout=T(10))
    try:
        msg_id = "8c1d2a43-6f2e-4b1e-9a55-3d1d8c2f7e10"
        ws.send(json.dumps({"meta": {"type": 1, "uuid": msg_id}, "payload": {"uri": uri, "timeout": timeout_ns, "args": args}}))
        ack = json.loads(ws.recv())
        assert ack["meta"]["type"] == 8 and ack["payload"]["for"] == msg_id
        res = json.loads(ws.recv())
        assert res["meta"]["type"] == 9 and res["payload"]["for"] == msg_id
        return res["payload"]["args"]
    finally:
        ws.close()


@pytest.fixture
def demo(procs):
    p = procs("demo", "--port", "0", "--log-level", "warning")
    url = p.expect(r"websocket: (ws://\S+)").group(1)
    redis_url = p.expect(r"redis: +(redis://127\.0\.0\.1:\d+/0)").group(1)
    p.expect(r"^stop:")
    return p, url, redis_url


def test_demo_serves_each_uri_and_stops_on_sigterm(demo):
    p, url, _ = demo
    assert any(f"juggler client {url} call test.echo" in line for line in p.seen)
    assert raw_call(url, "test.echo", {"x": [1, "y"]}) == {"x": [1, "y"]}
    assert raw_call(url, "test.reverse", "juggler") == "relgguj"
    assert raw_call(url, "test.delay", 20) == 20
    assert raw_call(url, "test.delay", "20") == 20  # as the reference's load tool sends it
    started = time.monotonic()
    assert p.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < T(5)


def test_demo_sigint_closes_clients_with_going_away(demo):
    p, url, _ = demo
    ws = websocket.create_connection(url, subprotocols=["juggler.0"], timeout=T(10))
    try:
        p.p.send_signal(signal.SIGINT)
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(data[:2], "big") == 1001
    finally:
        ws.close()
    assert p.p.wait(T(10)) == 0


def test_server_with_embedded_redis_and_callee_in_another_process(procs):
    server = procs("server", "--port", "0")
    url = server.expect(r"websocket: (ws://\S+)").group(1)
    redis_url = server.expect(r"redis: +(redis://127\.0\.0\.1:\d+/0)").group(1)
    # the line to start callees, ready to paste, as the demo prints it
    command = server.expect(r"^callees: +(juggler callee .*)$").group(1)
    assert command == f"juggler callee --redis {redis_url} --demo"
    callee = procs(*command.split()[1:], "--workers", "2")
    callee.expect(r"callee: serving test\.echo, test\.reverse, test\.delay")
    out = juggler("client", url, "call", "test.reverse", '"abc"')
    assert (out.returncode, out.stdout) == (0, '"cba"\n')
    assert callee.stop() == 0
    assert server.stop() == 0


@pytest.mark.parametrize("value, expected", [(None, 2), ("all", None), ("3", 3)])
def test_callee_waiting_reaches_the_pool(value, expected):
    """--waiting N|all: how many workers wait on redis while calls are quick (all: None)."""
    from juggler.cli import _callee_kwargs

    flags = {} if value is None else {"waiting": value}
    cfg, _ = load("callee", flags, env={})
    assert _callee_kwargs(cfg) == {"workers": 8, "waiting": expected}


def test_a_callee_with_every_worker_waiting_serves_calls(procs):
    server = procs("server", "--port", "0")
    url = server.expect(r"websocket: (ws://\S+)").group(1)
    command = server.expect(r"^callees: +(juggler callee .*)$").group(1)
    callee = procs(*command.split()[1:], "--workers", "2", "--waiting", "all")
    callee.expect(r"callee: serving test\.echo")
    out = juggler("client", url, "call", "test.reverse", '"abc"')
    assert (out.returncode, out.stdout) == (0, '"cba"\n')
    assert callee.stop() == 0
    assert server.stop() == 0


def test_callee_waiting_is_at_least_one():
    out = juggler("callee", "--redis", "redis://127.0.0.1:1/0", "--waiting", "0", "--print-config")
    assert out.returncode == 2
    assert "bad value for waiting (from flag --waiting): 0 is out of range" in out.stderr


def test_callee_serves_functions_named_on_the_command_line(procs, tmp_path):
    (tmp_path / "myrpc.py").write_text(
        "def add(args):\n    return args[0] + args[1]\n\n"
        "def mul(args):\n    return args[0] * args[1]\n\n"
        "functions = {'math.add': add}\n"
    )
    server = procs("server", "--port", "0")
    url = server.expect(r"websocket: (ws://\S+)").group(1)
    redis_url = server.expect(r"redis: +(redis://\S+)").group(1)
    callee = procs("callee", "myrpc:functions", "--uri", "math.mul=myrpc:mul", cwd=tmp_path, env=env(JUGGLER_REDIS_URL=redis_url))
    callee.expect(r"callee: serving math\.add, math\.mul")
    assert juggler("client", url, "call", "math.add", "[2, 3]").stdout == "5\n"
    assert juggler("client", url, "call", "math.mul", "[2, 3]").stdout == "6\n"
    assert callee.stop() == 0
    assert server.stop() == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["callee", "--redis", "redis://127.0.0.1:1/0"], "nothing to serve"),
        (["callee", "--demo"], "needs --redis"),
        (["callee", "--redis", "redis://127.0.0.1:1/0", "nosuchmodule:x"], "cannot import 'nosuchmodule'"),
        (["callee", "--redis", "redis://127.0.0.1:1/0", "--uri", "oops"], "URI=module:function"),
        (["callee", "--redis", "redis://127.0.0.1:1/0", "json:dumps"], "must be a dict"),
    ],
)
def test_callee_usage_errors(args, message):
    out = juggler(*args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.count("juggler callee") == 1  # said once, at the start of the line


def test_callee_help_says_redis_is_required():
    out = juggler("callee", "--help")
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert "the redis URL of the servers whose calls it serves: a standalone redis or any node of a Redis " \
           "Cluster (env JUGGLER_REDIS_URL; required)" in text
    assert "default none" not in text.split("--redis URL")[1].split("--workers")[0]


def test_each_command_help_speaks_of_that_command_only():
    callee = " ".join(juggler("callee", "--help").stdout.split())
    assert "embedded" not in callee and "pub-sub" not in callee  # the server's meaning of --redis
    assert "callee processes to run" in callee and "merged report" not in callee
    load = " ".join(juggler("load", "--help").stdout.split())
    assert "load processes to run, each driving its share of the connections" in load
    assert "--workers" not in load and "callee" not in load
    server = " ".join(juggler("server", "--help").stdout.split())
    assert "none: an embedded in-memory redis, whose URL it prints" in server


def test_server_help_is_in_sections():
    from juggler.cli import _SERVER_GROUPS, build_parser
    from juggler.config import COMMANDS, SETTINGS

    out = juggler("server", "--help").stdout
    titles = re.findall(r"^(\S[^:\n]*):$", out, flags=re.M)
    assert titles == ["options", *_SERVER_GROUPS]
    grouped = [name for members in _SERVER_GROUPS.values() for name in members]
    ungrouped = [name for name in COMMANDS["server"] if name not in grouped]
    assert not ungrouped, f"put these server settings in a section of juggler.cli._SERVER_GROUPS: {ungrouped}"
    assert len(grouped) == len(set(grouped)) and set(grouped) <= set(COMMANDS["server"])
    # under "options": only --help, --config and --print-config
    head = out.split("\noptions:\n")[1].split("\n\n")[0]
    assert re.findall(r"^  (-\S+)", head, flags=re.M) == ["-h,", "--config", "--print-config"]
    assert SETTINGS["cpu"].flag in out.split("\ntuning:\n")[1]
    assert build_parser() is not None


def test_client_help_shows_the_one_shot_commands_and_the_exit_status():
    out = juggler("client", "--help").stdout
    assert "usage: juggler client [OPTIONS] URL [COMMAND ...]" in out
    for line in ("call URI [JSON]", "pub CHANNEL [JSON]", "sub CHANNEL [COUNT]", "psub PATTERN [COUNT]",
                 "options go before the URL", "juggler client --timeout 2s ws://127.0.0.1:9000/ws call math.add",
                 "  5    could not connect, or the connection closed", "  130  interrupted (Ctrl-C)"):  # fmt: skip
        assert line in out, line


@pytest.mark.parametrize(
    "source, message",
    [
        ("def add(a, b:\n    return a + b\n", r"SyntaxError: .* \(\S+/broken\.py, line 1\)"),
        ("functions = {}\nundefined_name\n", r"NameError: name 'undefined_name' is not defined \(\S+/broken\.py, line 2\)"),
    ],
)
def test_a_callee_module_that_fails_to_import_is_one_line_and_status_2(tmp_path, source, message):
    (tmp_path / "broken.py").write_text(source)
    out = juggler("callee", "--redis", "redis://127.0.0.1:1/0", "broken:functions", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert re.fullmatch(r"juggler callee: cannot import 'broken': " + message + "\n", out.stderr), out.stderr


@pytest.mark.parametrize("command", ["demo", "server", "statesync-demo"])
def test_a_port_in_use_suggests_another(command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = juggler(command, "--port", str(port), "--log-level", "warning")
    assert out.returncode == 1
    assert f"juggler {command}: cannot serve on 127.0.0.1:{port}: Address already in use (juggler demo, server " \
           "and statesync-demo all default to port 9000): choose another with --port PORT, or --port 0 for any " \
           "free one\n" in out.stderr


def test_top_level_help_keeps_each_summary_whole():
    out = juggler("--help")
    text = " ".join(out.stdout.split())
    assert "demo Run a server, an in-memory redis and the demo callees (test.echo, test.reverse, test.delay) in one process" in text


def test_demo_delay_takes_a_number_or_a_string_of_one():
    from juggler.cli import demo_delay

    assert demo_delay(0) == 0 and demo_delay("0") == 0
    assert demo_delay(3) == 3 and demo_delay("3") == 3 and demo_delay(" 2 ") == 2
    assert demo_delay(1.5) == 1.5 and demo_delay("1.5") == 1.5
    for bad in ("abc", "", "-1", "600001", -1, True, None, [1], "nan", "inf"):
        with pytest.raises(ValueError, match="test.delay takes a number of milliseconds"):
            demo_delay(bad)


def test_unreachable_redis_is_one_line_and_status_1(free_port):
    out = juggler("callee", "--demo", "--redis", f"redis://127.0.0.1:{free_port}/0")
    assert out.returncode == 1
    assert "cannot reach redis at" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture
def free_port():
    from .conftest import free_port as fp

    return fp()


def test_one_shot_client_exit_codes(demo, free_port):
    _, url, _ = demo
    ok = juggler("client", url, "call", "test.echo", '{"a": [1, 2]}')
    assert (ok.returncode, json.loads(ok.stdout)) == (0, {"a": [1, 2]})
    err = juggler("client", url, "call", "test.reverse", "42")
    assert err.returncode == 1 and "test.reverse takes a string" in err.stderr
    usage = juggler("client", url, "call", "test.echo", "not json")
    assert usage.returncode == 2 and "JSON" in usage.stderr
    expired = juggler("client", "--timeout", "200ms", url, "call", "test.delay", "2000")
    assert expired.returncode == 4 and "expired" in expired.stderr
    refused = juggler("client", f"ws://127.0.0.1:{free_port}/ws", "call", "test.echo", "1")
    assert refused.returncode == 5 and "cannot connect" in refused.stderr
    pub = juggler("client", url, "pub", "some.channel", '{"x": 1}')
    assert pub.returncode == 0


def test_one_shot_client_nack_exit_code(procs):
    server = procs("server", "--port", "0", "--call-cap", "1", "--log-level", "warning")
    url = server.expect(r"websocket: (ws://\S+)").group(1)
    ws = websocket.create_connection(url, subprotocols=["juggler.0"], timeout=T(10))
    try:  # fill the call list of a URI nobody serves, and wait for its ACK
        ws.send(json.dumps({"meta": {"type": 1, "uuid": "0b7a8f7e-3c55-4c1e-8d33-5f0b1c2d3e4f"}, "payload": {"uri": "nobody", "timeout": 30 * 10**9}}))
        assert json.loads(ws.recv())["meta"]["type"] == 8
        nack = juggler("client", url, "call", "nobody", "1")
        assert nack.returncode == 3
        assert "NACK 500: list capacity exceeded" in nack.stderr
    finally:
        ws.close()


def test_one_shot_sub_prints_events(demo):
    _, url, _ = demo
    sub = subprocess.Popen(
        [sys.executable, "-m", "juggler", "client", url, "psub", "news.*", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    try:
        # publish until the subscriber has subscribed and got one (a PUB before its SUB is lost)
        deadline = time.monotonic() + T(20)
        while sub.poll() is None and time.monotonic() < deadline:
            juggler("client", url, "pub", "news.today", '{"n": 1}')
        out, err = sub.communicate(timeout=T(10))
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    assert sub.returncode == 0, err
    assert json.loads(out.splitlines()[0]) == {"channel": "news.today", "pattern": "news.*", "args": {"n": 1}}


def test_interactive_shell_over_stdin(demo):
    _, url, _ = demo
    script = "\n".join(
        [
            "call test.echo [1, 2]",
            "sub news",
            "psub n*",
            "pub news {\"a\": 1}",
            "connect",
            "@2 call test.reverse \"abc\"",
            "timeout 100ms",
            "call test.delay 2000",
            "wait",
            "list",
            "@1 unsb news",
            "@1 punsb n*",
            "bogus",
            "call test.echo not-json",
            "exit",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-m", "juggler", "client", url], input=script + "\n",
        capture_output=True, text=True, timeout=T(30), env=env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "[1] connected to" in text and "[2] connected to" in text
    assert re.search(r"\[1\] RES  test\.echo #1 [\d.]+ ms: \[1, 2\]", text)
    assert "[1] SUB news: ACK" in text and "[1] PSUB n*: ACK" in text
    assert '[1] EVNT news: {"a": 1}' in text
    assert '[1] EVNT news (pattern n*): {"a": 1}' in text
    assert re.search(r'\[2\] RES  test\.reverse #2 [\d.]+ ms: "cba"', text)
    assert "[2] EXP  test.delay #3: expired after 0.1 s" in text
    assert "[1] UNSB news: ACK" in text and "[1] PUNSB n*: ACK" in text
    assert "error: unknown command 'bogus'" in text
    assert "error: args must be JSON" in text
    assert "*[2] open; calls in flight: 0; subscriptions: none" in text


def test_load_tester_against_demo(demo):
    _, url, _ = demo
    out = juggler("load", "--duration", "2", "--connections", "4", "--json", url, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["calls"] > 0
    assert r["results"] == r["calls"] == r["acks"]
    assert r["nacks"] == r["expired"] == r["closed"] == 0
    assert 2.0 <= r["duration"] < T(10)
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p75"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_load_tester_fixed_rate_text_report(demo):
    _, url, _ = demo
    out = juggler("load", "--duration", "1", "--connections", "2", "--rate", "20", "--uri", "test.delay",
                  "--payload", "5", url, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    calls = int(re.search(r"^calls: +(\d+)", out.stdout, re.M).group(1))
    assert 30 <= calls <= 42  # 2 connections x 20/s x 1 s, no catch-up bursts
    assert re.search(r"^results: +%d " % calls, out.stdout, re.M)
    for key in ("acks:", "nacks:", "expired:", "duration:", "calls/s:", "latency:"):
        assert key in out.stdout
    assert re.search(r"latency: +min [\d.]+ ms  p50 [\d.]+  p75 [\d.]+  p90 [\d.]+  p99 [\d.]+  max [\d.]+", out.stdout)


def test_load_tester_counts_error_results_expiries_and_closes(demo, procs):
    _, url, _ = demo
    out = juggler("load", "--duration", "1", "--connections", "2", "--uri", "test.reverse", "--payload", "42", "--json", url, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["calls"] > 0 and r["results"] == r["error_results"] == r["calls"] == r["acks"]
    # each call expires after 100 ms; its RES, 300 ms late, is not taken for the next call's
    out = juggler("load", "--duration", "1", "--connections", "2", "--uri", "test.delay", "--payload", "300",
                  "--timeout", "100ms", "--json", url, timeout=60)  # fmt: skip
    r = json.loads(out.stdout)
    assert 0 < r["calls"] <= 22 and r["expired"] == r["calls"] and r["results"] == 0
    # no call got a result: no latency to report, and a status a script cannot take for success
    assert r["latency_ms"] is None
    assert out.returncode == 4
    assert out.stderr == f"juggler load: no call got a result ({r['calls']} calls: {r['calls']} expired, 0 NACKed, 0 closed)\n"
    server = procs("demo", "--port", "0", "--log-level", "warning")
    doomed = server.expect(r"websocket: (ws://\S+)").group(1)
    server.expect(r"^stop:")
    load = procs("load", "--duration", "600", "--connections", "2", "--uri", "test.delay", "--payload", "20", "--json", doomed)
    deadline = time.monotonic() + T(30)
    while "juggler_messages_read_total" not in raw_metrics(doomed) or calls_read(doomed) < 4:
        assert time.monotonic() < deadline, "no calls from juggler load"
        time.sleep(0.05)  # a bounded poll of an observable state, not a guess
    assert server.stop() == 0  # the server closes both connections: the run ends, with a report
    r = json.loads(load.expect(r"^\{", timeout=30).string)
    assert r["closed"] == 2 and r["calls"] == r["results"] + r["nacks"] + r["closed"]  # one outcome each
    assert load.p.wait(T(10)) == 0


def test_load_all_expired_text_report_says_latency_is_not_available(demo):
    _, url, _ = demo
    out = juggler("load", "-d", "500ms", "-c", "1", "-u", "test.delay", "-p", "300", "-t", "100ms", url, timeout=60)
    assert out.returncode == 4
    assert re.search(r"^latency: +n/a \(no call got a result\)$", out.stdout, re.M)
    assert "juggler load: no call got a result" in out.stderr


def test_load_takes_the_reference_load_tool_flags(demo):
    _, url, _ = demo
    # as a user of the Go tools types it: -p is a string, which the demo's test.delay takes
    out = juggler("load", "-addr", url, "-c", "2", "-d", "1s", "-r", "50ms", "-t", "2s", "-u", "test.delay", "-p", "5",
                  "--json", timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["connections"], r["rate"], r["uri"]) == (2, 20.0, "test.delay")
    assert 30 <= r["calls"] <= 42  # 2 connections x 20/s x 1 s
    assert r["results"] == r["calls"] and r["error_results"] == 0


def test_load_reference_flags_map_onto_the_settings():
    out = juggler("load", "-c", "3", "-d", "1m30s", "-r", "100ms", "-t", "1s", "-u", "x", "-p", "100", "--print-config",
                  "ws://127.0.0.1:1/ws")  # fmt: skip
    assert out.returncode == 0, out.stderr
    values = dict(re.findall(r"^(\w+) = (.*?)\s+#", out.stdout, re.M))
    assert values == {"connections": "3", "processes": "1", "rate": "10.0", "duration": "90.0", "timeout": "1.0",
                      "uri": '"x"', "payload": '"\\"100\\""', "log_level": '"info"'}  # fmt: skip
    assert juggler("load", "-r", "0", "--print-config", "ws://127.0.0.1:1/ws").stdout.count("rate = 0.0") == 1
    bad = juggler("load", "-r", "soon", "ws://127.0.0.1:1/ws")
    assert bad.returncode == 2 and "argument -r: 'soon' is not a duration" in bad.stderr
    nowhere = juggler("load", "-c", "2")
    assert (nowhere.returncode, nowhere.stderr) == (2, "juggler load: which server? give its URL (or -addr URL)\n")


def raw_metrics(ws_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(ws_url.replace("ws://", "http://").rsplit("/", 1)[0] + "/metrics", timeout=T(5)) as resp:
        return resp.read().decode()


def calls_read(ws_url: str) -> float:
    m = re.search(r'^juggler_messages_read_total\{type="CALL"\} (\S+)', raw_metrics(ws_url), re.M)
    return float(m.group(1)) if m else 0.0


def test_load_tester_processes_merge_into_one_report(demo):
    _, url, _ = demo
    out = juggler("load", "--processes", "2", "--duration", "2", "--connections", "3", "--json", url, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["processes"] == 2 and r["connections"] == 3
    assert [p["connections"] for p in r["per_process"]] == [2, 1]
    assert all(p["calls"] > 0 for p in r["per_process"])  # both processes called
    assert r["calls"] == sum(p["calls"] for p in r["per_process"])
    assert r["results"] == r["calls"] == r["acks"]
    assert r["nacks"] == r["expired"] == r["closed"] == 0
    assert 2.0 <= r["sending"] <= r["duration"] < T(10)
    assert r["calls_per_second"] == pytest.approx(r["calls"] / r["sending"], rel=1e-3)
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p75"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    text = juggler("load", "--duration", "1", "--connections", "2", url, timeout=60,
                   env=env(JUGGLER_PROCESSES="2"))  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert "2 connections, auto-regulated, over 2 processes" in text.stdout
    calls = int(re.search(r"^calls: +(\d+)", text.stdout, re.M).group(1))
    assert calls > 0 and re.search(r"^results: +%d " % calls, text.stdout, re.M)


def test_load_report_percentiles_are_over_the_merged_samples():
    from array import array

    from juggler.load import build_report

    def part(connections, latencies_ms):
        n = len(latencies_ms)
        return {"connections": connections, "calls": n, "acks": n, "nacks": 1, "results": n - 1, "errors": 1,
                "expired": 2, "closed": 0, "duration": 2.5, "sending": 2.0,
                "latencies": array("d", [x / 1000 for x in latencies_ms])}  # fmt: skip

    r = build_report("ws://x/ws", "u", 3, 0.0, [part(2, [1.0] * 9), part(1, [100.0])])
    # the p50 of each process is 1 and 100 ms: their mean would be 50.5
    assert r["latency_ms"] == {"min": 1.0, "p50": 1.0, "p75": 1.0, "p90": 1.0, "p99": 100.0, "max": 100.0}
    assert (r["calls"], r["acks"], r["results"], r["error_results"], r["nacks"], r["expired"]) == (10, 10, 10, 2, 2, 4)
    assert (r["sending"], r["duration"], r["calls_per_second"]) == (2.0, 2.5, 5.0)
    assert r["processes"] == 2 and r["per_process"] == [{"connections": 2, "calls": 9}, {"connections": 1, "calls": 1}]
    one = build_report("ws://x/ws", "u", 2, 0.0, [part(2, [1.0] * 9)])
    assert "processes" not in one and "per_process" not in one  # one process: the report as before


def test_load_tester_processes_stop_together_on_sigint(demo, procs):
    import urllib.request

    _, url, _ = demo
    load = procs("load", "--processes", "2", "--connections", "2", "--duration", "600", "--json", url)
    metrics = url.replace("ws://", "http://").rsplit("/", 1)[0] + "/metrics"
    deadline = time.monotonic() + T(30)
    while True:  # both processes are connected and calls flow
        with urllib.request.urlopen(metrics, timeout=T(5)) as resp:
            text = resp.read().decode()
        m = re.search(r'^juggler_messages_read_total\{type="CALL"\} (\S+)', text, re.M)
        if m and float(m.group(1)) >= 10:
            break
        assert time.monotonic() < deadline, "no calls from juggler load"
        time.sleep(0.05)  # a bounded poll of an observable state, not a guess
    started = time.monotonic()
    assert load.stop(signal.SIGINT, timeout=30) == 0
    assert time.monotonic() - started < T(20)
    r = json.loads(load.expect(r"^\{").string)  # the report: one JSON line
    assert r["processes"] == 2 and r["calls"] > 0 and r["sending"] < 600
    assert r["calls"] == r["results"] + r["closed"] + r["expired"] + r["nacks"]
    wait_connections(url, 0)  # every process closed its connections


def test_load_tester_more_processes_than_connections_is_a_usage_error():
    out = juggler("load", "--processes", "3", "--connections", "2", "ws://127.0.0.1:1/ws")
    assert out.returncode == 2
    assert "--processes (3) is more than --connections (2)" in out.stderr


# -- configuration -------------------------------------------------------------------------------


def test_config_precedence_flag_env_file_default(tmp_path):
    cfg = tmp_path / "j.toml"
    cfg.write_text('redis = "redis://file:1/0"\nport = 1111\n[server]\nport = 2222\nread_limit = 4096\n')
    values, sources = load("server", {"port": None}, env={}, config_path=str(cfg))
    assert values["port"] == 2222 and "[server]" in sources["port"]  # the command's table wins
    assert values["redis"] == "redis://file:1/0" and sources["redis"] == f"file {cfg}"
    assert values["read_limit"] == 4096
    assert values["write_queue_size"] == 256 and sources["write_queue_size"] == "default"
    values, sources = load("server", {"port": None}, env={"JUGGLER_PORT": "3333"}, config_path=str(cfg))
    assert values["port"] == 3333 and sources["port"] == "env JUGGLER_PORT"
    values, sources = load("server", {"port": "4444"}, env={"JUGGLER_PORT": "3333"}, config_path=str(cfg))
    assert values["port"] == 4444 and sources["port"] == "flag --port"
    values, _ = load("server", {}, env={"JUGGLER_CONFIG": str(cfg)})
    assert values["port"] == 2222


def test_print_config_shows_merged_result(tmp_path):
    cfg = tmp_path / "j.toml"
    cfg.write_text('[server]\nwrite_timeout = "500ms"\nport = 1234\n')
    out = juggler("server", "--config", str(cfg), "--port", "5555", "--print-config",
                  env=env(JUGGLER_READ_LIMIT="2048"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = {line.split("=")[0].strip(): line for line in out.stdout.splitlines() if "=" in line}
    assert "port = 5555" in lines["port"] and "flag --port" in lines["port"]
    assert "read_limit = 2048" in lines["read_limit"] and "env JUGGLER_READ_LIMIT" in lines["read_limit"]
    assert "write_timeout = 0.5" in lines["write_timeout"] and "file" in lines["write_timeout"]
    assert "# default" in lines["handshake_timeout"]


@pytest.mark.parametrize(
    "args, extra_env, file_text, message",
    [
        (["--port", "abc"], {}, None, "bad value for port (from flag --port): 'abc' is not a whole number"),
        (["--port", "70000"], {}, None, "bad value for port (from flag --port): 70000 is out of range"),
        ([], {"JUGGLER_READ_LIMIT": "0"}, None, "bad value for read_limit (from env JUGGLER_READ_LIMIT)"),
        ([], {"JUGGLER_REDIS_URL": "http://x"}, None, "bad value for redis (from env JUGGLER_REDIS_URL)"),
        (["--write-timeout", "soon"], {}, None, "'soon' is not a duration"),
        ([], {}, "port = [", "not valid TOML"),
        ([], {}, "prot = 1", "unknown setting 'prot'"),
        ([], {}, "[server]\nworkers = 3", "[server] has no setting 'workers'"),
        ([], {}, "[servre]\nport = 3", "unknown table [servre]"),
        ([], {}, '[server]\nport = "x"', "bad value for port (from file"),
    ],
)
def test_bad_configuration_is_one_line_and_status_2(tmp_path, args, extra_env, file_text, message):
    if file_text is not None:
        (tmp_path / "bad.toml").write_text(file_text)
        args = [*args, "--config", str(tmp_path / "bad.toml")]
    out = juggler("server", *args, "--print-config", env=env(**extra_env))
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file /no/such.toml"):
        load("server", {}, env={}, config_path="/no/such.toml")


def test_python_m_juggler_and_version():
    out = juggler("--version")
    assert out.returncode == 0 and out.stdout.startswith("juggler ")
    out = juggler("--help")
    for command in ("demo", "server", "callee", "client", "load"):
        assert command in out.stdout


def test_docs_list_every_setting():
    """docs/settings.inc is what docs/settings_table.py makes of juggler.config today."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "docs" / "settings_table.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "settings.inc").read_text() == gen.render(), "run: python docs/settings_table.py"
    assert ".. include:: settings.inc" in (ROOT / "docs" / "cli.rst").read_text()


def wait_connections(ws_url: str, n: int, timeout: float = 10) -> None:
    """Wait until the server's /healthz reports ``n`` open connections."""
    import urllib.request

    health = ws_url.replace("ws://", "http://").rsplit("/", 1)[0] + "/healthz"
    deadline = time.monotonic() + T(timeout)
    while True:
        with urllib.request.urlopen(health, timeout=T(5)) as r:
            if json.loads(r.read())["connections"] == n:
                return
        assert time.monotonic() < deadline, f"server still has connections other than {n}"
        time.sleep(0.02)  # a bounded poll of an observable state, not a guess


def test_server_cli_limits_take_effect(procs):
    server = procs("server", "--port", "0", "--max-connections", "2", "--write-limit", "300",
                   "--log-level", "warning")  # fmt: skip
    url = server.expect(r"websocket: (ws://\S+)").group(1)
    redis_url = server.expect(r"redis: +(redis://\S+)").group(1)
    callee = procs("callee", "--redis", redis_url, "--demo")
    callee.expect(r"callee: serving")
    ok = juggler("client", url, "call", "test.echo", '"%s"' % ("x" * 100))
    assert ok.returncode == 0, ok.stderr
    big = juggler("client", url, "call", "test.echo", '"%s"' % ("x" * 400))
    assert big.returncode == 1 and "write limit of 300 bytes" in big.stderr
    wait_connections(url, 0)  # the one-shot clients' connections are torn down
    held = [websocket.create_connection(url, subprotocols=["juggler.0"], timeout=T(10)) for _ in range(2)]
    try:  # both allowed connections are taken: the next handshake gets 503
        refused = juggler("client", url, "pub", "x", "1")
        assert refused.returncode == 5 and "503" in refused.stderr
    finally:
        for ws in held:
            ws.close()
    assert callee.stop() == 0
    assert server.stop() == 0


def test_server_cli_abuse_limits_take_effect(procs):
    """--max-args-size and --metrics-listen as flags, the two per-connection caps from the
    environment."""
    import urllib.request

    from juggler import Client, NackError

    server = procs("server", "--port", "0", "--max-args-size", "100", "--metrics-listen", "127.0.0.1:0",
                   "--log-level", "warning", env=env(JUGGLER_MAX_SUBSCRIPTIONS="1", JUGGLER_MAX_CALLS_IN_FLIGHT="2"))  # fmt: skip
    url = server.expect(r"websocket: (ws://\S+)").group(1)
    metrics = server.expect(r"metrics: +(http://\S+)/metrics").group(1)
    big = juggler("client", url, "call", "nobody", '"%s"' % ("x" * 200))
    assert big.returncode == 3 and "NACK 413: call args of 202 bytes" in big.stderr
    with Client.connect(url, connect_timeout=T(10)) as c:
        c.sub("one")
        with pytest.raises(NackError, match="429"):
            c.sub("two")
        waiting = [c.call_async("nobody", i, timeout=T(30)) for i in range(2)]
        with pytest.raises(NackError, match="429"):
            c.call("nobody", 3, timeout=T(30))
        assert not any(f.done() for f in waiting)
    with urllib.request.urlopen(metrics + "/healthz", timeout=T(10)) as r:
        assert json.loads(r.read())["status"] == "ok"
    assert server.stop() == 0


def test_callee_metrics_port_and_load_metric_deltas(procs):
    server = procs("server", "--port", "0", "--log-level", "warning")
    url = server.expect(r"websocket: (ws://\S+)").group(1)
    redis_url = server.expect(r"redis: +(redis://\S+)").group(1)
    callee = procs("callee", "--redis", redis_url, "--demo", "--metrics-port", "0")
    metrics_url = callee.expect(r"metrics: (http://\S+)").group(1)
    callee.expect(r"callee: serving")
    metrics_base = url.replace("ws://", "http://").replace("/ws", "")
    out = juggler("load", "--duration", "1", "--connections", "2", "--json", "--metrics", metrics_base + "/metrics", url, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    deltas = r["server_metrics"]
    assert deltas['juggler_messages_read_total{type="CALL"}'] == r["calls"]
    assert deltas['juggler_messages_written_total{type="RES"}'] == r["results"]
    assert deltas["juggler_call_ack_seconds_count"] == r["calls"]
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=T(10)) as resp:
        text = resp.read().decode()
    calls = [l for l in text.splitlines() if l.startswith("juggler_callee_calls_total")]
    assert calls and float(calls[0].split()[-1]) >= r["calls"]
    assert callee.stop() == 0
    assert server.stop() == 0


def test_callee_processes_serve_together_and_stop_on_sigterm(procs, redis_server):
    """--processes 2: two callee processes serve the same URIs; SIGTERM to the parent stops
    both gracefully (a running call finishes) and the parent exits 0 once they have."""
    from juggler import RedisBroker
    from juggler.message import CallPayload, new_uuid

    callee = procs("callee", "--redis", redis_server.url, "--demo", "--workers", "2", env=env(JUGGLER_PROCESSES="2"))
    pids = [int(x) for x in callee.expect(r"callee: 2 processes \(pids (\d+), (\d+)\)").groups()]
    for _ in range(2):
        callee.expect(r"callee: serving test\.echo, test\.reverse, test\.delay")
    broker = RedisBroker.from_url(redis_server.url)
    try:
        conn = new_uuid()
        calls = [CallPayload(conn, new_uuid(), "test.echo", i) for i in range(20)]
        for p in calls:
            broker.store_call(p, T(10))
        got = [broker.pop_result(conn, T(10)) for _ in calls]
        assert sorted(p.payload.args for p in got if p is not None) == list(range(20))
        # a slow call is running in one of the processes: a graceful stop lets it finish
        broker.store_call(CallPayload(conn, new_uuid(), "test.delay", 500), T(10))
        time.sleep(0.2)
        assert callee.stop(signal.SIGTERM) == 0
        popped = broker.pop_result(conn, T(2))
        assert popped is not None and popped.payload.args == 500
    finally:
        broker.close()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_callee_processes_stop_when_their_parent_is_killed(procs, redis_server):
    """A parent killed with SIGKILL cannot pass a stop on: its callee processes stop anyway
    (the kernel sends them SIGTERM), so none outlives it."""
    callee = procs("callee", "--redis", redis_server.url, "--demo", "--workers", "1", env=env(JUGGLER_PROCESSES="2"))
    pids = [int(x) for x in callee.expect(r"callee: 2 processes \(pids (\d+), (\d+)\)").groups()]
    for _ in range(2):
        callee.expect(r"callee: serving test\.echo")
    callee.p.kill()
    deadline = time.monotonic() + T(15)
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, f"callee process {pid} outlived its parent"
            time.sleep(0.02)
    callee.close()  # (their stdout closed with them: its reader threads end)


@pytest.mark.parametrize("command, flags, expected", [
    ("server", ["--switch-interval", "0.02"], "0.02"),
    ("demo", [], "1.0"),  # the default
])  # fmt: skip
def test_server_and_demo_set_the_gil_switch_interval(procs, command, flags, expected):
    proc = procs(command, "--port", "0", *flags, "--log-level", "debug")
    proc.expect(r"process tuned: .*GIL switch interval %s s" % re.escape(expected), stream="err")
    proc.expect(r"websocket: ws://")
    assert proc.stop() == 0
