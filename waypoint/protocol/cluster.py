"""Per-destination ("cluster") accounting for the waypoint: load balancing, outlier detection
and connection-pool limits, with the clock and randomness injected.

Owns: `Cluster` (one service + subset + port), `EndpointStats` (per endpoint), and the
decisions: `pick` (LB over the non-ejected endpoints), `record` (a request's outcome ->
consecutive-error counters -> ejection), and `admit`/`release` (connectionPool limits).

Semantics (Envoy, as Istio configures it from a DestinationRule):
- LEAST_REQUEST: power of two random choices, fewer active requests wins; ROUND_ROBIN; RANDOM.
- Consistent hash (``consistentHash``): a ring of ``ring_size`` virtual nodes spread over the
  endpoints (Envoy's ring hash); the request's key (`hash_key`: a header, a cookie, the source
  IP or a query parameter) picks the first usable endpoint clockwise, so ejected or
  already-tried endpoints are skipped and every other key keeps its endpoint. With ``maglev``,
  a Maglev lookup table (Eisenbud et al., NSDI 2016, §3.4: per-endpoint offset/skip
  permutations filled in turns) of ``tableSize`` entries over the endpoints: each endpoint
  owns ~1/N of the table; a key whose entry is ejected or already tried is re-hashed (key +
  attempt number) to another entry, so other keys never move. A request without the key is
  balanced by `lb`; `hash_cookie` makes the cookie Envoy generates when ``httpCookie.ttl`` is
  set and the request has none (the key is then the new cookie's value).
- Outlier detection: ``consecutive5xxErrors`` 5xx responses (a connect failure or timeout counts
  as 5xx and as a gateway error) in a row eject the endpoint for ``baseEjectionTime`` x the
  number of times it was ejected; any non-5xx response resets the counters. At most
  ``maxEjectionPercent`` of the endpoints are ejected at once, but at least one may be (Envoy).
  Ejections end lazily at `pick` time once their deadline has passed (Envoy ends them at the
  next ``interval`` tick; the difference is at most one interval, in our favour).
  If every endpoint is ejected the cluster is in panic and balances over all of them (Envoy's
  healthy panic threshold).
- Connection pool: a request runs if fewer than min(tcp.maxConnections, http2MaxRequests)
  requests are active on the cluster; otherwise it waits if fewer than
  ``http1MaxPendingRequests`` are waiting, else it overflows (503, response flag UO).

Invariants: counters never go negative; `release` is called exactly once per admitted request
(the waypoint does it in a ``finally``).
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl

from meshcore.config.routes import ConsistentHash, LbPolicy, TrafficPolicy
from meshcore.identity import SpiffeId


@dataclass(slots=True, kw_only=True)
class EndpointStats:
    uid: str
    ip: str
    port: int
    """Target port on the workload."""
    identity: SpiffeId
    active: int = 0
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    requests: int = 0
    max_requests_per_connection: int = 0
    """DestinationRule ``connectionPool.http.maxRequestsPerConnection`` (0 = unlimited)."""
    idle_timeout: float | None = None
    """DestinationRule ``connectionPool.http.idleTimeout`` (None: the pool's own)."""

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSpec:
    uid: str
    ip: str
    port: int
    identity: SpiffeId


class Admission(enum.Enum):
    GO = "go"
    WAIT = "wait"
    OVERFLOW = "overflow"


@dataclass(slots=True)
class Cluster:
    name: str
    """``<host>|<subset>|<port>`` for logs."""
    policy: TrafficPolicy
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    active: int = 0
    pending: int = 0
    overflows: int = 0
    _rr: int = 0
    _ring: list[tuple[int, str]] = field(default_factory=list)
    _ring_key: tuple[int, tuple[str, ...]] = (0, ())
    _table: list[str] = field(default_factory=list)
    _table_key: tuple[int, tuple[str, ...]] = (0, ())

    def update(self, specs: Iterable[EndpointSpec], policy: TrafficPolicy) -> None:
        """New endpoint set (from a new mesh state): counters of endpoints that stay are kept."""
        self.policy = policy
        fresh: dict[str, EndpointStats] = {}
        for s in specs:
            cur = self.endpoints.get(s.uid)
            if cur is not None and (cur.ip, cur.port, cur.identity) == (s.ip, s.port, s.identity):
                fresh[s.uid] = cur
            else:
                fresh[s.uid] = EndpointStats(uid=s.uid, ip=s.ip, port=s.port, identity=s.identity)
            # Upstream connection limits travel with the endpoint to the connection pool.
            fresh[s.uid].max_requests_per_connection = policy.pool.max_requests_per_connection
            fresh[s.uid].idle_timeout = policy.pool.idle_timeout
        self.endpoints = fresh

    # ---- load balancing ----------------------------------------------------------------------

    def _ring_for(self, size: int) -> list[tuple[int, str]]:
        uids = tuple(sorted(self.endpoints))
        if self._ring_key != (size, uids):
            per = max(1, size // max(1, len(uids)))
            self._ring = sorted((_hash64(f"{uid}#{i}".encode()), uid)
                                for uid in uids for i in range(per))  # fmt: skip
            self._ring_key = (size, uids)
        return self._ring

    def _table_for(self, size: int) -> list[str]:
        """The Maglev lookup table (uids) for the current endpoints, rebuilt when they change."""
        uids = tuple(sorted(self.endpoints))
        if self._table_key != (size, uids):
            self._table = maglev_table(uids, size)
            self._table_key = (size, uids)
        return self._table

    def pick(
        self, now: float, rng: random.Random, avoid: Collection[str] = (),
        key: bytes | None = None,
    ) -> EndpointStats | None:  # fmt: skip
        """An endpoint for the next try: not ejected, not in `avoid` (hosts that already failed
        this request) unless nothing else is left; with a consistent-hash `key`, the first such
        endpoint clockwise from the key on the ring."""
        eps = sorted(self.endpoints.values(), key=lambda e: e.uid)
        if not eps:
            return None
        usable = [e for e in eps if not e.ejected(now)] or eps  # all ejected: panic
        fresh = [e for e in usable if e.uid not in avoid] or usable
        if key is not None and self.policy.hash is not None and self.policy.hash.maglev:
            table = self._table_for(self.policy.hash.ring_size)
            ok = {e.uid for e in fresh}
            for attempt in range(8 * len(eps) + 8):  # then `lb` (all but ~e^-8 of the time)
                h = _hash64(key if attempt == 0 else key + b"#%d" % attempt)
                uid = table[h % len(table)]
                if uid in ok:
                    return self.endpoints[uid]
        elif key is not None and self.policy.hash is not None:
            ring = self._ring_for(self.policy.hash.ring_size)
            ok = {e.uid for e in fresh}
            start = bisect.bisect_left(ring, (_hash64(key), ""))
            for i in range(len(ring)):
                uid = ring[(start + i) % len(ring)][1]
                if uid in ok:
                    return self.endpoints[uid]
        lb = self.policy.lb
        if len(fresh) == 1:
            return fresh[0]
        if lb is LbPolicy.RANDOM:
            return rng.choice(fresh)
        if lb is LbPolicy.ROUND_ROBIN or lb is LbPolicy.PASSTHROUGH:
            self._rr = (self._rr + 1) % len(fresh)
            return fresh[self._rr]
        a, b = rng.sample(fresh, 2)
        return a if a.active <= b.active else b

    # ---- outlier detection -------------------------------------------------------------------

    def record(self, ep: EndpointStats, status: int | None, now: float) -> bool:
        """Record a try's outcome (`status` None = connect failure/reset/timeout, counted as a
        503 gateway error). Returns True if this outcome ejected the endpoint."""
        ep.requests += 1
        od = self.policy.outlier
        code = 503 if status is None else status
        if code < 500:
            ep.consecutive_5xx = 0
            ep.consecutive_gateway = 0
            return False
        ep.consecutive_5xx += 1
        if code in (502, 503, 504):
            ep.consecutive_gateway += 1
        if od is None or ep.ejected(now):
            return False
        hit = (od.consecutive_5xx and ep.consecutive_5xx >= od.consecutive_5xx) or (
            od.consecutive_gateway and ep.consecutive_gateway >= od.consecutive_gateway
        )
        if not hit:
            return False
        ejected_now = sum(1 for e in self.endpoints.values() if e.ejected(now))
        limit = max(1, int(len(self.endpoints) * od.max_ejection_percent / 100))
        if ejected_now >= limit:
            return False
        ep.ejections += 1
        ep.ejected_until = now + od.base_ejection_time * ep.ejections
        ep.consecutive_5xx = 0
        ep.consecutive_gateway = 0
        return True

    # ---- connection pool -----------------------------------------------------------------------

    @property
    def max_active(self) -> int:
        pool = self.policy.pool
        return min(pool.max_connections, pool.max_requests)

    def admit(self) -> Admission:
        """GO: counted as active now. WAIT: counted as pending; call `promote` when woken.
        OVERFLOW: rejected (503 UO)."""
        if self.active < self.max_active and self.pending == 0:
            self.active += 1
            return Admission.GO
        if self.pending < self.policy.pool.max_pending:
            self.pending += 1
            return Admission.WAIT
        self.overflows += 1
        return Admission.OVERFLOW

    def can_promote(self) -> bool:
        return self.active < self.max_active

    def promote(self) -> None:
        """A waiting request becomes active."""
        self.pending -= 1
        self.active += 1

    def abandon(self) -> None:
        """A waiting request gave up (timeout or client gone)."""
        self.pending = max(0, self.pending - 1)

    def release(self) -> None:
        self.active = max(0, self.active - 1)


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def maglev_table(names: Sequence[str], size: int) -> list[str]:
    """Maglev's lookup table (NSDI 2016, §3.4, Pseudocode 1) of `size` (a prime) entries:
    endpoint i visits the slots ``(offset_i + j * skip_i) % size`` and, in turns, takes the
    first one still free; the result gives every endpoint ``size / N`` (+-1) slots."""
    if not names:
        return []
    perms = []
    for name in names:
        h = hashlib.blake2b(name.encode(), digest_size=16).digest()
        offset = int.from_bytes(h[:8], "big") % size
        skip = int.from_bytes(h[8:], "big") % (size - 1) + 1 if size > 1 else 1
        perms.append([offset, skip])
    table: list[str] = [""] * size
    filled = 0
    while True:
        for i, name in enumerate(names):
            offset, skip = perms[i]
            c = offset
            while table[c]:
                offset = (offset + skip) % size
                c = offset
            table[c] = name
            perms[i][0] = (offset + skip) % size
            filled += 1
            if filled == size:
                return table


def hash_cookie(policy: ConsistentHash, rng: random.Random) -> tuple[bytes, str]:
    """(hash key, ``set-cookie`` value) of a cookie the waypoint generates for a request
    without one, as Envoy's cookie hash policy with a ``ttl`` does: ``name="<16 hex>"`` with
    ``Max-Age`` (none when the ttl is 0: a session cookie), ``Path``, the configured attributes
    and ``HttpOnly``. Envoy derives the value from the downstream address and port (one per
    connection); the waypoint draws it from `rng` (one per client session, same spread)."""
    value = f"{rng.getrandbits(64):016x}"
    parts = [f'{policy.cookie}="{value}"']
    ttl = policy.cookie_ttl or 0.0
    if ttl > 0:
        parts.append(f"Max-Age={int(ttl)}")
    if policy.cookie_path:
        parts.append(f"Path={policy.cookie_path}")
    parts.extend(f"{n}={v}" if v else n for n, v in policy.cookie_attributes)
    parts.append("HttpOnly")
    return value.encode(), "; ".join(parts)


def hash_key(
    policy: ConsistentHash | None, headers: Sequence[tuple[str, str]], target: str, source_ip: str
) -> bytes | None:
    """The consistent-hash key of a request (None: no policy, or the request lacks the key:
    balanced by the simple policy, as Envoy does)."""
    if policy is None:
        return None
    if policy.source_ip:
        return source_ip.encode() if source_ip else None
    if policy.header:
        values = [v for k, v in headers if k == policy.header]
        return ",".join(values).encode() if values else None
    if policy.query_param:
        query = target.partition("?")[2]
        for k, v in parse_qsl(query, keep_blank_values=True, max_num_fields=1000):
            if k == policy.query_param:
                return v.encode()
        return None
    for k, v in headers:
        if k != "cookie":
            continue
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(v)
        except CookieError:
            continue
        if policy.cookie in jar:
            return jar[policy.cookie].value.encode()
    return None
