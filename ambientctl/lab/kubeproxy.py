"""The lab's kube-proxy: Service ClusterIPs DNATed to ready endpoints in a lab node's netns.

A real node has kube-proxy (or an equivalent) so that host-network processes and pods outside
the mesh reach a Service's ClusterIP: the chart's node proxy dials
``ambient-controlplane.istio-system.svc:15012`` from the node's network namespace, a waypoint
dials it from its pod, and every in-cluster client dials ``kubernetes.default`` (10.96.0.1:443).
The lab kubelet (ambientctl.lab.kubelet) runs this for its node: it lists Services and
EndpointSlices as ``system:kube-proxy`` (bound to ``system:node-proxier`` by the API server's
bootstrap RBAC) and replaces one nftables table in the node netns.

`ruleset` is pure: (Services, EndpointSlices) -> the nft script. TCP only, ClusterIP Services
only, ready endpoints only; several endpoints are chosen at random per connection (``numgen``).
Captured pod traffic is never translated: the capture's own nft table marks it ``notrack`` in
raw prerouting (ebpf/redirect.py), before this nat hook, so the node proxy still sees the
ClusterIP the app dialled, as in Istio ambient where ztunnel resolves Services itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ambientctl.lab import system

TABLE = "ambient_lab_proxy"
Json = Mapping[str, Any]


def _ready(endpoint: Json) -> bool:
    cond = endpoint.get("conditions") or {}
    return cond.get("ready") is not False


def ruleset(services: Iterable[Json], slices: Iterable[Json]) -> str:
    """The nft script (atomic: the old table is deleted in the same transaction)."""
    by_service: dict[tuple[str, str], list[Json]] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        svc = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if svc and s.get("addressType", "IPv4") == "IPv4":
            by_service.setdefault((str(meta.get("namespace")), str(svc)), []).append(s)
    rules: list[str] = []
    for svc in sorted(services, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"])):
        spec = svc.get("spec") or {}
        cip = spec.get("clusterIP")
        if not cip or cip == "None" or ":" in str(cip):
            continue
        key = (str(svc["metadata"]["namespace"]), str(svc["metadata"]["name"]))
        for port in spec.get("ports") or []:
            if port.get("protocol", "TCP") != "TCP":
                continue
            targets = sorted(
                {
                    (str(addr), int(p["port"]))
                    for s in by_service.get(key, [])
                    for p in s.get("ports") or []
                    if p.get("name", "") == port.get("name", "") and p.get("port")
                    for e in s.get("endpoints") or []
                    if _ready(e)
                    for addr in e.get("addresses") or []
                }
            )
            if not targets:
                continue
            match = f"ip daddr {cip} tcp dport {int(port['port'])}"
            ports = {t[1] for t in targets}
            if len(targets) == 1:
                rules.append(f"{match} dnat to {targets[0][0]}:{targets[0][1]}")
            elif len(ports) == 1:
                pick = ", ".join(f"{i} : {a}" for i, (a, _) in enumerate(targets))
                rules.append(
                    f"{match} dnat to numgen random mod {len(targets)} map {{ {pick} }}"
                    f":{ports.pop()}"
                )
            else:  # endpoints disagree on the target port: the first one (rare; named ports)
                rules.append(f"{match} dnat to {targets[0][0]}:{targets[0][1]}")
    body = "\n".join(f"    {r}" for r in rules)
    return (
        f"table ip {TABLE} {{}}\n"
        f"delete table ip {TABLE}\n"
        f"table ip {TABLE} {{\n"
        "  chain pre { type nat hook prerouting priority -100; policy accept; jump svc; }\n"
        "  chain out { type nat hook output priority -100; policy accept; jump svc; }\n"
        f"  chain svc {{\n{body}\n  }}\n"
        "}\n"
    )


def apply(netns: str, script: str) -> None:
    system.run(system.nsenter(netns, ["nft", "-f", "-"]), input=script.encode())


def remove(netns: str) -> None:
    system.run(system.nsenter(netns, ["nft", "delete", "table", "ip", TABLE]), check=False)
