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
- Locality (``localityLbSetting``; the balancing proxy is the waypoint, so its `Origin` is the
  client's locality, as in Istio ambient): with ``distribute`` rules whose ``from`` matches the
  origin, localities get the ``to`` weights (localities matching one pattern share its weight;
  unlisted ones get none) and a request first picks a locality by weight x availability
  (min(1, 1.4 x healthy/total), Envoy's overprovisioning factor); otherwise, when outlier
  detection is configured (Istio applies failover only then), endpoints get priorities: by
  ``failoverPriority`` (the number of trailing entries not matched; an entry ``label`` matches
  the origin's value, ``label=value`` that value), or by locality (0: same
  region/zone/subzone, 1: same region/zone, 2: same region, 3: the region a ``failover`` rule
  of the origin's region names, 4: any other; 3 when there is no rule), or, with both
  ``failoverPriority`` and ``failover``, label priority x 5 + locality priority (Istio's
  order: locality failover within each label priority). A request picks a
  priority by Envoy's health spill-over: priority p gets min(100, 140 x healthy_p/total_p)
  percent of the load that the better priorities left (scaled up when the total is under
  100), so traffic leaves a locality as its endpoints are ejected. All ejected: panic over all.
  The LB policy / hash then picks within the chosen set.
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

from meshcore.config.routes import ConsistentHash, LbPolicy, LocalityLb, TrafficPolicy
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
    priority: int = 0
    """Locality failover priority (0 = best; `priorities`)."""
    locality: str = ""
    """``region/zone/subzone`` (distribute weights)."""

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSpec:
    uid: str
    ip: str
    port: int
    identity: SpiffeId
    locality: tuple[str, str, str] = ("", "", "")
    """(region, zone, subzone)."""
    network: str = ""
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Origin:
    """Where the balancing proxy runs (its locality, network and labels), for locality LB."""

    locality: tuple[str, str, str] = ("", "", "")
    network: str = ""
    labels: tuple[tuple[str, str], ...] = ()


_LOCALITY_LABELS = {
    "topology.kubernetes.io/region": 0,
    "topology.kubernetes.io/zone": 1,
    "topology.istio.io/subzone": 2,
}


def _label(
    locality: tuple[str, str, str], network: str, labels: Sequence[tuple[str, str]], name: str
) -> str | None:
    if name in _LOCALITY_LABELS:
        return locality[_LOCALITY_LABELS[name]]
    if name == "topology.istio.io/network":
        return network
    return next((v for k, v in labels if k == name), None)


def _locality_text(loc: tuple[str, str, str]) -> str:
    return "/".join(loc).rstrip("/")


def locality_matches(pattern: str, loc: tuple[str, str, str]) -> bool:
    """Istio's locality match: ``region[/zone[/subzone]]``, segment by segment; ``*`` or a
    missing zone/subzone matches any."""
    parts = pattern.split("/")
    parts += [""] * (3 - len(parts))
    if parts[0] != "*" and parts[0] != loc[0]:
        return False
    return all(p in ("", "*") or p == have for p, have in zip(parts[1:], loc[1:], strict=True))


def _label_priorities(
    entries: Sequence[str], origin: Origin, specs: Sequence[EndpointSpec]
) -> list[int]:
    """``failoverPriority``: N minus the number of leading entries the endpoint matches. An
    entry ``label`` matches when the endpoint's value equals the client's; ``label=value``
    when the endpoint's value equals ``value`` (Istio DestinationRule reference: "Specify
    labels with key and value [key1=value1, ...], istio would compare the labels with
    endpoints"). A label missing on either side reads as "" (Istio compares label maps, where
    a missing key is the empty value), so a label both lack matches."""
    wants: list[tuple[str, str]] = []
    for entry in entries:
        name, eq, value = entry.partition("=")
        own = _label(origin.locality, origin.network, origin.labels, name)
        wants.append((name, value if eq else own or ""))
    out = []
    for s in specs:
        n = 0
        for name, want in wants:
            if (_label(s.locality, s.network, s.labels, name) or "") != want:
                break
            n += 1
        out.append(len(wants) - n)
    return out


def priorities(policy: TrafficPolicy, origin: Origin, specs: Sequence[EndpointSpec]) -> list[int]:
    """Each endpoint's priority (0 = best) under ``localityLbSetting`` failover (module doc)."""
    loc = policy.locality
    if loc.failover_priority:
        by_label = _label_priorities(loc.failover_priority, origin, specs)
        if not loc.failover:
            return by_label
        # Both set: Istio applies the label priorities, then locality failover within each
        # (label priority x 5 + locality priority 0-4; ApplyLocalityLoadBalancer). Only the
        # order matters here: `Cluster` groups by value, best first.
        return [
            5 * p + q
            for p, q in zip(by_label, _locality_priorities(loc, origin, specs), strict=True)
        ]
    return _locality_priorities(loc, origin, specs)


def _locality_priorities(
    loc: LocalityLb, origin: Origin, specs: Sequence[EndpointSpec]
) -> list[int]:
    region, zone, subzone = origin.locality
    to = {b for a, b in loc.failover if a == region}
    out = []
    for s in specs:
        r, z, sz = s.locality
        if r == region and z == zone and sz == subzone:
            out.append(0)
        elif r == region and z == zone:
            out.append(1)
        elif r == region:
            out.append(2)
        elif r in to:
            out.append(3)
        else:
            out.append(4 if to else 3)
    return out


def locality_weights(
    policy: TrafficPolicy, origin: Origin, specs: Sequence[EndpointSpec]
) -> dict[str, float] | None:
    """Locality text -> weight under the first ``distribute`` rule matching the origin (None:
    no rule applies)."""
    for src, to in policy.locality.distribute:
        if not locality_matches(src, origin.locality):
            continue
        localities = sorted({s.locality for s in specs})
        weights: dict[str, float] = {_locality_text(x): 0.0 for x in localities}
        taken: set[tuple[str, str, str]] = set()
        for pattern, w in to:
            group = [x for x in localities if x not in taken and locality_matches(pattern, x)]
            for x in group:
                weights[_locality_text(x)] = w / len(group)
                taken.add(x)
        return weights
    return None


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
    _mode: str = ""
    """"": no locality LB; "priority": failover priorities; "weighted": distribute weights."""
    _weights: dict[str, float] = field(default_factory=dict)

    def update(
        self, specs: Iterable[EndpointSpec], policy: TrafficPolicy, origin: Origin | None = None
    ) -> None:
        """New endpoint set (from a new mesh state): counters of endpoints that stay are kept.
        `origin`: the waypoint's locality, for ``localityLbSetting`` (None: no locality LB)."""
        self.policy = policy
        specs = list(specs)
        prios = [0] * len(specs)
        self._mode = ""
        loc = policy.locality
        if origin is not None and loc.enabled:
            weights = locality_weights(policy, origin, specs)
            if weights is not None:
                self._mode, self._weights = "weighted", weights
            elif policy.outlier is not None:
                prios = priorities(policy, origin, specs)
                self._mode = "priority" if len(set(prios)) > 1 else ""
        fresh: dict[str, EndpointStats] = {}
        for s, prio in zip(specs, prios, strict=True):
            cur = self.endpoints.get(s.uid)
            if cur is not None and (cur.ip, cur.port, cur.identity) == (s.ip, s.port, s.identity):
                fresh[s.uid] = cur
            else:
                fresh[s.uid] = EndpointStats(uid=s.uid, ip=s.ip, port=s.port, identity=s.identity)
            fresh[s.uid].priority = prio
            fresh[s.uid].locality = _locality_text(s.locality)
            # Upstream connection limits travel with the endpoint to the connection pool.
            fresh[s.uid].max_requests_per_connection = policy.pool.max_requests_per_connection
            fresh[s.uid].idle_timeout = policy.pool.idle_timeout
        self.endpoints = fresh

    # ---- load balancing ----------------------------------------------------------------------

    def _ring_for(self, size: int) -> list[tuple[int, str]]:
        uids = tuple(sorted(self.endpoints))
        if self._ring_key != (size, uids):
            per = max(1, size // max(1, len(uids)))
            self._ring = sorted(
                (_hash64(f"{uid}#{i}".encode()), uid) for uid in uids for i in range(per)
            )
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
        self,
        now: float,
        rng: random.Random,
        avoid: Collection[str] = (),
        key: bytes | None = None,
        avoid_priorities: Collection[int] = (),
    ) -> EndpointStats | None:
        """An endpoint for the next try: not ejected, not in `avoid` (hosts that already failed
        this request) unless nothing else is left; with a consistent-hash `key`, the first such
        endpoint clockwise from the key on the ring. `avoid_priorities`: locality priorities a
        ``retryRemoteLocalities`` retry leaves (unless no other is left)."""
        eps = sorted(self.endpoints.values(), key=lambda e: e.uid)
        if not eps:
            return None
        if self._mode == "priority" and avoid_priorities:
            eps = [e for e in eps if e.priority not in avoid_priorities] or eps
        if self._mode:
            eps = self._locality_set(eps, now, rng)
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

    def _locality_set(
        self, eps: list[EndpointStats], now: float, rng: random.Random
    ) -> list[EndpointStats]:
        """The endpoints of the priority (or locality) this request goes to (module doc)."""
        prio = self._mode == "priority"
        groups: dict[str, list[EndpointStats]] = {}
        for e in eps:  # priority keys zero-padded: sorted = best first
            groups.setdefault(f"{e.priority:04d}" if prio else e.locality, []).append(e)
        shares: list[tuple[float, list[EndpointStats]]] = []
        for key in sorted(groups):
            members = groups[key]
            healthy = sum(1 for e in members if not e.ejected(now))
            avail = min(1.0, 1.4 * healthy / len(members))
            weight = 100.0 if prio else self._weights.get(key, 0.0)
            shares.append((weight * avail, members))
        total = sum(w for w, _m in shares)
        if total <= 0:
            return eps  # nothing available anywhere: panic over all endpoints
        if prio:
            # Envoy's spill-over: each priority takes what the better ones left, up to its
            # health; a total under 100 is scaled up to 100.
            scale = 100.0 / total if total < 100 else 1.0
            left, loads = 100.0, []
            for w, members in shares:
                take = min(left, w * scale)
                left -= take
                loads.append((take, members))
            shares = loads
            total = 100.0
        live = [(w, m) for w, m in shares if w > 0]
        if len(live) == 1:
            return live[0][1]
        r = rng.random() * total
        for w, members in live:
            r -= w
            if r < 0:
                return members
        return live[-1][1]

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
