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
must match (values ORed) and no ``not*`` value may match: ``ipBlocks`` and ``remoteIpBlocks``
are ANDed; ``serviceAccounts`` compare the peer's (namespace, service account).

Fail closed: a policy the parser (`meshcore.config.authorization`) could not fully read or
implement (``fail_closed_l7``) matches nothing if it is an ALLOW and everything if it is a DENY
or CUSTOM; a RequestAuthentication arrives as such a DENY for its targets. An unreadable scope
applies the policy to every waypoint of its namespace.

Invariant: pure; the decision carries the policy that decided, for the access log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from meshcore.config.authorization import (
    ROOT_NAMESPACE,
    WAYPOINT_CLASS,
    AuthzPolicy,
    IPNetwork,
    PolicyAction,
    PolicyCondition,
    PolicyOperation,
    PolicyRule,
    PolicySource,
)
from meshcore.config.labels import selector_matches
from meshcore.config.matchers import StringMatcher
from waypoint.protocol.route import RequestInfo


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
    policies: Sequence[AuthzPolicy],
    waypoint: WaypointIdentity,
    service_name: str | None,
    service_namespace: str | None,
) -> tuple[AuthzPolicy, ...]:
    wl_labels = dict(waypoint.labels)
    out = []
    for p in policies:
        if p.targets:
            for t in p.targets:
                if (
                    (
                        t.kind == "Gateway"
                        and t.name == waypoint.name
                        and t.namespace == waypoint.namespace == p.namespace
                    )
                    or (
                        t.kind == "Service"
                        and t.name == service_name
                        and p.namespace == t.namespace == service_namespace
                    )
                    or (
                        t.kind == "GatewayClass"
                        and t.name == WAYPOINT_CLASS
                        and p.namespace == ROOT_NAMESPACE
                    )
                ):
                    out.append(p)
                    break
        elif p.whole_namespace and p.namespace == waypoint.namespace:
            # Unreadable scope: fail closed over the whole namespace.
            out.append(p)
        elif (
            p.selector
            and p.namespace in (waypoint.namespace, ROOT_NAMESPACE)
            and selector_matches(p.selector, wl_labels)
        ):
            out.append(p)
    return tuple(out)


def _any(matches: Sequence[StringMatcher], value: str | None) -> bool:
    return any(m.matches(value) for m in matches)


