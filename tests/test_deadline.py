"""juggler.deadline: one timeout carried across several blocking steps."""

import time

from juggler.deadline import Deadline

__all__: list[str] = []


def test_a_deadline_counts_down_from_when_it_is_made():
    before = time.monotonic()
    deadline = Deadline.after(60.0)
    after = time.monotonic()
    assert before + 60.0 <= deadline.at <= after + 60.0
    assert 0 < deadline.remaining() <= 60.0
    assert not deadline.expired()
    assert "Deadline(in " in repr(deadline)


def test_a_passed_deadline_has_nothing_left():
    for deadline in (Deadline.after(0.0), Deadline.after(-5.0), Deadline(time.monotonic() - 1)):
        assert deadline.expired()
        assert deadline.remaining() == 0.0  # never negative: it is passed on as a timeout


def test_each_step_waits_for_what_is_left():
    deadline = Deadline(time.monotonic() + 10.0)
    first = deadline.remaining()
    second = deadline.remaining()
    assert 0 < second <= first <= 10.0
