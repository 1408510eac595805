"""The control plane PROCESS wiring of TokenReview auth (`--token-review-account`,
`--token-audience`, the API server from a kubeconfig): the CA and the xDS stream both
authenticate node proxies by the Kubernetes API STAND-IN's TokenReview, over real gRPC and HTTP
on loopback. The impersonation check reads the control plane's own store (manifests here).
Not yet moved to the real API server (issue 13); tests/cluster/test_tokenreview.py covers
TokenReview itself with real projected tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml

from controlplane.app import ControlPlane, ControlPlaneSettings, parse_args
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto.convert import ADDRESS_TYPE
from meshcore.xds import DELTA_METHOD, ControlPlaneEndpoint
from tests.helpers import loopback_block, run
from tests.kubeapi_standin import KubeApiStandIn
from tests.loopback.cpfixtures import base_manifests, write_manifests

pytestmark = pytest.mark.timeout(60)
BLOCK = loopback_block()
API_IP = BLOCK.ip(1)
CP_IP = BLOCK.ip(2)
ZTUNNEL = "system:serviceaccount:istio-system:ztunnel"


def kubeconfig(path: Path, port: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "s", "cluster": {"server": f"http://{API_IP}:{port}"}}],
                "users": [{"name": "cp", "user": {"token": "controlplane-sa-token"}}],
                "contexts": [{"name": "c", "context": {"cluster": "s", "user": "cp"}}],
                "current-context": "c",
            }
        )
    )
    return path


async def xds_code(port: int, token: str | None, node: str) -> grpc.StatusCode:
    """The status of a delta xDS stream opened with `token` claiming `node` (OK = served)."""
    async with grpc.aio.insecure_channel(f"{CP_IP}:{port}") as channel:
        call = channel.stream_stream(
            DELTA_METHOD,
            request_serializer=dpb.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=dpb.DeltaDiscoveryResponse.FromString,
        )

        async def requests() -> AsyncIterator[dpb.DeltaDiscoveryRequest]:
            yield dpb.DeltaDiscoveryRequest(node=dpb.Node(id=node), type_url=ADDRESS_TYPE)
            await asyncio.sleep(5)

        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        stream = call(requests(), metadata=metadata)
        try:
            async for _ in stream:
                return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            return err.code()
        finally:
            stream.cancel()
    return grpc.StatusCode.UNKNOWN


async def _controlplane_token_review(tmp: Path) -> None:
    api = KubeApiStandIn()
    await api.start(API_IP)
    await api.upsert(
        "pods",
        {
            "metadata": {"name": "ztunnel-a", "namespace": "istio-system", "uid": "u-a"},
            "spec": {"nodeName": "node-a", "serviceAccountName": "ztunnel"},
        },
    )
    api.add_token(
        "tok-a", ZTUNNEL, pod=("istio-system", "ztunnel-a", "u-a"), audiences=("ambient",)
    )
    write_manifests(tmp / "manifests", "base.yaml", base_manifests())
    settings = ControlPlaneSettings(
        listen=f"{CP_IP}:0",
        debug_listen=None,
        manifest_dir=tmp / "manifests",
        ca_dir=tmp / "ca",
        plaintext=True,
        kubeconfig=kubeconfig(tmp / "kubeconfig", api.port),
        token_review_accounts=(ZTUNNEL,),
        token_audiences=("ambient",),
        poll_interval=0.05,
    )
    cp = ControlPlane(settings)
    await cp.start()
    try:
        ep = ControlPlaneEndpoint(address=f"{CP_IP}:{cp.port}", token="tok-a")
        ca = ControlPlaneCAProvider(ep)
        sleep = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="sleep")
        echo = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="echo")
        assert (await ca.fetch(sleep)).identity == sleep  # sleep runs on node-a
        with pytest.raises(CertificateError, match="PERMISSION_DENIED"):
            await ca.fetch(echo)  # echo runs on node-b
        await ca.close()
        bad = ControlPlaneCAProvider(ControlPlaneEndpoint(address=ep.address, token="nope"))
        with pytest.raises(CertificateError, match="UNAUTHENTICATED"):
            await bad.fetch(sleep)
        await bad.close()

        assert await xds_code(cp.port, "tok-a", "node-a") == grpc.StatusCode.OK
        assert await xds_code(cp.port, "tok-a", "node-b") == grpc.StatusCode.PERMISSION_DENIED
        assert await xds_code(cp.port, "nope", "node-a") == grpc.StatusCode.UNAUTHENTICATED
        assert await xds_code(cp.port, None, "node-a") == grpc.StatusCode.UNAUTHENTICATED
        assert api.reviews
        assert all(r["spec"]["audiences"] == ["ambient"] for r in api.reviews)
    finally:
        await cp.stop()
        await api.stop()


def test_controlplane_token_review(tmp_path: Path) -> None:
    run(_controlplane_token_review(tmp_path))


def test_flags() -> None:
    s = parse_args(
        [
            "--ca-dir",
            "/x",
            "--manifest-dir",
            "/m",
            "--token-review-account",
            ZTUNNEL,
            "--token-audience",
            "a1",
            "--token-audience",
            "a2",
        ]
    )
    assert s.token_review_accounts == (ZTUNNEL,)
    assert s.token_audiences == ("a1", "a2")
