"""Waypoints in the lab: a waypoint pod per ``Gateway`` with ``gatewayClassName: istio-waypoint``.

Owns (pure): finding waypoint Gateways in the lab's manifest directory, choosing their node, and
turning the in-cluster controller's Deployment (`controlplane.waypoints.desired_objects`, the one
owner of what a waypoint pod is) into the Pod the lab runs: what a ReplicaSet and the kubelet
would do with its template (name, node, ``$(VAR)`` references, mounted files). The Pods live in
one lab-owned file, `WAYPOINT_FILE`, in the lab's manifests; `Lab` creates and removes the pods
themselves (real CNI chain, netns, process) in `Lab.sync_waypoints`.

The lab's part (everything else is the controller's template: service account, labels, args):
- name ``<gateway>-waypoint`` (a Deployment's pods get a generated suffix; the lab's is fixed);
- node: the Gateway's annotation `NODE_ANNOTATION` if set, else the lab's nodes round-robin by
  the Gateway's position (sorted by namespace/name), so the choice is stable;
- the projected token and the roots ConfigMap are the node's credential file and the lab's
  roots file (the waypoint gets its certificate with the node's credential: allowed, its pod
  runs on that node); the ``waypoint`` entry point is the lab's interpreter's;
- ``--drain-timeout 1`` (`LAB_ARGS`): ``lab down`` does not wait for clients.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambientctl.lab import topology
from controlplane.waypoints import ADMIN_PORT as ADMIN_PORT  # the lab reads it through us
from controlplane.waypoints import DEBUG_PORT as DEBUG_PORT
from controlplane.waypoints import (
    ROOTS_DIR,
    TOKEN_DIR,
    WaypointSettings,
    desired_objects,
    is_waypoint,
)

WAYPOINT_FILE = "zz-lab-waypoints.yaml"
NODE_ANNOTATION = "ambient.io/node"
WAYPOINT_BIN = str(Path(sys.executable).with_name("waypoint"))
LAB_ARGS = ("--drain-timeout", "1")


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointGateway:
    name: str
    namespace: str
    node: str = ""
    """Requested node (annotation), or ''."""
    doc: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """The Gateway object as written (the controller reads its annotations)."""

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
        if not isinstance(spec, Mapping) or not is_waypoint(doc):
            continue
        if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
            continue
        annotations = meta.get("annotations") or {}
        if not isinstance(annotations, Mapping):
            annotations = {}
        namespace = str(meta.get("namespace") or "default")
        gw = WaypointGateway(
            name=meta["name"],
            namespace=namespace,
            node=str(annotations.get(NODE_ANNOTATION, "")),
            doc={**doc, "metadata": {**meta, "namespace": namespace, "annotations": annotations}},
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
            raise ValueError(
                f"Gateway {gw.key}: {NODE_ANNOTATION}={gw.node!r} is not a lab node "
                f"({', '.join(nodes)})"
            )
        return gw.node
    return nodes[index % len(nodes)]


def pod_doc(
    gw: WaypointGateway, *, node: str, token_file: Path, roots: Path, roots_pem: str
) -> dict[str, Any]:
    """The waypoint Pod for `gw` on `node`: the controller's Deployment template
    (`desired_objects`) as the lab runs it (see the module doc)."""
    settings = WaypointSettings(
        xds_address=f"{topology.CONTROLPLANE_IP}:{topology.CONTROLPLANE_PORT}",
        trust_domain=topology.TRUST_DOMAIN,
        roots_pem=roots_pem,
        extra_args=LAB_ARGS,
    )
    template = desired_objects(gw.doc, settings).deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    # The kubelet's part: $(VAR) from the container's env (fieldRefs), mounted files.
    values = {"NODE_NAME": node, "POD_NAME": gw.pod_name, "POD_NAMESPACE": gw.namespace}
    files = {f"{TOKEN_DIR}/token": str(token_file), f"{ROOTS_DIR}/root-cert.pem": str(roots)}
    args = []
    for arg in container["args"]:
        for var, value in values.items():
            arg = arg.replace(f"$({var})", value)
        args.append(files.get(arg, arg))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": gw.pod_name,
            "namespace": gw.namespace,
            "labels": dict(template["metadata"]["labels"]),
            "annotations": dict(template["metadata"]["annotations"]),
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": template["spec"]["serviceAccountName"],
            "containers": [{"name": container["name"], "command": [WAYPOINT_BIN], "args": args}],
        },
    }


def pods_in_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
