"""Keep a server process on one CPU (``juggler server --cpu``, on by default).

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

``auto`` picks a CPU that no other juggler process has claimed: a claim is the abstract unix
socket ``juggler-cpu-N``, bound for as long as the process lives, so several servers sharing a
port (``--reuse-port``) spread over the CPUs, one each. Such names are seen within one network
namespace: processes in different containers do not see each other's claims. With every CPU
claimed, or only one to run on, the process is left free. A CPU named with ``--cpu N`` is
claimed too, if it is free. Linux only: elsewhere nothing is done.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Optional, Union

__all__ = ["parse_cpu", "pin", "claimed_cpu"]

log = logging.getLogger("juggler.server")

#: What ``--cpu`` takes: ``"auto"``, ``"none"`` (left free) or a CPU number.
CpuChoice = Union[str, int, None]

_claims: list[socket.socket] = []  # held for the life of the process
_pinned: Optional[int] = None


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
    """The CPU :func:`pin` kept this process on, if any."""
    return _pinned


def pin(choice: CpuChoice = "auto") -> Optional[int]:
    """Keep every thread of this process, and those it starts later, on one CPU (see the
    module); the CPU, or ``None`` when the process is left free to run anywhere. ``choice``:
    ``"auto"``, ``"none"`` (or ``None``) or a CPU number, as :func:`parse_cpu` reads them;
    :class:`ValueError` when this process may not run there. Call it before starting threads; threads already
    running are moved too."""
    global _pinned
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
        _claims.append(claim)
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
