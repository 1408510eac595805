"""Waypoints' in-cluster identity: the control plane's CA behind TokenReview (with waypoints
enabled), over real gRPC with real CSRs, the REAL API server reviewing real projected tokens
(TokenRequest, bound to real Pods) and serving the real Gateways, as the chart's
``ambient-controlplane`` service account (so the chart's RBAC is what the reviewer has).

Asserted: a waypoint's projected token (its service account, bound to a pod labelled with the
Gateway's name, the Gateway of class istio-waypoint running as that account) obtains a
certificate for its own identity and is PERMISSION_DENIED for any other identity, even of a
workload on its node; a token of a pod claiming a Gateway of another class, of a Gateway that
does not exist, or of a service account other than the Gateway's is refused; node proxies keep
working (node A's proxy still gets node A's workloads); with waypoints disabled a waypoint's
token is refused.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from ambientctl.lab.kube import KubeCluster
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
from tests.cluster import objects
from tests.cluster.fixtures import SYSTEM_NS, sa_kubeconfig
from tests.helpers import run

pytestmark = pytest.mark.timeout(120)
NS = "wpa-mesh"
CP_IP = "127.0.0.1"
ZTUNNEL = "system:serviceaccount:istio-system:ztunnel"
AUD = ("ambient-controlplane",)
GWL = "gateway.networking.k8s.io/gateway-name"


def gateway(kube: KubeCluster, name: str, cls: str = "istio-waypoint") -> None:
    body = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "gatewayClassName": cls,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }
    path = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/gateways"
    objects.ok(kube.request("POST", path, body), 201)


def ident(sa: str) -> SpiffeId:
    return SpiffeId(trust_domain="cluster.local", namespace=NS, service_account=sa)


NODE = "wpa-node-a"
# Node proxies' placement (the translator's decision in the control plane).
PLACEMENT = {(NODE, NS, "client"), (NODE, NS, "waypoint")}


def may_impersonate(node: str, identity: SpiffeId) -> bool:
    return (node, identity.namespace, identity.service_account) in PLACEMENT


async def _serve(
    kubeconfig: Path, *, waypoints: bool
) -> tuple[grpc.aio.Server, int, ServiceAccountTokenReview]:
    reviewer = ServiceAccountTokenReview(
        TokenReviewSettings(accounts=(ZTUNNEL,), audiences=tuple(AUD), waypoints=waypoints),
        kubeconfig=kubeconfig,
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


def test_waypoint_token_gets_only_its_own_identity(chart: KubeCluster, tmp_path: Path) -> None:
    kube = chart
    objects.namespace(kube, NS)
    for sa in ("client", "waypoint", "ingress", "ghost"):
        objects.service_account(kube, NS, sa)
    gateway(kube, "waypoint")
    gateway(kube, "ingress", cls="istio")
    placed = {
        "ztunnel-a": (SYSTEM_NS, "ztunnel", {"app": "wpa-ztunnel"}),
        "client": (NS, "client", {"app": "client"}),
        "waypoint-1": (NS, "waypoint", {GWL: "waypoint"}),
        "fake-1": (NS, "client", {GWL: "waypoint"}),
        "ingress-1": (NS, "ingress", {GWL: "ingress"}),
        "ghost-1": (NS, "ghost", {GWL: "ghost"}),
    }
    tokens: dict[str, str] = {}
    for name, (ns, sa, labels) in placed.items():
        pod_name = f"wpa-{name}" if ns == SYSTEM_NS else name
        p = objects.pod(
            kube, ns, pod_name, objects.PodOptions(node_name=NODE, sa=sa, labels=labels)
        )
        tokens[name] = objects.token(kube, ns, sa, audiences=list(AUD), pod=p)
    kc = sa_kubeconfig(kube, tmp_path / "cp.kubeconfig", SYSTEM_NS, "ambient-controlplane")

    async def main() -> None:
        server, port, reviewer = await _serve(kc, waypoints=True)
        try:
            assert await fetch(port, tokens["waypoint-1"], "waypoint") == "OK"
            # xDS sees the waypoint as its pod's node (its NODE_NAME claim must match)
            assert reviewer.authenticate(tokens["waypoint-1"]) == NODE
            # no impersonation, even of a workload on its own node
            denied = await fetch(port, tokens["waypoint-1"], "client")
            assert "PERMISSION_DENIED" in denied
            assert "may not obtain" in denied
            # a client pod labelled as the waypoint: not the Gateway's service account
            assert "runs as waypoint, not client" in await fetch(port, tokens["fake-1"], "client")
            assert "is not a waypoint" in await fetch(port, tokens["ingress-1"], "ingress")
            assert "does not exist" in await fetch(port, tokens["ghost-1"], "ghost")
            # the node proxy is unchanged
            assert await fetch(port, tokens["ztunnel-a"], "client") == "OK"
            assert await fetch(port, tokens["ztunnel-a"], "waypoint") == "OK"
        finally:
            await server.stop(0)
        server, port, _ = await _serve(kc, waypoints=False)
        try:
            assert "PERMISSION_DENIED" in await fetch(port, tokens["waypoint-1"], "waypoint")
        finally:
            await server.stop(0)

    run(main())
