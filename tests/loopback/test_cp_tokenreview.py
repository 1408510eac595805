"""In-cluster node-proxy authentication (TokenReview) of the control plane's CA, end to end over
real gRPC and real HTTP on loopback: the CA service behind the TokenReview interceptor, asking
the Kubernetes API STAND-IN (tests/kubeapi_standin.py) to review each caller's token. Real
CSRs and certificates (meshcore.caclient); nothing mocked but the API server.

Asserted: the node proxy's service account token of node A gets certificates for service
accounts with pods on node A and is refused (PERMISSION_DENIED) for node B's; the node comes
from ``authentication.kubernetes.io/node-name`` when present, else from the bound pod; an
unknown token is UNAUTHENTICATED; another service account's token is PERMISSION_DENIED; a
token not bound to a pod is refused; a token for another audience is UNAUTHENTICATED; reviews
are cached (one per token per TTL).
Why the stand-in here: it plays an API server before 1.30 (no node-name in the review: the pod
is looked up), counts the reviews and pod lookups the cache saves, and goes down (503) on
demand. The same flow with real projected tokens on a real API server (1.37) is
tests/cluster/test_tokenreview.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import grpc
import pytest
from kubernetes_asyncio import client

from controlplane.auth import (
    ServiceAccountTokenReview,
    TokenReviewSettings,
    auth_interceptors,
    read_review,
)
from controlplane.ca import CertificateService, IssuancePolicy
from controlplane.errors import PermissionDenied, Unauthenticated
from meshcore.ca import MeshCA
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.xds import ControlPlaneEndpoint
from tests.helpers import loopback_block, run
from tests.kubeapi_standin import KubeApiStandIn

pytestmark = pytest.mark.timeout(60)
BLOCK = loopback_block()
API_IP = BLOCK.ip(1)
CP_IP = BLOCK.ip(2)
ZTUNNEL = "system:serviceaccount:istio-system:ztunnel"
AUDIENCE = "ambient-controlplane"


def pod(ns: str, name: str, node: str, sa: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
        "spec": {"nodeName": node, "serviceAccountName": sa},
        "status": {"phase": "Running"},
    }


# Where workloads run (what the control plane's store says; the impersonation check itself is
# controlplane.translate's and is tested with it).
PLACEMENT = {("node-a", "mesh", "client"), ("node-b", "mesh", "server")}


def may_impersonate(node: str, identity: SpiffeId) -> bool:
    return (node, identity.namespace, identity.service_account) in PLACEMENT


def ident(sa: str) -> SpiffeId:
    return SpiffeId(trust_domain="cluster.local", namespace="mesh", service_account=sa)


async def _token_review_ca() -> None:
    api = KubeApiStandIn()
    await api.start(API_IP)
    for obj in (
        pod("istio-system", "ztunnel-a", "node-a", "ztunnel"),
        pod("istio-system", "ztunnel-b", "node-b", "ztunnel"),
        pod("mesh", "client", "node-a", "client"),
    ):
        await api.upsert("pods", obj)
    aud = (AUDIENCE,)
    # Node A's token: an API server before 1.30 (no node-name): the pod is looked up.
    api.add_token(
        "tok-a", ZTUNNEL, pod=("istio-system", "ztunnel-a", "uid-ztunnel-a"), audiences=aud
    )
    # Node B's token: 1.30+ puts the node in the review.
    api.add_token(
        "tok-b",
        ZTUNNEL,
        pod=("istio-system", "ztunnel-b", "uid-ztunnel-b"),
        node="node-b",
        audiences=aud,
    )
    api.add_token(
        "tok-other",
        "system:serviceaccount:mesh:client",
        pod=("mesh", "client", "uid-client"),
        audiences=aud,
    )
    api.add_token(
        "tok-a2", ZTUNNEL, pod=("istio-system", "ztunnel-a", "uid-ztunnel-a"), audiences=aud
    )
    api.add_token("tok-unbound", ZTUNNEL, audiences=aud)  # a legacy Secret token
    api.add_token("tok-apiserver", ZTUNNEL, pod=("istio-system", "ztunnel-a", "uid-ztunnel-a"))

    cfg = client.Configuration()
    cfg.host = f"http://{API_IP}:{api.port}"
    reviewer = ServiceAccountTokenReview(
        TokenReviewSettings(accounts=(ZTUNNEL,), audiences=(AUDIENCE,), cache_ttl=30),
        configuration=cfg,
    )
    ca = MeshCA.create_root()
    service = CertificateService(
        ca, authenticator=reviewer, policy=IssuancePolicy(may_impersonate=may_impersonate)
    )
    server = grpc.aio.server(interceptors=auth_interceptors(reviewer))
    server.add_generic_rpc_handlers((service.method_handlers(),))
    port = server.add_insecure_port(f"{CP_IP}:0")
    await server.start()

    def provider(token: str | None) -> ControlPlaneCAProvider:
        return ControlPlaneCAProvider(ControlPlaneEndpoint(address=f"{CP_IP}:{port}", token=token))

    async def refused(token: str | None, sa: str) -> str:
        p = provider(token)
        try:
            with pytest.raises(CertificateError) as info:
                await p.fetch(ident(sa))
        finally:
            await p.close()
        return str(info.value)

    try:
        # Node A's proxy: certificates for node A's workloads only.
        p = provider("tok-a")
        cert = await p.fetch(ident("client"))
        assert cert.identity == ident("client")
        again = await p.fetch(ident("client"))
        assert again.identity == ident("client")
        await p.close()
        assert reviewer.reviews == 1  # cached
        assert [r["spec"]["audiences"] for r in api.reviews] == [[AUDIENCE]]
        assert "get pods istio-system/ztunnel-a" in api.requests
        err = await refused("tok-a", "server")
        assert "PERMISSION_DENIED" in err
        assert "node 'node-a'" in err

        # Concurrent calls with a new token: one review in flight, shared.
        before = reviewer.reviews
        p = provider("tok-a2")
        certs = await asyncio.gather(*(p.fetch(ident("client")) for _ in range(5)))
        await p.close()
        assert {c.identity for c in certs} == {ident("client")}
        assert reviewer.reviews == before + 1

        # Node B's proxy (node from the review, no pod lookup): the mirror image.
        lookups = len([r for r in api.requests if r.startswith("get pods")])
        p = provider("tok-b")
        assert (await p.fetch(ident("server"))).identity == ident("server")
        await p.close()
        assert len([r for r in api.requests if r.startswith("get pods")]) == lookups
        assert "PERMISSION_DENIED" in await refused("tok-b", "client")

        err = await refused("nope", "client")
        assert "UNAUTHENTICATED" in err
        assert "invalid bearer token" in err
        err = await refused(None, "client")
        assert "UNAUTHENTICATED" in err
        assert "no credential" in err
        err = await refused("tok-other", "client")
        assert "PERMISSION_DENIED" in err
        assert "not the node proxy's service account" in err
        err = await refused("tok-unbound", "client")
        assert "PERMISSION_DENIED" in err
        assert "not bound to a pod" in err
        err = await refused("tok-apiserver", "client")
        assert "UNAUTHENTICATED" in err
        assert "audiences" in err

        # The node proxy's pod is deleted: its token stops working once the cache expires
        # (the API server refuses tokens of deleted bound objects).
        reviewer.settings = replace(reviewer.settings, cache_ttl=0.0)
        await api.delete("pods", "istio-system", "ztunnel-a")
        err = await refused("tok-a", "client")
        assert "UNAUTHENTICATED" in err

        # API outage: refused with a clear reason, not cached (works again right after).
        api.available = False
        err = await refused("tok-b", "server")
        assert "UNAUTHENTICATED" in err
        assert "did not answer the TokenReview" in err
        api.available = True
        p = provider("tok-b")
        assert (await p.fetch(ident("server"))).identity == ident("server")
        await p.close()
    finally:
        await server.stop(0)
        await reviewer.close()
        await api.stop()


def test_token_review_ca() -> None:
    run(_token_review_ca())


def test_read_review() -> None:
    extra = {
        "authentication.kubernetes.io/pod-name": ["ztunnel-x"],
        "authentication.kubernetes.io/pod-uid": ["u1"],
    }
    status = {"authenticated": True, "user": {"username": ZTUNNEL, "extra": extra}}
    bound = read_review(status, [ZTUNNEL])
    assert (bound.namespace, bound.pod_name, bound.pod_uid, bound.node) == (
        "istio-system",
        "ztunnel-x",
        "u1",
        "",
    )
    extra["authentication.kubernetes.io/node-name"] = ["n7"]
    assert read_review(status, [ZTUNNEL]).node == "n7"
    with pytest.raises(Unauthenticated, match="expired"):
        read_review({"authenticated": False, "error": "token expired"}, [ZTUNNEL])
    with pytest.raises(PermissionDenied):
        read_review(status, ["system:serviceaccount:other:ztunnel"])


def test_unconfigured_review_refuses() -> None:
    with pytest.raises(Unauthenticated, match="no node authentication configured"):
        ServiceAccountTokenReview().authenticate("x")
    assert auth_interceptors(ServiceAccountTokenReview()) == []
