"""Pure L7 authorization at the waypoint (Istio AuthorizationPolicy semantics).

Owns: which policies apply to a request at this waypoint (`applicable`), and `evaluate`.

Applicability (Istio ambient): a policy applies at a waypoint when its ``targetRefs`` name
- the waypoint's Gateway (kind Gateway, same namespace): all traffic through the waypoint;
- the destination Service (kind Service, the service's namespace): traffic to that service;
- the GatewayClass ``istio-waypoint`` (root namespace): every waypoint;
or (the older "selector form") its ``selector`` matches the waypoint's own labels (e.g.
``istio.io/gateway-name: <waypoint>``) and it lives in the waypoint's or the root namespace.
Policies with neither are enforced by node proxies, not here.

Evaluation order (Istio): CUSTOM first (unsupported here: a CUSTOM policy whose rules match
denies, fail closed), then any matching DENY denies; then if there is an ALLOW policy, one must
match; AUDIT never decides. A rule matches when every present part matches: ``from`` (any
source), ``to`` (any operation), and each ``when``. Inside a source/operation every set field
must match (values ORed) and no ``not*`` value may match.

Invariant: pure; the decision carries the policy that decided, for the access log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from meshcore.l7.config import (
    ROOT_NAMESPACE,
    WAYPOINT_CLASS,
    L7Policy,
    PolicyAction,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    ValueMatch,
)
from meshcore.l7.route import RequestInfo, selector_matches


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointIdentity:
    """Who this waypoint is, for policy applicability."""

    name: str
    """Gateway name."""
    namespace: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Decision:
    allowed: bool
    policy: str = ""
    """``ns/name`` of the deciding policy (empty: default allow)."""
    reason: str = ""


def applicable(
    policies: Sequence[L7Policy],
    waypoint: WaypointIdentity,
    service_name: str | None,
    service_namespace: str | None,
) -> tuple[L7Policy, ...]:
    wl_labels = dict(waypoint.labels)
    out = []
    for p in policies:
        if p.targets:
            for t in p.targets:
                if (
                    (t.kind == "Gateway" and t.name == waypoint.name
                     and t.namespace == waypoint.namespace == p.namespace)
                    or (t.kind == "Service" and t.name == service_name
                        and p.namespace == t.namespace == service_namespace)
                    or (t.kind == "GatewayClass" and t.name == WAYPOINT_CLASS
                        and p.namespace == ROOT_NAMESPACE)
                ):  # fmt: skip
                    out.append(p)
                    break
        elif (
            p.selector
            and p.namespace in (waypoint.namespace, ROOT_NAMESPACE)
            and selector_matches(p.selector, wl_labels)
        ):
            out.append(p)
    return tuple(out)


def _any(matches: Sequence[ValueMatch], value: str | None, *, ignore_case: bool = False) -> bool:
    return any(m.matches(value, ignore_case=ignore_case) for m in matches)


def _ip_in(value: str, nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    return any(ip in n for n in nets)


def _source_matches(s: PolicySource, req: RequestInfo) -> bool:
    if s.principals and not _any(s.principals, req.source_principal):
        return False
    if s.not_principals and _any(s.not_principals, req.source_principal):
        return False
    if s.namespaces and not _any(s.namespaces, req.source_namespace):
        return False
    if s.not_namespaces and _any(s.not_namespaces, req.source_namespace):
        return False
    if s.ip_blocks and not _ip_in(req.source_ip, s.ip_blocks):
        return False
    return not (s.not_ip_blocks and _ip_in(req.source_ip, s.not_ip_blocks))


def _op_matches(o: PolicyOperation, req: RequestInfo) -> bool:
    host = req.host
    if o.hosts and not _any(o.hosts, host, ignore_case=True):
        return False
    if o.not_hosts and _any(o.not_hosts, host, ignore_case=True):
        return False
    if o.ports and req.port not in o.ports:
        return False
    if o.not_ports and req.port in o.not_ports:
        return False
    if o.methods and not _any(o.methods, req.method):
        return False
    if o.not_methods and _any(o.not_methods, req.method):
        return False
    path = req.path_only
    if o.paths and not _any(o.paths, path):
        return False
    return not (o.not_paths and _any(o.not_paths, path))


def _condition_value(key: str, req: RequestInfo) -> str | None:
    if key.startswith("request.headers[") and key.endswith("]"):
        return req.header(key[len("request.headers[") : -1].lower())
    return {
        "source.ip": req.source_ip,
        "remote.ip": req.source_ip,
        "source.namespace": req.source_namespace,
        "source.principal": req.source_principal,
        "destination.port": str(req.port),
        "destination.ip": req.destination_ip,
    }.get(key)


_IP_KEYS = ("source.ip", "remote.ip", "destination.ip")


def _condition_matches(c: PolicyCondition, req: RequestInfo) -> bool:
    value = _condition_value(c.key, req)
    if c.key in _IP_KEYS:

        def ip_match(vms: Sequence[ValueMatch]) -> bool:
            nets = []
            for vm in vms:
                text = vm.exact or ""
                try:
                    nets.append(ipaddress.ip_network(text, strict=False))
                except ValueError:
                    continue
            return value is not None and _ip_in(value, nets)

        if c.values and not ip_match(c.values):
            return False
        return not (c.not_values and ip_match(c.not_values))
    if c.key == "source.principal" and value is not None:
        if c.values and not (_any(c.values, value) or _any(c.values, "spiffe://" + value)):
            return False
        return not (c.not_values and (_any(c.not_values, value)
                                      or _any(c.not_values, "spiffe://" + value)))  # fmt: skip
    if c.values and not _any(c.values, value):
        return False
    return not (c.not_values and _any(c.not_values, value))


def rule_matches(rule: PolicyRule, req: RequestInfo) -> bool:
    if rule.never:
        return False
    if rule.sources and not any(_source_matches(s, req) for s in rule.sources):
        return False
    if rule.operations and not any(_op_matches(o, req) for o in rule.operations):
        return False
    return all(_condition_matches(c, req) for c in rule.conditions)


def _policy_matches(p: L7Policy, req: RequestInfo) -> bool:
    return any(rule_matches(r, req) for r in p.rules)


def evaluate(policies: Sequence[L7Policy], req: RequestInfo) -> L7Decision:
    """Decide one request against the applicable policies."""
    for p in policies:
        if p.action is PolicyAction.CUSTOM and _policy_matches(p, req):
            return L7Decision(
                allowed=False, policy=p.key,
                reason=f"CUSTOM policy {p.key} (provider {p.provider or '?'}) is not supported: "
                "denied (fail closed)",
            )  # fmt: skip
    for p in policies:
        if p.action is PolicyAction.DENY and _policy_matches(p, req):
            return L7Decision(allowed=False, policy=p.key, reason=f"denied by DENY {p.key}")
    allows = [p for p in policies if p.action is PolicyAction.ALLOW]
    if not allows:
        return L7Decision(allowed=True, reason="no ALLOW policy")
    for p in allows:
        if _policy_matches(p, req):
            return L7Decision(allowed=True, policy=p.key, reason=f"allowed by {p.key}")
    return L7Decision(
        allowed=False,
        policy=",".join(p.key for p in allows),
        reason="no ALLOW policy matched",
    )
