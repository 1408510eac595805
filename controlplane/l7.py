"""Store snapshot -> the L7 resources served to waypoints (sans-I/O, pure).

Owns: which stored objects waypoints receive and under which names
(``type.googleapis.com/ambient.l7.Resource``, see `meshcore.proto.l7res`):
- every VirtualService, DestinationRule, HTTPRoute, AuthorizationPolicy and
  RequestAuthentication (selector and targetRef(s) forms alike) as written: the waypoint
  decides which apply to it with the same rules as in static mode (`meshcore.l7`), so the
  control plane does not pre-filter;
- per namespace with pods, one ``WorkloadLabels`` resource: workload uid -> pod labels, so
  DestinationRule subsets and ``sourceLabels`` see the real labels (not only app/version).

And `l7_findings`: what the waypoints will report about each of those objects, computed with
the waypoint's own parser (`meshcore.config.objects.parse_objects`), so the control plane reports a
bad object (debug view, status) exactly as the waypoint that applies it (and NACKs it) sees it.

Invariants: pure function of the snapshot; equal inputs give equal resources (canonical JSON),
so the xDS table's content-hash versions only change when an object really changed.
"""

from __future__ import annotations

import json

from controlplane.store import StoreSnapshot
from controlplane.translate import TranslateOptions
from meshcore.config.fields import Finding, check_object
from meshcore.config.objects import parse_objects
from meshcore.proto.l7res import L7Resource

ROUTING_KINDS = ("VirtualService", "DestinationRule", "HTTPRoute", "RequestAuthentication")


def l7_resources(snapshot: StoreSnapshot, opts: TranslateOptions) -> dict[str, L7Resource]:
    out: dict[str, L7Resource] = {}

    def add(res: L7Resource) -> None:
        out[res.key] = res

    for ns, objs in snapshot.namespaces.items():
        for obj in objs.stored.values():
            if obj.kind in ROUTING_KINDS and obj.raw_json:
                add(L7Resource(kind=obj.kind, namespace=ns, name=obj.name, json=obj.raw_json))
        for ap in objs.authorization_policies.values():
            if ap.raw_json:
                add(L7Resource(kind="AuthorizationPolicy", namespace=ns, name=ap.name,
                               json=ap.raw_json))  # fmt: skip
        labels = {
            f"{opts.cluster_id}//Pod/{ns}/{pod.name}": dict(pod.labels)
            for pod in objs.pods.values()
            if pod.ips
        }
        if labels:
            doc = {"kind": "WorkloadLabels", "labels": labels}
            text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
            add(L7Resource(kind="WorkloadLabels", namespace=ns, name="pods", json=text))
    return out


def l7_findings(resources: dict[str, L7Resource]) -> dict[str, list[Finding]]:
    """``Kind ns/name`` -> findings, from parsing `resources` as a waypoint does."""
    docs = [resources[k].document() for k in sorted(resources)]
    out: dict[str, list[Finding]] = {}
    for ref, finding in parse_objects(docs).findings:
        out.setdefault(ref, []).append(finding)
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
