"""L7 configuration for a waypoint: frozen records parsed from the objects users write.

Owns: `WaypointConfig` and its parts, and `parse_objects`, which reads Istio `VirtualService`
(networking.istio.io v1/v1beta1/v1alpha3), `DestinationRule`, Gateway API `HTTPRoute`
(gateway.networking.k8s.io) and `AuthorizationPolicy` (security.istio.io) exactly as written in
YAML, resolving short host names against the object's namespace (``reviews`` in namespace
``default`` is ``reviews.default.svc.cluster.local``, as Istio does).

Sources for semantics (public docs, 2026): istio.io "Virtual Service", "Destination Rule",
"Authorization Policy" references; Gateway API v1 HTTPRoute spec (match precedence, filters).

Invariants:
- Records are frozen, slotted, keyword-only; tuples only; safe to share between snapshots.
- A malformed object is left out with a warning naming object and field, never half-applied;
  EXCEPT an AuthorizationPolicy, which fails closed: a policy whose rules cannot be read
  becomes an ALLOW policy with no rules for its targets (allows nothing) until it is fixed,
  because skipping it could silently widen access.
- Durations are seconds (float); percentages are 0..100 floats.
- Unsupported attributes in a policy rule are read the SAFE way (the control plane's rule for
  node proxies): an ALLOW rule using one is dropped (matches nothing), a DENY rule ignores it
  (matches on the rest, so it denies more, never less).

Deliberate differences (documented in docs/waypoint.md): when no DestinationRule defines a
subset a route names, the subset selects ``version: <subset name>`` (with a warning) instead of
failing every request with 503; retries default to Istio's default policy (2 attempts on
connect-failure, refused-stream, unavailable, cancelled, 503).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshcore.config.authorization import AuthzPolicy, l7_warnings, parse_policy
from meshcore.config.fields import INVALID, NOTE, Finding, check_object, kind_support
from meshcore.config.labels import Labels, selector_matches
from meshcore.errors import ConfigError

DEFAULT_DOMAIN_SUFFIX = "cluster.local"


# ------------------------------------------------------------------------------- primitives


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatcher:
    """An Istio StringMatch (exact/prefix/regex) or a presence test."""

    kind: MatchKind
    value: str = ""
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False)
    """Compiled regex (REGEX only); full-match semantics as RE2 in Envoy."""

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.kind is MatchKind.PRESENT:
            return True
        if self.kind is MatchKind.REGEX:
            assert self.pattern is not None
            return self.pattern.fullmatch(text) is not None
        a, b = (text.lower(), self.value.lower()) if self.ignore_case else (text, self.value)
        return a == b if self.kind is MatchKind.EXACT else a.startswith(b)


def matcher(kind: MatchKind, value: str = "", *, ignore_case: bool = False) -> StringMatcher:
    pattern = None
    if kind is MatchKind.REGEX:
        try:
            pattern = re.compile(value, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ConfigError("regex", f"bad regular expression {value!r}: {exc}") from None
    return StringMatcher(kind=kind, value=value, ignore_case=ignore_case, pattern=pattern)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")


def parse_duration(value: object, path: str) -> float:
    """``1.5s``, ``500ms``, ``1m30s``, ``2h`` (protobuf Duration JSON and GEP-2257) -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a duration like '1.5s', got {value!r}")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            break
        number, unit = float(m.group(1)), m.group(2)
        total += number * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
        pos = m.end()
    if pos != len(value) or pos == 0:
        raise ConfigError(path, f"bad duration {value!r}")
    return total


def _percentage(obj: Mapping[str, Any], path: str, default: float = 100.0) -> float:
    """``percentage: {value: 12.5}`` or the older integer ``percent`` (0..100)."""
    if "percentage" in obj:
        pct = obj["percentage"]
        value = pct.get("value", 0.0) if isinstance(pct, Mapping) else pct
        key = f"{path}.percentage"
    elif "percent" in obj:
        value, key = obj["percent"], f"{path}.percent"
    else:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
        raise ConfigError(key, f"expected a percentage 0..100, got {value!r}")
    return float(value)


