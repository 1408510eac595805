"""Pure L4 authorization: does a connection pass a workload's Authorization policies?

Owns: matching one `Authorization` against a `ConnectionInfo`, and combining the policies that
apply to a destination into one `Decision`. No I/O, no state lookups: callers pass the policies
(`MeshState.policies_for`).

Semantics follow istio/ztunnel ``src/rbac.rs`` (Authorization::matches) and the proxy's
``assert_rbac`` combination, checked 2026:
- A policy with no rules matches nothing. A rule with no clauses matches everything; a clause with
  no matches matches everything; a Match with no field set matches nothing (it is skipped).
- Rules are ORed; clauses in a rule are ANDed; matches in a clause are ORed; in one Match each
  field ORs over its values and the set fields are ANDed; a not_* field requires that NO value
  matches.
- Combination: any matching DENY denies; else, with no ALLOW policy, allow; else allow only if
  some ALLOW policy matches. (An ALLOW policy with no rules therefore denies everything: it
  exists, and matches nothing. This is Istio's "allow-nothing" policy.)
- Principals compare as ``<td>/ns/<ns>/sa/<sa>`` (no ``spiffe://``). Namespaces compare with
  the identity's namespace; service accounts compare (namespace, service account), any trust
  domain.
- A connection without identity (plaintext) never matches a principals / namespaces /
  service_accounts condition, and always satisfies the not_* forms of those (ztunnel: the
  positive predicate is false for every value). Deviation: ztunnel compares namespaces of a
  plaintext peer against ``""``, so a raw ``{prefix: ""}`` namespace match would match it; here
  it does not (no identity never matches a positive identity condition).
- dry_run policies are not modelled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshcore.identity import SpiffeId
from meshcore.model import Action, Authorization, IPAddress, Match, StringMatch


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionInfo:
    """What L4 authorization sees of a connection."""

    src_identity: SpiffeId | None
    """Peer identity from the mTLS client certificate; None for plaintext."""
    src_ip: IPAddress
    """Source (client workload) IP."""
    dst_ip: IPAddress
    """Destination workload IP (the one the policies protect)."""
    dst_port: int
    """Destination port on that workload."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Outcome of `evaluate`."""

    allowed: bool
    """Whether the connection may proceed."""
    policy: str | None
    """Key (``ns/name``) of the policy that decided, if one did."""
    reason: str
    """Human-readable explanation, for logs and the 401 body."""


def _principal(identity: SpiffeId) -> str:
    # Istio writes principals without the scheme (ztunnel strips "spiffe://" before matching).
    return f"{identity.trust_domain}/ns/{identity.namespace}/sa/{identity.service_account}"


def _string_field(
    positive: tuple[StringMatch, ...], negative: tuple[StringMatch, ...], value: str | None
) -> bool:
    """One string-typed field: None = no identity, for which every comparison is false."""
    if positive and (value is None or not any(m.matches(value) for m in positive)):
        return False
    return not (negative and value is not None and any(m.matches(value) for m in negative))


def match_matches(m: Match, conn: ConnectionInfo) -> bool:
    """Whether one (non-empty) Match matches `conn`. Kinds AND, values OR."""
    ident = conn.src_identity
    if m.destination_ips and not any(conn.dst_ip in n for n in m.destination_ips):
        return False
    if any(conn.dst_ip in n for n in m.not_destination_ips):
        return False
    if m.source_ips and not any(conn.src_ip in n for n in m.source_ips):
        return False
    if any(conn.src_ip in n for n in m.not_source_ips):
        return False
    if m.destination_ports and conn.dst_port not in m.destination_ports:
        return False
    if conn.dst_port in m.not_destination_ports:
        return False

    def sa_hit(sa_ns: str, sa: str) -> bool:
        return ident is not None and ident.namespace == sa_ns and ident.service_account == sa

    if m.service_accounts and not any(
        sa_hit(s.namespace, s.service_account) for s in m.service_accounts
    ):
        return False
    if any(sa_hit(s.namespace, s.service_account) for s in m.not_service_accounts):
        return False
    principal = _principal(ident) if ident is not None else None
    if not _string_field(m.principals, m.not_principals, principal):
        return False
    namespace = ident.namespace if ident is not None else None
    return _string_field(m.namespaces, m.not_namespaces, namespace)


def policy_matches(policy: Authorization, conn: ConnectionInfo) -> bool:
    """Whether `policy`'s rules match `conn` (its action is not applied here)."""
    for rule in policy.rules:
        # all() over no clauses is True: a rule without clauses matches (ztunnel).
        if all(
            not clause.matches
            or any(not m.is_empty() and match_matches(m, conn) for m in clause.matches)
            for clause in rule.clauses
        ):
            return True
    return False


_NO_ALLOW_POLICY = Decision(allowed=True, policy=None, reason="no ALLOW policy applies")
"""The decision of most connections, built once (a frozen dataclass: shared safely)."""


def evaluate(policies: Iterable[Authorization], conn: ConnectionInfo) -> Decision:
    """Combine the policies applying to the destination (Istio order: DENY, then ALLOW)."""
    allow: list[Authorization] = []
    for policy in policies:
        if policy.action is Action.DENY:
            if policy_matches(policy, conn):
                return Decision(
                    allowed=False,
                    policy=policy.key,
                    reason=f"denied by DENY policy {policy.key}",
                )
        else:
            allow.append(policy)
    if not allow:
        return _NO_ALLOW_POLICY
    for policy in allow:
        if policy_matches(policy, conn):
            return Decision(
                allowed=True, policy=policy.key, reason=f"allowed by ALLOW policy {policy.key}"
            )
    names = ", ".join(p.key for p in allow)
    return Decision(allowed=False, policy=None, reason=f"no ALLOW policy matched ({names})")
