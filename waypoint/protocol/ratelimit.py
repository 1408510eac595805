"""Local rate limiting at the waypoint: token buckets and which ones a request draws from.

Owns: `TokenBucket`, `RateLimiter` (the buckets of every `RateLimitPolicy`, kept across config
updates while a policy's limits are unchanged) and `Verdict` (the outcome, with the values of
Envoy's ``x-ratelimit-*`` headers, draft-polli-ratelimit-headers-03 as Envoy's local_ratelimit
filter sends them: limit = bucket size, remaining = tokens left, reset = seconds until a token).

Semantics (`meshcore.config.ratelimit`): a request draws one token from every applicable
bucket (the policy's ``total`` bucket, and its per-client bucket: the override's when the
client's service account is listed, else ``identity``). It is admitted only when every bucket
has a token, and then takes one from each (a refused request takes nothing), so N concurrent
clients are admitted exactly ``capacity`` times at a frozen clock. Buckets start full.

Invariants: pure (clock passed as `now`); `take` has no await so it is atomic on the event loop;
per-client buckets per policy are bounded (`MAX_CLIENTS`; full buckets are dropped first, they
are equivalent to new ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshcore.config.ratelimit import RateLimitPolicy

MAX_CLIENTS = 10_000


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    rate: float
    """Tokens per second."""
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def reset_after(self) -> int:
        """Whole seconds until a token is available (0: one is)."""
        return 0 if self.tokens >= 1 else max(1, math.ceil((1 - self.tokens) / self.rate))


def new_bucket(rps: int, now: float) -> TokenBucket:
    return TokenBucket(capacity=float(rps), rate=float(rps), tokens=float(rps), stamp=now)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    allowed: bool
    policy: str = ""
    limit: int = 0
    remaining: int = 0
    reset: int = 0

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        if not self.limit:
            return ()
        return (
            ("x-ratelimit-limit", str(self.limit)),
            ("x-ratelimit-remaining", str(self.remaining)),
            ("x-ratelimit-reset", str(self.reset)),
        )


@dataclass(slots=True)
class _PolicyBuckets:
    policy: RateLimitPolicy
    total: TokenBucket | None
    clients: dict[str, TokenBucket] = field(default_factory=dict)


def applies(
    p: RateLimitPolicy,
    *,
    waypoint: tuple[str, str],
    service: tuple[str, str] | None,
    route_source: str,
    route_name: str,
) -> bool:
    """Whether `p` targets this request (waypoint = (namespace, name), service likewise)."""
    if p.target_kind == "Gateway":
        return (p.namespace, p.target_name) == waypoint
    if p.target_kind == "Service":
        return service is not None and (p.namespace, p.target_name) == service
    return route_source == f"HTTPRoute {p.namespace}/{p.target_name}" and (
        not p.section or p.section == route_name
    )


class RateLimiter:
    """Buckets for the current policies; `sync` keeps those whose policy did not change."""

    def __init__(self) -> None:
        self._state: dict[str, _PolicyBuckets] = {}

    def sync(self, policies: Sequence[RateLimitPolicy], now: float) -> None:
        state: dict[str, _PolicyBuckets] = {}
        for p in policies:
            cur = self._state.get(p.key)
            if cur is not None and cur.policy == p:
                state[p.key] = cur
            else:
                total = new_bucket(p.total, now) if p.total is not None else None
                state[p.key] = _PolicyBuckets(policy=p, total=total)
        self._state = state

    def _client_bucket(
        self, pb: _PolicyBuckets, client: tuple[str, str] | None, now: float
    ) -> TokenBucket | None:
        p = pb.policy
        rps = p.identity
        key = f"{client[0]}/{client[1]}" if client is not None else ""
        for o in p.overrides:
            if client is not None and client in o.clients:
                rps, key = o.rps, f"override:{key}"
                break
        if rps is None:
            return None
        b = pb.clients.get(key)
        if b is None:
            if len(pb.clients) >= MAX_CLIENTS:
                self._evict(pb, now)
            b = pb.clients[key] = new_bucket(rps, now)
        return b

    @staticmethod
    def _evict(pb: _PolicyBuckets, now: float) -> None:
        for k, b in list(pb.clients.items()):
            b.refill(now)
            if b.tokens >= b.capacity:
                del pb.clients[k]
        while len(pb.clients) >= MAX_CLIENTS:
            del pb.clients[next(iter(pb.clients))]  # the oldest

    def take(
        self, policies: Sequence[RateLimitPolicy], client: tuple[str, str] | None, now: float
    ) -> Verdict:
        """Admit (and take a token from every bucket) or refuse; `client` is the verified
        (namespace, service account), None without one."""
        buckets: list[tuple[str, TokenBucket]] = []
        for p in policies:
            pb = self._state.get(p.key)
            if pb is None:
                continue
            if pb.total is not None:
                buckets.append((p.key, pb.total))
            cb = self._client_bucket(pb, client, now)
            if cb is not None:
                buckets.append((p.key, cb))
        if not buckets:
            return Verdict(allowed=True)
        for _key, b in buckets:
            b.refill(now)
        empty = [(k, b) for k, b in buckets if b.tokens < 1]
        if empty:
            key, b = min(empty, key=lambda kb: kb[1].tokens)
            return Verdict(
                allowed=False, policy=key, limit=int(b.capacity), remaining=0, reset=b.reset_after()
            )
        for _key, b in buckets:
            b.tokens -= 1
        key, b = min(buckets, key=lambda kb: kb[1].tokens)
        return Verdict(
            allowed=True,
            policy=key,
            limit=int(b.capacity),
            remaining=int(b.tokens),
            reset=b.reset_after(),
        )
