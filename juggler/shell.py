"""``juggler client``: an interactive shell over several connections, or one command.

One-shot exit status (for scripts)::

    0    success (call: the result is printed as JSON on stdout)
    1    the callee returned an error result (its type and message on stderr)
    2    usage error (unknown command, args that are not JSON, not a websocket URL)
    3    the server answered NACK
    4    the call expired
    5    could not connect, or the connection closed
    130  interrupted (Ctrl-C, SIGINT)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, TextIO

from .client import Client, Subscription
from .config import parse_duration
from .exceptions import CallExpired, ConnectionClosed, HandshakeError, NackError, RemoteError

__all__ = ["run_client", "Shell", "ONE_SHOT_HELP", "EXIT_OK", "EXIT_REMOTE_ERROR", "EXIT_USAGE", "EXIT_NACK",
           "EXIT_EXPIRED", "EXIT_CONNECTION", "EXIT_INTERRUPTED"]  # fmt: skip

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_NACK = 3
EXIT_EXPIRED = 4
EXIT_CONNECTION = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command Ctrl-C stopped

#: The end of ``juggler client --help``: the one-shot commands and their exit status.
ONE_SHOT_HELP = f"""\
one-shot commands (without one: the interactive shell, where 'help' lists its commands):
  call URI [JSON]        call URI with JSON args; prints the result as JSON
  pub CHANNEL [JSON]     publish JSON args on CHANNEL
  sub CHANNEL [COUNT]    print each event on CHANNEL as a JSON line, COUNT of them
                         (default: until Ctrl-C or the connection closes)
  psub PATTERN [COUNT]   the same for a pattern subscription
options go before the URL (JSON args such as -1 are never taken for options):
  juggler client --timeout 2s ws://127.0.0.1:9000/ws call math.add '[1, 2]'

exit status:
  {EXIT_OK}    success
  {EXIT_REMOTE_ERROR}    the callee returned an error result
  {EXIT_USAGE}    usage error (unknown command, args that are not JSON, not a websocket URL)
  {EXIT_NACK}    the server answered NACK
  {EXIT_EXPIRED}    the call expired
  {EXIT_CONNECTION}    could not connect, or the connection closed
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""

HELP = """\
commands (prefix one with @N to run it on connection N):
  connect [URL]          open another connection and make it current
  use N                  make connection N current
  call URI [JSON]        call URI with JSON args; the result prints when it arrives
  pub CHANNEL [JSON]     publish JSON args on CHANNEL
  sub CHANNEL            subscribe to CHANNEL      psub PATTERN   subscribe to a pattern
  unsb CHANNEL           undo a sub                punsb PATTERN  undo a psub
  timeout DURATION       call timeout from now on (e.g. 500ms, 5s; now {timeout})
  wait                   wait until every call in flight has ended (for scripts)
  list                   connections, subscriptions and calls in flight
  close [N]              close connection N (default: the current one)
  help                   this text
  exit                   close everything and leave (also Ctrl-D)"""


PROMPT = "> "


class _Usage(Exception):
    pass


