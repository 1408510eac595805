"""Writing objects to the real API server the way their real writers do (tests only).

Without a kubelet (tests/cluster runs none), a test plays the kubelet's part: a Node object, and
a pod's ``status`` written through the ``status`` subresource (phase, podIP, Ready).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from ambientctl.lab.kube import KubeCluster

MERGE = "application/merge-patch+json"


def ok(result: tuple[int, Any], *codes: int) -> Any:
    status, body = result
    assert status in (codes or (200, 201)), f"HTTP {status}: {body}"
    return body


def namespace(kube: KubeCluster, name: str, **labels: str) -> None:
    """A namespace, once its ``default`` ServiceAccount exists (the controller-manager creates
    it; until then the ServiceAccount admission plugin refuses pods that use it)."""
    body = {"metadata": {"name": name, "labels": labels}}
    ok(kube.request("POST", "/api/v1/namespaces", body), 201)
    deadline = time.monotonic() + 30
    while kube.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] != 200:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {name}"
        time.sleep(0.1)


def node(kube: KubeCluster, name: str) -> None:
    status, _ = kube.request("GET", f"/api/v1/nodes/{name}")
    if status == 200:
        return
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}  # as kubelets do
    ok(kube.request("POST", "/api/v1/nodes", {"metadata": {"name": name, "labels": labels}}), 201)


def ready_node(kube: KubeCluster, name: str) -> None:
    """A Node that the scheduler takes: Ready (a fresh heartbeat) with allocatable capacity."""
    node(kube, name)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    capacity = {"cpu": "8", "memory": "16Gi", "pods": "110"}
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    body = {"status": {"capacity": capacity, "allocatable": capacity, "conditions": [ready]}}
    ok(kube.request("PATCH", f"/api/v1/nodes/{name}/status", body, content_type=MERGE))


def mark_ready(kube: KubeCluster, ns: str, name: str, ip: str) -> None:
    """What a kubelet reports for a started pod whose container is ready."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pod = ok(kube.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}"))
    conds = [
        {"type": t, "status": "True", "lastTransitionTime": now}
        for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    statuses = [
        {
            "name": c["name"],
            "image": c["image"],
            "imageID": "",
            "ready": True,
            "restartCount": 0,
            "started": True,
            "state": {"running": {"startedAt": now}},
        }
        for c in pod["spec"]["containers"]
    ]
    status = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "hostIP": ip,
        "startTime": now,
        "conditions": conds,
        "containerStatuses": statuses,
    }
    body = {"status": status}
    path = f"/api/v1/namespaces/{ns}/pods/{name}/status"
    ok(kube.request("PATCH", path, body, content_type="application/strategic-merge-patch+json"))


def service_account(kube: KubeCluster, ns: str, name: str, **labels: str) -> dict[str, Any]:
    body = {"metadata": {"name": name, "labels": labels}}
    path = f"/api/v1/namespaces/{ns}/serviceaccounts"
    result: dict[str, Any] = ok(kube.request("POST", path, body), 201)
    return result


@dataclass(frozen=True, slots=True, kw_only=True)
class PodOptions:
    """What `pod` creates: a pod bound to `node_name` running as `sa`, labelled `labels`
    (default ``app: <name>``); with `ip`, Running and Ready with that podIP."""

    node_name: str
    sa: str = "default"
    ip: str | None = None
    labels: dict[str, str] | None = None


def pod(kube: KubeCluster, ns: str, name: str, opts: PodOptions) -> dict[str, Any]:
    """A pod as `opts` says (the Node is created if missing)."""
    node(kube, opts.node_name)
    body = {
        "metadata": {"name": name, "labels": opts.labels or {"app": name}},
        "spec": {
            "nodeName": opts.node_name,
            "serviceAccountName": opts.sa,
            "containers": [{"name": "app", "image": "lab.invalid/app"}],
        },
    }
    created: dict[str, Any] = ok(kube.request("POST", f"/api/v1/namespaces/{ns}/pods", body), 201)
    if opts.ip is not None:
        created = set_pod_ip(kube, ns, name, opts.ip)
    return created


def set_pod_ip(kube: KubeCluster, ns: str, name: str, ip: str) -> dict[str, Any]:
    status = {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    }
    path = f"/api/v1/namespaces/{ns}/pods/{name}/status"
    result: dict[str, Any] = ok(kube.request("PATCH", path, status, content_type=MERGE))
    return result


def token(
    kube: KubeCluster, ns: str, sa: str, *, audiences: list[str], pod: dict[str, Any] | None
) -> str:
    """A projected token from the TokenRequest API, bound to ``pod`` when given."""
    spec: dict[str, Any] = {"audiences": audiences, "expirationSeconds": 3600}
    if pod is not None:
        meta = pod["metadata"]
        spec["boundObjectRef"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "uid": meta["uid"],
        }
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    path = f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
    return str(ok(kube.request("POST", path, body), 201)["status"]["token"])
