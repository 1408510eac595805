"""Gateway API TCPRoute and TLSRoute for waypoints (GAMMA: Service parents), as parsed.

Owns: `parse_l4_route` (a TCPRoute / TLSRoute spec -> `meshcore.config.routes.L4Route`).

Semantics (Gateway API v1alpha2 TCPRoute/TLSRoute, mesh profile; Istio supports both for
waypoints): ``parentRefs`` of kind Service bind the route to that service (``port``: only that
service port); ``rules[].backendRefs`` are weighted Services. TLSRoute ``hostnames`` match the
ClientHello's SNI (exact, or ``*.`` one-or-more labels), the TLS stream is passed through
unterminated; with no hostnames every SNI matches. TCPRoute: the first rule's backends (Gateway
API defines one rule for TCPRoute; more are refused).

Invariants: pure; a route whose every backend has weight 0 is kept (connections it selects
are refused, Gateway API: no backend, no traffic).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshcore.config.gatewayapi import gw_backend
from meshcore.config.reader import Ctx, read_int, read_map, read_seq, read_text
from meshcore.config.routes import L4Route
from meshcore.errors import ConfigError


def _hostname(value: object, path: str) -> str:
    text = read_text(value, path).lower()
    body = text[2:] if text.startswith("*.") else text
    if not body or not all(c.isalnum() or c in "-." for c in body) or ".." in body:
        raise ConfigError(path, f"{text!r} is not a hostname")
    return text


def parse_l4_route(kind: str, spec: Mapping[str, Any], ctx: Ctx, name: str) -> L4Route:
    hosts: list[str] = []
    ports: set[int | None] = set()
    for i, ref in enumerate(read_seq(spec.get("parentRefs"), "spec.parentRefs")):
        rp = f"spec.parentRefs[{i}]"
        rm = read_map(ref, rp)
        pkind = str(rm.get("kind", "Gateway"))
        ns = str(rm.get("namespace", ctx.namespace))
        pname = read_text(rm.get("name"), f"{rp}.name")
        if pkind != "Service":
            ctx.warn(f"parent kind {pkind!r} is not a mesh Service: not applied by waypoints", rp)
            continue
        hosts.append(f"{pname}.{ns}.svc.{ctx.suffix}")
        port = rm.get("port")
        ports.add(None if port is None else read_int(port, f"{rp}.port", 1, 65535))
    if len(ports) > 1:
        raise ConfigError(
            "spec.parentRefs", "Service parents with different ports are not supported"
        )
    rules = read_seq(spec.get("rules"), "spec.rules")
    if not rules:
        raise ConfigError("spec.rules", "at least one rule is required")
    if kind == "TCPRoute" and len(rules) > 1:
        raise ConfigError("spec.rules", "TCPRoute takes one rule (Gateway API)")
    backends = []
    for i, rule in enumerate(rules):
        rm = read_map(rule, f"spec.rules[{i}]")
        for j, b in enumerate(read_seq(rm.get("backendRefs"), f"spec.rules[{i}].backendRefs")):
            backends.append(gw_backend(b, f"spec.rules[{i}].backendRefs[{j}]", ctx))
    sni = tuple(
        _hostname(h, f"spec.hostnames[{i}]")
        for i, h in enumerate(read_seq(spec.get("hostnames"), "spec.hostnames"))
    )
    if sni and kind != "TLSRoute":
        raise ConfigError("spec.hostnames", "only TLSRoute has hostnames")
    return L4Route(
        kind=kind,
        namespace=ctx.namespace,
        name=name,
        hosts=tuple(hosts),
        port=next(iter(ports), None),
        sni=sni,
        backends=tuple(backends),
    )
