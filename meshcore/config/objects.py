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
from dataclasses import dataclass, field
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
    acc = _Collected(domain_suffix=domain_suffix)
    _collect(docs, acc)
    return acc.config()


@dataclass(slots=True, kw_only=True)
class _Collected:
    """What `parse_objects` has read so far (a ``kind: List`` adds to the same lists)."""

    domain_suffix: str
    tables: list[RouteTable] = field(default_factory=list)
    rules: list[DestinationPolicy] = field(default_factory=list)
    policies: list[AuthzPolicy] = field(default_factory=list)
    limits: list[RateLimitPolicy] = field(default_factory=list)
    l4: list[L4Route] = field(default_factory=list)
    labels: dict[str, Labels] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    findings: list[tuple[str, Finding]] = field(default_factory=list)

    def config(self) -> WaypointConfig:
        # Gateway API routes (HTTPRoute, GRPCRoute) before VirtualServices (Istio's precedence).
        tables = sorted(
            self.tables,
            key=lambda t: (t.kind not in ("HTTPRoute", "GRPCRoute"), t.namespace, t.name),
        )
        return WaypointConfig(
            route_tables=tuple(tables),
            destination_rules=tuple(sorted(self.rules, key=lambda r: (r.namespace, r.name))),
            policies=tuple(sorted(self.policies, key=lambda p: p.key)),
            workload_labels=tuple(sorted(self.labels.items())),
            warnings=tuple(self.warnings),
            findings=tuple(self.findings),
            rate_limits=tuple(sorted(self.limits, key=lambda r: r.key)),
            l4_routes=tuple(sorted(self.l4, key=lambda r: (r.namespace, r.name))),
        )


def _collect(docs: Iterable[object], acc: _Collected) -> None:
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            acc.warnings.append(f"object {index}: not a mapping: ignored")
            continue
        kind = str(doc.get("kind", ""))
        if kind == "List":
            _collect(doc.get("items") or [], acc)
        elif kind == "WorkloadLabels":
            for uid, lab in read_map(doc.get("labels"), "labels").items():
                acc.labels[str(uid)] = read_labels(lab, f"labels.{uid}")
        elif kind not in ROUTING_KINDS + POLICY_KINDS:
            unsupported = kind_support(kind, doc)
            if unsupported is not None and kind != "Gateway":
                ref = _ref(kind, doc, index)
                acc.findings.append((ref, unsupported))
                acc.warnings.append(f"{ref}: {unsupported.message}")
        else:
            try:
                namespace, name = _meta(doc)
            except ConfigError as exc:
                acc.warnings.append(f"{kind} #{index}: {exc}: ignored")
                continue
            if kind in POLICY_KINDS:
                _add_policy(acc, f"{kind} {namespace}/{name}", doc)
            else:
                _add_routing(acc, kind, doc, namespace, name)


def _add_policy(acc: _Collected, ref: str, doc: Mapping[str, Any]) -> None:
    pol = parse_policy(doc)
    acc.policies.append(pol)
    acc.findings += [(ref, f) for f in pol.findings]
    acc.warnings += [f"{ref}: {f.render()}" for f in pol.findings]
    acc.warnings += [f"{ref}: {w}" for w in l7_warnings(pol)]


def _add_routing(
    acc: _Collected, kind: str, doc: Mapping[str, Any], namespace: str, name: str
) -> None:
    """A routing object, checked against the field table first; left out (and reported) if
    a field is refused or a value malformed."""
    ref = f"{kind} {namespace}/{name}"
    checked = check_object(kind, doc)
    acc.findings += [(ref, f) for f in checked]
    acc.warnings += [f"{ref}: {f.render()}" for f in checked]
    if any(f.level == "Error" for f in checked):
        acc.warnings.append(f"{ref}: not applied (unknown or unsupported fields, see above)")
        return
    ctx = Ctx(
        ref=ref,
        namespace=namespace,
        suffix=acc.domain_suffix,
        warnings=acc.warnings,
        findings=acc.findings,
    )
    spec = doc.get("spec") or {}
    try:
        if not isinstance(spec, Mapping):
            raise ConfigError("spec", "expected an object")
        if kind == "VirtualService":
            acc.tables.append(parse_virtual_service(spec, ctx, name))
        elif kind == "HTTPRoute":
            acc.tables.append(parse_http_route(spec, ctx, name))
        elif kind == "HTTPLocalRateLimitPolicy":
            acc.limits.append(parse_rate_limit(spec, namespace, name))
        elif kind in ("TCPRoute", "TLSRoute"):
            acc.l4.append(parse_l4_route(kind, spec, ctx, name))
        elif kind == "GRPCRoute":
            acc.tables.append(parse_grpc_route(spec, ctx, name))
        else:
            acc.rules.append(parse_destination_rule(spec, ctx, name))
    except ConfigError as exc:
        acc.findings.append(
            (ref, Finding(code=INVALID, level="Error", path=exc.path, message=exc.message))
        )
        ctx.warn(f"{exc}: ignored")


def _ref(kind: str, doc: Mapping[str, Any], index: int) -> str:
    try:
        namespace, name = _meta(doc)
    except ConfigError:
        return f"{kind} #{index}"
    return f"{kind} {namespace}/{name}"
