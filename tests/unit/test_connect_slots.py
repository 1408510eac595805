"""`ztunnel.proxy.slots.ConnectSlots`: the bound on upstream connects in flight, waited for
without a task (issue 14)."""

from __future__ import annotations

import pytest

from ztunnel.proxy.slots import ConnectSlots


class Waiter:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def slot_granted(self) -> None:
        self.log.append(self.name)


def test_bound_then_fifo_handover() -> None:
    log: list[str] = []
    slots = ConnectSlots(2)
    a, b, c, d = (Waiter(n, log) for n in "abcd")
    assert slots.acquire(a)
    assert slots.acquire(b)
    assert not slots.acquire(c)
    assert not slots.acquire(d)
    assert (slots.held, slots.waiting) == (2, 2)
    slots.release()  # a's slot goes to c, the oldest waiter; held stays at the bound
    assert log == ["c"]
    assert (slots.held, slots.waiting) == (2, 1)
    slots.release()
    assert log == ["c", "d"]
    slots.release()
    slots.release()
    assert (slots.held, slots.waiting) == (0, 0)


def test_a_cancelled_waiter_is_never_granted_and_nobody_jumps_the_queue() -> None:
    log: list[str] = []
    slots = ConnectSlots(1)
    a, b, c = (Waiter(n, log) for n in "abc")
    assert slots.acquire(a)
    assert not slots.acquire(b)
    assert not slots.acquire(c)
    slots.cancel(b)
    slots.cancel(b)  # idempotent
    assert slots.waiting == 1
    slots.release()
    assert log == ["c"]
    slots.release()
    assert slots.held == 0
    # A free slot with nobody waiting is taken at once; a waiter queued first is served first.
    assert slots.acquire(a)
    assert not slots.acquire(b)
    slots.release()
    assert log == ["c", "b"]


def test_over_release_and_bad_limit_raise() -> None:
    slots = ConnectSlots(1)
    with pytest.raises(RuntimeError):
        slots.release()
    with pytest.raises(ValueError, match="limit"):
        ConnectSlots(0)
