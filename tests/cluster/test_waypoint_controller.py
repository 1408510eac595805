"""The in-cluster waypoint controller (controlplane.waypoints, run by the control plane with
its Kubernetes source) against the REAL API server, as the chart's ``ambient-controlplane``
service account (so the chart's waypoint RBAC, gateways/finalizers included, is what it has),
with the chart's Gateway API CRDs, the real deployment/replicaset controllers, scheduler and
garbage collector.

Asserted: a waypoint Gateway (created with kubectl) gets its ServiceAccount, Deployment, Service
and roots ConfigMap, each owned by the Gateway's real uid, accepted by the API server's
validation and defaulting; the Gateway's status is Accepted, Programmed=False; the real
controllers make a ReplicaSet and a pod, the scheduler binds it to a Ready node, and once the
pod reports Ready (the test plays the kubelet) the Deployment is available and the Gateway
Programmed=True; a Gateway naming a service account runs its pods as that account; deleting
the Gateway lets the garbage collector remove everything created for it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ambientctl.lab.kube import KubeCluster
from controlplane.app import ControlPlane, ControlPlaneSettings
from controlplane.waypoints import WaypointSettings
from tests.cluster import objects
from tests.cluster.fixtures import SYSTEM_NS, sa_kubeconfig

pytestmark = pytest.mark.timeout(240)
NS = "wp-shop"
GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: wp-shop
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def get(kube: KubeCluster, path: str) -> Any:
    status, body = kube.request("GET", path)
    return body if status == 200 else None


def wait(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def conditions(kube: KubeCluster) -> dict[str, str]:
    gw = get(kube, f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/gateways/waypoint")
    return {c["type"]: c["status"] for c in (gw.get("status") or {}).get("conditions", [])}


def test_waypoint_controller_on_the_real_api(chart: KubeCluster, tmp_path: Path) -> None:
    kube = chart
    objects.namespace(kube, NS)
    objects.ready_node(kube, "wp-node")
    kc = sa_kubeconfig(kube, tmp_path / "cp.kubeconfig", SYSTEM_NS, "ambient-controlplane")
    settings = ControlPlaneSettings(
        listen="127.0.0.1:0",
        debug_listen=None,
        kubernetes=True,
        kubeconfig=kc,
        ca_dir=tmp_path / "ca",
        # As the chart configures it (auth.mode=tokenReview), reviewing with the real API.
        token_review_accounts=(f"system:serviceaccount:{SYSTEM_NS}:ztunnel",),
        token_audiences=("ambient-controlplane",),
        # As the chart passes clusterId and tracing.{address,sampling} (test_cp_waypoint_chart).
        waypoints=WaypointSettings(
            image="lab.invalid/waypoint:1",
            cluster_id="east",
            tracing_address="otel.observability:4317",
            tracing_sampling=2.5,
        ),
        waypoint_interval=2,
        sync_timeout=30,
    )

    def scenario(cp: ControlPlane) -> None:
        kube.kubectl("apply", "-f", "-", input=GATEWAY)
        gw = get(kube, f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/gateways/waypoint")
        uid = gw["metadata"]["uid"]
        base = f"/api/v1/namespaces/{NS}"
        paths = {
            "ServiceAccount": f"{base}/serviceaccounts/waypoint",
            "Service": f"{base}/services/waypoint",
            "ConfigMap": f"{base}/configmaps/waypoint-controlplane-roots",
            "Deployment": f"/apis/apps/v1/namespaces/{NS}/deployments/waypoint",
        }
        created = {k: wait(k, lambda p=p: get(kube, p)) for k, p in paths.items()}
        for obj in created.values():
            (owner,) = obj["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["uid"], owner["controller"]) == ("Gateway", uid, True)
        roots = created["ConfigMap"]["data"]["root-cert.pem"]
        assert roots == cp.ca.roots_pem.decode()
        assert created["Service"]["spec"]["clusterIP"].startswith("10.96.")
        wait("Accepted", lambda: conditions(kube).get("Accepted") == "True")
        assert conditions(kube)["Programmed"] == "False"

        # The real controllers and scheduler: a ReplicaSet, a pod bound to the Ready node.
        def bound_pod() -> Any:
            pods = get(
                kube, f"{base}/pods?labelSelector=gateway.networking.k8s.io/gateway-name%3Dwaypoint"
            )
            items = [p for p in pods["items"] if p["spec"].get("nodeName") == "wp-node"]
            return items[0] if items else None

        pod = wait("the scheduler binds the waypoint pod", bound_pod)
        assert pod["spec"]["serviceAccountName"] == "waypoint"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["CLUSTER_ID"] == "east"
        assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "otel.observability:4317"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.025"
        objects.mark_ready(kube, NS, pod["metadata"]["name"], "10.244.0.10")
        wait("Programmed", lambda: conditions(kube).get("Programmed") == "True", 60)
        # A Gateway naming a service account: the pods run as it (no account of ours created).
        kube.kubectl(
            "annotate", "-n", NS, "gateway", "waypoint", "gateway.istio.io/service-account=reviews"
        )
        wait(
            "the Deployment runs as reviews",
            lambda: (
                get(kube, paths["Deployment"])["spec"]["template"]["spec"]["serviceAccountName"]
                == "reviews"
            ),
        )
        # Deleting the Gateway: the garbage collector removes what the controller created.
        kube.kubectl("delete", "-n", NS, "gateway", "waypoint", "--wait=false")
        for kind in ("Service", "ConfigMap", "Deployment"):
            wait(f"{kind} garbage-collected", lambda k=kind: get(kube, paths[k]) is None, 60)

    async def main() -> None:
        cp = ControlPlane(settings)
        await cp.start()
        try:
            await asyncio.to_thread(scenario, cp)
        finally:
            await cp.stop()

    asyncio.run(asyncio.wait_for(main(), 200))
