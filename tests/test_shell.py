"""``juggler client``: its one-shot commands and its shell, as a person at a terminal uses them."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from juggler import Client

from .conftest import T
from .test_cli import ROOT, demo, env, juggler, procs  # noqa: F401 - fixtures

__all__: list[str] = []


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://127.0.0.1:9000/ws", "'http://127.0.0.1:9000/ws' is an HTTP URL: a juggler server's websocket URL "
                                     "starts with ws://, e.g. ws://127.0.0.1:9000/ws"),
        ("127.0.0.1:9000", "'127.0.0.1:9000' is not a websocket URL (ws://HOST:PORT/PATH or wss://...), "
                           "e.g. ws://127.0.0.1:9000/ws"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", [["client", "{url}", "call", "test.echo", "1"], ["client", "{url}"], ["load", "{url}"]])
def test_a_url_that_is_not_a_websocket_one_is_one_line_and_status_2(url, message, command):
    out = juggler(*[word.format(url=url) for word in command], input="")
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"juggler {command[0]}: {message}\n"


def test_the_shell_carries_on_after_commands_that_fail(demo):
    _, url, _ = demo
    script = [
        "connect http://127.0.0.1:1/ws",
        "connect 127.0.0.1:1",
        "close abc",
        "use x",
        "call test.reverse 42",
        "wait",
        "list",
        "exit",
    ]
    out = juggler("client", url, input="\n".join(script) + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert "error: 'http://127.0.0.1:1/ws' is an HTTP URL: a juggler server's websocket URL starts with ws://, " \
           "e.g. ws://127.0.0.1:1/ws" in lines
    assert "error: '127.0.0.1:1' is not a websocket URL (ws://HOST:PORT/PATH or wss://...), e.g. ws://127.0.0.1:1/ws" in lines
    assert "error: close [N]" in lines and "error: use N" in lines
    # an error result says what the callee raised, as Python's last traceback line would
    assert any(re.fullmatch(r"\[1\] ERR  test\.reverse #1 [\d.]+ ms: TypeError: test\.reverse takes a string", line) for line in lines)
    assert "*[1] open; calls in flight: 0; subscriptions: none" in lines  # the connection lived through it all


def test_one_shot_error_result_names_the_exception_type(demo):
    _, url, _ = demo
    out = juggler("client", url, "call", "test.reverse", "42")
    assert out.returncode == 1
    assert out.stderr == "juggler client: error result: TypeError: test.reverse takes a string\n"


# -- at a terminal --------------------------------------------------------------------------------


class Terminal:
    """``juggler client URL`` on a pseudo-terminal that is its controlling terminal, so that
    Ctrl-C and Ctrl-D typed on it do what they do for a person."""

    # In the child: a session of its own whose controlling terminal is the pty (its stdin),
    # then the shell (no preexec_fn: this test process has threads).
    LAUNCH = (
        "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, '-m', 'juggler', 'client', sys.argv[1]])"
    )

    def __init__(self, url: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.LAUNCH, url], stdin=slave, stdout=slave, stderr=slave, env=env(TERM="dumb"),
        )  # fmt: skip
        os.close(slave)
        self.screen = ""  # everything it printed
        self.seen = 0  # what expect() has consumed of it

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait_for_a_key(self, timeout: float = 10) -> None:
        """Wait until the shell sleeps in select() for the next key, as it is when a person
        presses one: a signal that comes in the microseconds between readline's echo of a key
        and its next select() is noticed only at the key after (CPython's readline loop).
        A bounded poll of the kernel's word on where the main thread sleeps."""
        deadline = time.monotonic() + T(timeout)
        while True:
            with open(f"/proc/{self.proc.pid}/wchan") as f:
                where = f.read()
            if "poll" in where or "select" in where:
                return
            assert time.monotonic() < deadline, "the shell never waited for a key"
            time.sleep(0.005)

    def expect(self, pattern: str, timeout: float = 20) -> re.Match:
        """Wait until what it prints after the last match matches ``pattern``."""
        deadline = time.monotonic() + T(timeout)
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.screen, self.seen)
            if m:
                self.seen = m.end()
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.screen[self.seen:]!r} (all: {self.screen!r})"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                assert data, f"exited ({self.proc.wait()}) before {pattern!r}: {self.screen[self.seen:]!r}"
                self.screen += data.decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal(demo):
    _, url, _ = demo
    t = Terminal(url)
    yield t, url
    t.close()


