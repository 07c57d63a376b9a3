"""Process tuning (juggler.tuning): what juggler server applies, and what a host can ask for."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import threading

import pytest

from juggler import tuning

from .conftest import T
from .test_cli import Proc, env, juggler

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
    "import os, sys; from juggler import tuning; cpu = tuning.pin(sys.argv[1]); "
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
    assert tuning.parse_cpu(value) == expected


@pytest.mark.parametrize("value", ["", "-1", -1, "one", "1.5", True, None])
def test_parse_cpu_refuses_what_is_not_a_cpu(value):
    with pytest.raises(ValueError, match="is not a CPU"):
        tuning.parse_cpu(value)


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
        tuning.pin(100000)  # refused before anything changes: safe in this process
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


# -- tune_process: what juggler server applies, asked for explicitly --------------------------

# Tunes a process of its own (never this one: the settings are the whole process') and prints
# each setting before and after, with the stack a thread started after it actually got.
TUNE = r"""
import ctypes, gc, json, os, resource, sys, threading
from juggler import tuning

libc = ctypes.CDLL(None)
libc.pthread_self.restype = ctypes.c_ulong
libc.pthread_getattr_np.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
libc.pthread_attr_getstacksize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]

def new_thread_stack():
    got = []
    def measure():
        attr = ctypes.create_string_buffer(256)
        size = ctypes.c_size_t()
        libc.pthread_getattr_np(libc.pthread_self(), attr)
        libc.pthread_attr_getstacksize(attr, ctypes.byref(size))
        got.append(size.value)
    t = threading.Thread(target=measure)
    t.start()
    t.join()
    return got[0]

def settings():
    return {"stack": new_thread_stack(), "stack_size": threading.stack_size(), "switch": sys.getswitchinterval(),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "futex": tuning.futex_hash_slots(),
            "cpus": sorted(os.sched_getaffinity(0)), "gc": gc.get_threshold()}

