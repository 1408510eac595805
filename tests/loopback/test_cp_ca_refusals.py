"""The control plane's CA over real gRPC: which identities a node may obtain, lifetimes, and the
gRPC status, log line and counter of every refusal (issue 10, item 5).

Addresses: control plane on host 1 of a `tests.helpers.loopback_block` (port chosen by the
kernel). Node proxy "node-a" calls with its real node token; certificates are real (the CA's
chain is verified by the client side).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509

from controlplane.app import ControlPlane, ControlPlaneSettings
from meshcore.ca import generate_csr
from meshcore.caclient import CREATE_CERTIFICATE, build_request
from meshcore.identity import SpiffeId
from meshcore.proto import ca_pb2
from tests.helpers import loopback_block
from tests.loopback.cpfixtures import write_manifests

CP_IP = loopback_block().ip(1)
TOKEN = "token-node-a-0123456789"


def pod(
    name: str,
    sa: str,
    *,
    ns: str = "default",
    ip: str | None = "10.1.0.5",
    phase: str = "Running",
) -> dict[str, Any]:
    status: dict[str, object] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
    spec: dict[str, object] = {"serviceAccountName": sa, "nodeName": "node-a"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
        "status": status,
    }


def host_network(p: dict[str, Any]) -> dict[str, object]:
    """`p` with ``spec.hostNetwork: true``."""
    return {**p, "spec": {**p["spec"], "hostNetwork": True}}


MANIFESTS: list[dict[str, object]] = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}},
    pod("sleep", "sleep", ip="10.1.0.10"),
    # The node proxy itself: hostNetwork, its IP is the node's.
    host_network(pod("ztunnel-a", "ztunnel", ns="istio-system", ip="172.18.0.2")),
    host_network(pod("agent", "hostagent", ip="172.18.0.2")),
    pod("job", "batch", phase="Succeeded", ip="10.1.0.11"),
    pod("crashed", "crashed", phase="Failed", ip="10.1.0.12"),
    pod("pending", "pending", phase="Pending", ip=None),
]


def sid(sa: str, ns: str = "default") -> SpiffeId:
    return SpiffeId(trust_domain="cluster.local", namespace=ns, service_account=sa)


@contextlib.asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    creds = tmp_path / "creds.yaml"
    creds.write_text(yaml.safe_dump({"node-a": TOKEN}))
    write_manifests(tmp_path / "manifests", "m.yaml", MANIFESTS)
    plane = ControlPlane(
        ControlPlaneSettings(
            listen=f"{CP_IP}:0",
            debug_listen=None,
            manifest_dir=tmp_path / "manifests",
            ca_dir=tmp_path / "ca",
            node_credentials=creds,
            plaintext=True,
        )
    )
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


def run(tmp_path: Path, body: Callable[[ControlPlane], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(tmp_path) as cp:
            await body(cp)

    asyncio.run(asyncio.wait_for(main(), 60))


async def call(
    cp: ControlPlane, request: ca_pb2.IstioCertificateRequest, token: str | None = TOKEN
) -> ca_pb2.IstioCertificateResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    async with grpc.aio.insecure_channel(f"{CP_IP}:{cp.port}") as channel:
        method = channel.unary_unary(
            CREATE_CERTIFICATE,
            request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
        )
        response: ca_pb2.IstioCertificateResponse = await method(
            request, metadata=metadata, timeout=10
        )
        return response


def request_for(identity: SpiffeId, seconds: int = 3600) -> ca_pb2.IstioCertificateRequest:
    _key, csr = generate_csr(identity)
    return build_request(identity, csr, timedelta(seconds=seconds))


async def refused(
    cp: ControlPlane, request: ca_pb2.IstioCertificateRequest, token: str | None = TOKEN
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(cp, request, token)
    return info.value


def count(cp: ControlPlane, outcome: str) -> float:
    value = cp.metrics.registry.get_sample_value(
        "controlplane_ca_certificates_total", {"outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize(
    "identity",
    [
        sid("ztunnel", "istio-system"),  # the node proxy's own service account (hostNetwork)
        sid("hostagent"),  # any hostNetwork pod
        sid("batch"),  # Succeeded
        sid("crashed"),  # Failed
        sid("pending"),  # no IP yet
    ],
    ids=["node-proxy-own-sa", "host-network", "succeeded", "failed", "no-ip"],
)
def test_identities_the_node_proxy_does_not_serve_are_refused(
    tmp_path: Path, identity: SpiffeId, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(cp: ControlPlane) -> None:
        with caplog.at_level(logging.WARNING, logger="controlplane.ca"):
            err = await refused(cp, request_for(identity))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert identity.uri in (err.details() or "")
        assert count(cp, "permission_denied") == 1
        assert count(cp, "signed") == 0
        assert any("PERMISSION_DENIED" in r.getMessage() for r in caplog.records)
        # The same node gets its served pod's identity (the refusal is not a broken CA).
        resp = await call(cp, request_for(sid("sleep")))
        leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [sid("sleep").uri]

    run(tmp_path, body)


def test_huge_lifetime_is_clamped_not_an_overflow(tmp_path: Path) -> None:
    async def body(cp: ControlPlane) -> None:
        for seconds in (2**62, 2**63 - 1):
            req = request_for(sid("sleep"))
            req.validity_duration = seconds
            resp = await call(cp, req)
            leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
            life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
            # max_ttl (7 days) plus the one-minute backdating of notBefore.
            assert life == timedelta(days=7, minutes=1)

    run(tmp_path, body)


def test_negative_lifetime_is_invalid_argument(tmp_path: Path) -> None:
    async def body(cp: ControlPlane) -> None:
        req = request_for(sid("sleep"))
        req.validity_duration = -(2**63)
        err = await refused(cp, req)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "validity_duration" in (err.details() or "")
        assert count(cp, "invalid_argument") == 1

    run(tmp_path, body)


def test_expired_ca_is_unavailable(tmp_path: Path) -> None:
    async def body(cp: ControlPlane) -> None:
        cp.ca_service.clock = lambda: datetime(2199, 1, 1, tzinfo=UTC)
        err = await refused(cp, request_for(sid("sleep")))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "expired" in (err.details() or "")
        assert count(cp, "unavailable") == 1

    run(tmp_path, body)


def test_unexpected_failure_is_internal_without_details(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(cp: ControlPlane) -> None:
        def broken(_node: str, _identity: SpiffeId) -> bool:
            raise KeyError("secret internals")

        # fault injection: a bug in the decision
        cp.ca_service.policy = replace(cp.ca_service.policy, may_impersonate=broken)
        with caplog.at_level(logging.ERROR, logger="controlplane.ca"):
            err = await refused(cp, request_for(sid("sleep")))
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (err.details() or "")
        assert count(cp, "internal") == 1
        (line,) = [r for r in caplog.records if "CreateCertificate failed" in r.getMessage()]
        assert "KeyError" in line.getMessage()
        assert line.exc_info is None

    run(tmp_path, body)