def test_terminal_prompt_comes_back_under_results_and_events_with_the_typed_text(terminal):
    t, url = terminal
    t.expect(r"\[1\] connected to .*\r\n> $")
    t.type("sub news\r")
    t.expect(r"\[1\] SUB news: ACK\r\n> $")
    t.type("call test.ec")  # half a command, not sent yet, when the event comes
    t.expect(r"call test\.ec$")
    with Client.connect(url, connect_timeout=T(10)) as publisher:
        publisher.pub("news", {"n": 1})
    # the event goes above the prompt, which comes back with what was typed
    t.expect(r'\r\x1b\[K\[1\] EVNT news: \{"n": 1\}\r\n> call test\.ec$')
    t.type('ho "x"\r')  # the line, finished after the event, is the whole command
    t.expect(r'\[1\] CALL test\.echo #1\r\n')
    t.expect(r'\[1\] RES  test\.echo #1 [\d.]+ ms: "x"\r\n> $')


def test_terminal_ctrl_c_drops_the_line_and_ctrl_d_leaves_on_a_new_line(terminal):
    t, _ = terminal
    t.expect(r"\[1\] connected to .*\r\n> $")
    t.type("call test.echo 1")
    t.expect(r"call test\.echo 1$")  # on the screen, as a person sees it before pressing Ctrl-C
    t.wait_for_a_key()
    t.type("\x03")  # Ctrl-C: the line is dropped, the shell stays
    t.expect(r"\r\n> $")
    t.type("list\r")
    t.expect(r"\*\[1\] open; calls in flight: 0; subscriptions: none\r\n> $")
    assert "CALL test.echo" not in t.screen  # the dropped line was never run
    t.type("\x04")  # Ctrl-D on an empty line: leave, ending the prompt's line first
    t.expect(r"\r\n")
    assert t.proc.wait(T(10)) == 0
    assert t.screen.endswith("> \r\n") and "Traceback" not in t.screen


# -- headers, with examples/auth.py --------------------------------------------------------------


def test_header_option_authenticates_against_the_auth_example_which_stops_on_ctrl_c():
    import signal

    example = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "auth.py"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    try:
        line = example.stdout.readline()  # its first line, once it listens
        url = re.match(r"listening on (ws://\S+)", line).group(1)
        anonymous = juggler("client", url, "call", "test.echo", '"hi"')
        assert anonymous.returncode == 5 and "401" in anonymous.stderr
        alice = juggler("client", "-H", "Authorization: Bearer alice-token", url, "call", "test.echo", '"hi"')
        assert (alice.returncode, alice.stdout) == (0, '"hi"\n'), alice.stderr
        bob = juggler("client", "--header", "Authorization: Bearer bob-token", url, "call", "test.reverse", '"hi"')
        assert bob.returncode == 3 and "NACK 403: bob may not call test.reverse" in bob.stderr
        bad = juggler("client", "-H", "Authorization", url, "call", "test.echo", "1")
        assert bad.returncode == 2
        assert bad.stderr == "juggler client: --header 'Authorization' is not of the form 'Name: value'\n"
        example.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = example.communicate(timeout=T(20))
    finally:
        if example.poll() is None:
            example.kill()
            example.communicate()
    assert example.returncode == 0, err
    assert "Traceback" not in err and out.endswith("stopping\n")


def test_repeated_headers_are_joined_as_http_does():
    from juggler.cli import parse_headers

    assert parse_headers(["A: 1", "b:2", "A:  3 "]) == {"A": "1, 3", "b": "2"}
    assert parse_headers(["X-Empty:"]) == {"X-Empty": ""}


# -- exit status, pipes, the shell's lines (issue 22) ---------------------------------------------


