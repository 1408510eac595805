"""Dispatch: Kubernetes-style objects -> one `WaypointConfig`, the waypoint's parser, also
run by the control plane and ``ambientctl analyze`` so all three report the same findings.

Owns: `parse_objects`, `ROUTING_KINDS`, `POLICY_KINDS`.

Invariants:
- Every object is checked against the field table (`meshcore.config.fields`) first: a routing
  object with an unknown or refused field, or a malformed value, is left out (never
  half-applied) and reported; warned fields are reported.
- Policies (AuthorizationPolicy, RequestAuthentication) are read by
  `meshcore.config.authorization`, which never leaves one out: it fails closed.
- The result does not depend on the order of kinds; tables are sorted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from meshcore.config.authorization import AuthzPolicy, l7_warnings, parse_policy
from meshcore.config.findings import INVALID, Finding, check_object, kind_support
from meshcore.config.gatewayapi import parse_grpc_route, parse_http_route
from meshcore.config.istio import parse_destination_rule, parse_virtual_service
from meshcore.config.l4routes import parse_l4_route
from meshcore.config.labels import Labels
from meshcore.config.ratelimit import RateLimitPolicy, parse_rate_limit
from meshcore.config.reader import DEFAULT_DOMAIN_SUFFIX, Ctx, read_labels, read_map, read_text
from meshcore.config.routes import DestinationPolicy, L4Route, RouteTable, WaypointConfig
from meshcore.errors import ConfigError

# ---- entry point


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = read_map(obj.get("metadata"), "metadata")
    name = read_text(meta.get("name"), "metadata.name")
    return str(meta.get("namespace") or "default"), name


ROUTING_KINDS = (
    "VirtualService",
    "DestinationRule",
    "HTTPRoute",
    "HTTPLocalRateLimitPolicy",
    "TCPRoute",
    "TLSRoute",
    "GRPCRoute",
)
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
    limits: list[RateLimitPolicy] = []
    l4: list[L4Route] = []
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
            limits += sub.rate_limits
            l4 += sub.l4_routes
            labels.update(sub.workload_labels)
            warnings += sub.warnings
            findings += sub.findings
            continue
        if kind == "WorkloadLabels":
            for uid, lab in read_map(doc.get("labels"), "labels").items():
                labels[str(uid)] = read_labels(lab, f"labels.{uid}")
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
        ctx = Ctx(ref=ref, namespace=namespace, suffix=domain_suffix, warnings=warnings,
                   findings=findings)  # fmt: skip
        spec = doc.get("spec") or {}
        try:
            if not isinstance(spec, Mapping):
                raise ConfigError("spec", "expected an object")
            if kind == "VirtualService":
                tables.append(parse_virtual_service(spec, ctx, name))
            elif kind == "HTTPRoute":
                tables.append(parse_http_route(spec, ctx, name))
            elif kind == "HTTPLocalRateLimitPolicy":
                limits.append(parse_rate_limit(spec, namespace, name))
            elif kind in ("TCPRoute", "TLSRoute"):
                l4.append(parse_l4_route(kind, spec, ctx, name))
            elif kind == "GRPCRoute":
                tables.append(parse_grpc_route(spec, ctx, name))
            else:
                rules.append(parse_destination_rule(spec, ctx, name))
        except ConfigError as exc:
            findings.append(
                (ref, Finding(code=INVALID, level="Error", path=exc.path, message=exc.message))
            )
            ctx.warn(f"{exc}: ignored")
    # Gateway API routes (HTTPRoute, GRPCRoute) before VirtualServices (Istio's precedence).
    tables.sort(key=lambda t: (t.kind not in ("HTTPRoute", "GRPCRoute"), t.namespace, t.name))
    return WaypointConfig(
        route_tables=tuple(tables),
        destination_rules=tuple(sorted(rules, key=lambda r: (r.namespace, r.name))),
        policies=tuple(sorted(policies, key=lambda p: p.key)),
        workload_labels=tuple(sorted(labels.items())),
        warnings=tuple(warnings),
        findings=tuple(findings),
        rate_limits=tuple(sorted(limits, key=lambda r: r.key)),
        l4_routes=tuple(sorted(l4, key=lambda r: (r.namespace, r.name))),
    )


def _ref(kind: str, doc: Mapping[str, Any], index: int) -> str:
    try:
        namespace, name = _meta(doc)
    except ConfigError:
        return f"{kind} #{index}"
    return f"{kind} {namespace}/{name}"
