"""Shared helpers of the benchmark scripts (idle.py, calls.py, fanout.py): free ports, a private
redis-server, juggler processes, /proc readers, temporary git worktrees, and a raw websocket
client (handshake request and response, frame encoding and decoding).

Self-contained on purpose: nothing here imports ``juggler``, so the load side stays the same
code whichever tree's server it measures.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SUBPROTOCOL = "juggler.0"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# -- ports, limits, signals ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def sigterm_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt, so the same finally blocks clean up."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setpgrp()  # the terminal's Ctrl-C goes to us; we stop the children ourselves


# -- processes ---------------------------------------------------------------------------------


class Proc:
    """A child process whose output goes to a log file; stopped by :meth:`stop` (idempotent)."""

    def __init__(self, name: str, argv: list[str], logdir: str, env: Optional[dict[str, str]] = None,
                 cwd: Optional[str] = None) -> None:  # fmt: skip
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(logdir, f"{name}-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=cwd, preexec_fn=_die_with_parent)  # fmt: skip
        self.pid = self.popen.pid

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float, port: Optional[int] = None) -> Optional[re.Match]:
        """Wait until the output matches ``pattern`` (or, with ``port``, the port accepts a TCP
        connection); RuntimeError when the process exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.output())
            if m:
                return m
            if port is not None and port_open(port):
                return None
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode} before it was ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_redis(logdir: str, maxclients: int = 10000) -> tuple[Proc, str, int]:
    """A private redis-server on a free port (no persistence): (proc, url, port)."""
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    for _ in range(5):
        port = free_port()
        proc = Proc("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--maxclients", str(maxclients)], logdir)  # fmt: skip
        try:
            proc.wait_for(r"Ready to accept connections", 20)
            return proc, f"redis://127.0.0.1:{port}/0", port
        except RuntimeError:
            proc.stop()
            if "Address already in use" not in proc.output():
                raise
    raise RuntimeError("could not start redis-server on a free port")


def redis_clients(port: int) -> Optional[int]:
    """connected_clients of the redis on ``port`` (our own INFO connection included)."""
    import redis

    try:
        r = redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=5)
        try:
            return int(r.info("clients")["connected_clients"])
        finally:
            r.close()
    except Exception:
        return None


