"""Gateway API HTTPRoute (gateway.networking.k8s.io v1, mesh profile "GAMMA") -> records.

Owns: `parse_http_route` and `parse_grpc_route` (GRPCRoute read as the HTTPRoute its method
matches describe), `gw_backend` (a Service backendRef). Service parents only (a parentRef
``port`` restricts the route to that service port); matches ordered by the spec's "Matching
precedence"; filters RequestHeaderModifier, ResponseHeaderModifier, URLRewrite,
RequestRedirect, RequestMirror; ``retry`` (GEP-1731); ``timeouts``. Which fields are
implemented is `meshcore.config.fields`.

Invariant: pure; a malformed value raises `ConfigError` naming the field path.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from meshcore.config.matchers import MatchKind, StringMatcher, matcher
from meshcore.config.reader import Ctx, parse_duration, read_int, read_map, read_seq, read_text
from meshcore.config.routes import (
    DEFAULT_RETRY,
    NO_HEADER_OPS,
    CorsPolicy,
    Destination,
    HeaderOps,
    HttpRoute,
    Mirror,
    Redirect,
    RetryPolicy,
    Rewrite,
    RouteMatch,
    RouteTable,
)
from meshcore.errors import ConfigError

# ---- Gateway API HTTPRoute


def _gw_path_match(value: object, path: str) -> tuple[StringMatcher, bool]:
    m = read_map(value, path)
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
    for i, h in enumerate(read_seq(value, path)):
        hm = read_map(h, f"{path}[{i}]")
        kind = str(hm.get("type", "Exact"))
        name = read_text(hm.get("name"), f"{path}[{i}].name")
        text = str(hm.get("value", ""))
        if kind == "Exact":
            out.append((name.lower(), matcher(MatchKind.EXACT, text)))
        elif kind == "RegularExpression":
            out.append((name.lower(), matcher(MatchKind.REGEX, text)))
        else:
            raise ConfigError(f"{path}[{i}].type", f"unknown match type {kind!r}")
    return tuple(out)


def _gw_match(value: object, path: str) -> RouteMatch:
    m = read_map(value, path)
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
    m = read_map(value, path)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        return tuple(
            (
                read_text(
                    read_map(x, f"{path}.{key}[{i}]").get("name"), f"{path}.{key}[{i}].name"
                ).lower(),
                str(read_map(x, f"{path}.{key}[{i}]").get("value", "")),
            )
            for i, x in enumerate(read_seq(m.get(key), f"{path}.{key}"))
        )

    return HeaderOps(
        set=pairs("set"),
        add=pairs("add"),
        remove=tuple(str(x).lower() for x in read_seq(m.get("remove"), f"{path}.remove")),
    )


def gw_backend(value: object, path: str, ctx: Ctx) -> Destination:
    m = read_map(value, path)
    kind = str(m.get("kind", "Service"))
    if kind != "Service":
        raise ConfigError(f"{path}.kind", f"backend kind {kind!r} is not supported")
    ns = str(m.get("namespace", ctx.namespace))
    name = read_text(m.get("name"), f"{path}.name")
    port = m.get("port")
    return Destination(
        host=f"{name}.{ns}.svc.{ctx.suffix}",
        port=read_int(port, f"{path}.port", 1, 65535) if port is not None else None,
        weight=read_int(m.get("weight", 1), f"{path}.weight", 0, 1_000_000),
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
    m = read_map(value, path)
    codes = frozenset(
        read_int(c, f"{path}.codes[{i}]", 400, 599)
        for i, c in enumerate(read_seq(m.get("codes"), path))
    )
    backoff = DEFAULT_RETRY.backoff_base
    if "backoff" in m:
        backoff = parse_duration(m["backoff"], f"{path}.backoff")
    on = {"connect-failure", "refused-stream", "reset"}
    if codes:
        on.add("retriable-status-codes")
    return RetryPolicy(
        attempts=read_int(m.get("attempts", DEFAULT_RETRY.attempts), f"{path}.attempts", 0, 1000),
        retry_on=frozenset(on),
        status_codes=codes,
        backoff_base=backoff,
    )


def parse_http_route(spec: Mapping[str, Any], ctx: Ctx, name: str) -> RouteTable:
    """GAMMA: Service parents; a parentRef ``port`` restricts the route to that service port
    (every match gets ``port``), as Gateway API's mesh profile specifies."""
    hosts, only_port = _gw_parents(spec, ctx)
    source = f"HTTPRoute {ctx.namespace}/{name}"
    flat: list[tuple[tuple[int, int, int, int, int], int, HttpRoute]] = []
    for i, rule in enumerate(read_seq(spec.get("rules"), "spec.rules")):
        rp = f"spec.rules[{i}]"
        rm = read_map(rule, rp)
        backends = tuple(
            gw_backend(b, f"{rp}.backendRefs[{j}]", ctx)
            for j, b in enumerate(read_seq(rm.get("backendRefs"), f"{rp}.backendRefs"))
        )
        filters = _gw_filters(rm.get("filters"), f"{rp}.filters", ctx)
        timeout, retry = _gw_timeouts(rm, rp)
        matches = [
            _gw_match(x, f"{rp}.matches[{j}]")
            for j, x in enumerate(read_seq(rm.get("matches"), f"{rp}.matches"))
        ] or [_gw_match({}, f"{rp}.matches")]
        if only_port is not None:
            matches = [dataclasses.replace(mt, port=only_port) for mt in matches]
        # Gateway API: a rule with no backends (and no redirect) answers 500.
        direct = 500 if not backends and filters.redirect is None else None
        for match in matches:
            route = HttpRoute(
                name=f"{name}.{i}",
                source=source,
                matches=(match,),
                destinations=backends,
                redirect=filters.redirect,
                direct_status=direct,
                rewrite=filters.rewrite,
                timeout=timeout,
                retries=retry,
                mirrors=filters.mirrors,
                request_headers=filters.request_headers,
                response_headers=filters.response_headers,
                section=str(rm.get("name") or ""),
                cors=filters.cors,
            )
            flat.append((_gw_precedence(match), len(flat), route))
    flat.sort(key=lambda t: (t[0], t[1]))
    return RouteTable(
        kind="HTTPRoute",
        namespace=ctx.namespace,
        name=name,
        hosts=tuple(hosts),
        routes=tuple(r for _, _, r in flat),
    )


