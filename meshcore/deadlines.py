"""Many deadlines behind one timer: a coarse sweep instead of a timer handle per operation.

Owns: `DeadlineSweep`, the sans-I/O bookkeeping of deadlines in flight (the upstream connects of
the proxies, `meshcore.sockets.connect_tcp`): `add` one with its expiry, `discard` it when the
operation ended first, `get_timer` says when the caller's single timer must fire, `handle_timer`
returns what expired by then. The clock is the caller's (times are passed in), as in
`meshcore.hbone.connection.HboneConnection.get_timer/handle_timer`; so are the callbacks.

Why (issue 14, bench/README.md): a timer handle per new connection (asyncio.timeout) costs an
allocation, a heap push and a cancel per connection, and the connect almost never times out.
Here a connect costs one heap push; the loop wakes at most once per `granularity` for all of
them (after the last one ends, a caller's armed timer may still fire once, finding nothing).

Invariants: `handle_timer(now)` returns every key added with an expiry <= now and not discarded,
exactly once, oldest expiry first; an entry expires no earlier than its expiry and, when the
caller's timer fires at `get_timer()`, less than `granularity` after it. Memory is bounded by
the live deadlines: discarded entries are compacted away once the heap holds more than twice
the live ones (+64).
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

K = TypeVar("K")


class DeadlineSweep(Generic[K]):
    """Deadlines keyed by an opaque key (e.g. the pending operation)."""

    def __init__(self, granularity: float = 0.05) -> None:
        if granularity <= 0:
            raise ValueError("granularity must be > 0")
        self.granularity = granularity
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[int, tuple[float, K]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def add(self, key: K, expiry: float) -> int:
        """Track `key` until `expiry`; the token to `discard` it with."""
        self._seq += 1
        token = self._seq
        heapq.heappush(self._heap, (expiry, token, key))
        self._live[token] = (expiry, key)
        return token

    def discard(self, token: int) -> None:
        """The operation ended before its deadline (no-op if it expired or was discarded)."""
        self._live.pop(token, None)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [(e, t, k) for t, (e, k) in self._live.items()]
            heapq.heapify(self._heap)

    def get_timer(self) -> float | None:
        """When to call `handle_timer` next: the earliest live expiry rounded up to the
        granularity (deadlines close together share one wake-up); None when nothing is live."""
        heap = self._heap
        while heap and heap[0][1] not in self._live:
            heapq.heappop(heap)
        if not heap:
            return None
        return math.ceil(heap[0][0] / self.granularity) * self.granularity

    def handle_timer(self, now: float) -> list[K]:
        """The keys whose expiry is <= `now`, removed."""
        heap = self._heap
        expired: list[K] = []
        while heap and heap[0][0] <= now:
            _, token, key = heapq.heappop(heap)
            if self._live.pop(token, None) is not None:
                expired.append(key)
        return expired
