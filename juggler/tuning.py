"""Process tuning for a server of many websockets: what ``juggler server`` does at its start,
and what a program that embeds :class:`~juggler.Server` may do with one call,
:func:`tune_process`. Nothing else in juggler changes a setting of the whole process: creating,
starting and stopping a server, a callee or a client leaves the thread stack size, the GIL
switch interval, signal handlers, CPU affinity, the futex table, root logging handlers, the
recursion limit and ``RLIMIT_NOFILE`` as its host set them.

What :func:`tune_process` sets, each measured on a 2-CPU machine (docs/deployment.rst):

- **Thread stacks** of 512 KiB (:data:`THREAD_STACK_SIZE`, ``threading.stack_size``) for the
  threads started from then on, instead of the C library's 8 MiB: a connection's threads need
  little C stack (the deepest recursion on them, JSON nested up to the recursion limit, fits
  with room to spare), and 8 MiB stacks reserve 160 GiB of address space for 20,000 threads.
  Only the touched pages count against memory either way. It applies to every thread the
  process starts later, the application's own too: a program whose threads recurse deeply
  (parsing deeply nested documents) should leave it, or pass ``stack_size=None``.
- **The GIL switch interval**, 1 s instead of CPython's 5 ms (``sys.setswitchinterval``): with
  thousands of threads waiting for the GIL, each wakes every interval to ask for it, a herd
  that took the CPU when 10,000 websockets closed together.
- **The futex table** (Linux 6.16 and later, :func:`size_futex_hash`): a slot per thread the
  connections may have, instead of the kernel's 4 per CPU, which made every wake-up walk a
  list of a thousand sleepers with 20,000 threads asleep.
- **The open-file limit**, raised to the hard limit (:func:`raise_open_file_limit`): a
  connection holds one or two descriptors.
- **One C library malloc arena** (glibc's ``M_ARENA_MAX``, :func:`limit_malloc_arenas`) for
  the threads started from then on, instead of up to 8 per CPU: threads that take turns at
  the GIL gain nothing from arenas of their own, and each thread's allocations spread over
  them left pages part-used: 0.6 KiB less RSS per idle websocket (5,000 held, two runs
  each, 40.3 against 40.9 KiB).
- **The garbage collector's young generation**, collected every 10,000 allocations
  (:data:`GC_YOUNG`, the first of :func:`gc.set_threshold`) instead of CPython's 700: an open
  websocket is about 50 objects the collector tracks, and at 700 the full collections, which
  each walk every object of the process, came about every 1,400 connections opened (6 while
  10,000 opened, half a second of a 4 s open phase); ten times fewer young collections make
  ten times fewer full ones. Objects that live in cycles wait a little longer to be freed.
- **One CPU** (:func:`pin`, ``--cpu``): see below.

Keep a server process on one CPU
--------------------------------

A juggler server is many threads taking turns at CPython's GIL: under load a few of them are
always waiting for it. When they may run on any CPU, each hand-over of the GIL is a wake-up
sent to another CPU (an inter-processor interrupt, which costs a virtual machine an exit to
its hypervisor), and the thread that lets the GIL go and the one that takes it run on
different caches. Confined to one CPU, the same threads hand the GIL over where it is, and the
kernel's own work for them (their sockets, their futexes) stays there too. A process that
runs Python on one CPU at a time gives up little by it: only the work some C code does without
the GIL (TLS, for one) could have run beside it. Measured with ``benchmarks/calls.py`` on a
2-CPU machine that also ran redis, the callee and the load tool (left free to run anywhere),
see docs/deployment.rst: at 100 connections 1.67 times the calls/s, p99 0.54 times, server
CPU per call 0.67 times; at 10, 1.33 times the calls/s; at 1, 1.09 times.

At 100 connections about one run in two is slower (7-17 context switches per call instead of
2.5-6, 0.19-0.29 ms of server CPU instead of 0.12-0.17), on either CPU, and whether or not
the other processes share the server's CPU: the server's own threads preempt the one that
just let the GIL go (woken by it, they find the GIL's mutex still held and sleep again), a
convoy that keeps itself going once the CPU is saturated (docs/deployment.rst, "One CPU per
server process"). Unpinned it was slower still, and a longer slice did not end it:
:func:`pin` sets neither, nor does it move any other process. ``SCHED_BATCH``
(:func:`set_sched`, ``juggler server --sched batch``) kept it away in 16 runs of 16 and made
a call at 100 connections cost 0.83 times the server CPU on a busy machine; on a quiet one it
made no difference; it is off by default, as the p99 at one connection on a busy machine was
worse under it in 12 runs of 16.

``auto`` picks a CPU that no other juggler process has claimed: a claim is the abstract unix
socket ``juggler-cpu-N``, bound for as long as the process lives, so several servers sharing a
port (``--reuse-port``) spread over the CPUs, one each. Such names are seen within one network
namespace: processes in different containers do not see each other's claims. With every CPU
claimed, or only one to run on, the process is left free. A CPU named with ``--cpu N`` is
claimed too, if it is free. Linux only: elsewhere nothing is done.

A child forked by a pinned process (``os.fork``, ``multiprocessing`` with ``fork``) does not
hold its parent's claim (it is closed in the child, so a child that outlives its parent does
not keep the CPU from the next server), but the kernel copies the affinity: the child runs on
its parent's one CPU until it calls ``os.sched_setaffinity`` (:func:`unpinned_cpus` says which
CPUs the process could use before :func:`pin`). A child started with ``subprocess`` inherits
the affinity too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
import resource
import socket
import sys
import threading
from typing import Any, Callable, Optional, Union

__all__ = [
    "tune_process",
    "Tuned",
    "THREAD_STACK_SIZE",
    "GC_YOUNG",
    "default_max_connections",
    "raise_open_file_limit",
    "limit_malloc_arenas",
    "size_futex_hash",
    "libc_prctl",
    "futex_hash_slots",
    "parse_cpu",
    "pin",
    "claimed_cpu",
    "unpinned_cpus",
    "SCHED_CHOICES",
    "parse_sched",
    "set_sched",
]

log = logging.getLogger(__name__)

#: What ``--cpu`` takes: ``"auto"``, ``"none"`` (left free) or a CPU number.
CpuChoice = Union[str, int, None]

#: The stack size :func:`tune_process` gives the threads started after it (bytes). Python code
#: needs little C stack, and the deepest C recursion on a connection's threads (decoding and
#: encoding JSON nested up to the recursion limit) fits with room to spare; the C library's
#: default of 8 MiB would reserve 160 GiB of address space for 20,000 threads.
THREAD_STACK_SIZE = 512 * 1024

#: The allocations (less deallocations) of objects the garbage collector tracks between two
#: collections of its youngest generation, as :func:`tune_process` sets it (CPython: 700).
GC_YOUNG = 10000


@dataclasses.dataclass(frozen=True)
class Tuned:
    """What :func:`tune_process` did; ``None`` where it changed nothing."""

    #: the stack size of the threads started from now on (bytes)
    stack_size: Optional[int]
    #: the GIL switch interval now (seconds)
    switch_interval: Optional[float]
    #: the CPU every thread is kept on (``None``: left free)
    cpu: Optional[int]
    #: the open-file soft limit before and after
    open_files: tuple[int, int]
    #: the futex hash slots the process has now (``None``: no such setting, or not asked for)
    futex_hash_slots: Optional[int]
    #: the connections this process can hold now (:func:`default_max_connections`)
    capacity: int
    #: the most malloc arenas the C library makes from now on (``None``: unchanged, or not glibc)
    malloc_arenas: Optional[int] = None
    #: the garbage collector's first threshold now (``None``: unchanged)
    gc_young: Optional[int] = None


def tune_process(
    max_connections: Optional[int] = None,
    *,
    cpu: CpuChoice = "auto",
    stack_size: Optional[int] = THREAD_STACK_SIZE,
    switch_interval: Optional[float] = 1.0,
    open_files: bool = True,
    futex_hash: bool = True,
    malloc_arenas: Optional[int] = 1,
    gc_young: Optional[int] = GC_YOUNG,
) -> Tuned:
    """Tune this whole process for a server of many websockets, as ``juggler server`` does at
    its start (see the module for what each setting buys): keep its threads on one CPU
    (:func:`pin` with ``cpu``; ``"none"`` or ``None``: left free), raise the open-file limit to
    the hard limit (``open_files``), make the threads started from now on ``stack_size`` bytes
    (``None``: unchanged), set the GIL switch interval (``None``: unchanged) and size the
    futex table (``futex_hash``) for ``max_connections`` connections (``None`` or 0: what the
    process can hold), cap the C library's malloc arenas at ``malloc_arenas`` (``None``:
    unchanged; glibc only) and collect the garbage collector's young generation every
    ``gc_young`` allocations (``None``: unchanged; the older generations' thresholds stay). Call it once, early, before starting threads: from the main thread of a
    program that embeds :class:`~juggler.Server` and owns its process. Every setting is the
    whole process', the application's threads' too, and stays after the servers stop.

    Returns what it did. :class:`ValueError` for a ``cpu`` this process may not run on (then
    nothing was changed)."""
    if malloc_arenas is not None and malloc_arenas < 1:
        raise ValueError(f"malloc_arenas must be at least 1, got {malloc_arenas!r}")
    if gc_young is not None and gc_young < 1:
        raise ValueError(f"gc_young must be at least 1, got {gc_young!r}")
    if stack_size is not None and stack_size < 32768:
        raise ValueError(f"stack_size must be at least 32768 bytes, got {stack_size!r}")
    if switch_interval is not None and not switch_interval > 0:
        raise ValueError(f"switch_interval must be a positive number of seconds, got {switch_interval!r}")
    pinned = pin(cpu)  # first: it refuses a bad CPU before anything changed
    files = raise_open_file_limit() if open_files else (resource.getrlimit(resource.RLIMIT_NOFILE)[0],) * 2
    if stack_size is not None:
        threading.stack_size(stack_size)
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    arenas = limit_malloc_arenas(malloc_arenas) if malloc_arenas is not None else None
    if gc_young is not None:
        gc.set_threshold(gc_young, *gc.get_threshold()[1:])
    capacity = default_max_connections()
    slots = size_futex_hash(max_connections or capacity) if futex_hash else None
    return Tuned(
        stack_size=stack_size,
        switch_interval=switch_interval,
        cpu=pinned,
        open_files=files,
        futex_hash_slots=slots,
        capacity=capacity,
        malloc_arenas=arenas,
        gc_young=gc_young,
    )


# -- the scheduling policy --------------------------------------------------------------------

#: What ``--sched`` takes: ``"batch"`` (``SCHED_BATCH``) or ``"normal"`` (left as started).
SCHED_CHOICES = ("batch", "normal")


def parse_sched(value: Any) -> str:
    """``"batch"`` or ``"normal"``, from a setting's value; :class:`ValueError` naming the
    problem."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text not in SCHED_CHOICES:
        raise ValueError(f"{value!r} is not a scheduling policy ({' or '.join(SCHED_CHOICES)})")
    return text


def set_sched(choice: str = "batch") -> Optional[str]:
    """Give this thread, the threads it starts from then on and the ones already running
    Linux's ``SCHED_BATCH`` policy (``choice`` ``"batch"``; ``"normal"`` changes nothing);
    ``"batch"`` if it did, ``None`` if it changed nothing. ``juggler server --sched batch``
    calls it (docs/deployment.rst, :ref:`the GIL convoy <gil-convoy>`): a thread woken from a GIL hand-over
    then does not preempt the thread that woke it, which still holds the GIL's mutex. Nice
    values stay. A process started under another policy than ``SCHED_OTHER`` (``chrt``) is
    left as it is; where there is no ``SCHED_BATCH`` (not Linux) nothing is done, and it says
    so. Children the process starts later (an embedded redis) inherit the policy, as they
    inherit the CPU of :func:`pin`. Call it before starting threads."""
    if parse_sched(choice) == "normal":
        return None
    if not hasattr(os, "SCHED_BATCH") or not hasattr(os, "sched_setscheduler"):
        log.warning("scheduling: --sched batch has no effect on this system (no SCHED_BATCH)")
        return None
    current = os.sched_getscheduler(0)
    if current == os.SCHED_BATCH:
        return "batch"
    if current != os.SCHED_OTHER:
        log.warning("scheduling: --sched batch not applied: the process was started under policy %d "
                    "(chrt), which stays", current)  # fmt: skip
        return None
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # this thread and those it starts
    except OSError as exc:
        log.warning("scheduling: cannot give this process SCHED_BATCH: %s", exc)
        return None
    for tid in _threads():  # the threads started before, if any
        try:
            if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # (one that just ended)
            pass
    log.info("scheduling: every thread under SCHED_BATCH (--sched batch)")
    return "batch"


# -- connections, files and threads ----------------------------------------------------------

# What one connection may hold at most: its socket, its results redis connection (if it CALLs)
# and its reader, writer and results threads.
_FDS_PER_CONN = 2
_THREADS_PER_CONN = 3
_RESERVED_FDS = 128  # for redis pools, the listening socket, logs, the pub-sub connection
_RESERVED_THREADS = 64


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def default_max_connections() -> int:
    """How many connections this process can hold: bounded by its open-file limit (soft limit:
    see :func:`raise_open_file_limit`) and by the machine's thread limits (``kernel.pid_max``,
    ``kernel.threads-max``, and ``vm.max_map_count``, since every thread stack is two mappings).
    At least 1. It only reads them."""
    bounds = []
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            bounds.append((soft - _RESERVED_FDS) // _FDS_PER_CONN)
    except (OSError, ValueError):
        pass
    for path, per_thread in (
        ("/proc/sys/kernel/pid_max", 1),
        ("/proc/sys/kernel/threads-max", 1),
        ("/proc/sys/vm/max_map_count", 2),
    ):
        limit = _read_int(path)
        if limit is not None:
            bounds.append((limit // per_thread - _RESERVED_THREADS) // _THREADS_PER_CONN)
    return max(1, min(bounds)) if bounds else 10000


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process' open-file soft limit to its hard limit; returns ``(before, after)``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return soft, soft
    return soft, hard


# -- the futex table -------------------------------------------------------------------------

#: ``prctl`` options of Linux 6.16 and later: the size of a process' own futex hash table.
_PR_FUTEX_HASH = 78
_PR_FUTEX_HASH_SET_SLOTS = 1
_PR_FUTEX_HASH_GET_SLOTS = 2
#: The most futex hash slots :func:`size_futex_hash` asks for (64 bytes each: 4 MiB).
MAX_FUTEX_HASH_SLOTS = 1 << 16


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int) -> Optional[int]:
    """Cap the malloc arenas glibc makes from now on at ``arenas`` (``mallopt(M_ARENA_MAX)``;
    each thread otherwise gets one of up to 8 per CPU); ``arenas`` if it did, ``None``
    elsewhere (not glibc), or when the operator set it already (``MALLOC_ARENA_MAX``, or
    ``glibc.malloc.arena_max`` in ``GLIBC_TUNABLES``: theirs stands)."""
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: another C library's mallopt may differ
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return arenas if mallopt(_M_ARENA_MAX, arenas) == 1 else None


def libc_prctl() -> Optional[Callable[..., int]]:
    """The C library's ``prctl(option, arg2, arg3, arg4, arg5)`` (Linux), ``-1`` and ``errno``
    on failure; ``None`` where there is none."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    return prctl


def futex_hash_slots() -> Optional[int]:
    """The futex hash slots this process has (0: the kernel's global table), or ``None`` where
    the kernel has no such setting (before Linux 6.16, not Linux)."""
    prctl = libc_prctl()
    if prctl is None:
        return None
    have = prctl(_PR_FUTEX_HASH, _PR_FUTEX_HASH_GET_SLOTS, 0, 0, 0)
    return None if have < 0 else have


def size_futex_hash(connections: int) -> Optional[int]:
    """Give this process a futex hash table with a slot per thread that ``connections``
    connections may have (the next power of two, up to ``MAX_FUTEX_HASH_SLOTS``, 65,536); returns
    the slots it has after (0: the kernel's global table), or ``None`` where the kernel has no
    such setting (before Linux 6.16, not Linux).

    Every lock a thread sleeps on (a Python lock, a condition, the GIL) is a futex, and the
    kernel finds a futex's sleepers by walking one slot's list. Since Linux 6.16 a threaded
    process gets a table of its own, sized by the number of CPUs, not of threads: 16 slots on
    a 2-CPU machine. With 20,000 connection threads asleep, each wake-up then walked a list
    of over a thousand sleepers, and closing 10,000 websockets at once spent most of its time
    there. A setting of the whole process, which only ever grows here and stays for the
    life of the process; :func:`tune_process` makes it."""
    prctl = libc_prctl()
    if prctl is None:
        return None
    threads = _THREADS_PER_CONN * max(0, connections) + _RESERVED_THREADS
    # never fewer than the kernel's own choice (4 per CPU, which setting one stops it making)
    threads = max(threads, 4 * (os.cpu_count() or 1))
    slots = 2
    while slots < min(threads, MAX_FUTEX_HASH_SLOTS):
        slots *= 2
    have = prctl(_PR_FUTEX_HASH, _PR_FUTEX_HASH_GET_SLOTS, 0, 0, 0)
    if have < 0:
        return None  # no private futex hash on this kernel
    if have >= slots:
        return have  # (0 is not "enough": a process gets its small table at its first thread)
    if prctl(_PR_FUTEX_HASH, _PR_FUTEX_HASH_SET_SLOTS, slots, 0, 0) < 0:
        return have
    return prctl(_PR_FUTEX_HASH, _PR_FUTEX_HASH_GET_SLOTS, 0, 0, 0)


# -- one CPU ---------------------------------------------------------------------------------

_claims: list[socket.socket] = []  # held for the life of the process (not of its forked children)
_pinned: Optional[int] = None
_unpinned: Optional[frozenset[int]] = None  # the CPUs it could use before pin()


def _forget_claims_in_child() -> None:
    """After a fork, in the child: close the claims it inherited, so that they go with the
    process that made them. (The child keeps the affinity: see the module.)"""
    global _pinned
    claims = list(_claims)
    _claims.clear()
    _pinned = None
    for claim in claims:
        claim.close()


_fork_hook = False  # _forget_claims_in_child is registered (with the first claim, not on import)


def _hold(claim: socket.socket) -> None:
    """Keep ``claim`` for the life of this process, not of its forked children. The fork hook
    that closes claims in a child is registered with the first claim: importing this module
    (as :mod:`juggler.server` does) registers nothing in the host process."""
    global _fork_hook
    if not _fork_hook and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_claims_in_child)
        _fork_hook = True
    _claims.append(claim)


def parse_cpu(value: Any) -> CpuChoice:
    """``"auto"``, ``"none"`` or a CPU number, from a setting's value; :class:`ValueError`
    naming the problem."""
    if value is None or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a CPU (auto, none or a CPU number)")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().lower()
        if text in ("auto", "none"):
            return text
        if not text.isdigit():
            raise ValueError(f"{value!r} is not a CPU (auto, none or a CPU number)")
        number = int(text)
    if number < 0:
        raise ValueError(f"{value!r} is not a CPU (auto, none or a CPU number)")
    return number


def claimed_cpu() -> Optional[int]:
    """The CPU :func:`pin` kept this process on, if any (``None`` in a child it forked: the
    child keeps the affinity, not the claim)."""
    return _pinned


def unpinned_cpus() -> Optional[frozenset[int]]:
    """The CPUs this process could run on before :func:`pin` kept it on one (``None`` if it did
    not): what a forked child may give back to itself with ``os.sched_setaffinity(0, ...)``."""
    return _unpinned


def pin(choice: CpuChoice = "auto") -> Optional[int]:
    """Keep every thread of this process, and those it starts later, on one CPU (see the
    module); the CPU, or ``None`` when the process is left free to run anywhere. ``choice``:
    ``"auto"``, ``"none"`` (or ``None``) or a CPU number, as :func:`parse_cpu` reads them;
    :class:`ValueError` when this process may not run there. Call it before starting threads; threads already
    running are moved too."""
    global _pinned, _unpinned
    choice = "none" if choice is None else parse_cpu(choice)
    if choice == "none":
        return None
    if not hasattr(os, "sched_setaffinity"):
        if choice != "auto":
            log.warning("CPU: --cpu %s has no effect on this system", choice)
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if isinstance(choice, int):
        if choice not in allowed:
            raise ValueError(f"CPU {choice} is not one this process may run on ({_ranges(allowed)})")
        cpu: Optional[int] = choice
        _claim([choice], at_least=1)  # (so that an auto process picks another one)
    else:
        cpu = _claim(allowed)
        if cpu is None:
            log.info("CPU: left free (%s)", "one CPU to run on" if len(allowed) < 2 else
                     f"every CPU it may run on ({_ranges(allowed)}) is claimed by another juggler process")  # fmt: skip
            return None
    assert cpu is not None
    try:
        os.sched_setaffinity(0, {cpu})  # this thread, and the threads it starts from now on
    except OSError as exc:
        log.warning("CPU: cannot keep this process on CPU %d: %s", cpu, exc)
        _release(cpu)
        return None
    for tid in _threads():  # the threads started before, if any
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:  # (one that just ended)
            pass
    _pinned = cpu
    _unpinned = _unpinned or frozenset(allowed)
    log.info("CPU: every thread kept on CPU %d (--cpu)", cpu)
    return cpu


def _claim(allowed: list[int], at_least: int = 2) -> Optional[int]:
    """The first CPU of ``allowed`` no other process has claimed, claimed now: the one the
    kernel runs this thread on first, where the scheduler has just found room. None with
    fewer than ``at_least`` CPUs to choose from."""
    if len(allowed) < at_least:
        return None
    here = _current_cpu()
    for cpu in sorted(allowed, key=lambda c: c != here):
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            claim.bind(f"\0juggler-cpu-{cpu}")
        except OSError:
            claim.close()
            continue
        _hold(claim)
        return cpu
    return None


def _release(cpu: int) -> None:
    """Give up this process' claim on ``cpu``, if it holds one."""
    for claim in list(_claims):
        if claim.getsockname() == f"\0juggler-cpu-{cpu}".encode():
            _claims.remove(claim)
            claim.close()


def _current_cpu() -> Optional[int]:
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[36])  # field 39, "processor"
    except (OSError, ValueError, IndexError):
        return None


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # the calling thread


def _ranges(cpus: list[int]) -> str:
    """``0-3,6`` for ``[0, 1, 2, 3, 6]``."""
    parts: list[str] = []
    start = prev = None
    for c in cpus + [None]:  # type: ignore[list-item]
        if c is not None and prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    return ",".join(parts)
