"""The server's counters and histograms kept per thread (juggler.metrics.ThreadCounters,
ThreadHistogram): the same totals and the same exposition text as one locked counter and
prometheus_client's Histogram."""

from __future__ import annotations

import math
import random
import re
import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from juggler.metrics import ThreadCounters, ThreadHistogram
from juggler.server import Stats

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _text(registry: CollectorRegistry) -> str:
    return re.sub(r"(_created) \S+", r"\1 T", generate_latest(registry).decode())


def test_thread_histogram_writes_the_text_of_a_histogram():
    rng = random.Random(5)
    values = [rng.choice(BUCKETS) for _ in range(200)]  # on the bounds: each in its own bucket
    values += [rng.uniform(-1, 20) for _ in range(2000)] + [0.0, -0.0, math.inf, 1e-9, math.nan]
    old, new = CollectorRegistry(), CollectorRegistry()
    h_old = Histogram("juggler_x_seconds", "help text", buckets=BUCKETS, registry=old)
    h_new = ThreadHistogram("juggler_x_seconds", "help text", buckets=BUCKETS, registry=new)
    assert _text(old) == _text(new)  # nothing observed yet
    for v in values:
        h_old.observe(v)
        h_new.observe(v)
    assert _text(old) == _text(new)
    assert "juggler_x_seconds_created" in _text(new)


def test_thread_histogram_sums_the_observations_of_many_threads():
    old, new = CollectorRegistry(), CollectorRegistry()
    h_old = Histogram("h", "h", buckets=BUCKETS, registry=old)
    h_new = ThreadHistogram("h", "h", buckets=BUCKETS, registry=new)
    values = [0.25 * (i % 50) for i in range(400)]  # sums exact in any order

    def observe(chunk):
        for v in chunk:
            h_new.observe(v)

    threads = [threading.Thread(target=observe, args=(values[i::8],), name=f"observer-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for v in values:
        h_old.observe(v)
    assert _text(old) == _text(new)


def test_counters_from_many_threads_add_up_while_read():
    stats = Stats()
    assert isinstance(stats, ThreadCounters)
    stop = threading.Event()
    seen = []

    def reader():
        while not stop.is_set():
            seen.append(stats.snapshot().get("write_ACK", 0))

    def writer():
        for _ in range(5000):
            stats.incr("write_ACK")
            stats.incr("read_CALL", 2)

    r = threading.Thread(target=reader, name="reader")
    r.start()
    for _round in range(3):  # threads that end are folded in, new ones registered
        writers = [threading.Thread(target=writer, name=f"writer-{i}") for i in range(10)]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
    stop.set()
    r.join()
    assert stats.snapshot() == {"write_ACK": 150000, "read_CALL": 300000}
    assert seen == sorted(seen)  # a read never goes back
    stats.incr("write_ACK", 0)
    assert stats.snapshot()["write_ACK"] == 150000


def test_counters_keep_no_state_per_thread_that_ended():
    stats = Stats()
    for i in range(300):
        t = threading.Thread(target=stats.incr, args=("x",), name=f"t-{i}")
        t.start()
        t.join()
    assert len(stats._counts._live) <= 130  # folded as they pile up, not one per thread ever
    assert stats.snapshot() == {"x": 300}
    assert len(stats._counts._live) == 0
