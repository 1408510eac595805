"""Bounds on upstream connects in flight, waited for without a task (issue 9, issue 14).

Owns: `ConnectSlots`, a counting bound whose excess waits in arrival order, like
`asyncio.Semaphore`, but a waiter is an object told by a call instead of a suspended task: the
inbound CONNECT (`ztunnel.proxy.inbound.InboundTunnel`) runs without a task per stream.
Sans-I/O: no loop here; the waiter's `slot_granted` decides where its continuation runs (the
inbound tunnel schedules it on the loop, so a release never runs another tunnel's work inside
the releasing one's stack).

Invariants: at most `limit` slots are held at any time; a waiter is granted a slot at most once
and only while it waits (a cancelled waiter is never called); a released slot goes to the
oldest waiter first. Memory is the waiters themselves: one entry per waiting connect, removed
when it is granted or cancelled.
"""

from __future__ import annotations

from typing import Protocol


class SlotWaiter(Protocol):
    """Who waits for a slot (by identity: each waiting connect is its own object)."""

    def slot_granted(self) -> None:
        """A slot is this waiter's now (called by `ConnectSlots.release`)."""


class ConnectSlots:
    """At most `limit` holders; the excess waits in FIFO order."""

    __slots__ = ("_waiting", "held", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.held = 0
        self._waiting: dict[SlotWaiter, None] = {}  # insertion-ordered: FIFO

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def acquire(self, waiter: SlotWaiter) -> bool:
        """True: a slot is the caller's now. False: `waiter.slot_granted()` is called when one
        is (by a `release`), unless `cancel(waiter)` came first. Nobody jumps the queue."""
        if self.held < self.limit and not self._waiting:
            self.held += 1
            return True
        self._waiting[waiter] = None
        return False

    def cancel(self, waiter: SlotWaiter) -> None:
        """`waiter` no longer waits (no-op if it does not)."""
        self._waiting.pop(waiter, None)

    def release(self) -> None:
        """A holder is done: its slot goes to the oldest waiter, or back to the pool."""
        if self._waiting:
            waiter = next(iter(self._waiting))
            del self._waiting[waiter]
            waiter.slot_granted()  # the slot passes on: `held` is unchanged
        elif self.held > 0:
            self.held -= 1
        else:
            raise RuntimeError("ConnectSlots released more often than acquired")
