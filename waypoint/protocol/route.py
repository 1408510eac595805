"""Pure per-request routing for the waypoint: decide first, the proxy carries it out.

Owns: `RequestInfo` (what routing and policy see of a request), `CompiledConfig` (a
`WaypointConfig` indexed by host), `select_route` (first matching rule, in
Istio's http[] order; HTTPRoutes before VirtualServices, both sorted by namespace/name),
`pick_destination` (weighted, rng injected), `rewrite_target`, `redirect_location` and
`retriable` (whether a try's outcome is retried: Envoy's ``retry_on`` conditions).

Invariants:
- Functions here are pure: same inputs (and rng state) -> same decision; no I/O, no clock.
- `RequestInfo.path` is already normalised (`waypoint.protocol.hygiene`, Istio's pathNormalization)
  before routing and authorization, and the normalised path is what is forwarded, so
  ``/a/../admin`` can neither dodge a deny on ``/admin`` nor reach it through a route for ``/a``.
- Weighted picks use integer weights over their sum: weights 90/10 give exactly 9:1 odds.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import parse_qsl

from meshcore.config.authorization import AuthzPolicy
from meshcore.config.matchers import MatchKind, host_matches
from meshcore.config.routes import (
    Destination,
    DestinationPolicy,
    HttpRoute,
    Redirect,
    RetryPolicy,
    RouteMatch,
    RouteTable,
    WaypointConfig,
)
from waypoint.protocol.jwt import JwtAuth

_NO_LABELS: Mapping[str, str] = MappingProxyType({})


class RequestInfo(NamedTuple):
    """One request as routing and authorization see it (immutable; a NamedTuple, not a frozen
    dataclass: one is built per request, and a frozen dataclass's ``__init__`` runs
    interpreted, one ``object.__setattr__`` per field, ~1 us for these twelve; built with
    keywords; ``_replace`` for a changed copy)."""

    method: str
    path: str
    """Normalised path, with the query (``/a/b?x=1``)."""
    authority: str
    """Host header / :authority as sent by the client."""
    scheme: str = "http"
    headers: tuple[tuple[str, str], ...] = ()
    """Lower-case names; repeats kept."""
    port: int = 0
    """Destination (service) port from the tunnel's :authority."""
    source_principal: str | None = None
    """Verified peer identity without ``spiffe://`` (``cluster.local/ns/x/sa/y``)."""
    source_ip: str = ""
    source_namespace: str | None = None
    source_labels: Mapping[str, str] = _NO_LABELS
    destination_ip: str = ""
    auth: JwtAuth | None = None
    """The JWT a RequestAuthentication verified (`waypoint.protocol.jwt`); None: none."""

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.path.split("?", 1)[1] if "?" in self.path else ""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None

    @property
    def host(self) -> str:
        """The authority without port, lower-cased."""
        a = self.authority.lower()
        if a.startswith("["):
            return a.split("]", 1)[0] + "]"
        return a.rsplit(":", 1)[0] if a.count(":") == 1 else a


def _segment_prefix(path: str, prefix: str) -> bool:
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def match_request(m: RouteMatch, req: RequestInfo) -> bool:
    if m.uri is not None:
        p = req.path_only
        if m.path_prefix_segments and m.uri.kind is MatchKind.PREFIX:
            if not _segment_prefix(p, m.uri.value):
                return False
        elif not m.uri.matches(p):
            return False
    if m.method is not None and not m.method.matches(req.method):
        return False
    if m.scheme is not None and not m.scheme.matches(req.scheme):
        return False
    if m.authority is not None and not m.authority.matches(req.authority):
        return False
    if m.port is not None and m.port != req.port:
        return False
    return _fields_match(m, req) and _source_matches(m, req)


def _fields_match(m: RouteMatch, req: RequestInfo) -> bool:
    """The header, absent-header and query parameter conditions of `m`."""
    for name, sm in m.headers:
        if not sm.matches(req.authority if name in (":authority", "host") else req.header(name)):
            return False
    for name, sm in m.without_headers:
        if sm.matches(req.header(name)):
            return False
    if m.query_params:
        params = dict(parse_qsl(req.query, keep_blank_values=True))
        for name, sm in m.query_params:
            if not sm.matches(params.get(name)):
                return False
    return True


