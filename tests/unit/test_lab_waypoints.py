"""The lab's waypoint pods come from the in-cluster controller's template
(controlplane.waypoints.desired_objects), not from a second description of a waypoint pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ambientctl.lab import manifests, topology, waypoints
from controlplane.waypoints import SA_ANNOTATION, WaypointSettings, desired_objects

TOKEN = Path("/run/lab/node-a.token")
ROOTS = Path("/run/lab/roots.pem")


def _gateway(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "wp", "namespace": "shop"}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": meta,
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": []},
    }


def _pod(gw_doc: dict[str, Any]) -> dict[str, Any]:
    (gw,) = waypoints.gateways_in([gw_doc, {"kind": "Gateway", "spec": {}}])
    return waypoints.pod_doc(gw, node="node-a", token_file=TOKEN, roots=ROOTS, roots_pem="PEM")


def test_lab_pod_is_the_controllers_template_on_a_node() -> None:
    pod = _pod(_gateway())
    template = desired_objects(_gateway(), WaypointSettings(roots_pem="PEM")).deployment["spec"][
        "template"
    ]
    assert pod["metadata"]["labels"] == template["metadata"]["labels"]
    assert pod["spec"]["serviceAccountName"] == template["spec"]["serviceAccountName"] == "wp"
    assert pod["spec"]["nodeName"] == "node-a"
    args = pod["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--workload-uid"] == "Kubernetes//Pod/shop/wp-waypoint"
    assert flags["--node"] == "node-a"
    assert flags["--node-credential-file"] == str(TOKEN)
    assert flags["--controlplane-roots"] == str(ROOTS)
    assert flags["--xds-address"] == f"{topology.CONTROLPLANE_IP}:{topology.CONTROLPLANE_PORT}"
    assert flags["--drain-timeout"] == "1"
    assert not any("$(" in a for a in args)
    # Every flag of the controller's pods, in its order; only values differ (+ the lab's).
    controller_flags = template["spec"]["containers"][0]["args"][::2]
    assert args[::2] == [*controller_flags, "--drain-timeout"]


def test_service_account_annotation_is_honoured_as_in_cluster() -> None:
    pod = _pod(_gateway({SA_ANNOTATION: "shared", waypoints.NODE_ANNOTATION: "node-a"}))
    assert pod["spec"]["serviceAccountName"] == "shared"
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--service-account") + 1] == "shared"


def test_lab_reads_the_pod_it_writes() -> None:
    spec = manifests.parse([("lab", _pod(_gateway()))], ("node-a",))
    (pod,) = spec.pods
    assert pod.key == "shop/wp-waypoint"
    assert pod.node == "node-a"
    assert pod.command[0] == waypoints.WAYPOINT_BIN
    assert pod.labels["istio.io/dataplane-mode"] == "none"
