"""Store snapshot -> the L7 resources served to waypoints (sans-I/O, pure).

Owns: which stored objects waypoints receive and under which names
(``type.googleapis.com/ambient.l7.Resource``, see `meshcore.proto.l7res`):
- every VirtualService, DestinationRule, HTTPRoute, AuthorizationPolicy and
  RequestAuthentication (selector and targetRef(s) forms alike) as written: the waypoint
  decides which apply to it with the same rules as in static mode (`waypoint.protocol`), so the
  control plane does not pre-filter;
- per namespace with pods, one ``WorkloadLabels`` resource: workload uid -> pod labels, so
  DestinationRule subsets and ``sourceLabels`` see the real labels (not only app/version).

And `l7_findings`: what the waypoints will report about each of those objects, computed with
the waypoint's own parser (`meshcore.config.objects.parse_objects`), so the control plane reports a
bad object (debug view, status) exactly as the waypoint that applies it (and NACKs it) sees it.

And the findings of the objects waypoints do not parse: waypoint Gateways' fields
(`gateway_findings`), PeerAuthentication's fields and values (`peer_authentication_findings`),
the kinds the mesh does not implement (`unimplemented_findings`, one AMB0204 each), and the
AuthorizationPolicies node proxies enforce fail-closed for their reserved names
(`reserved_name_findings`, `controlplane.translate` "Reserved names"), so every object read
from Kubernetes is reported in one place (``ControlPlane.findings``, `merge_findings`).

Invariants: pure function of the snapshot; equal inputs give equal resources (canonical JSON),
so the xDS table's content-hash versions only change when an object really changed. The
optional caches only memoise (issue 14: re-deriving every namespace's resources and re-parsing
every object on each pod change cost ~75 ms of the control plane's 82 ms per change at 10,000
pods): a namespace's resources are reused while the store hands over the same (unchanged)
`NamespaceObjects`, an object's findings while its JSON is the same; results equal the uncached
ones.
"""

from __future__ import annotations

import json

from controlplane.objects import UNIMPLEMENTED_KINDS
from controlplane.store import NamespaceObjects, StoreSnapshot
from controlplane.translate import REJECTED_PREFIX, TranslateOptions, reserved_prefix
from meshcore.config.authorization import PolicyAction
from meshcore.config.findings import INVALID, Finding, check_object, kind_support
from meshcore.config.objects import parse_objects
from meshcore.proto.l7res import L7Resource

ROUTING_KINDS = (
    "VirtualService",
    "DestinationRule",
    "HTTPRoute",
    "RequestAuthentication",
    "HTTPLocalRateLimitPolicy",
    "GRPCRoute",
    "TCPRoute",
    "TLSRoute",
)


NamespaceCache = dict[str, tuple[NamespaceObjects, tuple[L7Resource, ...]]]
FindingsCache = dict[str, tuple[str, tuple[tuple[str, Finding], ...]]]


def l7_resources(
    snapshot: StoreSnapshot, opts: TranslateOptions, cache: NamespaceCache | None = None
) -> dict[str, L7Resource]:
    """Every L7 resource of the snapshot, by key. `cache` (kept by the caller across calls)
    memoises per namespace, keyed by the identity of its `NamespaceObjects`."""
    out: dict[str, L7Resource] = {}
    fresh: NamespaceCache = {}
    for ns, objs in snapshot.namespaces.items():
        hit = cache.get(ns) if cache is not None else None
        found = (
            hit[1] if hit is not None and hit[0] is objs else _namespace_resources(ns, objs, opts)
        )
        fresh[ns] = (objs, found)
        for res in found:
            out[res.key] = res
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return out


def _namespace_resources(
    ns: str, objs: NamespaceObjects, opts: TranslateOptions
) -> tuple[L7Resource, ...]:
    out: list[L7Resource] = []
    add = out.append
    for obj in objs.stored.values():
        if obj.kind in ROUTING_KINDS and obj.raw_json:
            add(L7Resource(kind=obj.kind, namespace=ns, name=obj.name, json=obj.raw_json))
    for ap in objs.authorization_policies.values():
        if ap.raw_json:
            add(
                L7Resource(kind="AuthorizationPolicy", namespace=ns, name=ap.name, json=ap.raw_json)
            )
    labels = {
        f"{opts.cluster_id}//Pod/{ns}/{pod.name}": dict(pod.labels)
        for pod in objs.pods.values()
        if pod.ips
    }
    if labels:
        doc = {"kind": "WorkloadLabels", "labels": labels}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        add(L7Resource(kind="WorkloadLabels", namespace=ns, name="pods", json=text))
    return tuple(out)