def _source_matches(m: RouteMatch, req: RequestInfo) -> bool:
    """`sourceLabels` and `sourceNamespace` of `m` against the calling workload."""
    if m.source_labels and not all(req.source_labels.get(k) == v for k, v in m.source_labels):
        return False
    return not (m.source_namespace is not None and m.source_namespace != req.source_namespace)


class RouteChoice(NamedTuple):
    """The rule a request takes (a NamedTuple for the reason given at `RequestInfo`)."""

    route: HttpRoute
    match: RouteMatch | None
    """The match block that matched (None for a match-all rule)."""


class CompiledConfig:
    """A `WaypointConfig` indexed for the data path. Immutable after construction; a new
    config means a new instance, published by one assignment."""

    __slots__ = ("_dr_by_host", "_labels", "_route_cache", "config")

    def __init__(self, config: WaypointConfig) -> None:
        self.config = config
        self._labels: Mapping[str, Mapping[str, str]] = MappingProxyType(
            {uid: MappingProxyType(dict(lab)) for uid, lab in config.workload_labels}
        )
        drs: dict[str, DestinationPolicy] = {}
        for dr in config.destination_rules:
            # Istio: the first (oldest) rule for a host wins; we order by namespace/name.
            drs.setdefault(dr.host, dr)
        self._dr_by_host: Mapping[str, DestinationPolicy] = MappingProxyType(drs)
        self._route_cache: dict[str, tuple[HttpRoute, ...]] = {}

    def routes_for(self, host: str) -> tuple[HttpRoute, ...]:
        """Routes of every table bound to `host` (exact hosts first, then wildcards), in order.
        Memoised per host (the cache only ever holds values derived from `config`)."""
        cached = self._route_cache.get(host)
        if cached is not None:
            return cached
        exact: list[RouteTable] = []
        wild: list[RouteTable] = []
        for t in self.config.route_tables:
            if host in t.hosts:
                exact.append(t)
            elif any(host_matches(h, host) for h in t.hosts):
                wild.append(t)
        routes = tuple(r for t in (*exact, *wild) for r in t.routes)
        self._route_cache[host] = routes
        return routes

    def destination_rule(self, host: str) -> DestinationPolicy | None:
        return self._dr_by_host.get(host)

    def labels(self, uid: str) -> Mapping[str, str] | None:
        return self._labels.get(uid)

    @property
    def policies(self) -> tuple[AuthzPolicy, ...]:
        return self.config.policies


def select_route(routes: Sequence[HttpRoute], req: RequestInfo) -> RouteChoice | None:
    for route in routes:
        if not route.matches:
            return RouteChoice(route=route, match=None)
        for m in route.matches:
            if match_request(m, req):
                return RouteChoice(route=route, match=m)
    return None


def pick_destination(dests: Sequence[Destination], rng: random.Random) -> Destination:
    """Weighted choice over integer weights (a single destination always wins)."""
    if len(dests) == 1:
        return dests[0]
    total = 0
    for d in dests:
        total += d.weight
    # rng.randrange(total), drawn as CPython's Random._randbelow does (the same numbers from
    # the same state) without randrange's argument handling, a measurable share of a request.
    if total <= 0:
        raise ValueError("no destination has a weight")  # as randrange(0) did
    bits = total.bit_length()
    r = rng.getrandbits(bits)
    while r >= total:
        r = rng.getrandbits(bits)
    for d in dests:
        if r < d.weight:
            return d
        r -= d.weight
    raise AssertionError("unreachable: r < total")


def default_route(host: str, port: int) -> HttpRoute:
    """No VirtualService/HTTPRoute: everything goes to the addressed service and port."""
    return HttpRoute(
        name="default", source="default", destinations=(Destination(host=host, port=port),)
    )


