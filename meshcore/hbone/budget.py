"""Sliding-window budgets of the work an HBONE peer can cause cheaply (RFC 9113 §10.5).

Owns: `RateBudget`, its sizes (`BUDGET_WINDOW` and the per-connection and per-peer limits), and
`spend`, the connection error a connection raises when one runs out. Used by the HTTP/2
connection core (resets, PING/SETTINGS, empty DATA) and by `meshcore.hbone.peers` (the reset
budget all connections of one peer share).

Invariants: a budget counts events at the times given (`now`, never read here); an exhausted
budget is a connection error ENHANCE_YOUR_CALM (the caller answers it with GOAWAY).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshcore.errors import H2ProtocolError
from meshcore.hbone.frames import ErrorCode

# Sliding-window budgets (events per BUDGET_WINDOW seconds) of work a peer causes cheaply.
BUDGET_WINDOW = 10.0
RESET_BUDGET = 200  # streams reset before an answer, refused, or reset for a stream error
PEER_RESET_BUDGET = 1000  # the same, summed over all connections of one peer (`peer_resets`)
CONTROL_BUDGET = 1000  # PING and SETTINGS frames (each forces a reply frame)
EMPTY_DATA_BUDGET = 200  # zero-length DATA without END_STREAM (CVE-2019-9518)


@dataclass(slots=True)
class RateBudget:
    """At most `limit` events in any `window` seconds, estimated with two fixed buckets (the
    previous bucket weighted by its overlap with the sliding window). Time is passed in."""

    limit: int
    window: float
    _start: float = float("-inf")
    _current: int = 0
    _previous: int = 0

    def spend(self, now: float, cost: int = 1) -> bool:
        """Count `cost` events at `now`; False once the window holds more than `limit`."""
        elapsed = now - self._start
        if elapsed >= self.window:
            if elapsed < 2 * self.window:
                self._previous, self._start = self._current, self._start + self.window
            else:
                self._previous, self._start = 0, now
            self._current = 0
            elapsed = now - self._start
        self._current += cost
        overlap = 1.0 - elapsed / self.window
        return self._previous * overlap + self._current <= self.limit


def spend(budget: RateBudget, now: float, what: str) -> None:
    """Spend one event of `budget` at `now`; over it: ENHANCE_YOUR_CALM naming `what`."""
    if not budget.spend(now):
        raise H2ProtocolError(
            f"too many {what} (over {budget.limit} in {budget.window:.0f}s)",
            ErrorCode.ENHANCE_YOUR_CALM,
        )