@contextlib.contextmanager
def _ctrl_c_to_this_thread() -> Iterator[None]:
    """Threads started inside block SIGINT, so that Ctrl-C goes to the main thread: readline
    waits for a key in select(), which only a signal delivered to that thread interrupts (one
    that another thread takes leaves the prompt as it was until the next key)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a Ctrl-C meanwhile is delivered now


def _typed_so_far() -> str:
    """What is typed at the prompt so far (readline's buffer; "" without readline)."""
    readline = sys.modules.get("readline")
    return readline.get_line_buffer() if readline is not None else ""


def _json_args(text: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _Usage(f"args must be JSON ({exc}); quote strings: '\"hello\"'") from None


def _number(text: str, usage: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _Usage(usage) from None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def closed_text(client: Client) -> str:
    """How a closed connection ended: ``1001 server shutting down``, or ``1006`` alone."""
    return f"{client.close_code} {client.close_reason}".rstrip()


class Shell:
    """The interactive shell: reads commands from ``stdin``, prints to ``out`` as things arrive."""

    def __init__(
        self,
        url: str,
        timeout: float,
        out: TextIO = sys.stdout,
        allowed: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.out = out
        self.allowed = allowed
        self.headers = headers or {}
        self.conns: dict[int, Client] = {}
        self.current: Optional[int] = None
        self._next = 1
        self._numbers = itertools.count(1)
        self._calls: set[Any] = set()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, str, float]] = {}
        self._subs: dict[tuple[int, str, bool], tuple[Subscription, threading.Thread]] = {}
        # a thread per connection that says when the connection is lost; joined by close()
        self._watchers: dict[int, threading.Thread] = {}
        self._closed_here: set[int] = set()  # connections 'close' closed: no "lost" line
        self._at_prompt = False  # the main thread waits in input() after printing PROMPT

    def say(self, text: str) -> None:
        """Print a line. If it comes while the prompt waits for a line (a result, an event),
        it goes above the prompt, which is printed again with what was typed so far."""
        with self._lock:
            if self._at_prompt:
                self.out.write(f"\r\x1b[K{text}\n{PROMPT}{_typed_so_far()}")
            else:
                self.out.write(text + "\n")
            self.out.flush()

    # -- commands --

    def connect(self, url: Optional[str] = None) -> None:
        url = url or self.url
        try:
            with _ctrl_c_to_this_thread():
                client = Client.connect(url, allowed_messages=self.allowed, headers=self.headers)
        except ValueError as exc:  # not a websocket URL
            raise _Usage(str(exc)) from None
        except (HandshakeError, OSError) as exc:
            self.say(f"cannot connect to {url}: {exc}")
            return
        n = self._next
        self._next += 1
        self.conns[n] = client
        self.current = n
        self.say(f"[{n}] connected to {url}")
        watcher = threading.Thread(target=self._watch, args=(n, client), name=f"juggler-shell-watch-{n}")
        self._watchers[n] = watcher
        with _ctrl_c_to_this_thread():
            watcher.start()

    def _watch(self, n: int, client: Client) -> None:
        """Say when connection ``n`` is lost (not by 'close' or 'exit')."""
        client.wait_closed()
        if n not in self._closed_here:
            self.say(f"[{n}] connection lost: {closed_text(client)}")

    def _conn(self, n: Optional[int]) -> tuple[int, Client]:
        n = self.current if n is None else n
        if n is None or n not in self.conns:
            raise _Usage("no such connection (see 'list', or 'connect')")
        client = self.conns[n]
        if client.closed:
            raise _Usage(f"connection {n} is closed ({closed_text(client)})")
        return n, client

    def call(self, n: Optional[int], rest: str) -> None:
        parts = rest.split(None, 1)
        if not parts:
            raise _Usage("call URI [JSON]")
        uri, args = parts[0], _json_args(parts[1] if len(parts) > 1 else "")
        n, client = self._conn(n)
        timeout = self.timeout  # this call's, whatever 'timeout' says later
        start = time.perf_counter()
        fut = client.call_async(uri, args, timeout=timeout)
        short = next(self._numbers)
        self.say(f"[{n}] CALL {uri} #{short}")

        def done(f: Any) -> None:
            ms = (time.perf_counter() - start) * 1000
            try:
                self.say(f"[{n}] RES  {uri} #{short} {ms:.1f} ms: {_dumps(f.result())}")
            except RemoteError as exc:
                self.say(f"[{n}] ERR  {uri} #{short} {ms:.1f} ms: {exc}")
            except NackError as exc:
                self.say(f"[{n}] NACK {uri} #{short}: {exc.code} {exc.message}")
            except CallExpired:
                self.say(f"[{n}] EXP  {uri} #{short}: expired after {timeout:g} s")
            except ConnectionClosed as exc:
                self.say(f"[{n}] CLOSED {uri} #{short}: {exc}")

        fut.add_done_callback(done)
        self._calls.add(fut)
        fut.add_done_callback(self._calls.discard)

    def pub(self, n: Optional[int], rest: str) -> None:
        parts = rest.split(None, 1)
        if not parts:
            raise _Usage("pub CHANNEL [JSON]")
        n, client = self._conn(n)
        client.pub(parts[0], _json_args(parts[1] if len(parts) > 1 else ""))
        self.say(f"[{n}] PUB {parts[0]}: ACK")

    def sub(self, n: Optional[int], rest: str, pattern: bool) -> None:
        channel = rest.strip()
        if not channel:
            raise _Usage("psub PATTERN" if pattern else "sub CHANNEL")
        n, client = self._conn(n)
        sub = client.sub(channel, pattern=pattern)
        key = (n, channel, pattern)
        if key in self._subs:
            self.say(f"[{n}] already subscribed to {channel}")
            return
        t = threading.Thread(target=self._print_events, args=(n, sub), name=f"juggler-shell-sub-{n}-{len(self._subs)}")
        self._subs[key] = (sub, t)
        with _ctrl_c_to_this_thread():
            t.start()
        self.say(f"[{n}] {'PSUB' if pattern else 'SUB'} {channel}: ACK")

    def _print_events(self, n: int, sub: Subscription) -> None:
        try:
            for ev in sub:
                via = f" (pattern {ev.pattern})" if ev.pattern else ""
                self.say(f"[{n}] EVNT {ev.channel}{via}: {_dumps(ev.args)}")
        except ConnectionClosed:
            pass

    def unsb(self, n: Optional[int], rest: str, pattern: bool) -> None:
        channel = rest.strip()
        if not channel:
            raise _Usage("punsb PATTERN" if pattern else "unsb CHANNEL")
        n, client = self._conn(n)
        client.unsb(channel, pattern=pattern)
        entry = self._subs.pop((n, channel, pattern), None)
        if entry is not None:
            entry[1].join()
        self.say(f"[{n}] {'PUNSB' if pattern else 'UNSB'} {channel}: ACK")

    def list(self) -> None:
        if not self.conns:
            self.say("no connections")
        for n, c in self.conns.items():
            mark = "*" if n == self.current else " "
            state = f"closed ({closed_text(c)})" if c.closed else "open"
            subs = [("pattern " if p else "") + ch for (m, ch, p) in self._subs if m == n]
            pending = c.pending_calls
            self.say(f"{mark}[{n}] {state}; calls in flight: {pending}; subscriptions: {', '.join(subs) or 'none'}")

    def close(self, n: Optional[int]) -> None:
        n = self.current if n is None else n
        client = self.conns.get(n) if n is not None else None
        if client is None:
            raise _Usage("no such connection")
        self._close(n, client)
        self.say(f"[{n}] closed")

    def _close(self, n: int, client: Client) -> None:
        self._closed_here.add(n)
        client.close()
        for key in [k for k in self._subs if k[0] == n]:
            self._subs.pop(key)[1].join()
        watcher = self._watchers.pop(n, None)
        if watcher is not None:
            watcher.join()

    def close_all(self) -> None:
        for n, client in self.conns.items():
            self._close(n, client)

    # -- the loop --

    def run_line(self, line: str) -> bool:
        """Run one command line; ``False`` when it asks to exit."""
        line = line.strip()
        if not line or line.startswith("#"):
            return True
        n: Optional[int] = None
        if line.startswith("@"):
            head, _, line = line.partition(" ")
            try:
                n = int(head[1:])
            except ValueError:
                raise _Usage(f"{head!r}: @ takes a connection number") from None
        cmd, _, rest = line.partition(" ")
        cmd = cmd.lower()
        actions: dict[str, Callable[[], Any]] = {
            "call": lambda: self.call(n, rest),
            "pub": lambda: self.pub(n, rest),
            "sub": lambda: self.sub(n, rest, False),
            "psub": lambda: self.sub(n, rest, True),
            "unsb": lambda: self.unsb(n, rest, False),
            "punsb": lambda: self.unsb(n, rest, True),
            "connect": lambda: self.connect(rest.strip() or None),
            "use": lambda: self._use(rest),
            "list": self.list,
            "wait": self.wait,
            "close": lambda: self.close(_number(rest, "close [N]") if rest.strip() else n),
            "timeout": lambda: self._set_timeout(rest),
            "help": lambda: self.say(HELP.format(timeout=f"{self.timeout:g} s")),
        }
        if cmd in ("exit", "quit"):
            return False
        if cmd not in actions:
            raise _Usage(f"unknown command {cmd!r} (try 'help')")
        actions[cmd]()
        return True

    def wait(self) -> None:
        """Block until every call in flight has ended (each ends by its timeout at the latest)."""
        concurrent.futures.wait(list(self._calls))

    def _use(self, rest: str) -> None:
        n = _number(rest, "use N")
        if n not in self.conns:
            raise _Usage(f"no connection {n}")
        self.current = n

    def _set_timeout(self, rest: str) -> None:
        try:
            self.timeout = parse_duration(rest.strip())
        except ValueError as exc:
            raise _Usage(str(exc)) from None
        if self.timeout <= 0:
            raise _Usage("timeout must be more than zero")
        self.say(f"call timeout: {self.timeout:g} s")

    def interact(self, stdin: TextIO) -> int:
        """Run commands from ``stdin`` until ``exit`` or its end. On a terminal: a prompt
        with line editing (readline), Ctrl-C drops the line being typed (or stops a ``wait``),
        Ctrl-D on an empty line leaves."""
        prompt = stdin is sys.stdin and stdin.isatty()
        if prompt:
            try:
                import readline  # noqa: F401 - input() edits lines with it once imported
            except ImportError:  # pragma: no cover - a Python built without it
                pass
        self.say("juggler client: 'help' lists the commands")
        try:
            self._run("connect")
            while True:
                line = self._prompt() if prompt else stdin.readline()
                if not line or not self._run(line):
                    break
        except KeyboardInterrupt:  # without a prompt, Ctrl-C leaves
            pass
        finally:
            self.close_all()
        return EXIT_OK

    def _prompt(self) -> str:
        """The next line typed at the prompt; "" at Ctrl-D."""
        while True:
            try:
                return self._input() + "\n"
            except EOFError:  # Ctrl-D: end the prompt's line before leaving
                self._write("\n")
                return ""
            except KeyboardInterrupt:  # Ctrl-C: drop the line, prompt again
                self._write("\n")

    def _input(self) -> str:
        """``input(PROMPT)``. What other threads print waits until the prompt is on the screen
        (readline calls its pre-input hook then), and goes above it while a line is typed."""
        readline = sys.modules.get("readline")
        set_hook = getattr(readline, "set_pre_input_hook", None)
        if not (sys.stdout.isatty() and self.out is sys.stdout):
            set_hook = None  # input() does not use readline then: no hook call to wait for
        self._lock.acquire()
        locked = True

        def shown() -> None:
            nonlocal locked
            if locked:
                self._at_prompt = True
                locked = False
                self._lock.release()

        if set_hook is not None:
            set_hook(shown)
        else:
            shown()
        try:
            return input(PROMPT)
        finally:
            if set_hook is not None:
                set_hook(None)
            if not locked:
                self._lock.acquire()
            self._at_prompt = False
            self._lock.release()

    def _write(self, text: str) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def _run(self, line: str) -> bool:
        """:meth:`run_line`, reporting a failed command in one line and carrying on."""
        try:
            return self.run_line(line)
        except _Usage as exc:
            self.say(f"error: {exc}")
        except (NackError, ConnectionClosed, TimeoutError) as exc:
            self.say(f"error: {exc}")
        except KeyboardInterrupt:
            self.say("interrupted")
        except Exception as exc:  # a bug must not take the other connections down with the shell
            self.say(f"error: {type(exc).__name__}: {exc}")
        return True


def one_shot(
    url: str, words: list[str], timeout: float, allowed: Optional[str], headers: Optional[dict[str, str]] = None
) -> int:
    """Run one command; print its result; return the exit status."""
    try:
        cmd, target, args, count = _one_shot_request(words)
        client = _one_shot_client(url, allowed, headers)
    except _Exit as exc:
        return exc.report()
    try:
        return _run_one_shot(client, cmd, target, args, count, timeout)
    except (RemoteError, NackError, CallExpired, ConnectionClosed, TimeoutError) as exc:
        return _failed(exc, target, timeout).report()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        client.close()


class _Exit(Exception):
    """A one-shot command ends with this exit status, and this line on stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def report(self) -> int:
        print(f"juggler client: {self}", file=sys.stderr)
        return self.status


def _one_shot_request(words: list[str]) -> tuple[str, str, Any, Optional[int]]:
    """``(command, URI or channel, args, COUNT)`` from the words of a one-shot command."""
    cmd, rest = words[0].lower(), " ".join(words[1:])
    if cmd not in ("call", "pub", "sub", "psub"):
        raise _Exit(EXIT_USAGE, f"unknown command {cmd!r}: one-shot commands are call, pub, sub, psub")
    parts = rest.split(None, 1)
    if not parts:
        raise _Exit(EXIT_USAGE, f"{cmd} needs a {'URI' if cmd == 'call' else 'channel'}")
    target, tail = parts[0], parts[1] if len(parts) > 1 else ""
    try:
        if cmd in ("sub", "psub"):
            return cmd, target, None, _count(cmd, tail)
        return cmd, target, _json_args(tail), None
    except _Usage as exc:
        options = [w for w in words[1:] if w.startswith("--")]
        where = f"; options go before the URL: juggler client {options[0]} ... URL {cmd} ..." if options else ""
        raise _Exit(EXIT_USAGE, f"{exc}{where}") from None


def _one_shot_client(url: str, allowed: Optional[str], headers: Optional[dict[str, str]]) -> Client:
    try:
        return Client.connect(url, allowed_messages=allowed, headers=headers)
    except ValueError as exc:  # not a websocket URL
        raise _Exit(EXIT_USAGE, str(exc)) from None
    except (HandshakeError, OSError) as exc:
        raise _Exit(EXIT_CONNECTION, f"cannot connect to {url}: {exc}") from None


def _run_one_shot(client: Client, cmd: str, target: str, args: Any, count: Optional[int], timeout: float) -> int:
    if cmd == "call":
        print(_dumps(client.call(target, args, timeout=timeout)), flush=True)
    elif cmd == "pub":
        client.pub(target, args)
    else:
        sub = client.sub(target, pattern=cmd == "psub")
        seen = 0
        while count is None or seen < count:
            ev = sub.get()
            if ev is None:  # the connection closed (nothing here unsubscribes)
                return _Exit(EXIT_CONNECTION, f"connection closed ({closed_text(client)})").report()
            print(_dumps({"channel": ev.channel, "pattern": ev.pattern, "args": ev.args}), flush=True)
            seen += 1
    return EXIT_OK


def _failed(exc: Exception, target: str, timeout: float) -> _Exit:
    """How a one-shot command that raised ``exc`` ends."""
    if isinstance(exc, RemoteError):
        return _Exit(EXIT_REMOTE_ERROR, f"error result: {exc}")
    if isinstance(exc, NackError):
        return _Exit(EXIT_NACK, str(exc))
    if isinstance(exc, CallExpired):
        return _Exit(EXIT_EXPIRED, f"call to {target} expired after {timeout:g} s")
    return _Exit(EXIT_CONNECTION, str(exc))  # ConnectionClosed, TimeoutError


def _count(cmd: str, text: str) -> Optional[int]:
    """The COUNT of ``sub CHANNEL [COUNT]``; ``None``: no end."""
    if not text.strip():
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise _Usage(f"{cmd} {'PATTERN' if cmd == 'psub' else 'CHANNEL'} [COUNT]: COUNT is a whole number "
                     f"of events, at least 1, not {text.strip()!r}")  # fmt: skip
    return count


def run_client(
    url: str, words: list[str], cfg: dict[str, Any], allowed: Optional[str] = None, headers: Optional[dict[str, str]] = None
) -> int:
    if words:
        return one_shot(url, words, cfg["timeout"], allowed, headers)
    return Shell(url, cfg["timeout"], allowed=allowed, headers=headers).interact(sys.stdin)
