"""Waypoints' in-cluster identity: the control plane's CA behind TokenReview (with waypoints
enabled), over real gRPC with real CSRs, the Kubernetes API STAND-IN reviewing the tokens.

Asserted: a waypoint's projected token (its service account, bound to a pod labelled with the
Gateway's name, the Gateway of class istio-waypoint running as that account) obtains a
certificate for its own identity and is PERMISSION_DENIED for any other identity, even of a
workload on its node; a token of a pod claiming a Gateway of another class, of a Gateway that
does not exist, or of a service account other than the Gateway's is refused; node proxies keep
working (node A's proxy still gets node A's workloads); with waypoints disabled a waypoint's
token is refused.
Not yet moved to the real API server (issue 13).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from kubernetes_asyncio import client

from controlplane.auth import (
    CertificatePrincipals,
    ServiceAccountTokenReview,
    TokenReviewSettings,
    auth_interceptors,
    restrict_waypoints,
)
from controlplane.ca import CertificateService, IssuancePolicy
from meshcore.ca import MeshCA
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.xds import ControlPlaneEndpoint
from tests.helpers import loopback_block, run
from tests.kubeapi_standin import KubeApiStandIn

pytestmark = pytest.mark.timeout(60)
BLOCK = loopback_block()
API_IP = BLOCK.ip(5)
CP_IP = BLOCK.ip(6)
ZTUNNEL = "system:serviceaccount:istio-system:ztunnel"
AUD = ("ambient-controlplane",)
GWL = "gateway.networking.k8s.io/gateway-name"


def pod(ns: str, name: str, node: str, sa: str, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa},
    }


def gateway(name: str, cls: str = "istio-waypoint") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "mesh", "uid": f"gw-{name}"},
        "spec": {"gatewayClassName": cls, "listeners": []},
    }


def ident(sa: str) -> SpiffeId:
    return SpiffeId(trust_domain="cluster.local", namespace="mesh", service_account=sa)


# Node proxies' placement (the translator's decision in the control plane).
PLACEMENT = {("node-a", "mesh", "client"), ("node-a", "mesh", "waypoint")}


def may_impersonate(node: str, identity: SpiffeId) -> bool:
    return (node, identity.namespace, identity.service_account) in PLACEMENT


async def _serve(
    api: KubeApiStandIn, *, waypoints: bool
) -> tuple[grpc.aio.Server, int, ServiceAccountTokenReview]:
    cfg = client.Configuration()
    cfg.host = f"http://{API_IP}:{api.port}"
    reviewer = ServiceAccountTokenReview(
        TokenReviewSettings(accounts=(ZTUNNEL,), audiences=AUD, waypoints=waypoints),
        configuration=cfg,
    )
    service = CertificateService(
        MeshCA.create_root(),
        authenticator=CertificatePrincipals(reviewer),
        policy=IssuancePolicy(may_impersonate=restrict_waypoints(may_impersonate)),
    )
    server = grpc.aio.server(interceptors=auth_interceptors(reviewer))
    server.add_generic_rpc_handlers((service.method_handlers(),))
    port = server.add_insecure_port(f"{CP_IP}:0")
    await server.start()
    return server, port, reviewer


async def fetch(port: int, token: str, sa: str) -> str:
    p = ControlPlaneCAProvider(ControlPlaneEndpoint(address=f"{CP_IP}:{port}", token=token))
    try:
        cert = await p.fetch(ident(sa))
        assert cert.identity == ident(sa)
        return "OK"
    except CertificateError as err:
        return str(err)
    finally:
        await p.close()


def test_waypoint_token_gets_only_its_own_identity() -> None:
    async def main() -> None:
        api = KubeApiStandIn()
        await api.start(API_IP)
        for plural, obj in (
            ("pods", pod("istio-system", "ztunnel-a", "node-a", "ztunnel")),
            ("pods", pod("mesh", "client", "node-a", "client")),
            ("pods", pod("mesh", "waypoint-1", "node-a", "waypoint", **{GWL: "waypoint"})),
            ("pods", pod("mesh", "fake-1", "node-a", "client", **{GWL: "waypoint"})),
            ("pods", pod("mesh", "ingress-1", "node-a", "ingress", **{GWL: "ingress"})),
            ("pods", pod("mesh", "ghost-1", "node-a", "ghost", **{GWL: "ghost"})),
            ("gateways", gateway("waypoint")),
            ("gateways", gateway("ingress", cls="istio")),
        ):
            await api.upsert(plural, obj)

        def token(name: str, sa: str, ns: str = "mesh") -> None:
            api.add_token(
                f"tok-{name}",
                f"system:serviceaccount:{ns}:{sa}",
                pod=(ns, name, f"uid-{name}"),
                audiences=AUD,
            )

        token("waypoint-1", "waypoint")
        token("fake-1", "client")
        token("ingress-1", "ingress")
        token("ghost-1", "ghost")
        token("ztunnel-a", "ztunnel", ns="istio-system")
        server, port, reviewer = await _serve(api, waypoints=True)
        try:
            assert await fetch(port, "tok-waypoint-1", "waypoint") == "OK"
            # xDS sees the waypoint as its pod's node (its NODE_NAME claim must match)
            assert reviewer.authenticate("tok-waypoint-1") == "node-a"
            # no impersonation, even of a workload on its own node
            denied = await fetch(port, "tok-waypoint-1", "client")
            assert "PERMISSION_DENIED" in denied
            assert "may not obtain" in denied
            # a client pod labelled as the waypoint: not the Gateway's service account
            assert "runs as waypoint, not client" in await fetch(port, "tok-fake-1", "client")
            assert "is not a waypoint" in await fetch(port, "tok-ingress-1", "ingress")
            assert "does not exist" in await fetch(port, "tok-ghost-1", "ghost")
            # the node proxy is unchanged
            assert await fetch(port, "tok-ztunnel-a", "client") == "OK"
            assert await fetch(port, "tok-ztunnel-a", "waypoint") == "OK"
        finally:
            await server.stop(0)
        server, port, _ = await _serve(api, waypoints=False)
        try:
            assert "PERMISSION_DENIED" in await fetch(port, "tok-waypoint-1", "waypoint")
        finally:
            await server.stop(0)
            await api.stop()

    run(main())
