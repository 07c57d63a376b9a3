"""benchmarks/_common.py's Placement: where a process's threads ran, as calls.py reports it
beside the server's context switches (issue 23: which process shares the server's CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _common as c  # noqa: E402

# A thread that keeps itself on the last CPU it may use and spins, beside a main thread that sleeps.
SPINNER = """
import os, sys, threading, time
def spin():
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    sys.stdout.write("spinning\\n"); sys.stdout.flush()
    end = time.monotonic() + 30
    while time.monotonic() < end:
        pass
threading.Thread(target=spin, daemon=True).start()
sys.stdin.read()
"""

needs_two = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                               or not os.path.exists("/proc/self/task"), reason="Linux with 2 CPUs")  # fmt: skip


@pytest.fixture
def spinner():
    p = subprocess.Popen([sys.executable, "-c", SPINNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "spinning\n"
        yield p
    finally:
        p.kill()
        p.wait(10)


@needs_two
@pytest.mark.timeout(60)
def test_a_thread_kept_on_one_cpu_is_credited_there(spinner):
    cpu = max(os.sched_getaffinity(0))
    placement = c.Placement({"spinner": spinner.pid})
    assert "spinner" not in placement.pinned  # (the process may run anywhere: it is sampled)
    for _ in range(15):
        time.sleep(0.02)
        placement.sample()
    placed = placement.finish()["spinner"]
    assert placed["cpus"].get(cpu, 0.0) > 0.05, placed
    assert sum(v for k, v in placed["cpus"].items() if k != cpu) < 0.5 * placed["cpus"][cpu], placed
    assert placed["threads"] == (2, 2) and placed["threads_ended"] == placed["threads_new"] == 0


@needs_two
@pytest.mark.timeout(60)
def test_a_process_kept_on_one_cpu_is_read_at_both_ends(spinner):
    cpu = max(os.sched_getaffinity(0))
    for tid in os.listdir(f"/proc/{spinner.pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})
    placement = c.Placement({"spinner": spinner.pid})
    assert placement.pinned == {"spinner": frozenset({cpu})}
    time.sleep(0.2)
    placed = placement.finish()["spinner"]
    assert list(placed["cpus"]) == [cpu] and placed["cpus"][cpu] > 0.05, placed
    assert placed["affinity"] == [cpu]


@pytest.mark.timeout(30)
def test_thread_times_of_a_process_that_is_gone():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(10)
    assert c.thread_times(p.pid) == {}


@needs_two
@pytest.mark.timeout(60)
def test_a_free_process_of_many_threads_is_not_sampled(spinner):
    placement = c.Placement({"spinner": spinner.pid}, most_threads=1)
    assert placement.unsampled == {"spinner"}
    time.sleep(0.1)
    placement.sample()
    placed = placement.finish()["spinner"]
    assert list(placed["cpus"]) == [-1] and placed["cpus"][-1] > 0.02, placed
