"""L7 configuration records: what a waypoint routes with, as parsed from the objects users
write (VirtualService, DestinationRule, HTTPRoute) plus the policies it enforces.

Owns: `WaypointConfig` and its parts (route tables and routes, destinations, retries, faults,
rewrites, redirects, mirrors, destination policies).

Invariants: records are frozen, slotted, keyword-only; tuples only; safe to share between
snapshots. Durations are seconds (float); percentages are 0..100 floats.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from meshcore.config.authorization import AuthzPolicy
from meshcore.config.findings import Finding
from meshcore.config.labels import Labels
from meshcore.config.matchers import StringMatcher
from meshcore.config.ratelimit import RateLimitPolicy

# ------------------------------------------------------------------------------- routing records


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderOps:
    """Header manipulation: set replaces, add appends, remove deletes (in that order: remove,
    set, add -- Envoy's request_headers_to_remove runs before additions)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)

    def apply(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        drop = set(self.remove) | {k for k, _ in self.set}
        out = [(k, v) for k, v in headers if k not in drop]
        out.extend(self.set)
        out.extend(self.add)
        return out


NO_HEADER_OPS = HeaderOps()


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    """One match block; every set condition must hold (AND). Istio's HTTPMatchRequest."""

    uri: StringMatcher | None = None
    path_prefix_segments: bool = False
    """Gateway API PathPrefix: a prefix matches only on '/' element boundaries."""
    scheme: StringMatcher | None = None
    method: StringMatcher | None = None
    authority: StringMatcher | None = None
    headers: tuple[tuple[str, StringMatcher], ...] = ()
    without_headers: tuple[tuple[str, StringMatcher], ...] = ()
    query_params: tuple[tuple[str, StringMatcher], ...] = ()
    port: int | None = None
    source_labels: Labels = ()
    source_namespace: str | None = None
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """Where a request goes: a host (FQDN), optional subset and port, with a weight."""

    host: str
    subset: str = ""
    port: int | None = None
    weight: int = 100
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS


RETRY_ON_DEFAULT = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    attempts: int = 2
    """Retries after the first try (Istio's ``attempts``)."""
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = RETRY_ON_DEFAULT
    """Envoy retry conditions: 5xx, gateway-error, reset, connect-failure, retriable-4xx,
    refused-stream, retriable-status-codes, and gRPC cancelled/deadline-exceeded/internal/
    resource-exhausted/unavailable."""
    status_codes: frozenset[int] = frozenset({503})
    """Codes retried under ``retriable-status-codes`` (a bare number in retryOn adds one)."""
    backoff_base: float = 0.025
    """Envoy's default base interval (25 ms), full jitter, x2 per retry, cap 10x base."""
    remote_localities: bool = False
    """``retryRemoteLocalities``: a retry leaves the locality priorities already tried (Envoy's
    previous_priorities retry plugin, as Istio configures it)."""


DEFAULT_RETRY = RetryPolicy(
    retry_on=RETRY_ON_DEFAULT | {"retriable-status-codes"}, status_codes=frozenset({503})
)
NO_RETRY = RetryPolicy(attempts=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    delay: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Rewrite:
    uri: str | None = None
    """Replace the matched prefix (prefix match) or the whole path (otherwise)."""
    full_path: str | None = None
    """Gateway API ReplaceFullPath."""
    uri_regex: tuple[str, str] | None = None
    """(pattern, substitution) over the path (Istio uriRegexRewrite)."""
    authority: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    uri: str | None = None
    """Replacement path; for Gateway API ReplacePrefixMatch, see `prefix`."""
    prefix: str | None = None
    """Replace only the matched prefix with this."""
    authority: str | None = None
    scheme: str | None = None
    port: int | None = None
    code: int = 301


@dataclass(frozen=True, slots=True, kw_only=True)
class Mirror:
    destination: Destination
    percent: float = 100.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CorsPolicy:
    """VirtualService ``corsPolicy`` / HTTPRoute ``CORS`` filter (`waypoint.protocol.cors`)."""

    allow_origins: tuple[StringMatcher, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: int | None = None
    """Seconds."""
    allow_credentials: bool = False
    forward_unmatched_preflights: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRoute:
    """One routing rule: first matching rule wins (Istio http[] order)."""

    name: str = ""
    source: str = ""
    """``VirtualService ns/name`` or ``HTTPRoute ns/name`` (for logs and debug)."""
    matches: tuple[RouteMatch, ...] = ()
    """ORed; empty = matches every request."""
    destinations: tuple[Destination, ...] = ()
    redirect: Redirect | None = None
    direct_status: int | None = None
    direct_body: str = ""
    rewrite: Rewrite | None = None
    timeout: float | None = None
    retries: RetryPolicy = DEFAULT_RETRY
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    section: str = ""
    """HTTPRoute ``rules[].name`` (a policy's ``targetRef.sectionName``)."""
    cors: CorsPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteTable:
    """The routes of one VirtualService or HTTPRoute, bound to hosts (FQDNs / wildcards)."""

    kind: str
    namespace: str
    name: str
    hosts: tuple[str, ...]
    routes: tuple[HttpRoute, ...]


# ------------------------------------------------------------------------------- destination rules


class LbPolicy(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    """0 = off (Envoy's default for gateway errors)."""
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPool:
    max_connections: int = 2**31 - 1
    max_pending: int = 2**31 - 1
    max_requests: int = 2**31 - 1
    max_requests_per_connection: int = 0
    """0 = unlimited."""
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistentHash:
    """DestinationRule ``loadBalancer.consistentHash``: what the hash key is (exactly one)."""

    header: str = ""
    cookie: str = ""
    cookie_ttl: float | None = None
    """``httpCookie.ttl``: set -> the waypoint generates the cookie when a request lacks it
    (0: a session cookie), as Envoy does."""
    cookie_path: str = ""
    cookie_attributes: tuple[tuple[str, str], ...] = ()
    """``httpCookie.attributes`` (name, value; value "" -> a bare attribute such as Secure)."""
    source_ip: bool = False
    query_param: str = ""
    ring_size: int = 1024
    """Virtual nodes on the ring (``ringHash.minimumRingSize``) or Maglev's table size."""
    maglev: bool = False
    """``maglev``: a Maglev lookup table of `ring_size` (a prime) entries instead of a ring."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityLb:
    """DestinationRule ``loadBalancer.localityLbSetting`` (Istio's mesh default: enabled, no
    rules: locality-prioritized failover whenever outlier detection is configured)."""

    enabled: bool = True
    distribute: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    """(from locality pattern, ((to locality pattern, weight percent), ...))."""
    failover: tuple[tuple[str, str], ...] = ()
    """(from region, to region)."""
    failover_priority: tuple[str, ...] = ()
    """Ordered labels (``topology.kubernetes.io/region|zone``, ``topology.istio.io/subzone``,
    ``topology.istio.io/network`` or pod labels), each ``label`` (the endpoint's value must
    equal the client's) or ``label=value`` (the endpoint's value must equal ``value``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy:
    lb: LbPolicy = LbPolicy.LEAST_REQUEST
    """Istio's default is LEAST_REQUEST."""
    hash: ConsistentHash | None = None
    """Consistent-hash load balancing (instead of `lb`)."""
    outlier: OutlierDetection | None = None
    pool: ConnectionPool = ConnectionPool()
    port_overrides: tuple[tuple[int, TrafficPolicy], ...] = ()
    locality: LocalityLb = LocalityLb()


@dataclass(frozen=True, slots=True, kw_only=True)
class Subset:
    name: str
    labels: Labels
    policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationPolicy:
    """A DestinationRule: subsets and traffic policy for one host."""

    namespace: str
    name: str
    host: str
    subsets: tuple[Subset, ...] = ()
    policy: TrafficPolicy = TrafficPolicy()

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def policy_for(self, subset: str, port: int | None) -> TrafficPolicy:
        """Subset policy over the rule's, then a port-level override (Istio precedence)."""
        sub = self.subset(subset) if subset else None
        pol = sub.policy if sub is not None and sub.policy is not None else self.policy
        for p, override in pol.port_overrides:
            if p == port:
                return override
        return pol


@dataclass(frozen=True, slots=True, kw_only=True)
class L4Route:
    """A TCPRoute or TLSRoute (`meshcore.config.l4routes`): connections to `hosts` (service
    FQDNs; `port`: only that service port) go to the weighted `backends`; a TLSRoute's `sni`
    (exact or ``*.suffix``) must match the ClientHello's server name."""

    kind: str
    namespace: str
    name: str
    hosts: tuple[str, ...]
    port: int | None = None
    sni: tuple[str, ...] = ()
    backends: tuple[Destination, ...] = ()

    @property
    def source(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def sni_matches(self, server_name: str | None) -> bool:
        if not self.sni:
            return True
        if server_name is None:
            return False
        for h in self.sni:
            if h.startswith("*."):
                if server_name.endswith(h[1:]) and len(server_name) > len(h) - 1:
                    return True
            elif h == server_name:
                return True
        return False


# ------------------------------------------------------------------------------- whole config


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointConfig:
    """Everything L7 a waypoint needs, as parsed. `CompiledConfig` (waypoint.protocol.route)
    indexes it for the data path."""

    route_tables: tuple[RouteTable, ...] = ()
    destination_rules: tuple[DestinationPolicy, ...] = ()
    policies: tuple[AuthzPolicy, ...] = ()
    workload_labels: tuple[tuple[str, Labels], ...] = ()
    """Workload uid -> labels (DestinationRule subsets, sourceLabels, selectors)."""
    warnings: tuple[str, ...] = ()
    findings: tuple[tuple[str, Finding], ...] = ()
    """(object reference, finding) for every reported field (`meshcore.config.fields`)."""
    rate_limits: tuple[RateLimitPolicy, ...] = ()
    """HTTPLocalRateLimitPolicy objects (`meshcore.config.ratelimit`)."""
    l4_routes: tuple[L4Route, ...] = ()
    """TCPRoute and TLSRoute objects, by namespace/name."""
