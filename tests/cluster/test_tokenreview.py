"""Node-proxy authentication (controlplane.auth TokenReview) against the REAL API server, with
REAL projected tokens from the TokenRequest API bound to real Pod objects, and the chart's RBAC:
the reviewer runs as the chart's ``ambient-controlplane`` service account, so a missing
permission in charts/ambient/templates/controlplane-rbac.yaml fails here.

Asserted: node A's proxy token (bound to its pod on node A) gets certificates only for workloads
on node A, node B's only for node B's (the API server puts the node in the review); a token of
another service account, a token not bound to a pod, a token for the API server's audience and a
garbage token are refused with the right gRPC status; deleting the bound pod invalidates its
token at the API server. The API-outage case stays on the stand-in
(tests/loopback/test_cp_tokenreview.py): a real server cannot be made to answer 503 on demand.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from ambientctl.lab.kube import KubeCluster
from controlplane.auth import ServiceAccountTokenReview, TokenReviewSettings, auth_interceptors
from controlplane.ca import CertificateService, IssuancePolicy
from meshcore.ca import MeshCA
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.xds import ControlPlaneEndpoint
from tests.cluster import objects
from tests.cluster.fixtures import SYSTEM_NS, sa_kubeconfig

pytestmark = pytest.mark.timeout(120)
NS = "tr-mesh"
ZTUNNEL = f"system:serviceaccount:{SYSTEM_NS}:ztunnel"
AUDIENCE = "ambient-controlplane"


def ident(sa: str) -> SpiffeId:
    return SpiffeId(trust_domain="cluster.local", namespace=NS, service_account=sa)


def test_token_review_with_real_projected_tokens(chart: KubeCluster, tmp_path: Path) -> None:
    kube = chart
    objects.namespace(kube, NS)
    for sa in ("client", "server"):
        objects.service_account(kube, NS, sa)
    za = objects.pod(
        kube, SYSTEM_NS, "tr-ztunnel-a", objects.PodOptions(node_name="tr-node-a", sa="ztunnel")
    )
    zb = objects.pod(
        kube, SYSTEM_NS, "tr-ztunnel-b", objects.PodOptions(node_name="tr-node-b", sa="ztunnel")
    )
    cl = objects.pod(kube, NS, "client", objects.PodOptions(node_name="tr-node-a", sa="client"))
    objects.pod(kube, NS, "server", objects.PodOptions(node_name="tr-node-b", sa="server"))
    aud = [AUDIENCE]
    tok_a = objects.token(kube, SYSTEM_NS, "ztunnel", audiences=aud, pod=za)
    tok_b = objects.token(kube, SYSTEM_NS, "ztunnel", audiences=aud, pod=zb)
    tok_other = objects.token(kube, NS, "client", audiences=aud, pod=cl)
    tok_unbound = objects.token(kube, SYSTEM_NS, "ztunnel", audiences=aud, pod=None)
    tok_apiserver = objects.token(kube, SYSTEM_NS, "ztunnel", audiences=["https://x"], pod=za)
    kc = sa_kubeconfig(kube, tmp_path / "cp.kubeconfig", SYSTEM_NS, "ambient-controlplane")

    def on_node(node: str, identity: SpiffeId) -> bool:
        _, pods = kube.request("GET", f"/api/v1/namespaces/{NS}/pods")
        sa = identity.service_account
        return any(
            p["spec"]["nodeName"] == node and p["spec"]["serviceAccountName"] == sa
            for p in pods["items"]
        )

    async def main() -> None:
        reviewer = ServiceAccountTokenReview(
            TokenReviewSettings(accounts=(ZTUNNEL,), audiences=(AUDIENCE,), cache_ttl=30),
            kubeconfig=kc,
        )
        service = CertificateService(
            MeshCA.create_root(),
            authenticator=reviewer,
            policy=IssuancePolicy(may_impersonate=on_node),
        )
        server = grpc.aio.server(interceptors=auth_interceptors(reviewer))
        server.add_generic_rpc_handlers((service.method_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        def provider(token: str | None) -> ControlPlaneCAProvider:
            endpoint = ControlPlaneEndpoint(address=f"127.0.0.1:{port}", token=token)
            return ControlPlaneCAProvider(endpoint)

        async def granted(token: str, sa: str) -> bool:
            p = provider(token)
            try:
                return (await p.fetch(ident(sa))).identity == ident(sa)
            finally:
                await p.close()

        async def refused(token: str | None, sa: str) -> str:
            p = provider(token)
            try:
                with pytest.raises(CertificateError) as info:
                    await p.fetch(ident(sa))
            finally:
                await p.close()
            return str(info.value)

        try:
            assert await granted(tok_a, "client")
            err = await refused(tok_a, "server")
            assert "PERMISSION_DENIED" in err
            assert "node 'tr-node-a'" in err
            assert await granted(tok_b, "server")
            assert "PERMISSION_DENIED" in await refused(tok_b, "client")
            err = await refused(tok_other, "client")
            assert "PERMISSION_DENIED" in err
            assert "not the node proxy's service account" in err
            err = await refused(tok_unbound, "client")
            assert "PERMISSION_DENIED" in err
            assert "not bound to a pod" in err
            assert "UNAUTHENTICATED" in await refused(tok_apiserver, "client")
            assert "UNAUTHENTICATED" in await refused("not-a-token", "client")
            # The bound pod is deleted: the API server no longer accepts its token.
            reviewer.settings = replace(reviewer.settings, cache_ttl=0.0)
            objects.ok(
                kube.request(
                    "DELETE",
                    f"/api/v1/namespaces/{SYSTEM_NS}/pods/tr-ztunnel-a?gracePeriodSeconds=0",
                )
            )
            # (the API server's token cache may answer from before the deletion for a moment)
            err = ""
            for _ in range(50):
                try:
                    await granted(tok_a, "client")
                except CertificateError as e:
                    err = str(e)
                    break
                await asyncio.sleep(0.2)
            assert "UNAUTHENTICATED" in err
        finally:
            await server.stop(0)
            await reviewer.close()

    asyncio.run(asyncio.wait_for(main(), 90))