def l7_findings(
    resources: dict[str, L7Resource], cache: FindingsCache | None = None
) -> dict[str, list[Finding]]:
    """``Kind ns/name`` -> findings, from parsing `resources` as a waypoint does. Each object
    is parsed on its own (a finding concerns one object); `cache` (kept by the caller) reuses
    an object's findings while its JSON is unchanged."""
    out: dict[str, list[Finding]] = {}
    fresh: FindingsCache = {}
    for key in sorted(resources):
        res = resources[key]
        if res.mesh is not None:
            continue  # MeshSettings: no object to parse
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0] == res.json:
            found = hit[1]
        else:
            found = parse_objects([res.document()]).findings
        fresh[key] = (res.json, found)
        for ref, finding in found:
            out.setdefault(ref, []).append(finding)
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return out


def gateway_findings(snapshot: StoreSnapshot) -> dict[str, list[Finding]]:
    """``Gateway ns/name`` -> field findings (waypoint Gateways' unsupported fields; a Gateway
    of another class is itself reported as not implemented)."""
    out: dict[str, list[Finding]] = {}
    for ns, objs in snapshot.namespaces.items():
        for obj in objs.stored.values():
            if obj.kind == "Gateway" and obj.raw_json:
                found = check_object("Gateway", json.loads(obj.raw_json))
                if found:
                    out[f"Gateway {ns}/{obj.name}"] = found
    return out


def peer_authentication_findings(snapshot: StoreSnapshot) -> dict[str, list[Finding]]:
    """``PeerAuthentication ns/name`` -> field findings; an unreadable one (enforced as STRICT
    for its scope) gets an Error finding saying so."""
    out: dict[str, list[Finding]] = {}
    for ns, objs in snapshot.namespaces.items():
        for pa in objs.peer_authentications.values():
            found = (
                check_object("PeerAuthentication", json.loads(pa.raw_json)) if pa.raw_json else []
            )
            if pa.error is not None:
                found.append(
                    Finding(
                        code=INVALID,
                        level="Error",
                        path="",
                        message=f"enforced as STRICT for its scope until fixed: {pa.error}",
                    )
                )
            if found:
                out[f"PeerAuthentication {ns}/{pa.name}"] = found
    return out


def reserved_name_findings(snapshot: StoreSnapshot) -> dict[str, list[Finding]]:
    """``AuthorizationPolicy ns/name`` -> an Error finding on ``metadata.name`` for each policy
    node proxies enforce (no targetRef, not AUDIT) whose name takes a reserved prefix: its L4
    record is enforced fail-closed under another name until it is renamed."""
    out: dict[str, list[Finding]] = {}
    for ns, objs in snapshot.namespaces.items():
        for ap in objs.authorization_policies.values():
            prefix = reserved_prefix(ap.name)
            action = ap.policy.action
            if prefix is None or ap.targeted or action is PolicyAction.AUDIT:
                continue
            effect = "allows nothing" if action is PolicyAction.ALLOW else "denies everything"
            message = (
                f"the prefix {prefix!r} is reserved for the policies the mesh converts: node "
                f"proxies enforce this policy fail-closed ({effect}) as "
                f"{REJECTED_PREFIX + ap.name!r} until it is renamed"
            )
            found = Finding(code=INVALID, level="Error", path="metadata.name", message=message)
            out[f"AuthorizationPolicy {ns}/{ap.name}"] = [found]
    return out


def merge_findings(*parts: dict[str, list[Finding]]) -> dict[str, list[Finding]]:
    """One ``Kind ns/name`` -> findings map from several (one object may be in more than one)."""
    out: dict[str, list[Finding]] = {}
    for part in parts:
        for ref, found in part.items():
            out.setdefault(ref, []).extend(found)
    return out


def unimplemented_findings(snapshot: StoreSnapshot) -> dict[str, list[Finding]]:
    """``Kind ns/name`` -> the one AMB0204 finding of each object of a kind the mesh does not
    implement (`controlplane.objects.UNIMPLEMENTED_KINDS`)."""
    out: dict[str, list[Finding]] = {}
    for ns, objs in snapshot.namespaces.items():
        for obj in objs.stored.values():
            if obj.kind not in UNIMPLEMENTED_KINDS or not obj.raw_json:
                continue
            doc = json.loads(obj.raw_json)
            found = kind_support(str(doc.get("kind", obj.kind)), doc)
            if found is not None:
                out[f"{obj.kind} {ns}/{obj.name}"] = [found]
    return out
