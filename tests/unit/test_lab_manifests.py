"""The lab's writes into its manifest directory, read back by the control plane's parser.

The contract: what `ambientctl lab` writes (Pod node/uid/status, Namespace labels) is what
controlplane/objects.py reads into the store, so the control plane's workloads carry the
lab-assigned IPs and nodes and the CA's impersonation check knows each pod's node.
"""

from __future__ import annotations

from typing import Any

from ambientctl.lab import manifests, topology
from controlplane.objects import Namespace, Pod, parse_object

POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "client", "namespace": "demo", "labels": {"app": "client"}},
    "spec": {"serviceAccountName": "sleep", "containers": [{"name": "c", "command": ["sleep"]}]},
}


def test_pod_facts_are_read_by_the_control_plane() -> None:
    facts = manifests.PodFacts(node="node-2", ip="10.240.2.7", host_ip="172.30.0.12", uid="u-1")
    doc = manifests.with_pod_facts(POD, facts)
    assert "status" not in POD
    assert "nodeName" not in POD["spec"]  # input untouched
    pod = parse_object(doc)
    assert isinstance(pod, Pod)
    assert pod.ips == ("10.240.2.7",)
    assert pod.node == "node-2"
    assert pod.phase == "Running"
    assert pod.uid == "u-1"
    assert pod.service_account == "sleep"
    assert dict(pod.labels) == {"app": "client"}


def test_labels_set_and_removed_like_kubectl_label() -> None:
    ns = manifests.namespace_doc("legacy", {})
    assert "labels" not in ns["metadata"]
    on = manifests.with_labels(ns, {"istio.io/dataplane-mode": "ambient", "team": "a"})
    parsed = parse_object(on)
    assert isinstance(parsed, Namespace)
    assert dict(parsed.labels) == {"istio.io/dataplane-mode": "ambient", "team": "a"}
    off = manifests.with_labels(on, {"istio.io/dataplane-mode": None, "team": None})
    assert "labels" not in off["metadata"]
    assert on["metadata"]["labels"]["team"] == "a"  # input untouched


def test_object_refs_and_workload_uid() -> None:
    assert manifests.object_ref(POD) == ("Pod", "demo", "client")
    assert manifests.object_ref({"kind": "Namespace", "metadata": {"name": "x"}}) == (
        "Namespace",
        "",
        "x",
    )
    assert manifests.object_ref({"kind": "Service", "metadata": {"name": "s"}}) is None
    assert manifests.workload_uid("demo/client") == "Kubernetes//Pod/demo/client"


def test_control_plane_address_is_on_the_underlay_and_not_a_node() -> None:
    plans = topology.nodes_plan("lab", ("node-1", "node-2"))
    assert topology.CONTROLPLANE_IP not in {p.ip for p in plans}
    assert topology.CONTROLPLANE_IP.startswith("172.30.0.")
    assert topology.DEFAULT_PRIMARY_PLUGIN in topology.PRIMARY_PLUGINS
    conf = topology.conflist(plans[0], ipam_dir=topology.STATE_ROOT, agent_socket=None)
    assert conf["plugins"][0]["type"] == topology.DEFAULT_PRIMARY_PLUGIN  # type: ignore[index]
