"""The in-cluster waypoint controller (controlplane/waypoints.py) against the Kubernetes API
STAND-IN (tests/kubeapi_standin.py) over real HTTP on loopback.

Asserted: a waypoint Gateway gets its ServiceAccount, Deployment and Service with the desired
spec and an ownerReference to the Gateway (its uid), and a status (Accepted, Programmed=False
until the Deployment reports an available replica, then True; the Service's hostname as
address); a second pass changes nothing (no writes); a changed Gateway (annotation naming a
service account) and a drifted Deployment are patched; a Gateway of another class gets nothing;
deleting the Gateway deletes what was created.
Why the stand-in here: it records every write, so "a second pass writes nothing" and "drift is
patched" are asserted exactly, and the Deployment's status is set directly. The same controller
against a real API server (validation, defaulting, RBAC, the real deployment controller,
scheduler and garbage collector) is tests/cluster/test_waypoint_controller.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from controlplane.app import ControlPlane, ControlPlaneSettings
from controlplane.waypoints import WaypointController, WaypointSettings
from meshcore.kubeapi import KubeApi
from tests.helpers import loopback_block, run
from tests.kubeapi_standin import KubeApiStandIn

pytestmark = pytest.mark.timeout(60)
BLOCK = loopback_block()
API_IP = BLOCK.ip(1)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def gateway(name: str, cls: str = "istio-waypoint", **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": f"gw-uid-{name}",
            "generation": 1,
            "annotations": annotations,
        },
        "spec": {
            "gatewayClassName": cls,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def writes(api: KubeApiStandIn) -> list[str]:
    return [r for r in api.requests if r.split(" ")[0] in ("create", "patch", "delete")]


def test_controller_lifecycle() -> None:
    async def main() -> None:
        api = KubeApiStandIn()
        await api.start(API_IP)
        cfg = client.Configuration(host=f"http://{API_IP}:{api.port}")
        ctl = WaypointController(
            WaypointSettings(image="reg.example/waypoint:9", roots_pem="ROOTS"),
            kube=KubeApi(configuration=cfg),
        )
        try:
            await api.upsert("gateways", gateway("waypoint"))
            await api.upsert("gateways", gateway("ingress", cls="istio"))
            await ctl.reconcile(now=NOW)
            assert ctl.stats.errors == []
            dep = api.objects["deployments"][("shop", "waypoint")]
            svc = api.objects["services"][("shop", "waypoint")]
            sa = api.objects["serviceaccounts"][("shop", "waypoint")]
            roots = api.objects["configmaps"][("shop", "waypoint-controlplane-roots")]
            assert roots["data"] == {"root-cert.pem": "ROOTS"}
            for obj in (dep, svc, sa, roots):
                (owner,) = obj["metadata"]["ownerReferences"]
                assert owner["kind"] == "Gateway"
                assert owner["uid"] == "gw-uid-waypoint"
                assert owner["controller"] is True
                assert obj["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == (
                    "waypoint"
                )
            tmpl = dep["spec"]["template"]
            assert tmpl["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
            assert tmpl["spec"]["containers"][0]["image"] == "reg.example/waypoint:9"
            assert svc["spec"]["ports"][0]["port"] == 15008
            # the other class is ignored
            assert ("shop", "ingress") not in api.objects["deployments"]
            assert "status" not in api.objects["gateways"][("shop", "ingress")]
            status = api.objects["gateways"][("shop", "waypoint")]["status"]
            conds = {c["type"]: c["status"] for c in status["conditions"]}
            assert conds == {"Accepted": "True", "Programmed": "False"}
            assert status["addresses"][0]["value"] == "waypoint.shop.svc.cluster.local"

            # idempotent: a second pass writes nothing
            before = len(writes(api))
            await ctl.reconcile(now=NOW)
            assert writes(api)[before:] == []

            # the Deployment becomes available (what the deployment controller would report)
            live = api.objects["deployments"][("shop", "waypoint")]
            await api.upsert("deployments", {**live, "status": {"availableReplicas": 1}})
            await ctl.reconcile(now=NOW)
            status = api.objects["gateways"][("shop", "waypoint")]["status"]
            assert {c["type"]: c["status"] for c in status["conditions"]}["Programmed"] == "True"

            # drift is patched back; a Gateway naming a service account switches the pods to it
            live = api.objects["deployments"][("shop", "waypoint")]
            drifted = {**live, "spec": {**live["spec"], "replicas": 0}}
            await api.upsert("deployments", drifted)
            await api.upsert(
                "gateways",
                {
                    **api.objects["gateways"][("shop", "waypoint")],
                    **{
                        "metadata": {
                            **gateway("waypoint")["metadata"],
                            "annotations": {"gateway.istio.io/service-account": "reviews"},
                        }
                    },
                },
            )
            rv = api.objects["deployments"][("shop", "waypoint")]["metadata"]["resourceVersion"]
            await ctl.reconcile(now=NOW)
            dep = api.objects["deployments"][("shop", "waypoint")]
            assert dep["metadata"]["resourceVersion"] != rv
            assert dep["spec"]["replicas"] == 1
            assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "reviews"
            assert "patch deployments shop/waypoint" in writes(api)

            # the Gateway is deleted: everything we created goes (no garbage collector here)
            await api.delete("gateways", "shop", "waypoint")
            await ctl.reconcile(now=NOW)
            for plural in ("deployments", "services", "serviceaccounts"):
                assert ("shop", "waypoint") not in api.objects.get(plural, {}), plural
            assert api.objects["configmaps"] == {}
            assert ctl.stats.deleted == 4
            assert ctl.stats.errors == []
        finally:
            if ctl.api is not None:
                await ctl.api.close()
            await api.stop()

    run(main())


def test_run_loop_reacts_to_kick() -> None:
    async def main() -> None:
        api = KubeApiStandIn()
        await api.start(API_IP)
        cfg = client.Configuration(host=f"http://{API_IP}:{api.port}")
        ctl = WaypointController(WaypointSettings(), kube=KubeApi(configuration=cfg), interval=30)
        task = asyncio.create_task(ctl.run())
        try:
            while ctl.passes < 1:
                await asyncio.sleep(0.02)
            await api.upsert("gateways", gateway("wp2"))
            ctl.kick()
            for _ in range(250):
                if ("shop", "wp2") in api.objects.get("deployments", {}):
                    break
                await asyncio.sleep(0.02)
            assert ("shop", "wp2") in api.objects["deployments"]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await api.stop()

    run(main())


def test_controlplane_runs_the_controller(tmp_path: Path) -> None:
    """`ControlPlane` with the Kubernetes source and --waypoint-image: a Gateway watched from
    the API gets its Deployment, and a roots ConfigMap holding the control plane's CA roots."""

    async def main() -> None:
        api = KubeApiStandIn()
        await api.start(API_IP)
        (tmp_path / "kubeconfig").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "s", "cluster": {"server": f"http://{API_IP}:{api.port}"}}
                    ],
                    "users": [{"name": "cp", "user": {"token": "cp-token"}}],
                    "contexts": [{"name": "c", "context": {"cluster": "s", "user": "cp"}}],
                    "current-context": "c",
                }
            )
        )
        settings = ControlPlaneSettings(
            listen=f"{BLOCK.ip(2)}:0",
            debug_listen=None,
            kubernetes=True,
            kubeconfig=tmp_path / "kubeconfig",
            ca_dir=tmp_path / "ca",
            insecure_no_node_auth=True,  # no node proxy in this test; loopback listener
            waypoints=WaypointSettings(image="img:1"),
            waypoint_interval=30,
            sync_timeout=10,
        )
        cp = ControlPlane(settings)
        await cp.start()
        try:
            assert cp.waypoints is not None
            await api.upsert("gateways", gateway("waypoint"))
            for _ in range(250):  # the watch feeds the store, which kicks the controller
                if ("shop", "waypoint") in api.objects.get("services", {}):  # created last
                    break
                await asyncio.sleep(0.02)
            assert ("shop", "waypoint") in api.objects["deployments"]
            roots = api.objects["configmaps"][("shop", "waypoint-controlplane-roots")]
            assert roots["data"]["root-cert.pem"] == cp.ca.roots_pem.decode()
        finally:
            await cp.stop()
            await api.stop()

    run(main())
