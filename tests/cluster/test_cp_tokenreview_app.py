"""The control plane PROCESS wiring of TokenReview auth (`--token-review-account`,
`--token-audience`, the API server from a kubeconfig) against the REAL API server: the CA and
the xDS stream both authenticate node proxies with a real projected token (TokenRequest, bound
to a real ztunnel Pod on node-a, audience ``ambient``), reviewed by the real TokenReview as the
chart's ``ambient-controlplane`` service account. The impersonation check reads the control
plane's own store (manifests here: sleep on node-a, echo on node-b). A token for another
audience is refused: the control plane sends its audience in the review."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from ambientctl.lab.kube import KubeCluster
from controlplane.app import ControlPlane, ControlPlaneSettings, parse_args
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.xds import ControlPlaneEndpoint
from tests.cluster import objects
from tests.cluster.fixtures import SYSTEM_NS, sa_kubeconfig
from tests.helpers import run
from tests.loopback.cpfixtures import base_manifests, write_manifests
from tests.loopback.test_cp_xds_refusal import stream_status

pytestmark = pytest.mark.timeout(120)
CP_IP = "127.0.0.1"
ZTUNNEL = "system:serviceaccount:istio-system:ztunnel"


async def xds_code(port: int, token: str | None, node: str) -> grpc.StatusCode:
    """The status of a delta xDS stream opened with `token` claiming `node` (OK = served).
    Like a node proxy, it sends its first request at once and keeps its side open; the control
    plane reads that request before refusing (`controlplane.xds.REFUSED_FIRST_REQUEST_WAIT`), so
    a refusal never races the send (grpc-core then reported INTERNAL, once, under load)."""
    code, _, _ = await stream_status(port, 0.0, token=token, node=node, ip=CP_IP)
    return code


async def _controlplane_token_review(kube: KubeCluster, tmp: Path) -> None:
    # node-a's proxy pod; the node is named as in base_manifests (sleep on node-a).
    za = objects.pod(
        kube, SYSTEM_NS, "trapp-ztunnel-a", objects.PodOptions(node_name="node-a", sa="ztunnel")
    )
    tok_a = objects.token(kube, SYSTEM_NS, "ztunnel", audiences=["ambient"], pod=za)
    tok_other_aud = objects.token(kube, SYSTEM_NS, "ztunnel", audiences=["other"], pod=za)
    kc = sa_kubeconfig(kube, tmp / "cp.kubeconfig", SYSTEM_NS, "ambient-controlplane")
    write_manifests(tmp / "manifests", "base.yaml", base_manifests())
    settings = ControlPlaneSettings(
        listen=f"{CP_IP}:0",
        debug_listen=None,
        manifest_dir=tmp / "manifests",
        ca_dir=tmp / "ca",
        plaintext=True,
        kubeconfig=kc,
        token_review_accounts=(ZTUNNEL,),
        token_audiences=("ambient",),
        poll_interval=0.05,
    )
    cp = ControlPlane(settings)
    await cp.start()
    try:
        ep = ControlPlaneEndpoint(address=f"{CP_IP}:{cp.port}", token=tok_a)
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

        assert await xds_code(cp.port, tok_a, "node-a") == grpc.StatusCode.OK
        assert await xds_code(cp.port, tok_a, "node-b") == grpc.StatusCode.PERMISSION_DENIED
        assert await xds_code(cp.port, "nope", "node-a") == grpc.StatusCode.UNAUTHENTICATED
        assert await xds_code(cp.port, None, "node-a") == grpc.StatusCode.UNAUTHENTICATED
        # The review names the control plane's audience: a token for another is refused.
        code = await xds_code(cp.port, tok_other_aud, "node-a")
        assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await cp.stop()


def test_controlplane_token_review(chart: KubeCluster, tmp_path: Path) -> None:
    run(_controlplane_token_review(chart, tmp_path))


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
