"""A library leaves its host process alone (issue 20): creating, starting and stopping a
``Server``, a ``Callee`` and a ``Client`` in a process changes no setting of the whole process.
Host threads record the settings before, during and after 300 websockets are accepted, and
threads the host starts meanwhile check the stack they were given."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import resource
import signal
import sys
import threading
from typing import Any

import pytest

from juggler import Callee, Client, RedisBroker, Server

from .conftest import T, echo
from .test_idle import Counter, open_idle

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's thread attributes")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.pthread_self.restype = ctypes.c_ulong
_libc.pthread_getattr_np.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
_libc.pthread_attr_getstacksize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
_libc.pthread_attr_destroy.argtypes = [ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


def own_stack_size() -> int:
    """The calling thread's stack, as the C library made it (not threading.stack_size(), which
    is the setting for threads started from now on)."""
    attr = ctypes.create_string_buffer(256)  # a pthread_attr_t, with room to spare
    assert _libc.pthread_getattr_np(_libc.pthread_self(), attr) == 0
    try:
        size = ctypes.c_size_t()
        assert _libc.pthread_attr_getstacksize(attr, ctypes.byref(size)) == 0
        return size.value
    finally:
        _libc.pthread_attr_destroy(attr)


def futex_hash_slots() -> int:
    return _libc.prctl(78, 2, 0, 0, 0)  # PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS (-1: no such setting)


def thread_policies() -> frozenset[int]:
    """The scheduling policies (SCHED_OTHER, SCHED_BATCH, ...) the process' threads run under:
    a library's threads get none of their own either."""
    found = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            found.add(os.sched_getscheduler(int(tid)))
        except OSError:  # (one that just ended)
            pass
    return frozenset(found)


_SIGNALS = sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP})


def process_settings() -> dict[str, Any]:
    """Every setting of the whole process a library could be tempted to change, as seen from
    the calling thread."""
    root = logging.getLogger()
    return {
        "threading.stack_size()": threading.stack_size(),
        "switch interval": sys.getswitchinterval(),
        "signal handlers": {s: signal.getsignal(s) for s in _SIGNALS},
        "this thread's CPUs": frozenset(os.sched_getaffinity(0)),
        "the main thread's CPUs": frozenset(os.sched_getaffinity(os.getpid())),
        "futex hash slots": futex_hash_slots(),
        "scheduling policies of its threads": thread_policies(),
        "root logging handlers": list(root.handlers),
        "root logging level": root.level,
        "recursion limit": sys.getrecursionlimit(),
        "gc thresholds": gc.get_threshold(),
        "RLIMIT_NOFILE": resource.getrlimit(resource.RLIMIT_NOFILE),
        "threading.excepthook": threading.excepthook,
        "sys.excepthook": sys.excepthook,
    }


class HostThreads:
    """What a busy host does meanwhile: one thread records the process' settings over and
    over, another starts short threads one after the other, each noting the stack it got and
    what ``threading.stack_size()`` said on it."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.settings_seen: list[dict[str, Any]] = []
        self.stack_sizes_seen: set[int] = set()
        self.stacks: list[int] = []  # the actual stack of each thread started
        self.started = 0
        self._threads = [
            threading.Thread(target=self._record, name="host-recorder"),
            threading.Thread(target=self._spawn, name="host-spawner"),
        ]

    # Both pause a moment each turn (stop.wait): a thread that never blocks would hold the GIL
    # for whole switch intervals, and the server's threads, back from each socket call, would
    # queue behind it (on a busy machine, 300 handshakes then took over a minute).

    def _record(self) -> None:
        while not self.stop.wait(0.0002):
            seen = process_settings()
            if not self.settings_seen or seen != self.settings_seen[-1]:
                self.settings_seen.append(seen)
            for _ in range(50):  # the stack size setting is the one that changed for a moment
                self.stack_sizes_seen.add(threading.stack_size())

    def _spawn(self) -> None:
        while not self.stop.wait(0.0001):
            t = threading.Thread(target=self._measure, name="host-worker")
            t.start()
            t.join()
            self.started += 1

    def _measure(self) -> None:
        self.stack_sizes_seen.add(threading.stack_size())
        self.stacks.append(own_stack_size())

    def __enter__(self) -> "HostThreads":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self._threads:
            t.join()


def reference_stack() -> int:
    """The stack a thread of this host gets when juggler is not around."""
    sizes: list[int] = []
    t = threading.Thread(target=lambda: sizes.append(own_stack_size()), name="host-reference")
    t.start()
    t.join()
    return sizes[0]


def test_server_callee_and_client_leave_the_host_process_alone(redis_client):
    stack = reference_stack()  # (a first thread also gets the process the kernel's own futex table)
    before = process_settings()
    broker = RedisBroker(redis_client)
    counter = Counter()
    with HostThreads() as host:
        server = Server(broker, on_state=counter, close_timeout=0.5)
        callee = Callee(broker, workers=4, block=0.05)
        callee.register("test.echo", echo)
        socks: list = []
        try:
            server.start()
            callee.start()
            socks = open_idle(server, 300)  # 300 websockets accepted while the host's threads start
            counter.wait(connected=300)
            during = process_settings()
            with Client.connect(server.url, connect_timeout=T(10)) as client:
                assert client.call("test.echo", {"n": 1}, timeout=T(10)) == {"n": 1}
                sub = client.sub("host-alone")
                client.pub("host-alone", 1)
                assert sub.get(T(10)).args == 1
        finally:
            for s in socks:
                s.close()
            callee.stop()
            server.shutdown()
        host.stop.set()  # and joined on the way out
    after = process_settings()
    assert during == before
    assert after == before
    assert host.settings_seen == [before], "a host thread saw a process-wide setting change"
    assert host.stack_sizes_seen == {before["threading.stack_size()"]}
    assert host.started > 0 and set(host.stacks) == {stack}, (
        f"of {host.started} host threads started meanwhile, some got another stack than {stack} bytes: "
        f"{sorted(set(host.stacks))}"
    )