def _map(value: object, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected an object, got {type(value).__name__}")
    return value


def _seq(value: object, path: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {type(value).__name__}")
    return value


def _text(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {value!r}")
    return value


def _int(value: object, path: str, lo: int = 0, hi: int = 2**31 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(path, f"expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def _labels(value: object, path: str) -> Labels:
    m = _map(value, path)
    return tuple(sorted((str(k), str(v)) for k, v in m.items()))


labels_match = selector_matches


def resolve_host(host: str, namespace: str, suffix: str = DEFAULT_DOMAIN_SUFFIX) -> str:
    """Short names are relative to the config's namespace (Istio): ``reviews`` ->
    ``reviews.<ns>.svc.<suffix>``; ``reviews.prod`` -> ``reviews.prod.svc.<suffix>``;
    ``x.ns.svc`` gets the suffix; anything else (FQDN, wildcard) is kept, lower-cased."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("*"):
        return h
    dots = h.count(".")
    if dots == 0:
        return f"{h}.{namespace}.svc.{suffix}"
    if dots == 1:
        return f"{h}.svc.{suffix}"
    if h.endswith(".svc"):
        return f"{h}.{suffix}"
    return h


def host_matches(pattern: str, host: str) -> bool:
    """VirtualService host matching: exact, or ``*.example.com`` / ``*`` wildcard."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


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
class TrafficPolicy:
    lb: LbPolicy = LbPolicy.LEAST_REQUEST
    """Istio's default is LEAST_REQUEST."""
    outlier: OutlierDetection | None = None
    pool: ConnectionPool = ConnectionPool()
    port_overrides: tuple[tuple[int, TrafficPolicy], ...] = ()


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


# ------------------------------------------------------------------------------- whole config


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointConfig:
    """Everything L7 a waypoint needs, as parsed. `CompiledConfig` (meshcore.l7.route)
    indexes it for the data path."""

    route_tables: tuple[RouteTable, ...] = ()
    destination_rules: tuple[DestinationPolicy, ...] = ()
    policies: tuple[AuthzPolicy, ...] = ()
    workload_labels: tuple[tuple[str, Labels], ...] = ()
    """Workload uid -> labels (DestinationRule subsets, sourceLabels, selectors)."""
    warnings: tuple[str, ...] = ()
    findings: tuple[tuple[str, Finding], ...] = ()
    """(object reference, finding) for every reported field (`meshcore.config.fields`)."""


# ------------------------------------------------------------------------------- parsing


@dataclass(slots=True)
class _Ctx:
    ref: str
    namespace: str
    suffix: str
    warnings: list[str]
    findings: list[tuple[str, Finding]] = field(default_factory=list)

    def warn(self, message: str, path: str = "") -> None:
        """A warning about a value (fields themselves are reported from the field table)."""
        finding = Finding(code=NOTE, level="Warning", path=path, message=message)
        self.warnings.append(f"{self.ref}: {finding.render()}")
        self.findings.append((self.ref, finding))


def _string_match(value: object, path: str) -> StringMatcher:
    m = _map(value, path)
    ignore = bool(m.get("ignoreCase", False))
    for key, kind in (("exact", MatchKind.EXACT), ("prefix", MatchKind.PREFIX)):
        if key in m:
            return matcher(kind, _text(m[key], f"{path}.{key}"), ignore_case=ignore)
    if "regex" in m:
        try:
            return matcher(MatchKind.REGEX, _text(m["regex"], f"{path}.regex"), ignore_case=ignore)
        except ConfigError as exc:
            raise ConfigError(f"{path}.regex", exc.message) from None
    if not m:
        return matcher(MatchKind.PRESENT)
    raise ConfigError(path, f"expected exact, prefix or regex, got {sorted(m)}")


def _named_matches(value: object, path: str) -> tuple[tuple[str, StringMatcher], ...]:
    m = _map(value, path)
    return tuple((str(k).lower(), _string_match(v, f"{path}.{k}")) for k, v in m.items())


def _vs_match(value: object, path: str, ctx: _Ctx) -> RouteMatch:
    m = _map(value, path)
    known = {
        "name", "uri", "scheme", "method", "authority", "headers", "withoutHeaders", "port",
        "queryParams", "sourceLabels", "sourceNamespace", "ignoreUriCase", "gateways",
        "statPrefix",
    }  # fmt: skip
    for key in m:
        if key not in known:
            raise ConfigError(f"{path}.{key}", "unknown field")
    uri = None
    if "uri" in m:
        uri = _string_match(m["uri"], f"{path}.uri")
        if m.get("ignoreUriCase"):
            uri = matcher(uri.kind, uri.value, ignore_case=True)
    if "gateways" in m and "mesh" not in m["gateways"]:
        ctx.warn("names no 'mesh': this match never applies at a waypoint", f"{path}.gateways")
    return RouteMatch(
        name=str(m.get("name", "")),
        uri=uri,
        scheme=_string_match(m["scheme"], f"{path}.scheme") if "scheme" in m else None,
        method=_string_match(m["method"], f"{path}.method") if "method" in m else None,
        authority=_string_match(m["authority"], f"{path}.authority") if "authority" in m else None,
        headers=_named_matches(m.get("headers"), f"{path}.headers"),
        without_headers=_named_matches(m.get("withoutHeaders"), f"{path}.withoutHeaders"),
        query_params=tuple(
            (k, v) for k, v in _named_matches(m.get("queryParams"), f"{path}.queryParams")
        ),
        port=_int(m["port"], f"{path}.port", 1, 65535) if "port" in m else None,
        source_labels=_labels(m.get("sourceLabels"), f"{path}.sourceLabels"),
        source_namespace=str(m["sourceNamespace"]) if "sourceNamespace" in m else None,
    )


def _header_ops(value: object, path: str) -> HeaderOps:
    m = _map(value, path)
    return HeaderOps(
        set=tuple((str(k).lower(), str(v)) for k, v in _map(m.get("set"), f"{path}.set").items()),
        add=tuple((str(k).lower(), str(v)) for k, v in _map(m.get("add"), f"{path}.add").items()),
        remove=tuple(str(x).lower() for x in _seq(m.get("remove"), f"{path}.remove")),
    )


def _vs_headers(value: object, path: str) -> tuple[HeaderOps, HeaderOps]:
    m = _map(value, path)
    return _header_ops(m.get("request"), f"{path}.request"), _header_ops(
        m.get("response"), f"{path}.response"
    )


def _vs_destination(value: object, path: str, ctx: _Ctx, *, weight: int) -> Destination:
    m = _map(value, path)
    host = _text(m.get("host"), f"{path}.host")
    port = None
    if "port" in m:
        port = _int(_map(m["port"], f"{path}.port").get("number"), f"{path}.port.number", 1, 65535)
    return Destination(
        host=resolve_host(host, ctx.namespace, ctx.suffix),
        subset=str(m.get("subset", "")),
        port=port,
        weight=weight,
    )


def _retry(value: object, path: str) -> RetryPolicy:
    m = _map(value, path)
    attempts = _int(m.get("attempts", 2), f"{path}.attempts", 0, 1000)
    per_try = (
        parse_duration(m["perTryTimeout"], f"{path}.perTryTimeout")
        if "perTryTimeout" in m
        else None
    )
    on: set[str] = set()
    codes: set[int] = set()
    if "retryOn" in m:
        for tok in _text(m["retryOn"], f"{path}.retryOn").split(","):
            tok = tok.strip().lower()
            if tok.isdigit():
                codes.add(int(tok))
                on.add("retriable-status-codes")
            elif tok:
                on.add(tok)
    else:
        on = set(DEFAULT_RETRY.retry_on)
        codes = set(DEFAULT_RETRY.status_codes)
    return RetryPolicy(
        attempts=attempts, per_try_timeout=per_try, retry_on=frozenset(on),
        status_codes=frozenset(codes),
    )  # fmt: skip


def _fault(value: object, path: str, ctx: _Ctx) -> Fault:
    m = _map(value, path)
    delay, delay_pct, abort, abort_pct = None, 100.0, None, 100.0
    if "delay" in m:
        d = _map(m["delay"], f"{path}.delay")
        if "fixedDelay" not in d:
            raise ConfigError(f"{path}.delay", "fixedDelay is required (exponentialDelay is not)")
        delay = parse_duration(d["fixedDelay"], f"{path}.delay.fixedDelay")
        delay_pct = _percentage(d, f"{path}.delay")
    if "abort" in m:
        a = _map(m["abort"], f"{path}.abort")
        if "httpStatus" in a:
            abort = _int(a["httpStatus"], f"{path}.abort.httpStatus", 200, 599)
        else:
            raise ConfigError(f"{path}.abort", "only httpStatus aborts are supported")
        abort_pct = _percentage(a, f"{path}.abort")
    return Fault(delay=delay, delay_percent=delay_pct, abort_status=abort, abort_percent=abort_pct)


def _vs_http_route(value: object, path: str, ctx: _Ctx, source: str) -> HttpRoute:
    m = _map(value, path)
    known = {
        "name", "match", "route", "redirect", "directResponse", "delegate", "rewrite", "timeout",
        "retries", "fault", "mirror", "mirrorPercent", "mirrorPercentage", "mirrors",
        "corsPolicy", "headers",
    }  # fmt: skip
    for key in m:
        if key not in known:
            raise ConfigError(f"{path}.{key}", "unknown field")
    if "delegate" in m:
        raise ConfigError(f"{path}.delegate", "delegate VirtualServices are not supported")
    matches = tuple(
        _vs_match(x, f"{path}.match[{i}]", ctx) for i, x in enumerate(_seq(m.get("match"), path))
    )
    dests: list[Destination] = []
    routes = _seq(m.get("route"), f"{path}.route")
    for i, r in enumerate(routes):
        rp = f"{path}.route[{i}]"
        rm = _map(r, rp)
        default_weight = 100 if len(routes) == 1 else 0
        weight = _int(rm.get("weight", default_weight), f"{rp}.weight", 0, 100000)
        d = _vs_destination(rm.get("destination"), f"{rp}.destination", ctx, weight=weight)
        req, resp = _vs_headers(rm.get("headers"), f"{rp}.headers")
        dests.append(
            Destination(
                host=d.host,
                subset=d.subset,
                port=d.port,
                weight=d.weight,
                request_headers=req,
                response_headers=resp,
            )
        )
    if len(dests) > 1 and sum(d.weight for d in dests) == 0:
        raise ConfigError(f"{path}.route", "weights are all zero")
    redirect = None
    if "redirect" in m:
        r = _map(m["redirect"], f"{path}.redirect")
        port = r.get("port")
        redirect = Redirect(
            uri=str(r["uri"]) if "uri" in r else None,
            authority=str(r["authority"]) if "authority" in r else None,
            scheme=str(r["scheme"]) if "scheme" in r else None,
            port=_int(port, f"{path}.redirect.port", 1, 65535) if port is not None else None,
            code=_int(r.get("redirectCode", 301), f"{path}.redirect.redirectCode", 300, 399),
        )
    direct_status, direct_body = None, ""
    if "directResponse" in m:
        dr = _map(m["directResponse"], f"{path}.directResponse")
        direct_status = _int(dr.get("status"), f"{path}.directResponse.status", 200, 599)
        body = _map(dr.get("body"), f"{path}.directResponse.body")
        direct_body = str(body.get("string", ""))
    if not dests and redirect is None and direct_status is None:
        raise ConfigError(path, "needs route, redirect or directResponse")
    rewrite = None
    if "rewrite" in m:
        rw = _map(m["rewrite"], f"{path}.rewrite")
        regex = None
        if "uriRegexRewrite" in rw:
            rr = _map(rw["uriRegexRewrite"], f"{path}.rewrite.uriRegexRewrite")
            pattern = _text(rr.get("match"), f"{path}.rewrite.uriRegexRewrite.match")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{path}.rewrite.uriRegexRewrite.match", str(exc)) from None
            regex = (pattern, str(rr.get("rewrite", "")))
        rewrite = Rewrite(
            uri=str(rw["uri"]) if "uri" in rw else None,
            authority=str(rw["authority"]) if "authority" in rw else None,
            uri_regex=regex,
        )
    mirrors: list[Mirror] = []
    if "mirror" in m:
        pct = 100.0
        if "mirrorPercentage" in m:
            pct = _percentage({"percentage": m["mirrorPercentage"]}, path)
        elif "mirrorPercent" in m:
            pct = _percentage({"percent": m["mirrorPercent"]}, path)
        mirrors.append(
            Mirror(destination=_vs_destination(m["mirror"], f"{path}.mirror", ctx, weight=100),
                   percent=pct)
        )  # fmt: skip
    for i, mm in enumerate(_seq(m.get("mirrors"), f"{path}.mirrors")):
        mp = f"{path}.mirrors[{i}]"
        mmap = _map(mm, mp)
        mirrors.append(
            Mirror(
                destination=_vs_destination(mmap.get("destination"), f"{mp}.destination", ctx,
                                            weight=100),
                percent=_percentage(mmap, mp),
            )
        )  # fmt: skip
    req, resp = _vs_headers(m.get("headers"), f"{path}.headers")
    return HttpRoute(
        name=str(m.get("name", "")),
        source=source,
        matches=matches,
        destinations=tuple(dests),
        redirect=redirect,
        direct_status=direct_status,
        direct_body=direct_body,
        rewrite=rewrite,
        timeout=parse_duration(m["timeout"], f"{path}.timeout") if "timeout" in m else None,
        retries=_retry(m["retries"], f"{path}.retries") if "retries" in m else DEFAULT_RETRY,
        fault=_fault(m["fault"], f"{path}.fault", ctx) if "fault" in m else None,
        mirrors=tuple(mirrors),
        request_headers=req,
        response_headers=resp,
    )


def parse_virtual_service(spec: Mapping[str, Any], ctx: _Ctx, name: str) -> RouteTable:
    hosts = tuple(
        resolve_host(_text(h, f"spec.hosts[{i}]"), ctx.namespace, ctx.suffix)
        for i, h in enumerate(_seq(spec.get("hosts"), "spec.hosts"))
    )
    if not hosts:
        raise ConfigError("spec.hosts", "at least one host is required")
    gateways = _seq(spec.get("gateways"), "spec.gateways")
    if gateways and "mesh" not in gateways:
        ctx.warn("does not include 'mesh': not applied by waypoints", "spec.gateways")
        return RouteTable(kind="VirtualService", namespace=ctx.namespace, name=name, hosts=(),
                          routes=())  # fmt: skip
    source = f"VirtualService {ctx.namespace}/{name}"
    routes = tuple(
        _vs_http_route(r, f"spec.http[{i}]", ctx, source)
        for i, r in enumerate(_seq(spec.get("http"), "spec.http"))
    )
    return RouteTable(
        kind="VirtualService", namespace=ctx.namespace, name=name, hosts=hosts, routes=routes
    )


def _traffic_policy(value: object, path: str, ctx: _Ctx, *, nested: bool = True) -> TrafficPolicy:
    m = _map(value, path)
    lb = LbPolicy.LEAST_REQUEST
    if "loadBalancer" in m:
        lbm = _map(m["loadBalancer"], f"{path}.loadBalancer")
        if "simple" in lbm:
            simple = str(lbm["simple"]).upper()
            if simple == "LEAST_CONN":
                simple = "LEAST_REQUEST"
            try:
                lb = LbPolicy(simple)
            except ValueError:
                raise ConfigError(
                    f"{path}.loadBalancer.simple", f"unknown load balancer {simple!r}"
                ) from None
    outlier = None
    if "outlierDetection" in m:
        o = _map(m["outlierDetection"], f"{path}.outlierDetection")
        c5 = o.get("consecutive5xxErrors", o.get("consecutiveErrors", 5))
        outlier = OutlierDetection(
            consecutive_5xx=_int(c5, f"{path}.outlierDetection.consecutive5xxErrors"),
            consecutive_gateway=_int(
                o.get("consecutiveGatewayErrors", 0), f"{path}.outlierDetection.gatewayErrors"
            ),
            interval=parse_duration(o.get("interval", "10s"), f"{path}.outlierDetection.interval"),
            base_ejection_time=parse_duration(
                o.get("baseEjectionTime", "30s"), f"{path}.outlierDetection.baseEjectionTime"
            ),
            max_ejection_percent=float(
                _int(o.get("maxEjectionPercent", 10), f"{path}.outlierDetection.max", 0, 100)
            ),
        )
    pool = ConnectionPool()
    if "connectionPool" in m:
        cp = _map(m["connectionPool"], f"{path}.connectionPool")
        tcp = _map(cp.get("tcp"), f"{path}.connectionPool.tcp")
        http = _map(cp.get("http"), f"{path}.connectionPool.http")
        big = 2**31 - 1

        def lim(obj: Mapping[str, Any], key: str, where: str) -> int:
            v = obj.get(key)
            return big if v is None or v == 0 else _int(v, f"{path}.connectionPool.{where}.{key}")

        pool = ConnectionPool(
            max_connections=lim(tcp, "maxConnections", "tcp"),
            connect_timeout=parse_duration(
                tcp.get("connectTimeout", "10s"), f"{path}.connectionPool.tcp.connectTimeout"
            ),
            max_pending=lim(http, "http1MaxPendingRequests", "http"),
            max_requests=lim(http, "http2MaxRequests", "http"),
            max_requests_per_connection=int(http.get("maxRequestsPerConnection", 0) or 0),
            idle_timeout=parse_duration(
                http.get("idleTimeout", "1h"), f"{path}.connectionPool.http.idleTimeout"
            ),
        )
    overrides: list[tuple[int, TrafficPolicy]] = []
    if nested:
        for i, p in enumerate(_seq(m.get("portLevelSettings"), f"{path}.portLevelSettings")):
            pp = f"{path}.portLevelSettings[{i}]"
            pm = _map(p, pp)
            number = _int(_map(pm.get("port"), f"{pp}.port").get("number"), f"{pp}.port.number")
            overrides.append((number, _traffic_policy(pm, pp, ctx, nested=False)))
    return TrafficPolicy(lb=lb, outlier=outlier, pool=pool, port_overrides=tuple(overrides))


def parse_destination_rule(spec: Mapping[str, Any], ctx: _Ctx, name: str) -> DestinationPolicy:
    host = resolve_host(_text(spec.get("host"), "spec.host"), ctx.namespace, ctx.suffix)
    policy = _traffic_policy(spec.get("trafficPolicy"), "spec.trafficPolicy", ctx)
    subsets = []
    for i, s in enumerate(_seq(spec.get("subsets"), "spec.subsets")):
        sp = f"spec.subsets[{i}]"
        sm = _map(s, sp)
        subsets.append(
            Subset(
                name=_text(sm.get("name"), f"{sp}.name"),
                labels=_labels(sm.get("labels"), f"{sp}.labels"),
                policy=(
                    _traffic_policy(sm["trafficPolicy"], f"{sp}.trafficPolicy", ctx)
                    if "trafficPolicy" in sm
                    else None
                ),
            )
        )
    return DestinationPolicy(
        namespace=ctx.namespace, name=name, host=host, subsets=tuple(subsets), policy=policy
    )


# ---- Gateway API HTTPRoute


def _gw_path_match(value: object, path: str) -> tuple[StringMatcher, bool]:
    m = _map(value, path)
    kind = str(m.get("type", "PathPrefix"))
    text = str(m.get("value", "/"))
    if kind == "Exact":
        return matcher(MatchKind.EXACT, text), False
    if kind == "PathPrefix":
        return matcher(MatchKind.PREFIX, text.rstrip("/") or "/"), True
    if kind == "RegularExpression":
        try:
            return matcher(MatchKind.REGEX, text), False
        except ConfigError as exc:
            raise ConfigError(path, exc.message) from None
    raise ConfigError(f"{path}.type", f"unknown path match type {kind!r}")


def _gw_named(value: object, path: str) -> tuple[tuple[str, StringMatcher], ...]:
    out = []
    for i, h in enumerate(_seq(value, path)):
        hm = _map(h, f"{path}[{i}]")
        kind = str(hm.get("type", "Exact"))
        name = _text(hm.get("name"), f"{path}[{i}].name")
        text = str(hm.get("value", ""))
        if kind == "Exact":
            out.append((name.lower(), matcher(MatchKind.EXACT, text)))
        elif kind == "RegularExpression":
            out.append((name.lower(), matcher(MatchKind.REGEX, text)))
        else:
            raise ConfigError(f"{path}[{i}].type", f"unknown match type {kind!r}")
    return tuple(out)


def _gw_match(value: object, path: str) -> RouteMatch:
    m = _map(value, path)
    uri, segments = (None, False)
    if "path" in m:
        uri, segments = _gw_path_match(m["path"], f"{path}.path")
    else:
        uri, segments = matcher(MatchKind.PREFIX, "/"), True
    query = tuple((k, v) for k, v in _gw_named(m.get("queryParams"), f"{path}.queryParams"))
    return RouteMatch(
        uri=uri,
        path_prefix_segments=segments,
        method=matcher(MatchKind.EXACT, str(m["method"])) if "method" in m else None,
        headers=_gw_named(m.get("headers"), f"{path}.headers"),
        query_params=query,
    )


def _gw_header_filter(value: object, path: str) -> HeaderOps:
    m = _map(value, path)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        return tuple(
            (_text(_map(x, f"{path}.{key}[{i}]").get("name"), f"{path}.{key}[{i}].name").lower(),
             str(_map(x, f"{path}.{key}[{i}]").get("value", "")))
            for i, x in enumerate(_seq(m.get(key), f"{path}.{key}"))
        )  # fmt: skip

    return HeaderOps(
        set=pairs("set"),
        add=pairs("add"),
        remove=tuple(str(x).lower() for x in _seq(m.get("remove"), f"{path}.remove")),
    )


def _gw_backend(value: object, path: str, ctx: _Ctx) -> Destination:
    m = _map(value, path)
    kind = str(m.get("kind", "Service"))
    if kind != "Service":
        raise ConfigError(f"{path}.kind", f"backend kind {kind!r} is not supported")
    ns = str(m.get("namespace", ctx.namespace))
    name = _text(m.get("name"), f"{path}.name")
    port = m.get("port")
    return Destination(
        host=f"{name}.{ns}.svc.{ctx.suffix}",
        port=_int(port, f"{path}.port", 1, 65535) if port is not None else None,
        weight=_int(m.get("weight", 1), f"{path}.weight", 0, 1_000_000),
    )


def _gw_precedence(match: RouteMatch) -> tuple[int, int, int, int, int]:
    """Gateway API ordering (HTTPRoute spec, "Matching precedence"): Exact path, longest
    prefix, method, most headers, most query params. Smaller sorts first."""
    uri = match.uri
    exact = 0 if uri is not None and uri.kind is MatchKind.EXACT else 1
    length = -len(uri.value) if uri is not None and uri.kind is not MatchKind.REGEX else 0
    return (
        exact,
        length,
        0 if match.method is not None else 1,
        -len(match.headers),
        -len(match.query_params),
    )


def _gw_retry(value: object, path: str) -> RetryPolicy:
    """HTTPRoute ``rules[].retry`` (Gateway API v1.2, GEP-1731): ``attempts`` retries,
    ``codes`` (400..599) retried, ``backoff`` as the base interval. Unset: the mesh default
    (Istio's: 2 attempts on connect-failure, refused-stream, unavailable, cancelled, 503).
    Connection failures are always retryable (GEP-1731: "a connection error" is retried)."""
    if value is None:
        return DEFAULT_RETRY
    m = _map(value, path)
    codes = frozenset(
        _int(c, f"{path}.codes[{i}]", 400, 599) for i, c in enumerate(_seq(m.get("codes"), path))
    )
    backoff = DEFAULT_RETRY.backoff_base
    if "backoff" in m:
        backoff = parse_duration(m["backoff"], f"{path}.backoff")
    on = {"connect-failure", "refused-stream", "reset"}
    if codes:
        on.add("retriable-status-codes")
    return RetryPolicy(
        attempts=_int(m.get("attempts", DEFAULT_RETRY.attempts), f"{path}.attempts", 0, 1000),
        retry_on=frozenset(on),
        status_codes=codes,
        backoff_base=backoff,
    )


def parse_http_route(spec: Mapping[str, Any], ctx: _Ctx, name: str) -> RouteTable:
    """GAMMA: Service parents; a parentRef ``port`` restricts the route to that service port
    (every match gets ``port``), as Gateway API's mesh profile specifies."""
    hosts: list[str] = []
    ports: set[int | None] = set()
    for i, ref in enumerate(_seq(spec.get("parentRefs"), "spec.parentRefs")):
        rp = f"spec.parentRefs[{i}]"
        rm = _map(ref, rp)
        kind = str(rm.get("kind", "Gateway"))
        ns = str(rm.get("namespace", ctx.namespace))
        pname = _text(rm.get("name"), f"{rp}.name")
        if kind == "Service":
            hosts.append(f"{pname}.{ns}.svc.{ctx.suffix}")
        else:
            ctx.warn(f"parent kind {kind!r} is not a mesh Service: not applied by waypoints", rp)
        port = rm.get("port")
        if kind == "Service":
            ports.add(None if port is None else _int(port, f"{rp}.port", 1, 65535))
    if len(ports) > 1:
        raise ConfigError(
            "spec.parentRefs", "Service parents with different ports are not supported"
        )
    only_port = next(iter(ports), None)
    source = f"HTTPRoute {ctx.namespace}/{name}"
    flat: list[tuple[tuple[int, int, int, int, int], int, HttpRoute]] = []
    for i, rule in enumerate(_seq(spec.get("rules"), "spec.rules")):
        rp = f"spec.rules[{i}]"
        rm = _map(rule, rp)
        backends = tuple(
            _gw_backend(b, f"{rp}.backendRefs[{j}]", ctx)
            for j, b in enumerate(_seq(rm.get("backendRefs"), f"{rp}.backendRefs"))
        )
        req_ops, resp_ops = NO_HEADER_OPS, NO_HEADER_OPS
        rewrite_path: tuple[str, str] | None = None
        rewrite_host: str | None = None
        redirect: Redirect | None = None
        mirrors: list[Mirror] = []
        for j, f in enumerate(_seq(rm.get("filters"), f"{rp}.filters")):
            fp = f"{rp}.filters[{j}]"
            fm = _map(f, fp)
            ftype = str(fm.get("type"))
            if ftype == "RequestHeaderModifier":
                req_ops = _gw_header_filter(fm.get("requestHeaderModifier"), fp)
            elif ftype == "ResponseHeaderModifier":
                resp_ops = _gw_header_filter(fm.get("responseHeaderModifier"), fp)
            elif ftype == "URLRewrite":
                u = _map(fm.get("urlRewrite"), f"{fp}.urlRewrite")
                rewrite_host = str(u["hostname"]) if "hostname" in u else None
                if "path" in u:
                    p = _map(u["path"], f"{fp}.urlRewrite.path")
                    ptype = str(p.get("type"))
                    if ptype == "ReplaceFullPath":
                        rewrite_path = ("full", str(p.get("replaceFullPath", "/")))
                    elif ptype == "ReplacePrefixMatch":
                        rewrite_path = ("prefix", str(p.get("replacePrefixMatch", "/")))
                    else:
                        raise ConfigError(f"{fp}.urlRewrite.path.type", f"unknown {ptype!r}")
            elif ftype == "RequestRedirect":
                r = _map(fm.get("requestRedirect"), f"{fp}.requestRedirect")
                rpath = _map(r.get("path"), f"{fp}.requestRedirect.path")
                redirect = Redirect(
                    uri=str(rpath["replaceFullPath"]) if "replaceFullPath" in rpath else None,
                    prefix=(
                        str(rpath["replacePrefixMatch"]) if "replacePrefixMatch" in rpath else None
                    ),
                    authority=str(r["hostname"]) if "hostname" in r else None,
                    scheme=str(r["scheme"]) if "scheme" in r else None,
                    port=int(r["port"]) if "port" in r else None,
                    code=_int(r.get("statusCode", 302), f"{fp}.requestRedirect.statusCode", 300,
                              399),
                )  # fmt: skip
            elif ftype == "RequestMirror":
                mm = _map(fm.get("requestMirror"), f"{fp}.requestMirror")
                pct = 100.0
                if "percent" in mm:
                    pct = float(_int(mm["percent"], f"{fp}.requestMirror.percent", 0, 100))
                mirrors.append(
                    Mirror(
                        destination=_gw_backend(mm.get("backendRef"), f"{fp}.backendRef", ctx),
                        percent=pct,
                    )
                )
            else:
                raise ConfigError(f"{fp}.type", f"filter {ftype!r} is not supported")
        timeouts = _map(rm.get("timeouts"), f"{rp}.timeouts")
        timeout = None
        if "request" in timeouts:
            timeout = parse_duration(timeouts["request"], f"{rp}.timeouts.request") or None
        retry = _gw_retry(rm.get("retry"), f"{rp}.retry")
        if "backendRequest" in timeouts:
            retry = RetryPolicy(
                attempts=retry.attempts,
                per_try_timeout=parse_duration(
                    timeouts["backendRequest"], f"{rp}.timeouts.backendRequest"
                ),
                retry_on=retry.retry_on,
                status_codes=retry.status_codes,
                backoff_base=retry.backoff_base,
            )
        matches = [
            _gw_match(x, f"{rp}.matches[{j}]")
            for j, x in enumerate(_seq(rm.get("matches"), f"{rp}.matches"))
        ] or [_gw_match({}, f"{rp}.matches")]
        if only_port is not None:
            matches = [dataclasses.replace(mt, port=only_port) for mt in matches]
        if not backends and redirect is None:
            # Gateway API: a rule with no backends answers 500.
            direct: int | None = 500
        else:
            direct = None
        for match in matches:
            rewrite = None
            if rewrite_path is not None or rewrite_host is not None:
                kind, value = rewrite_path or ("", "")
                rewrite = Rewrite(
                    uri=value if kind == "prefix" else None,
                    full_path=value if kind == "full" else None,
                    authority=rewrite_host,
                )
            flat.append(
                (
                    _gw_precedence(match),
                    len(flat),
                    HttpRoute(
                        name=f"{name}.{i}",
                        source=source,
                        matches=(match,),
                        destinations=backends,
                        redirect=redirect,
                        direct_status=direct,
                        rewrite=rewrite,
                        timeout=timeout,
                        retries=retry,
                        mirrors=tuple(mirrors),
                        request_headers=req_ops,
                        response_headers=resp_ops,
                    ),
                )
            )
    flat.sort(key=lambda t: (t[0], t[1]))
    return RouteTable(
        kind="HTTPRoute",
        namespace=ctx.namespace,
        name=name,
        hosts=tuple(hosts),
        routes=tuple(r for _, _, r in flat),
    )


# ---- entry point


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _map(obj.get("metadata"), "metadata")
    name = _text(meta.get("name"), "metadata.name")
    return str(meta.get("namespace") or "default"), name


ROUTING_KINDS = ("VirtualService", "DestinationRule", "HTTPRoute")
POLICY_KINDS = ("AuthorizationPolicy", "RequestAuthentication")


def parse_objects(
    docs: Iterable[object],
    *,
    domain_suffix: str = DEFAULT_DOMAIN_SUFFIX,
) -> WaypointConfig:
    """Parse Kubernetes-style objects (the kinds above; a kind in the field table's "not
    implemented" list is reported; others ignored) into a config. Also accepts
    ``kind: WorkloadLabels`` (``labels: {<workload uid>: {k: v}}``) for static mode.

    Every object is checked against `meshcore.config.fields` first: a routing object with an
    unknown or refused field is not applied; warned fields are reported. Policies are read by
    `meshcore.config.authorization` (fail closed)."""
    tables: list[RouteTable] = []
    rules: list[DestinationPolicy] = []
    policies: list[AuthzPolicy] = []
    labels: dict[str, Labels] = {}
    warnings: list[str] = []
    findings: list[tuple[str, Finding]] = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            warnings.append(f"object {index}: not a mapping: ignored")
            continue
        kind = str(doc.get("kind", ""))
        if kind == "List":
            sub = parse_objects(doc.get("items") or [], domain_suffix=domain_suffix)
            tables += sub.route_tables
            rules += sub.destination_rules
            policies += sub.policies
            labels.update(sub.workload_labels)
            warnings += sub.warnings
            findings += sub.findings
            continue
        if kind == "WorkloadLabels":
            for uid, lab in _map(doc.get("labels"), "labels").items():
                labels[str(uid)] = _labels(lab, f"labels.{uid}")
            continue
        if kind not in ROUTING_KINDS + POLICY_KINDS:
            unsupported = kind_support(kind, doc)
            if unsupported is not None and kind != "Gateway":
                ref = _ref(kind, doc, index)
                findings.append((ref, unsupported))
                warnings.append(f"{ref}: {unsupported.message}")
            continue
        try:
            namespace, name = _meta(doc)
        except ConfigError as exc:
            warnings.append(f"{kind} #{index}: {exc}: ignored")
            continue
        ref = f"{kind} {namespace}/{name}"
        if kind in POLICY_KINDS:
            pol = parse_policy(doc)
            policies.append(pol)
            findings += [(ref, f) for f in pol.findings]
            warnings += [f"{ref}: {f.render()}" for f in pol.findings]
            warnings += [f"{ref}: {w}" for w in l7_warnings(pol)]
            continue
        checked = check_object(kind, doc)
        findings += [(ref, f) for f in checked]
        warnings += [f"{ref}: {f.render()}" for f in checked]
        if any(f.level == "Error" for f in checked):
            warnings.append(f"{ref}: not applied (unknown or unsupported fields, see above)")
            continue
        ctx = _Ctx(ref=ref, namespace=namespace, suffix=domain_suffix, warnings=warnings,
                   findings=findings)  # fmt: skip
        spec = doc.get("spec") or {}
        try:
            if not isinstance(spec, Mapping):
                raise ConfigError("spec", "expected an object")
            if kind == "VirtualService":
                tables.append(parse_virtual_service(spec, ctx, name))
            elif kind == "HTTPRoute":
                tables.append(parse_http_route(spec, ctx, name))
            else:
                rules.append(parse_destination_rule(spec, ctx, name))
        except ConfigError as exc:
            findings.append(
                (ref, Finding(code=INVALID, level="Error", path=exc.path, message=exc.message))
            )
            ctx.warn(f"{exc}: ignored")
    tables.sort(key=lambda t: (t.kind != "HTTPRoute", t.namespace, t.name))
    return WaypointConfig(
        route_tables=tuple(tables),
        destination_rules=tuple(sorted(rules, key=lambda r: (r.namespace, r.name))),
        policies=tuple(sorted(policies, key=lambda p: p.key)),
        workload_labels=tuple(sorted(labels.items())),
        warnings=tuple(warnings),
        findings=tuple(findings),
    )


def _ref(kind: str, doc: Mapping[str, Any], index: int) -> str:
    try:
        namespace, name = _meta(doc)
    except ConfigError:
        return f"{kind} #{index}"
    return f"{kind} {namespace}/{name}"
