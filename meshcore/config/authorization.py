"""The one AuthorizationPolicy (and RequestAuthentication) parser, with its L4 and L7 views.

Owns: `parse_policy` (an AuthorizationPolicy or RequestAuthentication object as written ->
`AuthzPolicy`), the AuthorizationPolicy string syntax (`value_match`), `to_l4` (the
`meshcore.model.Authorization` node proxies enforce) and the L7 view the waypoint evaluates
(`AuthzPolicy` itself, with `fail_closed_l7`). The control plane, the waypoint and
``ambientctl analyze`` all call this module, so they agree on every policy.

Semantics (istio.io "Authorization Policy" reference, "Authorization Policy Conditions",
"Ambient: Layer 4 authorization policy"; checked 2026):
- Inside a source/operation every set field must match (values ORed) and no ``not*`` value may
  match; ``ipBlocks`` and ``remoteIpBlocks`` are therefore ANDed. ``serviceAccounts`` values are
  ``<namespace>/<name>`` and compare with the peer identity's namespace and service account
  (any trust domain).
- Strings: ``*`` = present; ``*x`` = suffix; ``x*`` = prefix; anything else exact (Istio checks
  the leading ``*`` first, so ``*a*`` is the suffix ``a*``); paths also take ``{*}``/``{**}``.
- Principals are compared without ``spiffe://``.

Fail closed (the project's bar, beyond Istio, whose API server refuses such objects): every
field is checked against `meshcore.config.fields` and every value is validated. Anything unknown,
refused or invalid makes the policy fail closed for the layer it concerns: its ALLOW rules match
nothing, its DENY (and CUSTOM) rules match everything, in the policy's scope. Fields Istio
documents as HTTP-only are not failures at L4: node proxies apply Istio's ztunnel rule (an ALLOW
rule using one matches nothing; a DENY rule is enforced on its L4 attributes alone). A
RequestAuthentication carries its ``jwtRules`` (`meshcore.config.requestauthn`) to the waypoint,
which validates tokens (`waypoint.protocol.jwt`); it is read as a DENY with no rules (it denies
nothing by itself) unless it fails closed (then its targets are denied). Node proxies cannot
read HTTP: at L4 (selector / namespace form) a RequestAuthentication denies its workloads.
``requestPrincipals`` and ``request.auth.*`` are evaluated by the waypoint from the verified
token; at L4 they follow Istio's ztunnel rule like every HTTP-only field.
An unreadable scope (selector / targetRefs) widens the scope to the policy's whole namespace;
so do the scope forms Istio's validation refuses (selector AND targetRef(s), targetRef AND
targetRefs, an unknown target kind/group, a target in another namespace), which would otherwise
apply nowhere.
A source or operation whose fields are all empty lists, and a ``when`` whose values and
notValues are both empty, are invalid (Istio's validation refuses them): read literally they
would constrain nothing, so an ALLOW rule would match every request.

Invariants: pure; `parse_policy` never raises for a readable ``metadata`` (everything else
becomes findings); frozen records.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshcore.config.fields import FIELDS, L4, Status
from meshcore.config.findings import (
    INVALID,
    REFUSED,
    Finding,
    check_object,
    condition_key,
    schema_path,
)
from meshcore.config.labels import Labels
from meshcore.config.matchers import MatchKind, StringMatcher, matcher
from meshcore.config.requestauthn import JwtRule, parse_jwt_rules
from meshcore.errors import ConfigError
from meshcore.model import (
    Action,
    Authorization,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ROOT_NAMESPACE = "istio-system"
WAYPOINT_CLASS = "istio-waypoint"
REQUEST_AUTHN_PREFIX = "istio_requestauthn_"
"""Name prefix of the L4 record a RequestAuthentication becomes ('_' never occurs in a
Kubernetes name, so it cannot collide with an AuthorizationPolicy)."""


class PolicyAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


# ------------------------------------------------------------------------------ strings


def value_match(text: str, *, path: bool = False, ignore_case: bool = False) -> StringMatcher:
    """Istio's ``StringMatcherWithPrefix`` order: ``*``, leading ``*``, trailing ``*``, exact;
    for paths also the templates ``{*}`` (one segment) and ``{**}`` (any rest), as REGEX."""
    if text == "*":
        return StringMatcher(kind=MatchKind.PRESENCE)
    if path and "{" in text:
        parts = []
        for seg in text.split("/"):
            if seg == "{*}":
                parts.append("[^/]+")
            elif seg == "{**}":
                parts.append(".*")
            else:
                parts.append(re.escape(seg))
        return matcher(MatchKind.REGEX, "/".join(parts))
    if text.startswith("*"):
        return StringMatcher(kind=MatchKind.SUFFIX, value=text[1:], ignore_case=ignore_case)
    if text.endswith("*"):
        return StringMatcher(kind=MatchKind.PREFIX, value=text[:-1], ignore_case=ignore_case)
    return StringMatcher(kind=MatchKind.EXACT, value=text, ignore_case=ignore_case)


def to_wire(m: StringMatcher) -> StringMatch:
    """The xDS `StringMatch` node proxies compare with (no REGEX at L4: paths are HTTP-only)."""
    assert m.kind is not MatchKind.REGEX
    assert not m.ignore_case
    return StringMatch(kind=m.kind, value=m.value)


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicySource:
    principals: tuple[StringMatcher, ...] = ()
    not_principals: tuple[StringMatcher, ...] = ()
    namespaces: tuple[StringMatcher, ...] = ()
    not_namespaces: tuple[StringMatcher, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()
    """(namespace, service account) pairs."""
    not_service_accounts: tuple[tuple[str, str], ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    remote_ip_blocks: tuple[IPNetwork, ...] = ()
    not_remote_ip_blocks: tuple[IPNetwork, ...] = ()
    request_principals: tuple[StringMatcher, ...] = ()
    """``<iss>/<sub>`` of the verified JWT (HTTP-only)."""
    not_request_principals: tuple[StringMatcher, ...] = ()
    l7_fields: tuple[str, ...] = ()
    """Set fields Istio documents as HTTP-only (for the L4 view)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyOperation:
    hosts: tuple[StringMatcher, ...] = ()
    not_hosts: tuple[StringMatcher, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[StringMatcher, ...] = ()
    not_methods: tuple[StringMatcher, ...] = ()
    paths: tuple[StringMatcher, ...] = ()
    not_paths: tuple[StringMatcher, ...] = ()
    l7_fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyCondition:
    """One ``when`` entry. Values are typed by key: `nets` for IP keys, `ports` for
    destination.port, `values` (strings) for the others."""

    key: str
    values: tuple[StringMatcher, ...] = ()
    not_values: tuple[StringMatcher, ...] = ()
    nets: tuple[IPNetwork, ...] = ()
    not_nets: tuple[IPNetwork, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    l4: bool = False
    """Whether node proxies evaluate this key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRule:
    sources: tuple[PolicySource, ...] = ()
    """ORed; empty = any source."""
    operations: tuple[PolicyOperation, ...] = ()
    conditions: tuple[PolicyCondition, ...] = ()
    """ANDed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyTarget:
    kind: str
    """``Gateway``, ``Service``, ``GatewayClass`` or ``ServiceEntry``."""
    name: str
    namespace: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzPolicy:
    """An AuthorizationPolicy (or a RequestAuthentication read as a DENY) as parsed."""

    namespace: str
    name: str
    action: PolicyAction
    kind: str = "AuthorizationPolicy"
    rules: tuple[PolicyRule, ...] = ()
    has_rules: bool = True
    """False when the spec has no ``rules`` field (ALLOW: allow-nothing)."""
    targets: tuple[PolicyTarget, ...] = ()
    selector: Labels | None = None
    provider: str = ""
    whole_namespace: bool = False
    """The scope was unreadable: applies to every workload and waypoint of the namespace."""
    findings: tuple[Finding, ...] = ()
    fail_closed_l7: tuple[str, ...] = ()
    """Why the waypoint's view fails closed (empty: it does not)."""
    fail_closed_l4: tuple[str, ...] = ()
    """Why the node proxies' view fails closed (empty: it does not)."""
    jwt_rules: tuple[JwtRule, ...] = ()
    """RequestAuthentication only: the token rules the waypoint validates with."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def targeted(self) -> bool:
        return bool(self.targets)

    @property
    def error(self) -> str | None:
        """The fail-closed reasons as one message (None: the policy is enforced as written)."""
        reasons = self.fail_closed_l7 or self.fail_closed_l4
        return "; ".join(reasons) if reasons else None


# Kept for the waypoint's vocabulary: the L7 view is the parsed policy itself.
L7Policy = AuthzPolicy


# ------------------------------------------------------------------------------ parsing


class _Problems:
    """Findings of one object, and which layers each one makes fail closed."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.l7: list[str] = []
        self.l4: list[str] = []

    def add(self, finding: Finding, *, l7: bool = True, l4: bool = True) -> None:
        self.findings.append(finding)
        if finding.level == "Error":
            if l7:
                self.l7.append(finding.render())
            if l4:
                self.l4.append(finding.render())

    def invalid(self, exc: ConfigError) -> None:
        self.add(Finding(code=INVALID, level="Error", path=exc.path, message=exc.message))


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected an object, got {type(value).__name__}")
    return value


def _list(value: object, path: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {type(value).__name__}")
    return value


def _text(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {value!r}")
    if not value:
        raise ConfigError(path, "empty string (Istio rejects empty values)")
    return value


def _strings(value: object, path: str) -> tuple[str, ...]:
    return tuple(_text(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))


def _matches(
    value: object, path: str, *, paths: bool = False, ignore_case: bool = False
) -> tuple[StringMatcher, ...]:
    return tuple(value_match(v, path=paths, ignore_case=ignore_case) for v in _strings(value, path))


def _principals(value: object, path: str) -> tuple[StringMatcher, ...]:
    return tuple(value_match(v.removeprefix("spiffe://")) for v in _strings(value, path))


def _net(text: str, path: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(path, f"{text!r} is not an IP address or CIDR ({exc})") from None


def _nets(value: object, path: str) -> tuple[IPNetwork, ...]:
    return tuple(_net(v, f"{path}[{i}]") for i, v in enumerate(_strings(value, path)))


def _port(value: object, path: str, lo: int = 1) -> int:
    if isinstance(value, str) and value.isdigit() and value.isascii():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 65535:
        raise ConfigError(path, f"{value!r} is not a port number ({lo}-65535)")
    return value


def _ports(value: object, path: str, lo: int = 1) -> tuple[int, ...]:
    return tuple(_port(v, f"{path}[{i}]", lo) for i, v in enumerate(_list(value, path)))


def _service_accounts(value: object, path: str) -> tuple[tuple[str, str], ...]:
    out = []
    for i, v in enumerate(_strings(value, path)):
        ns, sep, sa = v.partition("/")
        if not sep or not ns or not sa or "/" in sa or "*" in v:
            raise ConfigError(
                f"{path}[{i}]", f"{v!r} is not '<namespace>/<service account>' (exact, no '*')"
            )
        out.append((ns, sa))
    return tuple(out)


def _labels(value: object, path: str) -> Labels:
    out = []
    for k, v in _obj(value, path).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"{path}.{k}", "label keys and values must be strings")
        out.append((k, v))
    return tuple(sorted(out))


_SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")


def _source(value: object, path: str) -> PolicySource:
    s = _obj(value, path)
    if not s:
        raise ConfigError(path, "an empty source matches nothing in Istio (rejected)")
    source = PolicySource(
        principals=_principals(s.get("principals"), f"{path}.principals"),
        not_principals=_principals(s.get("notPrincipals"), f"{path}.notPrincipals"),
        namespaces=_matches(s.get("namespaces"), f"{path}.namespaces"),
        not_namespaces=_matches(s.get("notNamespaces"), f"{path}.notNamespaces"),
        service_accounts=_service_accounts(s.get("serviceAccounts"), f"{path}.serviceAccounts"),
        not_service_accounts=_service_accounts(
            s.get("notServiceAccounts"), f"{path}.notServiceAccounts"
        ),
        ip_blocks=_nets(s.get("ipBlocks"), f"{path}.ipBlocks"),
        not_ip_blocks=_nets(s.get("notIpBlocks"), f"{path}.notIpBlocks"),
        remote_ip_blocks=_nets(s.get("remoteIpBlocks"), f"{path}.remoteIpBlocks"),
        not_remote_ip_blocks=_nets(s.get("notRemoteIpBlocks"), f"{path}.notRemoteIpBlocks"),
        request_principals=_matches(s.get("requestPrincipals"), f"{path}.requestPrincipals"),
        not_request_principals=_matches(
            s.get("notRequestPrincipals"), f"{path}.notRequestPrincipals"
        ),
        l7_fields=tuple(k for k in _SOURCE_L7 if s.get(k)),
    )
    if source == PolicySource() and _all_known(s, "spec.rules[].from[].source"):
        # Only empty lists: constrains nothing, so an ALLOW rule would match every source.
        # Istio's validation refuses it ("`from.source` must not be empty").
        raise ConfigError(path, "every field is empty: the source must not be empty (Istio)")
    return source


def _operation(value: object, path: str) -> PolicyOperation:
    o = _obj(value, path)
    if not o:
        raise ConfigError(path, "an empty operation matches nothing in Istio (rejected)")
    operation = PolicyOperation(
        # Hosts compare case-insensitively (DNS names; Istio's host matcher ignores case).
        hosts=_matches(o.get("hosts"), f"{path}.hosts", ignore_case=True),
        not_hosts=_matches(o.get("notHosts"), f"{path}.notHosts", ignore_case=True),
        ports=_ports(o.get("ports"), f"{path}.ports"),
        not_ports=_ports(o.get("notPorts"), f"{path}.notPorts"),
        methods=_matches(o.get("methods"), f"{path}.methods"),
        not_methods=_matches(o.get("notMethods"), f"{path}.notMethods"),
        paths=_matches(o.get("paths"), f"{path}.paths", paths=True),
        not_paths=_matches(o.get("notPaths"), f"{path}.notPaths", paths=True),
        l7_fields=tuple(k for k in _OPERATION_L7 if o.get(k)),
    )
    if operation == PolicyOperation() and _all_known(o, "spec.rules[].to[].operation"):
        raise ConfigError(path, "every field is empty: the operation must not be empty (Istio)")
    return operation


def _all_known(value: Mapping[str, Any], schema: str) -> bool:
    """Every key of `value` is a field of the table (an unknown one is its own finding)."""
    table = FIELDS["AuthorizationPolicy"]
    return all(f"{schema}.{k}" in table for k in value)


_IP_KEYS = ("source.ip", "remote.ip", "destination.ip")


def _condition(value: object, path: str, problems: _Problems) -> PolicyCondition | None:
    """None when the key is refused at both layers (a finding is recorded); an HTTP-only key
    refused at the waypoint is kept for the L4 view (Istio's ztunnel rule)."""
    w = _obj(value, path)
    key = _text(w.get("key"), f"{path}.key")
    if "values" not in w and "notValues" not in w:
        raise ConfigError(path, "at least one of values or notValues must be set")
    row = condition_key(key)
    if row is None:
        problems.add(
            Finding(
                code=REFUSED,
                level="Error",
                path=f"{path}.key",
                message=f"unknown condition key {key!r}",
            )
        )
        return None
    _pattern, (status, l4, note) = row
    if status is not Status.IMPLEMENTED:
        # HTTP-only keys are Istio's ztunnel rule at L4, not a failure there: the condition
        # stays in the rule as an HTTP-only one (no values), so the L4 view drops an ALLOW rule
        # using it and keeps a DENY rule's L4 part (dropping the condition itself would turn
        # the ALLOW rule into allow-everything at L4). The L7 view fails closed.
        problems.add(
            Finding(
                code=REFUSED,
                level="Error",
                path=f"{path}.key",
                message=f"condition key {key!r} is not supported: {note}",
            ),
            l4=l4 is not L4.L7_ONLY,
        )
        if l4 is L4.L7_ONLY:
            # Kept as an HTTP-only condition so node proxies apply Istio's ztunnel rule to the
            # rule (dropping it would widen an ALLOW rule to "any connection" at L4).
            return PolicyCondition(key=key, l4=False)
        return None
    vp, np = f"{path}.values", f"{path}.notValues"
    if not _list(w.get("values"), vp) and not _list(w.get("notValues"), np):
        # Empty lists constrain nothing (an ALLOW rule would match every request); Istio's
        # validation refuses them like absent ones.
        raise ConfigError(path, "values and notValues are both empty (Istio: one must be set)")
    if key in _IP_KEYS:
        return PolicyCondition(
            key=key,
            nets=_nets(w.get("values"), vp),
            not_nets=_nets(w.get("notValues"), np),
            l4=l4 is L4.ENFORCED,
        )
    if key == "destination.port":
        return PolicyCondition(
            key=key,
            ports=_ports(w.get("values"), vp, 0),
            not_ports=_ports(w.get("notValues"), np, 0),
            l4=True,
        )
    parse = _principals if key == "source.principal" else _matches
    return PolicyCondition(
        key=key,
        values=parse(w.get("values"), vp),
        not_values=parse(w.get("notValues"), np),
        l4=l4 is L4.ENFORCED,
    )


def _rule(value: object, path: str, problems: _Problems) -> PolicyRule:
    m = _obj(value, path)
    sources = tuple(
        _source(_obj(f, f"{path}.from[{i}]").get("source"), f"{path}.from[{i}].source")
        for i, f in enumerate(_list(m.get("from"), f"{path}.from"))
    )
    ops = tuple(
        _operation(_obj(t, f"{path}.to[{i}]").get("operation"), f"{path}.to[{i}].operation")
        for i, t in enumerate(_list(m.get("to"), f"{path}.to"))
    )
    conds = []
    for i, w in enumerate(_list(m.get("when"), f"{path}.when")):
        c = _condition(w, f"{path}.when[{i}]", problems)
        if c is not None:
            conds.append(c)
    return PolicyRule(sources=sources, operations=ops, conditions=tuple(conds))


TARGET_GROUPS = {
    "Gateway": ("gateway.networking.k8s.io",),
    "GatewayClass": ("gateway.networking.k8s.io",),
    "Service": ("core",),
    "ServiceEntry": ("networking.istio.io",),
}
"""The kinds a policy may target, with their API group (Istio's validation; an omitted group is
read as the kind's own)."""


def _targets(spec: Mapping[str, Any], namespace: str) -> tuple[PolicyTarget, ...]:
    """The targetRef(s); scope forms Istio's validation refuses raise (they would otherwise
    apply nowhere, silently): both selector and targetRef(s), both targetRef and targetRefs,
    a kind/group it does not know, a target in another namespace."""
    refs = list(_list(spec.get("targetRefs"), "spec.targetRefs"))
    paths = [f"spec.targetRefs[{i}]" for i in range(len(refs))]
    if spec.get("targetRef") is not None:
        if refs:
            raise ConfigError("spec.targetRef", "only one of targetRef or targetRefs (Istio)")
        refs.append(spec["targetRef"])
        paths.append("spec.targetRef")
    if refs and spec.get("selector") is not None:
        raise ConfigError(paths[0], "only one of selector or targetRef(s) can be set (Istio)")
    out = []
    for ref, path in zip(refs, paths, strict=True):
        r = _obj(ref, path)
        kind = _text(r.get("kind"), f"{path}.kind")
        group = r.get("group") or ""
        if kind not in TARGET_GROUPS or (group and group not in ("", *TARGET_GROUPS[kind])):
            known = ", ".join(f"{k} ({g[0]})" for k, g in TARGET_GROUPS.items())
            raise ConfigError(f"{path}.kind", f"{group}/{kind} is not one of {known}")
        target_ns = _text(r.get("namespace", namespace), f"{path}.namespace")
        if target_ns != namespace:
            raise ConfigError(
                f"{path}.namespace", "a target in another namespace is not supported (Istio)"
            )
        out.append(
            PolicyTarget(kind=kind, name=_text(r.get("name"), f"{path}.name"), namespace=target_ns)
        )
    return tuple(out)


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _obj(obj.get("metadata"), "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("metadata.name", "required string is missing")
    ns = meta.get("namespace") or "default"
    if not isinstance(ns, str):
        raise ConfigError("metadata.namespace", "expected a string")
    return ns, name


def parse_policy(obj: Mapping[str, Any]) -> AuthzPolicy:
    """One AuthorizationPolicy or RequestAuthentication object (kind, metadata, spec) ->
    `AuthzPolicy`. Raises ConfigError only when ``metadata`` cannot be read."""
    kind = str(obj.get("kind", "AuthorizationPolicy"))
    namespace, name = _meta(obj)
    problems = _Problems()
    for f in check_object(kind, obj):
        # The table says which fields are HTTP-only: those are not failures at L4.
        problems.add(f, l4=not _l7_only_field(kind, f.path))
    raw_spec = obj.get("spec")
    spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
    if raw_spec is not None and not isinstance(raw_spec, Mapping):
        problems.invalid(ConfigError("spec", "expected an object"))
    # Scope first: without it we could not even fail closed in the right place.
    selector: Labels | None = None
    targets: tuple[PolicyTarget, ...] = ()
    whole_namespace = False
    try:
        if spec.get("selector") is not None:
            selector = _labels(
                _obj(spec["selector"], "spec.selector").get("matchLabels"),
                "spec.selector.matchLabels",
            )
        targets = _targets(spec, namespace)
    except ConfigError as exc:
        problems.invalid(exc)
        selector, targets, whole_namespace = None, (), True
    if kind == "RequestAuthentication":
        jwt_rules: tuple[JwtRule, ...] = ()
        try:
            jwt_rules = parse_jwt_rules(spec.get("jwtRules"))
        except ConfigError as exc:
            problems.invalid(exc)
        # Node proxies cannot validate tokens: the workloads it selects are denied at L4.
        l4_reason = (
            "RequestAuthentication needs a waypoint (node proxies cannot validate "
            "JWTs): its workloads are denied"
        )
        # A valid one denies nothing by itself (no rules); a broken one denies its targets.
        return AuthzPolicy(
            namespace=namespace,
            name=name,
            kind=kind,
            action=PolicyAction.DENY,
            rules=(PolicyRule(),) if problems.l7 else (),
            targets=targets,
            selector=selector,
            whole_namespace=whole_namespace,
            findings=tuple(problems.findings),
            fail_closed_l7=tuple(problems.l7),
            fail_closed_l4=(*problems.l4, *(() if targets else (l4_reason,))),
            jwt_rules=jwt_rules if not problems.l7 else (),
        )
    action = PolicyAction.DENY
    try:
        text = spec.get("action", "ALLOW")
        action = PolicyAction(text if isinstance(text, str) and text else "ALLOW")
    except ValueError:
        problems.invalid(ConfigError("spec.action", f"unknown action {spec.get('action')!r}"))
    provider = ""
    rules: list[PolicyRule] = []
    try:
        provider = str(_obj(spec.get("provider"), "spec.provider").get("name", ""))
        for i, r in enumerate(_list(spec.get("rules"), "spec.rules")):
            rules.append(_rule(r, f"spec.rules[{i}]", problems))
    except ConfigError as exc:
        problems.invalid(exc)
    return AuthzPolicy(
        namespace=namespace,
        name=name,
        action=action,
        rules=tuple(rules),
        has_rules=spec.get("rules") is not None,
        targets=targets,
        selector=selector,
        provider=provider,
        whole_namespace=whole_namespace,
        findings=tuple(problems.findings),
        fail_closed_l7=tuple(problems.l7),
        fail_closed_l4=tuple(problems.l4),
    )


def _l7_only_field(kind: str, path: str) -> bool:
    row = FIELDS.get(kind, {}).get(schema_path(path))
    return row is not None and row.l4 is L4.L7_ONLY


# ------------------------------------------------------------------------------ L4 view


def _l4_rule(rule: PolicyRule, deny: bool) -> tuple[Rule | None, list[str]]:
    """One rule -> L4 Rule (None = matches nothing) + the HTTP-only parts found (Istio's
    ztunnel rule: ALLOW drops the rule, DENY keeps its L4 attributes)."""
    l7: list[str] = []
    clauses: list[Clause] = []
    # from: entries ORed. An entry whose L4 part is empty matches any connection (its HTTP
    # part is ignored for DENY), so then the whole clause matches everything and is left out.
    if rule.sources:
        matches = []
        match_all = False
        for s in rule.sources:
            l7.extend(f"from.source.{f}" for f in s.l7_fields)
            m = Match(
                principals=tuple(to_wire(v) for v in s.principals),
                not_principals=tuple(to_wire(v) for v in s.not_principals),
                namespaces=tuple(to_wire(v) for v in s.namespaces),
                not_namespaces=tuple(to_wire(v) for v in s.not_namespaces),
                service_accounts=tuple(
                    ServiceAccountMatch(namespace=n, service_account=a)
                    for n, a in s.service_accounts
                ),
                not_service_accounts=tuple(
                    ServiceAccountMatch(namespace=n, service_account=a)
                    for n, a in s.not_service_accounts
                ),
                source_ips=s.ip_blocks,
                not_source_ips=s.not_ip_blocks,
            )
            if m.is_empty():
                match_all = True
            else:
                matches.append(m)
        if not match_all:
            clauses.append(Clause(matches=tuple(matches)))
    if rule.operations:
        matches = []
        match_all = False
        for o in rule.operations:
            l7.extend(f"to.operation.{f}" for f in o.l7_fields)
            m = Match(destination_ports=o.ports, not_destination_ports=o.not_ports)
            if m.is_empty():
                match_all = True
            else:
                matches.append(m)
        if not match_all:
            clauses.append(Clause(matches=tuple(matches)))
    for c in rule.conditions:
        if not c.l4:
            l7.append(f"when.{c.key}")
            continue
        m = _l4_condition(c)
        if not m.is_empty():
            clauses.append(Clause(matches=(m,)))
    if l7 and not deny:
        return None, l7
    return Rule(clauses=tuple(clauses)), l7


def _l4_condition(c: PolicyCondition) -> Match:
    if c.key == "source.ip":
        return Match(source_ips=c.nets, not_source_ips=c.not_nets)
    if c.key == "destination.ip":
        return Match(destination_ips=c.nets, not_destination_ips=c.not_nets)
    if c.key == "destination.port":
        return Match(destination_ports=c.ports, not_destination_ports=c.not_ports)
    if c.key == "source.namespace":
        return Match(
            namespaces=tuple(to_wire(v) for v in c.values),
            not_namespaces=tuple(to_wire(v) for v in c.not_values),
        )
    assert c.key == "source.principal", c.key
    return Match(
        principals=tuple(to_wire(v) for v in c.values),
        not_principals=tuple(to_wire(v) for v in c.not_values),
    )


def to_l4(
    policy: AuthzPolicy, *, root_namespace: str = ROOT_NAMESPACE, waypoint: bool = False
) -> tuple[Authorization | None, list[str]]:
    """The L4 Authorization node proxies enforce for `policy` (None: node proxies do not
    enforce it: targetRef policies, AUDIT) and the warnings to report. ``waypoint=True``: the
    same L4 view for TCP carried through a waypoint (targetRef policies included; the caller
    chose the applicable ones)."""
    if policy.targeted and not waypoint:
        return None, []
    if policy.selector is not None:
        scope = Scope.WORKLOAD_SELECTOR
    elif policy.namespace == root_namespace:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    name = policy.name
    if policy.kind == "RequestAuthentication":
        name = REQUEST_AUTHN_PREFIX + policy.name
    if policy.fail_closed_l4:
        reasons = "; ".join(policy.fail_closed_l4)
        if policy.action is PolicyAction.ALLOW:
            return Authorization(name=name, namespace=policy.namespace, scope=scope), [
                f"enforced fail-closed (allows nothing) until fixed: {reasons}"
            ]
        if policy.action is PolicyAction.AUDIT:
            return None, [f"AUDIT policy is not enforced and is invalid: {reasons}"]
        return Authorization(
            name=name,
            namespace=policy.namespace,
            scope=scope,
            action=Action.DENY,
            rules=(Rule(),),
        ), [f"enforced fail-closed (denies everything) until fixed: {reasons}"]
    if policy.action is PolicyAction.AUDIT:
        return None, ["action AUDIT is not enforced by node proxies (audit never decides)"]
    warnings: list[str] = []
    deny = policy.action is not PolicyAction.ALLOW
    if policy.action is PolicyAction.CUSTOM:
        warnings.append(
            "action CUSTOM (external authorization) is not implemented: node proxies deny "
            "what its rules match (fail closed)"
        )
    rules: list[Rule] = []
    for i, r in enumerate(policy.rules):
        rule, l7 = _l4_rule(r, deny)
        if l7:
            effect = (
                "the rule is enforced on its L4 attributes only (denies more)"
                if deny
                else "the rule is dropped (it allows nothing)"
            )
            warnings.append(
                f"rules[{i}] uses {', '.join(sorted(set(l7)))} which node proxies cannot "
                f"evaluate; {effect}"
            )
        if rule is not None:
            rules.append(rule)
    return Authorization(
        name=name,
        namespace=policy.namespace,
        scope=scope,
        action=Action.DENY if deny else Action.ALLOW,
        rules=tuple(rules),
    ), warnings


def l7_warnings(policy: AuthzPolicy) -> list[str]:
    """What the waypoint reports about `policy` (beyond the findings)."""
    out = []
    if policy.fail_closed_l7:
        effect = "allows nothing" if policy.action is PolicyAction.ALLOW else "denies everything"
        if policy.action is not PolicyAction.AUDIT:
            out.append(
                f"enforced fail-closed ({effect}) until fixed: {'; '.join(policy.fail_closed_l7)}"
            )
    if policy.action is PolicyAction.CUSTOM:
        out.append(
            "action CUSTOM (external authorization) is not supported by the waypoint: "
            "requests it matches are denied (fail closed)"
        )
    if policy.action is PolicyAction.AUDIT:
        out.append("action AUDIT is not supported by the waypoint: ignored (audit never decides)")
    return out