def _gw_parents(spec: Mapping[str, Any], ctx: Ctx) -> tuple[list[str], int | None]:
    """(hostnames of the Service parents, the one parentRef ``port`` if any); other parent
    kinds are warned about; Service parents with different ports are a ConfigError."""
    hosts: list[str] = []
    ports: set[int | None] = set()
    for i, ref in enumerate(read_seq(spec.get("parentRefs"), "spec.parentRefs")):
        rp = f"spec.parentRefs[{i}]"
        rm = read_map(ref, rp)
        kind = str(rm.get("kind", "Gateway"))
        ns = str(rm.get("namespace", ctx.namespace))
        pname = read_text(rm.get("name"), f"{rp}.name")
        if kind == "Service":
            hosts.append(f"{pname}.{ns}.svc.{ctx.suffix}")
        else:
            ctx.warn(f"parent kind {kind!r} is not a mesh Service: not applied by waypoints", rp)
        port = rm.get("port")
        if kind == "Service":
            ports.add(None if port is None else read_int(port, f"{rp}.port", 1, 65535))
    if len(ports) > 1:
        raise ConfigError(
            "spec.parentRefs", "Service parents with different ports are not supported"
        )
    return hosts, next(iter(ports), None)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _RuleFilters:
    """What a rule's ``filters`` make of its routes."""

    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: CorsPolicy | None = None


def _gw_filters(value: object, path: str, ctx: Ctx) -> _RuleFilters:
    """A rule's ``filters``: a later filter of the same type replaces an earlier one (mirrors
    add up); an unknown type is a ConfigError."""
    req_ops, resp_ops = NO_HEADER_OPS, NO_HEADER_OPS
    rewrite_path: tuple[str, str] | None = None
    rewrite_host: str | None = None
    redirect: Redirect | None = None
    mirrors: list[Mirror] = []
    cors: CorsPolicy | None = None
    for j, f in enumerate(read_seq(value, path)):
        fp = f"{path}[{j}]"
        fm = read_map(f, fp)
        ftype = str(fm.get("type"))
        if ftype == "RequestHeaderModifier":
            req_ops = _gw_header_filter(fm.get("requestHeaderModifier"), fp)
        elif ftype == "ResponseHeaderModifier":
            resp_ops = _gw_header_filter(fm.get("responseHeaderModifier"), fp)
        elif ftype == "URLRewrite":
            u = read_map(fm.get("urlRewrite"), f"{fp}.urlRewrite")
            rewrite_host = str(u["hostname"]) if "hostname" in u else None
            if "path" in u:
                rewrite_path = _gw_rewrite_path(u["path"], f"{fp}.urlRewrite.path")
        elif ftype == "RequestRedirect":
            redirect = _gw_redirect(fm.get("requestRedirect"), f"{fp}.requestRedirect")
        elif ftype == "RequestMirror":
            mirrors.append(_gw_mirror(fm.get("requestMirror"), fp, ctx))
        elif ftype == "CORS":
            cors = _gw_cors(fm.get("cors"), f"{fp}.cors")
        else:
            raise ConfigError(f"{fp}.type", f"filter {ftype!r} is not supported")
    rewrite = None
    if rewrite_path is not None or rewrite_host is not None:
        kind, text = rewrite_path or ("", "")
        rewrite = Rewrite(
            uri=text if kind == "prefix" else None,
            full_path=text if kind == "full" else None,
            authority=rewrite_host,
        )
    return _RuleFilters(
        request_headers=req_ops,
        response_headers=resp_ops,
        rewrite=rewrite,
        redirect=redirect,
        mirrors=tuple(mirrors),
        cors=cors,
    )


