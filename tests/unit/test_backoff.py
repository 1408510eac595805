"""meshcore.backoff: the one retry schedule (table, jitter bounds, full jitter, injected sleep)."""

from __future__ import annotations

import asyncio
import random

import pytest

from meshcore.backoff import Backoff, Retry


class Edge(random.Random):
    """uniform() returns one end of its range: the jitter's extremes, deterministically."""

    def __init__(self, high: bool) -> None:
        super().__init__()
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def test_schedule_doubles_then_caps() -> None:
    s = Backoff(initial=0.2, cap=10.0)
    assert [s.base(a) for a in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert s.base(10**9) == 10.0  # exponent clamped: no OverflowError


def test_proportional_jitter_applies_after_the_cap() -> None:
    s = Backoff(initial=0.5, cap=150.0)
    assert s.delay(0, Edge(False)) == pytest.approx(0.4)
    assert s.delay(0, Edge(True)) == pytest.approx(0.6)
    assert s.delay(30, Edge(True)) == pytest.approx(180.0)
    assert s.delay(30, Edge(False)) == pytest.approx(120.0)


def test_full_jitter_spans_zero_to_base() -> None:
    s = Backoff(initial=0.025, cap=0.25, full=True)
    assert s.delay(3, Edge(False)) == 0.0
    assert s.delay(3, Edge(True)) == pytest.approx(0.2)
    assert s.delay(9, Edge(True)) == pytest.approx(0.25)


def test_same_sequence_as_a_direct_uniform_call() -> None:
    """One rng.uniform per delay: a seeded rng reproduces the pre-module formula exactly."""
    s = Backoff(initial=0.2, cap=10.0)
    a, b = random.Random(7), random.Random(7)
    for attempt in range(12):
        expected = min(10.0, 0.2 * 2**attempt) * (1 + b.uniform(-0.2, 0.2))
        assert s.delay(attempt, a) == pytest.approx(expected)


def test_negative_attempt_is_an_error() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff(initial=1, cap=2).delay(-1, random.Random(0))


def test_retry_sleeps_the_schedule_and_resets() -> None:
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)

    async def main() -> None:
        r = Retry(Backoff(initial=1.0, cap=4.0, jitter=0.0), rng=random.Random(0), sleep=sleep)
        for _ in range(4):
            await r.wait()
        r.reset()
        await r.wait()
        await r.wait(0.5)

    asyncio.run(main())
    assert slept == [1.0, 2.0, 4.0, 4.0, 1.0, 0.5]


def test_no_jitter_uses_no_randomness() -> None:
    class NoRng(random.Random):
        def uniform(self, a: float, b: float) -> float:
            raise AssertionError("uniform called")

    assert Backoff(initial=0.5, cap=10.0, jitter=0.0).delay(2, NoRng()) == 2.0
