"""juggler.health: one log line per outage and per return, one backoff for all listeners."""

import logging
import threading
import time

import pytest

from juggler.health import RedisHealth

from .conftest import T


def test_an_outage_is_logged_once_going_and_once_back(caplog):
    changes = []
    health = RedisHealth("server x", on_change=changes.append)
    with caplog.at_level(logging.WARNING, logger="juggler.health"):
        for _ in range(8):
            health.failed(ConnectionError("refused"))
        assert not health.up
        for _ in range(6):
            health.succeeded()
    assert health.up
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "server x: redis unavailable (refused)" in lines[0]
    assert "server x: redis is back" in lines[1]
    assert changes == [False, True]
    assert health.outages == 1


def test_while_up_a_turn_is_at_once():
    health = RedisHealth()
    start = time.monotonic()
    assert all(health.wait_turn() for _ in range(100))
    assert time.monotonic() - start < 0.5
    assert health.attempts == 0


def test_many_listeners_share_one_backoff_while_redis_is_down():
    health = RedisHealth(base=0.02, cap=0.1)
    health.failed(ConnectionError("down"))
    stop = threading.Event()
    tries = []

    def listener():
        while health.wait_turn(stop):
            tries.append(time.monotonic())
            health.failed(ConnectionError("still down"))  # each attempt fails

    threads = [threading.Thread(target=listener, name=f"test-listener-{i}") for i in range(50)]
    for t in threads:
        t.start()
    time.sleep(0.6)  # the span measured: the attempts of 50 listeners in it
    stop.set()
    health.wake()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    # 0.01-0.02, then waits growing to 0.05-0.1 s: about 10 turns in 0.6 s, not 50 per turn
    assert 3 <= len(tries) <= 20, tries
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert min(gaps) >= 0.009


def test_a_success_lets_every_waiting_listener_go_at_once():
    health = RedisHealth(base=5.0, cap=5.0)  # turns far apart: only a success can end the wait
    health.failed(ConnectionError("down"))
    went = []
    threads = [threading.Thread(target=lambda: went.append(health.wait_turn()), name=f"test-waiter-{i}") for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # (let them block: a success before they wait would do as well)
    start = time.monotonic()
    health.succeeded()
    for t in threads:
        t.join(5)
    assert went == [True] * 10
    assert time.monotonic() - start < 1.0


def test_close_ends_every_wait():
    health = RedisHealth(base=5.0, cap=5.0)
    health.failed(ConnectionError("down"))
    result = []
    t = threading.Thread(target=lambda: result.append(health.wait_turn()), name="test-waiter")
    t.start()
    health.close()
    health.close()
    t.join(5)
    assert result == [False]
    assert health.wait_turn() is False


def test_a_bad_backoff_is_refused():
    with pytest.raises(ValueError):
        RedisHealth(base=0, cap=1)
    with pytest.raises(ValueError):
        RedisHealth(base=2, cap=1)


def test_a_wait_with_a_timeout_takes_a_due_turn_or_gives_up():
    now = [100.0]
    health = RedisHealth(base=1.0, cap=1.0, clock=lambda: now[0], jitter=lambda: 0.0)
    assert health.request_turn(0)  # up: always
    health.failed(ConnectionError("down"))
    assert not health.request_turn(0)  # the first turn comes after base/2 = 0.5 s
    now[0] += 0.5
    assert health.request_turn(0)
    assert not health.request_turn(0)  # taken: the next one is 0.5 s later
    assert health.attempts == 1
    health.succeeded()
    assert health.request_turn(0)
    health.close()
    assert not health.request_turn(0)


def test_a_request_waits_at_most_its_timeout_for_a_turn():
    health = RedisHealth(base=5.0, cap=5.0)
    health.failed(ConnectionError("down"))
    start = time.monotonic()
    assert not health.request_turn(0.1)
    assert 0.09 <= time.monotonic() - start < 1.0
    # and a success during the wait lets it go at once
    threading.Timer(0.05, health.succeeded).start()
    assert health.request_turn(T(5))


def test_a_request_tries_once_per_turn_while_redis_is_down():
    now = [0.0]
    health = RedisHealth(base=0.1, cap=0.4, clock=lambda: now[0], jitter=lambda: 1.0)
    assert health.try_turn()  # up: always
    health.failed(ConnectionError("down"))
    assert not health.try_turn()  # its first turn comes 0.1 s later
    now[0] = 0.1
    assert health.try_turn() and not health.try_turn()  # one request per turn
    now[0] = 0.29
    assert not health.try_turn()
    now[0] = 0.31
    assert health.try_turn()
    assert health.attempts == 2 and health.reconnects == 0
    health.succeeded()
    assert health.try_turn() and health.try_turn()


def test_reconnects_counts_every_turn_a_listener_takes():
    health = RedisHealth(base=0.01, cap=0.01)
    assert health.wait_turn()  # up: at once, and counted
    health.failed(ConnectionError("down"))
    assert health.wait_turn()
    assert (health.reconnects, health.attempts) == (2, 1)


def test_one_probe_at_a_time_and_it_sees_an_outage_found_meanwhile():
    health = RedisHealth()
    inside = threading.Event()
    release = threading.Event()
    seen = []

    def first():
        with health.probe() as up:
            seen.append(("first", up))
            inside.set()
            release.wait(5)
            health.failed(ConnectionError("refused"))

    def second():
        with health.probe() as up:
            seen.append(("second", up))

    t1 = threading.Thread(target=first, name="test-probe-1")
    t1.start()
    assert inside.wait(5)
    t2 = threading.Thread(target=second, name="test-probe-2")
    t2.start()
    t2.join(0.1)
    assert t2.is_alive()  # waits for the first probe's outcome
    release.set()
    t1.join(5)
    t2.join(5)
    assert seen == [("first", True), ("second", False)]


def test_a_success_or_failure_of_a_request_older_than_the_last_change_does_not_flap(caplog):
    """What the soak saw at an outage (3 "unavailable" and 2 "back after 0.0 s" in 25 ms):
    replies to requests sent before redis was marked down (read from a socket buffer after it)
    made it "back", and failures of requests that began before it was seen back made it go
    again. With the epoch each request took when it began, those reports do not count: one
    line when redis goes, one when a request that began after that proves it back."""
    changes = []
    health = RedisHealth("server x", on_change=changes.append)
    with caplog.at_level(logging.WARNING, logger="juggler.health"):
        before = [health.epoch for _ in range(3)]  # three requests sent while redis looked up
        health.failed(ConnectionError("stalled"), before[0])  # the first to find out
        health.succeeded(before[1])  # a reply sent before the stall: no evidence
        assert not health.up
        health.failed(TimeoutError("late"), before[2])  # (already down: nothing new)
        during = health.epoch  # a request that begins while redis is down...
        health.succeeded(during)  # ...and is answered: redis is back
        assert health.up
        health.failed(ConnectionError("old connection"), before[2])  # began before the return: old news
        health.failed(ConnectionError("old connection"), during)  # the same
        assert health.up
        health.succeeded(during)  # (up already: nothing)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "redis unavailable (stalled)" in lines[0] and "redis is back" in lines[1]
    assert changes == [False, True] and health.outages == 1
    # a failure of a request that began after the return is a new outage; one without a
    # token always counts
    health.failed(ConnectionError("down again"), health.epoch)
    assert not health.up and health.outages == 2
    health.succeeded()
    assert health.up
