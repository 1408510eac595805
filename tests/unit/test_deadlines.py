"""`meshcore.deadlines.DeadlineSweep`: the shared connect-timeout bookkeeping (issue 14), pure
(the clock is the caller's: times are passed in)."""

from __future__ import annotations

import pytest

from meshcore.deadlines import DeadlineSweep


def test_expires_no_earlier_than_its_deadline_and_once() -> None:
    sweep: DeadlineSweep[str] = DeadlineSweep(granularity=0.1)
    sweep.add("a", 10.0)
    assert sweep.handle_timer(9.999) == []
    assert sweep.handle_timer(10.0) == ["a"]
    assert sweep.handle_timer(11.0) == []
    assert len(sweep) == 0
    assert sweep.get_timer() is None


def test_timer_is_the_earliest_live_deadline_rounded_up_to_the_granularity() -> None:
    sweep: DeadlineSweep[str] = DeadlineSweep(granularity=0.25)
    assert sweep.get_timer() is None
    late = sweep.add("late", 7.1)
    early = sweep.add("early", 5.01)
    assert sweep.get_timer() == 5.25
    sweep.discard(early)
    assert sweep.get_timer() == 7.25
    sweep.discard(late)
    assert sweep.get_timer() is None


def test_one_wake_up_serves_every_deadline_within_the_granularity() -> None:
    sweep: DeadlineSweep[int] = DeadlineSweep(granularity=0.05)
    for i in range(5):
        sweep.add(i, 3.001 + i * 0.01)
    when = sweep.get_timer()
    assert when is not None
    assert when == pytest.approx(3.05)
    assert sweep.handle_timer(when) == [0, 1, 2, 3, 4]  # oldest first


def test_a_discarded_deadline_never_expires_and_is_not_kept() -> None:
    sweep: DeadlineSweep[str] = DeadlineSweep()
    tokens = [sweep.add(f"op{i}", 1.0) for i in range(1000)]
    keep = sweep.add("keep", 2.0)
    for t in tokens:
        sweep.discard(t)
    sweep.discard(tokens[0])  # twice: no-op
    assert len(sweep) == 1
    assert len(sweep._heap) <= 66  # compacted: memory follows the live deadlines
    assert sweep.get_timer() == pytest.approx(2.0)
    assert sweep.handle_timer(1.5) == []
    assert sweep.handle_timer(2.0) == ["keep"]
    sweep.discard(keep)  # after it expired: no-op
    assert len(sweep) == 0


def test_granularity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="granularity"):
        DeadlineSweep(granularity=0)
