"""Findings in the objects' status (controlplane/status.py) against the REAL API server: the
control plane (``kubernetes=True``, as the chart's ``ambient-controlplane`` service account, so
the chart's status RBAC is what it gets) writes, through the real status subresource, an
``Accepted=False`` route condition into an HTTPRoute with a refused field (``sectionName`` on a
Service parentRef; the chart's HTTPRoute CRD keeps it) and ``status.validationMessages`` into a
schema-valid AuthorizationPolicy the mesh refuses (an unknown condition key). Fixing the route
makes it ``Accepted=True``; fixing the policy removes its messages. A misspelt field cannot be
tested here (the typed Istio CRD schema prunes it): tests/loopback/test_cp_status.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ambientctl.lab.kube import KubeCluster
from controlplane.app import ControlPlane, ControlPlaneSettings
from tests.cluster import objects
from tests.cluster.fixtures import SYSTEM_NS, sa_kubeconfig
from tests.helpers import eventually, run

pytestmark = pytest.mark.timeout(120)
NS = "cp-status"
AP = f"/apis/security.istio.io/v1/namespaces/{NS}/authorizationpolicies"
ROUTES = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes"


def policy(key: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-admin"},
        "spec": {
            "selector": {"matchLabels": {"app": "db"}},
            "rules": [{"when": [{"key": key, "values": ["x"]}]}],
        },
    }


ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "reviews"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "sectionName": "http"}],
        "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}],
    },
}


async def _status_written(kube: KubeCluster, tmp: Path) -> None:
    def get(path: str) -> dict[str, Any]:
        obj: dict[str, Any] = objects.ok(kube.request("GET", path))
        return obj

    async def status(path: str) -> dict[str, Any]:
        obj = await asyncio.to_thread(get, path)
        st: dict[str, Any] = obj.get("status") or {}
        return st

    async def accepted() -> str | None:
        parents = (await status(f"{ROUTES}/reviews")).get("parents") or []
        return str(parents[0]["conditions"][0]["status"]) if parents else None

    objects.namespace(kube, NS)
    objects.ok(kube.request("POST", AP, policy("request.bogus")), 201)
    objects.ok(kube.request("POST", ROUTES, ROUTE), 201)
    # The server kept the refused field (the chart's HTTPRoute CRD types sectionName).
    assert get(f"{ROUTES}/reviews")["spec"]["parentRefs"][0]["sectionName"] == "http"
    kc = sa_kubeconfig(kube, tmp / "cp.kubeconfig", SYSTEM_NS, "ambient-controlplane")
    settings = ControlPlaneSettings(
        listen="127.0.0.1:0",
        debug_listen=None,
        kubernetes=True,
        kubeconfig=kc,
        ca_dir=tmp / "ca",
        insecure_no_node_auth=True,  # no node proxy in this test; loopback listener
        sync_timeout=30,
    )
    cp = ControlPlane(settings)
    await cp.start()
    try:
        await eventually(accepted, 15, "the route's status")
        (parent,) = (await status(f"{ROUTES}/reviews"))["parents"]
        (cond,) = parent["conditions"]
        assert cond["type"] == "Accepted"
        assert cond["status"] == "False"
        assert cond["reason"] == "UnsupportedValue"
        assert "parentRefs[0].sectionName" in cond["message"]
        assert parent["parentRef"]["name"] == "reviews"
        assert parent["controllerName"]

        async def messages() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = (await status(f"{AP}/allow-admin")).get(
                "validationMessages"
            ) or []
            return found

        await eventually(messages, 15, "the policy's status")
        (msg,) = await messages()
        assert msg["type"] == {"code": "AMB0202", "name": "UnsupportedField"}
        assert msg["level"] == "ERROR"
        assert "spec.rules[0].when[0].key" in msg["description"]

        # Fixed: the route is accepted, the policy's messages go away.
        fixed_route = {
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}]}
        }
        await asyncio.to_thread(
            kube.request, "PATCH", f"{ROUTES}/reviews", fixed_route, content_type=objects.MERGE
        )
        fixed_policy = {
            "spec": {"rules": [{"when": [{"key": "source.ip", "values": ["10.0.0.1"]}]}]}
        }
        await asyncio.to_thread(
            kube.request, "PATCH", f"{AP}/allow-admin", fixed_policy, content_type=objects.MERGE
        )

        async def route_accepted() -> bool:
            return await accepted() == "True"

        async def no_messages() -> bool:
            return not await messages()

        await eventually(route_accepted, 15, "the route to be accepted")
        await eventually(no_messages, 15, "the policy's messages to be removed")
        assert cp.status_writer is not None
        assert cp.status_writer.errors == []
    finally:
        await cp.stop()


def test_findings_are_written_into_status(chart: KubeCluster, tmp_path: Path) -> None:
    run(_status_written(chart, tmp_path))
