"""Istio routing objects -> records: VirtualService (networking.istio.io v1/v1beta1/v1alpha3)
and DestinationRule.

Owns: `parse_virtual_service`, `parse_destination_rule`. Short host names resolve against the
object's namespace (``reviews`` in ``default`` is ``reviews.default.svc.cluster.local``, as
Istio does). Semantics: istio.io "Virtual Service" and "Destination Rule" references (2026).
Which fields are implemented is `meshcore.config.fields`; the dispatcher
(`meshcore.config.objects`) checks them before these parsers run.

Deliberate differences (docs/waypoint.md): retries default to Istio's default policy (2
attempts on connect-failure, refused-stream, unavailable, cancelled, 503).

Invariant: pure; a malformed value raises `ConfigError` naming the field path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshcore.config.matchers import MatchKind, StringMatcher, matcher
from meshcore.config.reader import (
    Ctx,
    parse_duration,
    read_int,
    read_labels,
    read_map,
    read_percentage,
    read_seq,
    read_text,
    resolve_host,
)
from meshcore.config.routes import (
    DEFAULT_RETRY,
    ConnectionPool,
    ConsistentHash,
    CorsPolicy,
    Destination,
    DestinationPolicy,
    Fault,
    HeaderOps,
    HttpRoute,
    LbPolicy,
    LocalityLb,
    Mirror,
    OutlierDetection,
    Redirect,
    RetryPolicy,
    Rewrite,
    RouteMatch,
    RouteTable,
    Subset,
    TrafficPolicy,
)
from meshcore.errors import ConfigError


def _string_match(value: object, path: str) -> StringMatcher:
    m = read_map(value, path)
    ignore = bool(m.get("ignoreCase", False))
    for key, kind in (("exact", MatchKind.EXACT), ("prefix", MatchKind.PREFIX)):
        if key in m:
            return matcher(kind, read_text(m[key], f"{path}.{key}"), ignore_case=ignore)
    if "regex" in m:
        try:
            return matcher(
                MatchKind.REGEX, read_text(m["regex"], f"{path}.regex"), ignore_case=ignore
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}.regex", exc.message) from None
    if not m:
        return matcher(MatchKind.PRESENCE)
    raise ConfigError(path, f"expected exact, prefix or regex, got {sorted(m)}")


def _named_matches(value: object, path: str) -> tuple[tuple[str, StringMatcher], ...]:
    m = read_map(value, path)
    return tuple((str(k).lower(), _string_match(v, f"{path}.{k}")) for k, v in m.items())


def _vs_match(value: object, path: str, ctx: Ctx) -> RouteMatch:
    m = read_map(value, path)
    known = {
        "name",
        "uri",
        "scheme",
        "method",
        "authority",
        "headers",
        "withoutHeaders",
        "port",
        "queryParams",
        "sourceLabels",
        "sourceNamespace",
        "ignoreUriCase",
        "gateways",
        "statPrefix",
    }
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
        port=read_int(m["port"], f"{path}.port", 1, 65535) if "port" in m else None,
        source_labels=read_labels(m.get("sourceLabels"), f"{path}.sourceLabels"),
        source_namespace=str(m["sourceNamespace"]) if "sourceNamespace" in m else None,
    )


def _header_ops(value: object, path: str) -> HeaderOps:
    m = read_map(value, path)
    return HeaderOps(
        set=tuple(
            (str(k).lower(), str(v)) for k, v in read_map(m.get("set"), f"{path}.set").items()
        ),
        add=tuple(
            (str(k).lower(), str(v)) for k, v in read_map(m.get("add"), f"{path}.add").items()
        ),
        remove=tuple(str(x).lower() for x in read_seq(m.get("remove"), f"{path}.remove")),
    )


def _vs_headers(value: object, path: str) -> tuple[HeaderOps, HeaderOps]:
    m = read_map(value, path)
    return _header_ops(m.get("request"), f"{path}.request"), _header_ops(
        m.get("response"), f"{path}.response"
    )


def _vs_destination(value: object, path: str, ctx: Ctx, *, weight: int) -> Destination:
    m = read_map(value, path)
    host = read_text(m.get("host"), f"{path}.host")
    port = None
    if "port" in m:
        port = read_int(
            read_map(m["port"], f"{path}.port").get("number"), f"{path}.port.number", 1, 65535
        )
    return Destination(
        host=resolve_host(host, ctx.namespace, ctx.suffix),
        subset=str(m.get("subset", "")),
        port=port,
        weight=weight,
    )


def _retry(value: object, path: str) -> RetryPolicy:
    m = read_map(value, path)
    attempts = read_int(m.get("attempts", 2), f"{path}.attempts", 0, 1000)
    per_try = (
        parse_duration(m["perTryTimeout"], f"{path}.perTryTimeout")
        if "perTryTimeout" in m
        else None
    )
    on: set[str] = set()
    codes: set[int] = set()
    if "retryOn" in m:
        for tok in read_text(m["retryOn"], f"{path}.retryOn").split(","):
            tok = tok.strip().lower()
            if tok.isdigit():
                codes.add(int(tok))
                on.add("retriable-status-codes")
            elif tok:
                on.add(tok)
    else:
        on = set(DEFAULT_RETRY.retry_on)
        codes = set(DEFAULT_RETRY.status_codes)
    remote = m.get("retryRemoteLocalities", False)
    if not isinstance(remote, bool):
        raise ConfigError(f"{path}.retryRemoteLocalities", "expected a boolean")
    return RetryPolicy(
        attempts=attempts,
        per_try_timeout=per_try,
        retry_on=frozenset(on),
        status_codes=frozenset(codes),
        remote_localities=remote,
    )


def _fault(value: object, path: str, ctx: Ctx) -> Fault:
    m = read_map(value, path)
    delay, delay_pct, abort, abort_pct = None, 100.0, None, 100.0
    if "delay" in m:
        d = read_map(m["delay"], f"{path}.delay")
        if "fixedDelay" not in d:
            raise ConfigError(f"{path}.delay", "fixedDelay is required (exponentialDelay is not)")
        delay = parse_duration(d["fixedDelay"], f"{path}.delay.fixedDelay")
        delay_pct = read_percentage(d, f"{path}.delay")
    if "abort" in m:
        a = read_map(m["abort"], f"{path}.abort")
        if "httpStatus" in a:
            abort = read_int(a["httpStatus"], f"{path}.abort.httpStatus", 200, 599)
        else:
            raise ConfigError(f"{path}.abort", "only httpStatus aborts are supported")
        abort_pct = read_percentage(a, f"{path}.abort")
    return Fault(delay=delay, delay_percent=delay_pct, abort_status=abort, abort_percent=abort_pct)


def _vs_http_route(value: object, path: str, ctx: Ctx, source: str) -> HttpRoute:
    m = read_map(value, path)
    known = {
        "name",
        "match",
        "route",
        "redirect",
        "directResponse",
        "delegate",
        "rewrite",
        "timeout",
        "retries",
        "fault",
        "mirror",
        "mirrorPercent",
        "mirrorPercentage",
        "mirrors",
        "corsPolicy",
        "headers",
    }
    for key in m:
        if key not in known:
            raise ConfigError(f"{path}.{key}", "unknown field")
    if "delegate" in m:
        raise ConfigError(f"{path}.delegate", "delegate VirtualServices are not supported")
    matches = tuple(
        _vs_match(x, f"{path}.match[{i}]", ctx)
        for i, x in enumerate(read_seq(m.get("match"), path))
    )
    dests: list[Destination] = []
    routes = read_seq(m.get("route"), f"{path}.route")
    for i, r in enumerate(routes):
        rp = f"{path}.route[{i}]"
        rm = read_map(r, rp)
        default_weight = 100 if len(routes) == 1 else 0
        weight = read_int(rm.get("weight", default_weight), f"{rp}.weight", 0, 100000)
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
    redirect = _vs_redirect(m["redirect"], f"{path}.redirect") if "redirect" in m else None
    direct_status, direct_body = None, ""
    if "directResponse" in m:
        dr = read_map(m["directResponse"], f"{path}.directResponse")
        direct_status = read_int(dr.get("status"), f"{path}.directResponse.status", 200, 599)
        body = read_map(dr.get("body"), f"{path}.directResponse.body")
        direct_body = str(body.get("string", ""))
    if not dests and redirect is None and direct_status is None:
        raise ConfigError(path, "needs route, redirect or directResponse")
    rewrite = _vs_rewrite(m["rewrite"], f"{path}.rewrite") if "rewrite" in m else None
    mirrors: list[Mirror] = []
    if "mirror" in m:
        pct = 100.0
        if "mirrorPercentage" in m:
            pct = read_percentage({"percentage": m["mirrorPercentage"]}, path)
        elif "mirrorPercent" in m:
            pct = read_percentage({"percent": m["mirrorPercent"]}, path)
        mirrors.append(
            Mirror(
                destination=_vs_destination(m["mirror"], f"{path}.mirror", ctx, weight=100),
                percent=pct,
            )
        )
    for i, mm in enumerate(read_seq(m.get("mirrors"), f"{path}.mirrors")):
        mp = f"{path}.mirrors[{i}]"
        mmap = read_map(mm, mp)
        mirrors.append(
            Mirror(
                destination=_vs_destination(
                    mmap.get("destination"), f"{mp}.destination", ctx, weight=100
                ),
                percent=read_percentage(mmap, mp),
            )
        )
    req, resp = _vs_headers(m.get("headers"), f"{path}.headers")
    cors = _cors(m["corsPolicy"], f"{path}.corsPolicy") if "corsPolicy" in m else None
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
        cors=cors,
    )


def _vs_redirect(value: object, path: str) -> Redirect:
    r = read_map(value, path)
    port = r.get("port")
    return Redirect(
        uri=str(r["uri"]) if "uri" in r else None,
        authority=str(r["authority"]) if "authority" in r else None,
        scheme=str(r["scheme"]) if "scheme" in r else None,
        port=read_int(port, f"{path}.port", 1, 65535) if port is not None else None,
        code=read_int(r.get("redirectCode", 301), f"{path}.redirectCode", 300, 399),
    )


def _vs_rewrite(value: object, path: str) -> Rewrite:
    """HTTPRewrite: ``uri`` (prefix replacement), ``authority``, ``uriRegexRewrite`` (the
    pattern must compile)."""
    rw = read_map(value, path)
    regex = None
    if "uriRegexRewrite" in rw:
        rr = read_map(rw["uriRegexRewrite"], f"{path}.uriRegexRewrite")
        pattern = read_text(rr.get("match"), f"{path}.uriRegexRewrite.match")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{path}.uriRegexRewrite.match", str(exc)) from None
        regex = (pattern, str(rr.get("rewrite", "")))
    return Rewrite(
        uri=str(rw["uri"]) if "uri" in rw else None,
        authority=str(rw["authority"]) if "authority" in rw else None,
        uri_regex=regex,
    )


def _cors(value: object, path: str) -> CorsPolicy:
    """VirtualService ``corsPolicy`` (istio.io CorsPolicy): ``allowOrigins`` StringMatch list
    (and the deprecated exact ``allowOrigin``), methods, headers, ``maxAge`` duration,
    ``allowCredentials``, ``unmatchedPreflights`` FORWARD (default) or IGNORE."""
    m = read_map(value, path)
    origins = [
        _string_match(o, f"{path}.allowOrigins[{i}]")
        for i, o in enumerate(read_seq(m.get("allowOrigins"), f"{path}.allowOrigins"))
    ]
    origins += [
        matcher(MatchKind.EXACT, read_text(o, f"{path}.allowOrigin[{i}]"))
        for i, o in enumerate(read_seq(m.get("allowOrigin"), f"{path}.allowOrigin"))
    ]

    def texts(key: str) -> tuple[str, ...]:
        return tuple(
            read_text(v, f"{path}.{key}[{i}]")
            for i, v in enumerate(read_seq(m.get(key), f"{path}.{key}"))
        )

    unmatched = str(m.get("unmatchedPreflights", "FORWARD"))
    if unmatched not in ("FORWARD", "IGNORE", "UNSPECIFIED"):
        raise ConfigError(f"{path}.unmatchedPreflights", f"{unmatched!r} is not FORWARD or IGNORE")
    creds = m.get("allowCredentials", False)
    if not isinstance(creds, bool):
        raise ConfigError(f"{path}.allowCredentials", f"expected a boolean, got {creds!r}")
    max_age = None
    if "maxAge" in m:
        max_age = int(parse_duration(m["maxAge"], f"{path}.maxAge"))
    return CorsPolicy(
        allow_origins=tuple(origins),
        allow_methods=texts("allowMethods"),
        allow_headers=texts("allowHeaders"),
        expose_headers=texts("exposeHeaders"),
        max_age=max_age,
        allow_credentials=creds,
        forward_unmatched_preflights=unmatched != "IGNORE",
    )


def parse_virtual_service(spec: Mapping[str, Any], ctx: Ctx, name: str) -> RouteTable:
    hosts = tuple(
        resolve_host(read_text(h, f"spec.hosts[{i}]"), ctx.namespace, ctx.suffix)
        for i, h in enumerate(read_seq(spec.get("hosts"), "spec.hosts"))
    )
    if not hosts:
        raise ConfigError("spec.hosts", "at least one host is required")
    gateways = read_seq(spec.get("gateways"), "spec.gateways")
    if gateways and "mesh" not in gateways:
        ctx.warn("does not include 'mesh': not applied by waypoints", "spec.gateways")
        return RouteTable(
            kind="VirtualService", namespace=ctx.namespace, name=name, hosts=(), routes=()
        )
    source = f"VirtualService {ctx.namespace}/{name}"
    routes = tuple(
        _vs_http_route(r, f"spec.http[{i}]", ctx, source)
        for i, r in enumerate(read_seq(spec.get("http"), "spec.http"))
    )
    return RouteTable(
        kind="VirtualService", namespace=ctx.namespace, name=name, hosts=hosts, routes=routes
    )


def _traffic_policy(value: object, path: str, ctx: Ctx, *, nested: bool = True) -> TrafficPolicy:
    m = read_map(value, path)
    lb = LbPolicy.LEAST_REQUEST
    chash: ConsistentHash | None = None
    locality = LocalityLb()
    if "loadBalancer" in m:
        lbm = read_map(m["loadBalancer"], f"{path}.loadBalancer")
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
        if "consistentHash" in lbm:
            chash = _consistent_hash(
                lbm["consistentHash"], f"{path}.loadBalancer.consistentHash", ctx
            )
        if lbm.get("localityLbSetting") is not None:
            locality = _locality_lb(
                lbm["localityLbSetting"], f"{path}.loadBalancer.localityLbSetting"
            )
    outlier = None
    if "outlierDetection" in m:
        o = read_map(m["outlierDetection"], f"{path}.outlierDetection")
        c5 = o.get("consecutive5xxErrors", o.get("consecutiveErrors", 5))
        outlier = OutlierDetection(
            consecutive_5xx=read_int(c5, f"{path}.outlierDetection.consecutive5xxErrors"),
            consecutive_gateway=read_int(
                o.get("consecutiveGatewayErrors", 0), f"{path}.outlierDetection.gatewayErrors"
            ),
            interval=parse_duration(o.get("interval", "10s"), f"{path}.outlierDetection.interval"),
            base_ejection_time=parse_duration(
                o.get("baseEjectionTime", "30s"), f"{path}.outlierDetection.baseEjectionTime"
            ),
            max_ejection_percent=float(
                read_int(o.get("maxEjectionPercent", 10), f"{path}.outlierDetection.max", 0, 100)
            ),
        )
    pool = ConnectionPool()
    if "connectionPool" in m:
        cp = read_map(m["connectionPool"], f"{path}.connectionPool")
        tcp = read_map(cp.get("tcp"), f"{path}.connectionPool.tcp")
        http = read_map(cp.get("http"), f"{path}.connectionPool.http")
        big = 2**31 - 1

        def lim(obj: Mapping[str, Any], key: str, where: str) -> int:
            v = obj.get(key)
            return (
                big if v is None or v == 0 else read_int(v, f"{path}.connectionPool.{where}.{key}")
            )

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
        for i, p in enumerate(read_seq(m.get("portLevelSettings"), f"{path}.portLevelSettings")):
            pp = f"{path}.portLevelSettings[{i}]"
            pm = read_map(p, pp)
            number = read_int(
                read_map(pm.get("port"), f"{pp}.port").get("number"), f"{pp}.port.number"
            )
            overrides.append((number, _traffic_policy(pm, pp, ctx, nested=False)))
    return TrafficPolicy(
        lb=lb,
        hash=chash,
        outlier=outlier,
        pool=pool,
        port_overrides=tuple(overrides),
        locality=locality,
    )


_TOPOLOGY_LOCALITY_LABELS = (
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
)
_LOCALITY = re.compile(r"^([^/*]+|\*)(/([^/*]+|\*)){0,2}$")


def _locality_pattern(value: object, path: str) -> str:
    """``region[/zone[/subzone]]``, each segment a name or ``*`` (Istio matches segment by
    segment; ``*`` or a missing segment matches any)."""
    text = read_text(value, path)
    if not _LOCALITY.match(text):
        raise ConfigError(path, f"{text!r} is not a locality (region[/zone[/subzone]])")
    return text


def _locality_lb(value: object, path: str) -> LocalityLb:
    """``localityLbSetting`` (Istio networking/v1 LocalityLoadBalancerSetting): ``distribute``
    weights must sum to 100 per ``from``; ``distribute`` excludes ``failover``; a failover's
    ``from`` and ``to`` are different regions (Istio's validation). ``failover`` together
    with ``failoverPriority`` may not list the region/zone/subzone labels, and a
    ``failoverPriority`` entry is ``label`` or ``label=value`` (Istio's validation)."""
    m = read_map(value, path)
    enabled = m.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}.enabled", "expected a boolean")
    dist: list[tuple[str, tuple[tuple[str, int], ...]]] = []
    for i, d in enumerate(read_seq(m.get("distribute"), f"{path}.distribute")):
        dp = f"{path}.distribute[{i}]"
        dm = read_map(d, dp)
        src = _locality_pattern(dm.get("from"), f"{dp}.from")
        to = read_map(dm.get("to"), f"{dp}.to")
        weights = tuple(
            (_locality_pattern(k, f"{dp}.to"), read_int(w, f"{dp}.to[{k}]", 0, 100))
            for k, w in to.items()
        )
        if sum(w for _k, w in weights) != 100:
            raise ConfigError(f"{dp}.to", "weights must sum to 100")
        dist.append((src, weights))
    fail: list[tuple[str, str]] = []
    for i, f in enumerate(read_seq(m.get("failover"), f"{path}.failover")):
        fp = f"{path}.failover[{i}]"
        fm = read_map(f, fp)
        a, b = read_text(fm.get("from"), f"{fp}.from"), read_text(fm.get("to"), f"{fp}.to")
        if a == b:
            raise ConfigError(fp, "from and to must be different regions")
        fail.append((a, b))
    prio = tuple(
        read_text(x, f"{path}.failoverPriority[{i}]")
        for i, x in enumerate(read_seq(m.get("failoverPriority"), f"{path}.failoverPriority"))
    )
    for i, x in enumerate(prio):
        key, eq, val = x.partition("=")
        if not key or (eq and (not val or "=" in val)):
            raise ConfigError(f"{path}.failoverPriority[{i}]", f"{x!r} is not label or label=value")
    if dist and (fail or prio):
        raise ConfigError(path, "distribute cannot be combined with failover/failoverPriority")
    for x in prio if fail else ():
        if x in _TOPOLOGY_LOCALITY_LABELS:  # Istio: ValidateLocalityLbSetting
            raise ConfigError(path, f"failover cannot be combined with {x!r} in failoverPriority")
    return LocalityLb(
        enabled=enabled, distribute=tuple(dist), failover=tuple(fail), failover_priority=prio
    )


_COOKIE_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_COOKIE_VALUE = re.compile(r"^[\x21-\x3a\x3c-\x7e]*$")  # no CTLs, spaces or ';' (RFC 6265 §4.1.1)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _http_cookie(value: object, path: str) -> dict[str, Any]:
    """``httpCookie`` {name, path, ttl, attributes} -> ConsistentHash fields (RFC 6265 syntax:
    a bad name or attribute is a ConfigError rather than a header we would send)."""
    c = read_map(value, path)
    name = read_text(c.get("name"), f"{path}.name")
    if not _COOKIE_TOKEN.match(name):
        raise ConfigError(f"{path}.name", f"{name!r} is not a cookie name (RFC 6265 token)")
    out: dict[str, Any] = {"cookie": name}
    if c.get("path") is not None:
        cpath = read_text(c.get("path"), f"{path}.path")
        if not _COOKIE_VALUE.match(cpath):
            raise ConfigError(f"{path}.path", f"{cpath!r} is not a cookie path")
        out["cookie_path"] = cpath
    if c.get("ttl") is not None:
        out["cookie_ttl"] = parse_duration(c.get("ttl"), f"{path}.ttl")
    attrs = []
    for i, a in enumerate(read_seq(c.get("attributes") or [], f"{path}.attributes")):
        am = read_map(a, f"{path}.attributes[{i}]")
        an = read_text(am.get("name"), f"{path}.attributes[{i}].name")
        av = am.get("value", "")
        if not _COOKIE_TOKEN.match(an) or not isinstance(av, str) or not _COOKIE_VALUE.match(av):
            raise ConfigError(f"{path}.attributes[{i}]", "not a cookie attribute (RFC 6265)")
        attrs.append((an, av))
    out["cookie_attributes"] = tuple(attrs)
    return out


def _consistent_hash(value: object, path: str, ctx: Ctx) -> ConsistentHash:
    """``consistentHash``: exactly one key of httpHeaderName, httpCookie, useSourceIp,
    httpQueryParameterName; ``ringHash.minimumRingSize`` / ``minimumRingSize`` size the ring
    (Envoy's default 1024, capped at 65537); ``maglev.tableSize`` sizes a Maglev table
    (Envoy's default 65537; it must be prime, as Envoy requires; at most 65537 here)."""
    m = read_map(value, path)
    keys = [
        k
        for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
        if m.get(k) not in (None, False)
    ]
    if len(keys) != 1:
        raise ConfigError(
            path,
            "exactly one hash key is required (httpHeaderName, httpCookie, "
            "useSourceIp, httpQueryParameterName)",
        )
    size = 1024
    maglev = False
    if "ringHash" in m:
        size = read_int(
            read_map(m["ringHash"], f"{path}.ringHash").get("minimumRingSize", 1024),
            f"{path}.ringHash.minimumRingSize",
            1,
        )
    elif "maglev" in m:
        maglev = True
        size = read_int(
            read_map(m["maglev"], f"{path}.maglev").get("tableSize", 65537),
            f"{path}.maglev.tableSize",
            1,
            65537,
        )
        if not _is_prime(size):
            raise ConfigError(f"{path}.maglev.tableSize", f"{size} is not a prime (Envoy)")
    elif "minimumRingSize" in m:
        size = read_int(m["minimumRingSize"], f"{path}.minimumRingSize", 1)
    if size > 65537:
        # Reported, not silent: the ring is built in the data path's process.
        ctx.warn(f"ring size {size} is served with 65537 virtual nodes (the maximum)", path)
    shape: dict[str, Any] = {"ring_size": min(size, 65537), "maglev": maglev}
    key = keys[0]
    if key == "httpHeaderName":
        return ConsistentHash(header=read_text(m[key], f"{path}.{key}").lower(), **shape)
    if key == "httpCookie":
        return ConsistentHash(**_http_cookie(m[key], f"{path}.{key}"), **shape)
    if key == "useSourceIp":
        if m[key] is not True:
            raise ConfigError(f"{path}.{key}", "expected true")
        return ConsistentHash(source_ip=True, **shape)
    return ConsistentHash(query_param=read_text(m[key], f"{path}.{key}"), **shape)


def parse_destination_rule(spec: Mapping[str, Any], ctx: Ctx, name: str) -> DestinationPolicy:
    host = resolve_host(read_text(spec.get("host"), "spec.host"), ctx.namespace, ctx.suffix)
    policy = _traffic_policy(spec.get("trafficPolicy"), "spec.trafficPolicy", ctx)
    subsets = []
    for i, s in enumerate(read_seq(spec.get("subsets"), "spec.subsets")):
        sp = f"spec.subsets[{i}]"
        sm = read_map(s, sp)
        subsets.append(
            Subset(
                name=read_text(sm.get("name"), f"{sp}.name"),
                labels=read_labels(sm.get("labels"), f"{sp}.labels"),
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
