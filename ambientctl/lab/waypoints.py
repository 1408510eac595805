"""Waypoints in the lab: a waypoint pod per ``Gateway`` with ``gatewayClassName: istio-waypoint``.

Owns (pure): finding waypoint Gateways in the lab's manifest directory, choosing their node, and
the Pod object the lab creates for each (the part Istio's waypoint Deployment controller plays).
The Pods live in one lab-owned file, `WAYPOINT_FILE`, in the lab's manifests; `Lab` creates and
removes the pods themselves (real CNI chain, netns, process) in `Lab.sync_waypoints`.

The waypoint pod (Istio's conventions):
- name ``<gateway>-waypoint``, service account ``<gateway>`` (the waypoint's own identity
  ``spiffe://<td>/ns/<ns>/sa/<gateway>``), labels ``gateway.networking.k8s.io/gateway-name:
  <gateway>`` (the control plane's waypoint Service selects it) and
  ``istio.io/dataplane-mode: none`` (never captured: the waypoint speaks HBONE itself);
- node: the Gateway's annotation `NODE_ANNOTATION` if set, else the lab's nodes round-robin by
  the Gateway's position (sorted by namespace/name), so the choice is stable;
- command: ``waypoint --xds-address <control plane> --node <node> --node-credential-file
  <node token>``: config over delta xDS, certificate from the control plane's CA with the
  node's credential (allowed: the waypoint's pod runs on that node).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ambientctl.lab import topology

WAYPOINT_FILE = "zz-lab-waypoints.yaml"
WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
NODE_ANNOTATION = "ambient.io/node"
WAYPOINT_BIN = str(Path(sys.executable).with_name("waypoint"))
ADMIN_PORT = 15020
"""Metrics and readiness, on the pod IP (as the in-cluster controller deploys waypoints)."""
DEBUG_PORT = 15000
"""Debug views, on the pod's loopback only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointGateway:
    name: str
    namespace: str
    node: str = ""
    """Requested node (annotation), or ''."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def pod_name(self) -> str:
        return f"{self.name}-waypoint"

    @property
    def pod_key(self) -> str:
        return f"{self.namespace}/{self.pod_name}"


def gateways_in(docs: Sequence[Any]) -> list[WaypointGateway]:
    """Waypoint Gateways among `docs`, sorted by namespace/name."""
    out: dict[str, WaypointGateway] = {}
    for doc in docs:
        if not isinstance(doc, Mapping) or doc.get("kind") != "Gateway":
            continue
        spec = doc.get("spec") or {}
        meta = doc.get("metadata") or {}
        if not isinstance(spec, Mapping) or spec.get("gatewayClassName") != WAYPOINT_CLASS:
            continue
        if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
            continue
        annotations = meta.get("annotations") or {}
        node = annotations.get(NODE_ANNOTATION, "") if isinstance(annotations, Mapping) else ""
        gw = WaypointGateway(
            name=meta["name"], namespace=str(meta.get("namespace") or "default"), node=str(node)
        )
        out[gw.key] = gw
    return [out[k] for k in sorted(out)]


def read_gateways(directory: Path) -> list[WaypointGateway]:
    """Waypoint Gateways of the top-level manifest files (unreadable files are skipped: the
    control plane reports them)."""
    docs: list[Any] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            docs.extend(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError):
            continue
    return gateways_in(docs)


def choose_node(gw: WaypointGateway, index: int, nodes: Sequence[str]) -> str:
    if gw.node:
        if gw.node not in nodes:
            raise ValueError(f"Gateway {gw.key}: {NODE_ANNOTATION}={gw.node!r} is not a lab node "
                             f"({', '.join(nodes)})")  # fmt: skip
        return gw.node
    return nodes[index % len(nodes)]


def pod_doc(gw: WaypointGateway, *, node: str, token_file: Path, roots: Path) -> dict[str, Any]:
    """The waypoint Pod object for `gw` on `node`."""
    xds = f"{topology.CONTROLPLANE_IP}:{topology.CONTROLPLANE_PORT}"
    command = [
        WAYPOINT_BIN,
        "--name", gw.name,
        "--namespace", gw.namespace,
        "--service-account", gw.name,
        "--workload-uid", f"Kubernetes//Pod/{gw.namespace}/{gw.pod_name}",
        "--xds-address", xds,
        "--node", node,
        "--node-credential-file", str(token_file),
        "--controlplane-roots", str(roots),
        "--trust-domain", topology.TRUST_DOMAIN,
        "--admin", f"0.0.0.0:{ADMIN_PORT}",
        "--debug-listen", f"127.0.0.1:{DEBUG_PORT}",
        "--drain-timeout", "1",
    ]  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": gw.pod_name,
            "namespace": gw.namespace,
            "labels": {GATEWAY_NAME: gw.name, "istio.io/dataplane-mode": "none"},
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": gw.name,
            "containers": [{"name": "waypoint", "command": command}],
        },
    }


def pods_in_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
