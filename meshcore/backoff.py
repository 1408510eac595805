"""The one jittered exponential backoff every retry loop uses (rng and sleep injected).

Owns: `Backoff`, the pure schedule (delay of retry number `attempt`), and `Retry`, the small
stateful helper a retry loop holds (attempt counter, the rng, the sleep it awaits).

Schedule: ``base = min(cap, initial * multiplier ** attempt)``, then
- proportional jitter (default): ``base * (1 + uniform(-jitter, +jitter))``: the cap applies
  before the jitter, so a capped delay lies in ``[cap * (1 - jitter), cap * (1 + jitter)]``
  (ztunnel's ExponentialBackoff for certificate fetches and xDS reconnects);
- full jitter (``full=True``): ``uniform(0, base)`` (Envoy's router retry back-off,
  https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_filters/router_filter
  "x-envoy-max-retries": "fully jittered exponential back-off").

Invariants: pure given the rng (exactly one ``rng.uniform`` call per jittered delay, none
without jitter, so a seeded rng gives the same sequence as before this module existed); never
negative; the exponent is clamped so a large attempt number cannot overflow; ``attempt < 0``
is a programming error (ValueError).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """A retry schedule; `delay(attempt, rng)` is the wait before retry number `attempt`."""

    initial: float
    cap: float
    multiplier: float = 2.0
    jitter: float = 0.2
    """Proportional jitter (±); ignored when `full`."""
    full: bool = False
    """Full jitter: uniform(0, base)."""

    def base(self, attempt: int) -> float:
        """The un-jittered delay of retry `attempt` (0 = first retry after the first failure)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        return min(self.cap, self.initial * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = self.base(attempt)
        if self.full:
            return rng.uniform(0, base)
        if not self.jitter:
            return base
        return base * (1.0 + rng.uniform(-self.jitter, self.jitter))


class Retry:
    """A retry loop's state: `await wait()` after a failure, `reset()` after a success."""

    def __init__(
        self,
        schedule: Backoff,
        *,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.schedule = schedule
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next retry; advances the attempt counter."""
        delay = self.schedule.delay(self.attempt, self.rng)
        self.attempt += 1
        return delay

    async def wait(self, delay: float | None = None) -> None:
        """Sleep `delay` (default: `next_delay()`)."""
        await self.sleep(self.next_delay() if delay is None else delay)