before = settings()
tuned = tuning.tune_process(int(sys.argv[1]), cpu=sys.argv[2])
print(json.dumps({"before": before, "after": settings(), "tuned": tuned.__dict__}))
"""


def tune(max_connections: int, cpu: str, nofile: tuple[int, int]) -> dict:
    def limit() -> None:  # in the child: a soft limit under the hard one, for tune_process to raise
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    out = subprocess.run([sys.executable, "-c", TUNE, str(max_connections), cpu], capture_output=True, text=True,
                         timeout=T(30), preexec_fn=limit)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tune_process_applies_each_setting_and_says_what_it_did():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = (min(soft, 1024, hard - 1), hard) if hard > 1 else (soft, hard)
    got = tune(5000, "none", nofile)
    before, after, tuned = got["before"], got["after"], got["tuned"]
    assert before["stack"] > tuning.THREAD_STACK_SIZE  # the C library's default: 8 MiB, mostly
    assert after["stack_size"] == tuned["stack_size"] == tuning.THREAD_STACK_SIZE
    assert after["stack"] <= tuning.THREAD_STACK_SIZE  # (the guard page may come out of it)
    assert before["switch"] == 0.005 and after["switch"] == tuned["switch_interval"] == 1.0
    assert before["nofile"] == list(nofile) and after["nofile"] == [hard, hard]
    assert tuned["open_files"] == [nofile[0], hard]
    assert after["cpus"] == before["cpus"] and tuned["cpu"] is None  # cpu="none"
    assert tuned["capacity"] == (tuned["capacity"] or 1) > 0
    # the young generation collected less often; the older generations' thresholds as they were
    assert after["gc"] == [tuning.GC_YOUNG, *before["gc"][1:]] and tuned["gc_young"] == tuning.GC_YOUNG
    # one malloc arena for the threads started from now on (glibc only)
    assert tuned["malloc_arenas"] == (1 if platform.libc_ver()[0] == "glibc" else None)
    if before["futex"] is None:  # a kernel before 6.16: nothing to size
        assert after["futex"] is None and tuned["futex_hash_slots"] is None
    else:  # a slot per thread of 5000 connections (3 each, and some), a power of two
        assert after["futex"] == tuned["futex_hash_slots"] >= 16384
        assert after["futex"] & (after["futex"] - 1) == 0


def test_size_futex_hash_only_grows():
    script = ("from juggler import tuning; import threading; threading.Thread(target=print).start(); "
              "a = tuning.size_futex_hash(5000); b = tuning.size_futex_hash(10); c = tuning.size_futex_hash(10**9); "
              "print(a, b, c, tuning.futex_hash_slots())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=T(30))
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()[-4:]
    if words == ["None"] * 4:  # an older kernel: nothing to do, nothing done
        return
    a, b, c, now = map(int, words)
    assert a >= 16384 and b == a and c == now == tuning.MAX_FUTEX_HASH_SLOTS


def test_tune_process_refuses_a_cpu_before_changing_anything():
    stack, switch = threading.stack_size(), sys.getswitchinterval()
    with pytest.raises(ValueError, match="CPU 100000 is not one this process may run on"):
        tuning.tune_process(10, cpu=100000)
    assert (threading.stack_size(), sys.getswitchinterval()) == (stack, switch)
    assert sorted(os.sched_getaffinity(0)) == ALLOWED


def test_juggler_server_tunes_its_process():
    server = Proc("server", "--port", "0", "--cpu", "none", "--max-connections", "2000", "--log-level", "info")
    try:
        m = server.expect(r"process tuned: thread stacks of (\d+) KiB, GIL switch interval (\S+) s, "
                          r"futex hash slots (\d+|\(none on this kernel\)), malloc arenas (1|\(unchanged\)), "
                          r"GC young generation (\d+)", stream="err")  # fmt: skip
        assert int(m.group(1)) * 1024 == tuning.THREAD_STACK_SIZE and float(m.group(2)) == 1.0
        assert m.group(3) == "(none on this kernel)" or int(m.group(3)) >= 8192  # 3 * 2000 + reserve
        assert int(m.group(5)) == tuning.GC_YOUNG
        server.expect(r"websocket: ws://")
        with open(f"/proc/{server.p.pid}/limits") as f:
            soft, hard = next(line for line in f if line.startswith("Max open files")).split()[3:5]
        assert soft == hard  # raised to the hard limit
        assert server.stop() == 0
    finally:
        server.close()


# -- CPU claims and fork ----------------------------------------------------------------------

# Pins itself to a CPU, forks a child, and "crashes" (exits without cleaning up) at the first
# line on its stdin; the child lives on until it is killed.
FORKER = r"""
import os, signal, sys
from juggler import tuning
cpu = tuning.pin("auto")
if os.fork() == 0:
    cpus = lambda c: ",".join(map(str, sorted(c)))
    os.write(1, f"child {os.getpid()} {tuning.claimed_cpu()} {cpus(os.sched_getaffinity(0))} {cpus(tuning.unpinned_cpus() or ())}\n".encode())
    while True:
        signal.pause()