def _ip_in(value: str, nets: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    return any(ip in n for n in nets)


def _service_account(principal: str | None) -> tuple[str, str] | None:
    """(namespace, service account) of ``<td>/ns/<ns>/sa/<sa>``."""
    if principal is None:
        return None
    parts = principal.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        return None
    return parts[2], parts[4]


def _remote_ip(req: RequestInfo) -> str:
    """Istio's remote.ip: X-Forwarded-For with the mesh's trusted hops (0 by default, Envoy's
    ``xff_num_trusted_hops``), so the downstream peer address: the source IP."""
    return req.source_ip


def _source_matches(s: PolicySource, req: RequestInfo) -> bool:
    if s.principals and not _any(s.principals, req.source_principal):
        return False
    if s.not_principals and _any(s.not_principals, req.source_principal):
        return False
    if s.namespaces and not _any(s.namespaces, req.source_namespace):
        return False
    if s.not_namespaces and _any(s.not_namespaces, req.source_namespace):
        return False
    sa = _service_account(req.source_principal)
    if s.service_accounts and sa not in s.service_accounts:
        return False
    if s.not_service_accounts and sa is not None and sa in s.not_service_accounts:
        return False
    # ipBlocks and remoteIpBlocks are separate fields of one source: ANDed (Istio).
    if s.ip_blocks and not _ip_in(req.source_ip, s.ip_blocks):
        return False
    if s.not_ip_blocks and _ip_in(req.source_ip, s.not_ip_blocks):
        return False
    if s.remote_ip_blocks and not _ip_in(_remote_ip(req), s.remote_ip_blocks):
        return False
    if s.not_remote_ip_blocks and _ip_in(_remote_ip(req), s.not_remote_ip_blocks):
        return False
    # requestPrincipals: <iss>/<sub> of the verified JWT (`waypoint.protocol.jwt`); none: no match.
    principal = req.auth.principal if req.auth is not None else None
    if s.request_principals and not _any(s.request_principals, principal):
        return False
    return not (s.not_request_principals and _any(s.not_request_principals, principal))


def _op_matches(o: PolicyOperation, req: RequestInfo) -> bool:
    host = req.host
    if o.hosts and not _any(o.hosts, host):
        return False
    if o.not_hosts and _any(o.not_hosts, host):
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


def _condition_matches(c: PolicyCondition, req: RequestInfo) -> bool:
    """Keys and value types were checked by the parser (`meshcore.config.authorization`)."""
    if c.key in ("source.ip", "remote.ip", "destination.ip"):
        value = {
            "source.ip": req.source_ip,
            "remote.ip": _remote_ip(req),
            "destination.ip": req.destination_ip,
        }[c.key]
        if c.nets and not _ip_in(value, c.nets):
            return False
        return not (c.not_nets and _ip_in(value, c.not_nets))
    if c.key == "destination.port":
        if c.ports and req.port not in c.ports:
            return False
        return not (c.not_ports and req.port in c.not_ports)
    if c.key.startswith("request.auth."):
        return _auth_condition(c, req)
    text: str | None
    if c.key.startswith("request.headers["):
        text = req.header(c.key[len("request.headers[") : -1].lower())
    elif c.key == "source.namespace":
        text = req.source_namespace
    elif c.key == "source.principal":
        text = req.source_principal
    else:  # pragma: no cover - the parser refuses every other key
        return False
    if c.values and not _any(c.values, text):
        return False
    return not (c.not_values and _any(c.not_values, text))


def _auth_condition(c: PolicyCondition, req: RequestInfo) -> bool:
    """``request.auth.*`` (Istio "Authorization Policy Conditions"): a multi-valued attribute
    (audiences, a list claim) matches when any of its values does; no token: no value."""
    auth = req.auth
    texts: tuple[str, ...] = ()
    if auth is not None:
        if c.key == "request.auth.principal":
            texts = (auth.principal,)
        elif c.key == "request.auth.audiences":
            texts = auth.audiences
        elif c.key == "request.auth.presenter":
            texts = (auth.presenter,) if auth.presenter else ()
        else:  # request.auth.claims[a][b]...
            inner = c.key[len("request.auth.claims[") : -1]
            texts = auth.claim(inner.split("]["))
    if c.values and not any(_any(c.values, t) for t in texts):
        return False
    return not (c.not_values and any(_any(c.not_values, t) for t in texts))


def rule_matches(rule: PolicyRule, req: RequestInfo) -> bool:
    if rule.sources and not any(_source_matches(s, req) for s in rule.sources):
        return False
    if rule.operations and not any(_op_matches(o, req) for o in rule.operations):
        return False
    return all(_condition_matches(c, req) for c in rule.conditions)


def _policy_matches(p: AuthzPolicy, req: RequestInfo) -> bool:
    if p.fail_closed_l7:
        # Something we do not implement: ALLOW rules match nothing, DENY/CUSTOM everything.
        return p.action is not PolicyAction.ALLOW
    return any(rule_matches(r, req) for r in p.rules)


def evaluate(policies: Sequence[AuthzPolicy], req: RequestInfo) -> L7Decision:
    """Decide one request against the applicable policies."""
    for p in policies:
        if p.action is PolicyAction.CUSTOM and _policy_matches(p, req):
            return L7Decision(
                allowed=False,
                policy=p.key,
                reason=f"CUSTOM policy {p.key} (provider {p.provider or '?'}) is not supported: "
                "denied (fail closed)",
            )
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