@pytest.fixture
def watched(juggler_broker, juggler_callee):
    """A server whose SUBs set ``subscribed`` once processed, and a callee whose ``test.block``
    sets ``called`` and blocks until the test ends."""
    from juggler import Server, Sub, chain, recover

    subscribed, called, release = threading.Event(), threading.Event(), threading.Event()

    def track(next_handler):
        def handle(conn, msg):
            next_handler(conn, msg)
            if isinstance(msg, Sub):
                subscribed.set()

        return handle

    def block(args):
        called.set()
        release.wait(T(30))

    juggler_callee.register("test.block", block)
    server = Server(juggler_broker, host="127.0.0.1", port=0, handler=chain(recover(), track)).start()
    try:
        yield SimpleNamespace(server=server, url=server.url, subscribed=subscribed, called=called)
    finally:
        release.set()
        server.shutdown()


def test_one_shot_call_interrupted_by_ctrl_c_exits_130(watched, procs):
    p = procs("client", watched.url, "call", "test.block", "null")
    assert watched.called.wait(T(20))
    assert p.stop(signal.SIGINT) == 130


def test_one_shot_sub_interrupted_by_ctrl_c_exits_130(watched, procs):
    p = procs("client", watched.url, "sub", "news")
    assert watched.subscribed.wait(T(20))
    assert p.stop(signal.SIGINT) == 130


def test_one_shot_sub_exits_5_when_the_server_goes_away(watched, procs):
    p = procs("client", watched.url, "sub", "news")
    assert watched.subscribed.wait(T(20))
    watched.server.shutdown()
    assert p.p.wait(T(20)) == 5
    p.expect(r"^juggler client: connection closed \(1001 server shutting down\)$", stream="err")


def test_one_shot_sub_into_a_pipe_its_reader_closed_exits_quietly(watched):
    """``juggler client URL sub CH | head -1``: no BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "juggler", "client", watched.url, "sub", "news"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())  # fmt: skip
    try:
        assert watched.subscribed.wait(T(20))
        with Client.connect(watched.url) as c:
            c.pub("news", 1)
            assert json.loads(p.stdout.readline())["args"] == 1  # what head -1 reads
            p.stdout.close()  # head exits
            c.pub("news", 2)
            assert p.wait(T(20)) == 141
        assert p.stderr.read() == ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


@pytest.mark.parametrize("command", ["server", "client"])
def test_print_config_into_a_closed_pipe_exits_quietly(command):
    args = ["--print-config"] + (["ws://127.0.0.1:1/ws"] if command == "client" else [])
    p = subprocess.Popen([sys.executable, "-m", "juggler", command, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env())  # fmt: skip
    p.stdout.close()  # closed before the child, still starting Python, writes
    err = p.stderr.read()
    p.stderr.close()
    assert (p.wait(T(30)), err) == (141, "")


def test_options_after_the_args_are_a_usage_error_that_says_where_options_go():
    out = juggler("client", "ws://127.0.0.1:1/ws", "call", "math.add", "[1,2]", "--timeout", "2s")
    assert out.returncode == 2
    assert "args must be JSON" in out.stderr
    assert "options go before the URL: juggler client --timeout ... URL call ..." in out.stderr
    bad_count = juggler("client", "ws://127.0.0.1:1/ws", "sub", "news", "x")
    assert bad_count.returncode == 2 and "COUNT is a whole number of events, at least 1, not 'x'" in bad_count.stderr


def test_shell_expiry_says_the_calls_own_timeout_and_a_lost_connection_is_said(watched, procs):
    p = procs("client", watched.url, stdin=subprocess.PIPE)
    p.expect(r"^\[1\] connected to ")

    def send(line: str) -> None:
        p.p.stdin.write(line + "\n")
        p.p.stdin.flush()

    send("timeout 300ms")
    send("call nobody.home 1")
    p.expect(r"^\[1\] CALL nobody\.home #1$")
    send("timeout 5s")
    send("wait")
    p.expect(r"^\[1\] EXP  nobody\.home #1: expired after 0\.3 s$")  # the call's timeout, not 5 s
    watched.server.shutdown()
    p.expect(r"^\[1\] connection lost: 1001 server shutting down$")
    send("list")
    p.expect(r"^\*\[1\] closed \(1001 server shutting down\); ")
    send("exit")
    assert p.p.wait(T(20)) == 0


def test_a_close_without_a_reason_has_no_stray_space():
    from juggler.shell import closed_text

    assert closed_text(SimpleNamespace(close_code=1000, close_reason="")) == "1000"
    assert closed_text(SimpleNamespace(close_code=1001, close_reason="bye")) == "1001 bye"