def rewrite_target(choice: RouteChoice, path: str) -> str:
    """The request target after the route's rewrite (query kept unless replaced)."""
    rw = choice.route.rewrite
    if rw is None:
        return path
    p, sep, query = path.partition("?")
    if rw.full_path is not None:
        p = rw.full_path
    elif rw.uri_regex is not None:
        pattern, sub = rw.uri_regex
        p = re.sub(pattern, _envoy_subst(sub), p)
    elif rw.uri is not None:
        m = choice.match
        if m is not None and m.uri is not None and m.uri.kind is MatchKind.PREFIX:
            rest = p[len(m.uri.value) :]
            new = rw.uri
            if m.path_prefix_segments and new.endswith("/") and rest.startswith("/"):
                rest = rest[1:]
            p = (new + rest) or "/"
            if m.path_prefix_segments and not p.startswith("/"):
                p = "/" + p
        else:
            p = rw.uri
    return p + sep + query


def _envoy_subst(sub: str) -> str:
    """RE2/Envoy substitutions use ``\\1``; Python's re.sub understands the same."""
    return sub


def redirect_location(redirect: Redirect, choice: RouteChoice, req: RequestInfo) -> str:
    """The Location of a redirect response (absolute URI, RFC 9110 §10.2.2). Without a
    configured port the request's port is kept unless the scheme changes (then the scheme's
    default applies: Gateway API RequestRedirect rules)."""
    scheme = redirect.scheme or req.scheme
    host = redirect.authority or req.host
    port = redirect.port
    if port is None and redirect.scheme is None:
        a = req.authority
        tail = a.rsplit(":", 1)[1] if ":" in a and not a.endswith("]") else ""
        port = int(tail) if tail.isdigit() else None
    path = req.path
    if redirect.uri is not None:
        path = redirect.uri
    elif redirect.prefix is not None:
        m = choice.match
        if m is not None and m.uri is not None and m.uri.kind is MatchKind.PREFIX:
            rest = req.path_only[len(m.uri.value) :]
            path = (redirect.prefix.rstrip("/") + rest) or "/"
    default = {"http": 80, "https": 443}.get(scheme)
    authority = host if port is None or port == default else f"{host}:{port}"
    return f"{scheme}://{authority}{path}"


def labels_of(
    uid: str, canonical_name: str, canonical_revision: str, config: CompiledConfig
) -> Mapping[str, str]:
    """A workload's labels: the configured ones, else the canonical ones Istio derives from
    ``app``/``version`` (so ``subset: v1`` with ``labels: {version: v1}`` works in static mode
    without a label table)."""
    given = config.labels(uid)
    if given is not None:
        return given
    out: dict[str, str] = {}
    if canonical_name:
        out["app"] = canonical_name
        out["service.istio.io/canonical-name"] = canonical_name
    if canonical_revision:
        out["version"] = canonical_revision
        out["service.istio.io/canonical-revision"] = canonical_revision
    return out


# ---- retries -----------------------------------------------------------------------------------

_GRPC_RETRY = {
    "1": "cancelled",
    "4": "deadline-exceeded",
    "8": "resource-exhausted",
    "13": "internal",
    "14": "unavailable",
}


def retriable(policy: RetryPolicy, status: int | None, grpc_status: str | None) -> bool:
    """Whether a try's outcome is retried (Envoy retry_on semantics). `status` None = connect
    failure; -1 = reset before headers; -2 = per-try timeout."""
    on = policy.retry_on
    if status is None:
        return bool(on & {"connect-failure", "5xx", "gateway-error", "reset"})
    if status == -1:
        return bool(on & {"reset", "5xx", "refused-stream"})
    if status == -2:
        return bool(on & {"5xx", "gateway-error", "reset"})
    if "5xx" in on and status >= 500:
        return True
    if "gateway-error" in on and status in (502, 503, 504):
        return True
    if "retriable-4xx" in on and status == 409:
        return True
    if "retriable-status-codes" in on and status in policy.status_codes:
        return True
    return grpc_status is not None and _GRPC_RETRY.get(grpc_status, "") in on
