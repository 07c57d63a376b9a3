"""A server process kept on one CPU (juggler.affinity, juggler server --cpu)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from juggler import affinity

from .conftest import T
from .test_cli import Proc, juggler

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
ALLOWED = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def unclaimed() -> list[int]:
    """The CPUs no juggler process claims right now (another test's server, a benchmark)."""
    free = []
    for cpu in ALLOWED:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.bind(f"\0juggler-cpu-{cpu}")
            except OSError:
                continue
        free.append(cpu)
    return free

# a process that pins itself, says where, and holds its claim until its stdin closes
HOLDER = (
    "import os, sys; from juggler import affinity; cpu = affinity.pin(sys.argv[1]); "
    "print(cpu, sorted(os.sched_getaffinity(0)), flush=True); sys.stdin.read()"
)


def holder(choice: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, choice], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def release(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(T(10))
    p.stdout.close()


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), (" AUTO ", "auto"), ("none", "none"), ("0", 0), ("12", 12), (3, 3),
])  # fmt: skip
def test_parse_cpu(value, expected):
    assert affinity.parse_cpu(value) == expected


@pytest.mark.parametrize("value", ["", "-1", -1, "one", "1.5", True, None])
def test_parse_cpu_refuses_what_is_not_a_cpu(value):
    with pytest.raises(ValueError, match="is not a CPU"):
        affinity.parse_cpu(value)


def test_auto_gives_each_process_a_cpu_of_its_own_until_none_is_left():
    # One claim per CPU this machine lets us run on; past them, a process runs anywhere.
    free = unclaimed() if len(ALLOWED) >= 2 else []
    held, cpus = [], []
    try:
        for i in range(len(free) + 1):
            p, line = holder("auto")
            held.append(p)
            if i < len(free):
                cpu = int(line.split()[0])
                assert line == f"{cpu} [{cpu}]"
                cpus.append(cpu)
            else:  # every CPU claimed (or only one to run on): left free
                assert line == f"None {ALLOWED}"
        assert sorted(cpus) == free  # one each
    finally:
        for p in held:
            release(p)
    assert set(cpus) <= set(unclaimed())  # the claims went with their processes


def test_an_explicit_cpu_and_none():
    p, line = holder(str(ALLOWED[-1]))
    release(p)
    assert line == f"{ALLOWED[-1]} [{ALLOWED[-1]}]"
    p, line = holder("none")
    release(p)
    assert line == f"None {ALLOWED}"
    with pytest.raises(ValueError, match=r"CPU 100000 is not one this process may run on \("):
        affinity.pin(100000)  # refused before anything changes: safe in this process
    assert sorted(os.sched_getaffinity(0)) == ALLOWED


def test_juggler_server_keeps_its_threads_on_one_cpu_by_default():
    server = Proc("server", "--port", "0", "--log-level", "info")
    try:
        m = server.expect(r"CPU: (every thread kept on CPU (\d+)|left free)", stream="err")
        server.expect(r"websocket: ws://")
        pid = server.p.pid
        masks = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}
        if m.group(2) is not None:
            assert masks == {frozenset({int(m.group(2))})}  # every thread, the ones started after too
        else:  # left free: only one CPU, or another juggler process claims each
            assert len(ALLOWED) < 2 or not unclaimed()
        assert server.stop() == 0
    finally:
        server.close()


def test_juggler_server_cpu_flag():
    server = Proc("server", "--port", "0", "--cpu", "none", "--log-level", "info")
    try:
        server.expect(r"websocket: ws://")
        pid = server.p.pid
        assert sorted(os.sched_getaffinity(pid)) == ALLOWED
        assert server.stop() == 0
    finally:
        server.close()
    err = []
    while (line := server.streams["err"].get_nowait()) is not None:  # (closed: all of it is there)
        err.append(line)
    assert err and not any("CPU:" in line for line in err)
    bad = juggler("server", "--port", "0", "--cpu", "100000")
    assert bad.returncode != 0
    assert "--cpu: CPU 100000 is not one this process may run on" in bad.stderr
    assert "is not a CPU" in juggler("server", "--port", "0", "--cpu", "x").stderr