def _gw_rewrite_path(value: object, path: str) -> tuple[str, str]:
    """URLRewrite ``path``: ("full", path) or ("prefix", replacement)."""
    p = read_map(value, path)
    ptype = str(p.get("type"))
    if ptype == "ReplaceFullPath":
        return ("full", str(p.get("replaceFullPath", "/")))
    if ptype == "ReplacePrefixMatch":
        return ("prefix", str(p.get("replacePrefixMatch", "/")))
    raise ConfigError(f"{path}.type", f"unknown {ptype!r}")


def _gw_redirect(value: object, path: str) -> Redirect:
    r = read_map(value, path)
    rpath = read_map(r.get("path"), f"{path}.path")
    return Redirect(
        uri=str(rpath["replaceFullPath"]) if "replaceFullPath" in rpath else None,
        prefix=str(rpath["replacePrefixMatch"]) if "replacePrefixMatch" in rpath else None,
        authority=str(r["hostname"]) if "hostname" in r else None,
        scheme=str(r["scheme"]) if "scheme" in r else None,
        port=int(r["port"]) if "port" in r else None,
        code=read_int(r.get("statusCode", 302), f"{path}.statusCode", 300, 399),
    )


def _gw_mirror(value: object, fp: str, ctx: Ctx) -> Mirror:
    """RequestMirror of filter `fp`; ``percent`` 0-100 or ``fraction`` (default all requests)."""
    mm = read_map(value, f"{fp}.requestMirror")
    pct = 100.0
    if "percent" in mm and "fraction" in mm:
        raise ConfigError(f"{fp}.requestMirror", "percent and fraction are exclusive")
    if "percent" in mm:
        pct = float(read_int(mm["percent"], f"{fp}.requestMirror.percent", 0, 100))
    elif "fraction" in mm:
        pct = _fraction(mm["fraction"], f"{fp}.requestMirror.fraction")
    return Mirror(
        destination=gw_backend(mm.get("backendRef"), f"{fp}.backendRef", ctx), percent=pct
    )


def _gw_timeouts(rm: Mapping[str, Any], rp: str) -> tuple[float | None, RetryPolicy]:
    """(request timeout or None, retry policy with ``timeouts.backendRequest`` as its
    per-try timeout) of rule `rp`."""
    timeouts = read_map(rm.get("timeouts"), f"{rp}.timeouts")
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
    return timeout, retry


def _gw_cors(value: object, path: str) -> CorsPolicy:
    """HTTPRoute ``CORS`` filter (Gateway API HTTPCORSFilter): origins are ``*``, or
    ``scheme://host[:port]`` where the host may start with ``*.``; ``maxAge`` seconds
    (default 5)."""
    m = read_map(value, path)
    origins: list[StringMatcher] = []
    for i, o in enumerate(read_seq(m.get("allowOrigins"), f"{path}.allowOrigins")):
        text = read_text(o, f"{path}.allowOrigins[{i}]")
        if text == "*":
            origins.append(matcher(MatchKind.PRESENCE))
        elif "*" in text:
            scheme, sep, host = text.partition("://")
            if not sep or not host.startswith("*.") or "*" in host[1:] or "*" in scheme:
                raise ConfigError(f"{path}.allowOrigins[{i}]", f"{text!r}: '*' only as '*.'")
            pattern = re.escape(f"{scheme}://") + r"[^/]+" + re.escape(host[1:])
            origins.append(matcher(MatchKind.REGEX, pattern))
        else:
            origins.append(matcher(MatchKind.EXACT, text))

    def texts(key: str) -> tuple[str, ...]:
        return tuple(
            read_text(v, f"{path}.{key}[{i}]")
            for i, v in enumerate(read_seq(m.get(key), f"{path}.{key}"))
        )

    creds = m.get("allowCredentials", False)
    if not isinstance(creds, bool):
        raise ConfigError(f"{path}.allowCredentials", f"expected a boolean, got {creds!r}")
    return CorsPolicy(
        allow_origins=tuple(origins),
        allow_methods=texts("allowMethods"),
        allow_headers=texts("allowHeaders"),
        expose_headers=texts("exposeHeaders"),
        max_age=read_int(m.get("maxAge", 5), f"{path}.maxAge", 1),
        allow_credentials=creds,
    )


