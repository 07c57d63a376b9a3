"""juggler.health: one log line per outage and per return, one backoff for all listeners."""

import logging
import threading
import time

import pytest

from juggler.health import RedisHealth


def test_an_outage_is_logged_once_going_and_once_back(caplog):
    changes = []
    health = RedisHealth("server x", on_change=changes.append)
    with caplog.at_level(logging.WARNING, logger="juggler.broker"):
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