def juggler_flags(python: str, tree: str, command: str) -> set[str]:
    """The --flags ``python -m juggler COMMAND --help`` of ``tree`` lists (empty if it fails)."""
    try:
        out = subprocess.run([python, "-m", "juggler", command, "--help"], env=tree_env(tree), capture_output=True,
                             text=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(re.findall(r"--[a-z][a-z0-9-]*", out))


def tree_env(tree: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def build_cmd(template: str, values: dict[str, Any], supported: Optional[set[str]] = None,
              optional: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:  # fmt: skip
    """``template`` (placeholders such as {python}, {redis}, {port}) split into argv. Flags named
    in ``optional`` that ``supported`` does not list are dropped with their value: (argv,
    dropped)."""
    argv = shlex.split(template.format(**values))
    dropped: list[str] = []
    if supported:
        out: list[str] = []
        i = 0
        while i < len(argv):
            a = argv[i]
            flag = a.split("=", 1)[0]
            if flag in optional and flag not in supported:
                takes_value = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--")
                dropped.append(" ".join(argv[i : i + (2 if takes_value else 1)]))
                i += 2 if takes_value else 1
                continue
            out.append(a)
            i += 1
        argv = out
    return argv, dropped


# -- /proc -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads, those that ended too), in seconds: its
    CPU in user space and in the kernel."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of stat(5)


def context_switches(pid: int) -> int:
    """Context switches (voluntary and not) of a process's live threads, from
    /proc/PID/task/*/status: a thread that waits for a lock or the GIL switches out and back."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if "ctxt_switches" in line:
                        total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended
    return total


def allowed_cpus(pid: int) -> frozenset[int]:
    """The CPUs a process may run on (its affinity: one CPU for a pinned server)."""
    try:
        return frozenset(os.sched_getaffinity(pid))
    except OSError:
        return frozenset()


def _read(path: str) -> Optional[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 1024)
    except OSError:
        return None
    finally:
        os.close(fd)


def thread_times(pid: int) -> dict[int, tuple[int, int, int]]:
    """Per thread of a process: (ns on a CPU, ns waiting on a run queue, the CPU it last ran
    on), from /proc/PID/task/TID/schedstat and stat field 39 ("processor")."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        sched = _read(f"/proc/{pid}/task/{tid}/schedstat")
        stat = _read(f"/proc/{pid}/task/{tid}/stat")
        if not sched or not stat:
            continue  # (it ended)
        try:
            run, wait = (int(x) for x in sched.split()[:2])
            cpu = int(stat[stat.rindex(b")") + 2 :].split()[36])
        except (ValueError, IndexError):
            continue
        out[int(tid)] = (run, wait, cpu)
    return out


class Placement:
    """Where the threads of some processes ran over a window, by sampling: each
    :meth:`sample` credits every thread's run time since the last sample (schedstat, ns) to
    the CPU it last ran on (stat field 39), so a thread that moves between samples is credited
    to where it was last seen. A process kept on one CPU is read at the start and the end only
    (its time is all there); so is the run-queue wait of every process (time runnable but not
    running: what a busy neighbour on its CPU costs it). A process free to run anywhere with
    more than ``most_threads`` threads (a server left unpinned) is not sampled either, since
    reading them all 50 times a second costs the machine a share of a CPU: its time is credited
    to CPU ``-1``."""

    def __init__(self, pids: dict[str, int], most_threads: int = 64) -> None:
        self.pids = pids
        self.pinned = {role: cpus for role, pid in pids.items() if len(cpus := allowed_cpus(pid)) == 1}
        self.on_cpu: dict[str, dict[int, float]] = {role: {} for role in pids}
        self.first = {role: thread_times(pid) for role, pid in pids.items()}
        self.last = {role: dict(t) for role, t in self.first.items()}
        self.unsampled = {role for role, t in self.first.items() if role not in self.pinned and len(t) > most_threads}

    def sample(self) -> None:
        for role, pid in self.pids.items():
            if role in self.pinned or role in self.unsampled:
                continue
            now = thread_times(pid)
            before = self.last[role]
            cpus = self.on_cpu[role]
            for tid, (run, _, cpu) in now.items():
                ran = run - before[tid][0] if tid in before else 0  # (a new thread: from its next sample)
                cpus[cpu] = cpus.get(cpu, 0.0) + ran / 1e9
            self.last[role] = now

    def finish(self) -> dict[str, dict[str, Any]]:
        """Per role: ``cpus`` (seconds run on each CPU), ``wait`` (seconds its threads spent
        runnable on a run queue), ``affinity`` (the CPUs it may use)."""
        out: dict[str, dict[str, Any]] = {}
        for role, pid in self.pids.items():
            end = thread_times(pid)
            start = self.first[role]
            ran = sum(r - start[t][0] for t, (r, _, _) in end.items() if t in start)
            wait = sum(w - start[t][1] for t, (_, w, _) in end.items() if t in start)
            if role in self.pinned:
                cpus = {next(iter(self.pinned[role])): ran / 1e9}
            elif role in self.unsampled:
                cpus = {-1: ran / 1e9}
            else:
                self.sample()
                cpus = self.on_cpu[role]
            out[role] = {"cpus": {k: round(v, 4) for k, v in sorted(cpus.items())}, "wait": wait / 1e9,
                         "affinity": sorted(allowed_cpus(pid)), "threads": (len(start), len(end)),
                         "threads_ended": len(set(start) - set(end)), "threads_new": len(set(end) - set(start))}  # fmt: skip
        return out


def involuntary_switches(pid: int) -> int:
    """The context switches of a process's live threads that the scheduler made (a thread
    preempted while it could still run): nonvoluntary_ctxt_switches of /proc/PID/task/*/status."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def cpu_times() -> dict[int, list[int]]:
    """Per CPU, the ticks of /proc/stat: user nice system idle iowait irq softirq steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                out[int(name[3:])] = [int(t) for t in ticks[:8]]
    return out


def proc_status(pid: int) -> dict[str, int]:
    """Threads and VmRSS (bytes) from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> Optional[int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                v = line.split()[3]
                return None if v == "unlimited" else int(v)
    return None


def system_thread_limit() -> int:
    """The most tasks (threads) this machine can have: min of pid_max and threads-max."""
    vals = []
    for path in ("/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"):
        try:
            with open(path) as f:
                vals.append(int(f.read()))
        except OSError:
            pass
    return min(vals) if vals else 32768


# -- git worktrees ------------------------------------------------------------------------------


def git(*args: str, cwd: str = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def describe_tree(tree: str) -> str:
    try:
        rev = git("rev-parse", "--short", "HEAD", cwd=tree)
        dirty = git("status", "--porcelain", "--untracked-files=no", cwd=tree)
        return rev + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, OSError):
        return "?"


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[tuple[str, str]]:
    """A temporary detached ``git worktree`` of ``rev``: (path, short commit); removed after."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    parent = tempfile.mkdtemp(prefix="juggler-bench-wt-")
    path = os.path.join(parent, "tree")
    git("worktree", "add", "--detach", path, commit)
    try:
        yield path, commit[:7]
    finally:
        try:
            git("worktree", "remove", "--force", path)
        except (subprocess.CalledProcessError, OSError):
            pass
        shutil.rmtree(parent, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            git("worktree", "prune")


# -- raw websocket client ---------------------------------------------------------------------


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, str]:
    """A websocket upgrade request offering juggler.0, and the Sec-WebSocket-Accept it expects."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    req = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
    ).encode("ascii")
    accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")
    return req, accept


def check_handshake_response(head: bytes, accept: str) -> Optional[str]:
    """None if ``head`` (the response head) is a valid 101 for juggler.0, else why not."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return f"bad status line {lines[0][:60]!r}"
    if parts[1] != "101":
        return f"HTTP {parts[1]}"
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != accept:
        return "101 with a wrong Sec-WebSocket-Accept"
    if headers.get("sec-websocket-protocol") != SUBPROTOCOL:
        return f"101 without subprotocol {SUBPROTOCOL}"
    return None


def ws_connect(port: int, path: str, timeout: float, host: str = "127.0.0.1") -> tuple[socket.socket, "FrameParser"]:
    """A blocking juggler.0 handshake (every step bounded by ``timeout``): the socket, left
    non-blocking with TCP_NODELAY, and a parser holding any bytes that came after the 101."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, accept = handshake_request(host, port, path)
        sock.sendall(req)
        head = bytearray()
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("closed before the 101")
            head += data
        end = head.find(b"\r\n\r\n")
        problem = check_handshake_response(bytes(head[:end]), accept)
        if problem:
            raise ConnectionError(problem)
        parser = FrameParser()
        parser.buf += head[end + 4 :]
        sock.setblocking(False)
        return sock, parser
    except BaseException:
        sock.close()
        raise


def _xor(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, masked: bool = True) -> bytes:
    """One final frame; a client's frames are masked."""
    n = len(payload)
    b1 = 0x80 | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        header = struct.pack(">BB", b1, bit | n)
    elif n < 65536:
        header = struct.pack(">BBH", b1, bit | 126, n)
    else:
        header = struct.pack(">BBQ", b1, bit | 127, n)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + _xor(payload, mask)


def send_or_queue(sock: socket.socket, queued: bytes, frame: bytes) -> bytes:
    """Send ``frame`` on the non-blocking ``sock``, after what is ``queued`` for it (then it only
    joins the queue): what is left to send once the socket is writable. OSError goes through."""
    if queued:
        return queued + frame
    try:
        k = sock.send(frame)
    except BlockingIOError:
        k = 0
    return frame[k:]


def write_queued(sel: Any, sub: Any, connecting: int, handshake: int) -> Optional[tuple[str, str]]:
    """A non-blocking subscriber's socket (``sub.sock``, ``.state``, ``.out``) is writable:
    finish its connect (``connecting`` -> ``handshake``), send what is queued, and watch it for
    reading once all is sent. Returns None, or ``(step, reason)`` when the socket failed, step
    being ``"connect"`` or ``"send"``."""
    if sub.state == connecting:
        err = sub.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return "connect", f"connect: {errno.errorcode.get(err, err)}"
        sub.state = handshake
    try:
        k = sub.sock.send(sub.out)
    except BlockingIOError:
        return None
    except OSError as exc:
        return "send", f"send: {errname(exc)}"
    sub.out = sub.out[k:]
    if not sub.out:
        sel.modify(sub.sock, selectors.EVENT_READ, sub)
    return None


def close_frame(code: int = 1000, reason: str = "") -> bytes:
    return encode_frame(OP_CLOSE, struct.pack(">H", code) + reason.encode("utf-8")[:120])


class FrameParser:
    """Incremental decoder of a server's frames: :meth:`feed` bytes, get complete
    ``(opcode, payload)`` control frames and reassembled data messages."""

    __slots__ = ("buf", "_op", "_data")

    def __init__(self) -> None:
        self.buf = bytearray()
        self._op: Optional[int] = None
        self._data = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b1, b2 = buf[pos], buf[pos + 1]
            length = b2 & 0x7F
            hdr = 2
            if length == 126:
                if n - pos < 4:
                    break
                (length,) = struct.unpack_from(">H", buf, pos + 2)
                hdr = 4
            elif length == 127:
                if n - pos < 10:
                    break
                (length,) = struct.unpack_from(">Q", buf, pos + 2)
                hdr = 10
            mask = None
            if b2 & 0x80:
                if n - pos < hdr + 4:
                    break
                mask = bytes(buf[pos + hdr : pos + hdr + 4])
                hdr += 4
            if n - pos < hdr + length:
                break
            payload = bytes(buf[pos + hdr : pos + hdr + length])
            if mask is not None:
                payload = _xor(payload, mask)
            pos += hdr + length
            opcode = b1 & 0x0F
            if opcode >= 0x8:
                out.append((opcode, payload))
                continue
            if opcode != OP_CONT:
                self._op = opcode
                self._data = bytearray()
            self._data += payload
            if b1 & 0x80 and self._op is not None:
                out.append((self._op, bytes(self._data)))
                self._op, self._data = None, bytearray()
        if pos:
            del buf[:pos]
        return out


def close_code(payload: bytes) -> int:
    return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005


def answer_close(sock: socket.socket, payload: bytes) -> int:
    """Answer the peer's close frame (``payload``) with one of the same code (1000 for none),
    if the socket still takes it; returns the peer's code."""
    code = close_code(payload)
    with contextlib.suppress(OSError):
        sock.send(close_frame(code if code not in (1005, 1006) else 1000))
    return code


def errname(exc: BaseException) -> str:
    """A short label for a socket error, e.g. ``ECONNREFUSED``."""
    code = getattr(exc, "errno", None)
    if code and code in errno.errorcode:
        return errno.errorcode[code]
    return type(exc).__name__


# -- numbers -----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(-(-p * len(sorted_values) // 100)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ratio(new: Optional[float], old: Optional[float]) -> Optional[float]:
    if new is None or old is None or old == 0:
        return None
    return new / old


def fmt_ratio(r: Optional[float]) -> str:
    return "   n/a" if r is None else f"{r:6.2f}"


def mib(n: float) -> float:
    return n / (1 << 20)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