# ------------------------------------------------------------------------------ GRPCRoute

_GRPC_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._")


def _grpc_path(value: object, path: str) -> dict[str, str]:
    """GRPCRoute ``matches[].method`` -> the HTTPRoute path match gRPC's ``/service/method``
    path (gRPC over HTTP/2 "Path") gives: both -> Exact; service only -> prefix ``/service/``;
    method only -> ``/<any service>/method``; RegularExpression -> a full-match regex."""
    m = read_map(value, path)
    kind = str(m.get("type", "Exact"))
    service, method = m.get("service"), m.get("method")
    if service is None and method is None:
        raise ConfigError(path, "one of service and method is required")
    parts = []
    for key, v in (("service", service), ("method", method)):
        if v is not None:
            text = read_text(v, f"{path}.{key}")
            if kind == "Exact" and not set(text) <= _GRPC_NAME:
                raise ConfigError(f"{path}.{key}", f"{text!r} is not a gRPC {key} name")
            parts.append(text)
        else:
            parts.append("")
    svc, meth = parts
    if kind == "RegularExpression":
        return {"type": "RegularExpression", "value": f"/{svc or '[^/]+'}/{meth or '[^/]+'}"}
    if kind != "Exact":
        raise ConfigError(f"{path}.type", f"{kind!r} is not Exact or RegularExpression")
    if svc and meth:
        return {"type": "Exact", "value": f"/{svc}/{meth}"}
    if svc:
        return {"type": "PathPrefix", "value": f"/{svc}"}
    return {"type": "RegularExpression", "value": f"/[^/]+/{meth.replace('.', '[.]')}"}


def parse_grpc_route(spec: Mapping[str, Any], ctx: Ctx, name: str) -> RouteTable:
    """GRPCRoute (gateway.networking.k8s.io v1, GAMMA), read as the HTTPRoute its matches
    describe (gRPC is HTTP/2 with ``:path`` = ``/service/method``): method and header matches,
    the filters and backendRefs HTTPRoute shares, Service parents."""
    rules = []
    for i, rule in enumerate(read_seq(spec.get("rules"), "spec.rules")):
        rp = f"spec.rules[{i}]"
        rm = dict(read_map(rule, rp))
        matches = []
        for j, match in enumerate(read_seq(rm.get("matches"), f"{rp}.matches")):
            mm = dict(read_map(match, f"{rp}.matches[{j}]"))
            method = mm.pop("method", None)
            if method is not None:
                mm["path"] = _grpc_path(method, f"{rp}.matches[{j}].method")
            matches.append(mm)
        if matches:
            rm["matches"] = matches
        rules.append(rm)
    table = parse_http_route({**spec, "rules": rules}, ctx, name)
    source = f"GRPCRoute {ctx.namespace}/{name}"
    # GRPCRoute precedence (spec "Matching precedence"): most characters of a matching service,
    # then of a matching method, then most header matches; a rule without matches is last.
    routes = sorted(table.routes, key=_grpc_precedence)
    return dataclasses.replace(
        table,
        kind="GRPCRoute",
        routes=tuple(dataclasses.replace(r, source=source) for r in routes),
    )


_ANY_SERVICE = "/[^/]+/"


def _grpc_precedence(route: HttpRoute) -> tuple[int, int, int]:
    m = route.matches[0] if route.matches else None
    if m is None:
        return (1, 0, 0)
    uri, svc, meth = m.uri, 0, 0
    if uri is not None:
        text = uri.value.lstrip("/")
        if uri.kind is MatchKind.REGEX and uri.value.startswith(_ANY_SERVICE):
            meth = len(uri.value) - len(_ANY_SERVICE)
        else:
            service, _, method = text.partition("/")
            svc, meth = len(service), len(method)
    if not svc and not meth and not m.headers:
        return (1, 0, 0)  # matches everything
    return (-svc, -meth, -len(m.headers))


def _fraction(value: object, path: str) -> float:
    """Gateway API ``Fraction`` {numerator, denominator (default 100)} as a percentage
    (numerator <= denominator, denominator >= 1: the API's CEL validation)."""
    m = read_map(value, path)
    den = read_int(m.get("denominator", 100), f"{path}.denominator", 1)
    num = read_int(m.get("numerator"), f"{path}.numerator", 0, den)
    return 100.0 * num / den