os.write(1, f"parent {os.getpid()} {cpu}\n".encode())  # (one write each: the two share the pipe)
sys.stdin.readline()
os._exit(0)
"""


def claims_held(pid: int) -> set[str]:
    """The ``juggler-cpu-N`` claims among the sockets process ``pid`` has open."""
    names = {}
    with open("/proc/net/unix") as f:  # the unix sockets of this network namespace, by inode
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("@juggler-cpu-"):
                names[fields[6]] = fields[7][1:]
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:[") and target[8:-1] in names:
            held.add(names[target[8:-1]])
    return held


def test_a_forked_child_keeps_the_affinity_but_not_the_claim():
    p = subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child, parent = sorted(p.stdout.readline().split() for _ in range(2))
        assert child[0] == "child" and parent[0] == "parent", (child, parent)
        child_pid = int(child[1])
        if parent[2] == "None":
            pytest.skip("every CPU is claimed by another juggler process right now (or only one to run on)")
        cpu = int(parent[2])
        assert claims_held(int(parent[1])) == {f"juggler-cpu-{cpu}"}  # the parent holds its claim
        assert claims_held(child_pid) == set(), "the forked child holds its parent's claim on the CPU"
        p.stdin.write("crash\n")
        p.stdin.flush()
        assert p.wait(T(10)) == 0  # the parent is gone; its child lives on, and the CPU is free
        assert os.path.exists(f"/proc/{child_pid}") and claims_held(child_pid) == set()
        # it runs on its parent's CPU (the kernel copied the affinity), and knows where it could run
        assert child[2:] == ["None", str(cpu), ",".join(map(str, ALLOWED))]
    finally:
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)
        p.stdin.close()
        p.wait(T(10))
        p.stdout.close()



# -- the scheduling policy (--sched) -----------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("batch", "batch"), (" Normal ", "normal")])
def test_parse_sched(value, expected):
    assert tuning.parse_sched(value) == expected


@pytest.mark.parametrize("value", ["idle", "fifo", "", None, 3])
def test_parse_sched_refuses_what_is_not_a_policy(value):
    with pytest.raises(ValueError, match="is not a scheduling policy"):
        tuning.parse_sched(value)


def policies(pid: int) -> dict[int, int]:
    """The scheduling policy of each thread of process ``pid``."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = os.sched_getscheduler(int(tid))
        except OSError:  # (one that just ended)
            pass
    return found


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_juggler_server_sched_batch_reaches_every_thread_it_starts():
    from juggler import Client

    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # (what the server starts from)
    server = Proc("server", "--port", "0", "--cpu", "none", "--sched", "batch", "--log-level", "info")
    callee = None
    try:
        server.expect(r"scheduling: every thread under SCHED_BATCH", stream="err")
        url = server.expect(r"websocket: (ws://\S+)").group(1)
        redis_url = server.expect(r"redis: +(redis://\S+)").group(1)
        callee = Proc("callee", "--redis", redis_url, "--demo")
        callee.expect(r"callee: serving")
        with Client.connect(url, connect_timeout=T(10)) as client:  # a connection's threads, its results thread
            assert client.call("test.echo", {"n": 1}, timeout=T(10)) == {"n": 1}
            sub = client.sub("sched-batch")  # the pub-sub thread
            client.pub("sched-batch", 1)
            assert sub.get(T(10)).args == 1
            seen = policies(server.p.pid)
        assert len(seen) >= 6 and set(seen.values()) == {os.SCHED_BATCH}, seen
        assert set(policies(callee.p.pid).values()) == {os.SCHED_OTHER}  # only the server's
        assert callee.stop() == 0  # (first: it holds connections to the server's embedded redis)
        assert server.stop() == 0
    finally:
        if callee is not None:
            callee.close()
        server.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_juggler_server_sched_normal_by_default_and_from_the_environment():
    for environ, policy in ((env(JUGGLER_SCHED="batch"), os.SCHED_BATCH), (env(), os.SCHED_OTHER)):
        server = Proc("server", "--port", "0", "--cpu", "none", "--log-level", "info", env=environ)
        try:
            server.expect(r"websocket: ws://")
            assert set(policies(server.p.pid).values()) == {policy}
            assert server.stop() == 0
        finally:
            server.close()
    assert "is not a scheduling policy" in juggler("server", "--port", "0", "--sched", "idle").stderr


def test_set_sched_applies_to_threads_started_before_and_after():
    out = subprocess.run([sys.executable, "-c", SET_SCHED], capture_output=True, text=True, timeout=T(30))
    assert out.returncode == 0, out.stderr
    if not hasattr(os, "SCHED_BATCH"):
        assert out.stdout.split() == ["None"] and "has no effect on this system" in out.stderr
    else:
        assert out.stdout.split() == ["batch", "3", "3", "3", "None", "batch"]


# A thread started before, the calling thread and one started after; then "normal" (nothing
# done) and a second "batch" (already so).
SET_SCHED = r"""
import os, threading
from juggler import tuning
go = threading.Event()
seen = []
early = threading.Thread(target=lambda: (go.wait(), seen.append(os.sched_getscheduler(0))), name="early")
early.start()
done = tuning.set_sched("batch")
print(done)
if done:
    go.set(); early.join()
    late = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)), name="late")
    late.start(); late.join()
    print(*seen, os.sched_getscheduler(0), tuning.set_sched("normal"), tuning.set_sched("batch"))
else:
    go.set(); early.join()
"""
