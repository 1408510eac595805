"""The control plane end to end on loopback: manifest directory -> translation -> delta xDS
and CA over gRPC -> real node proxies carrying traffic. See cpfixtures for addresses."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from controlplane.app import ControlPlane
from meshcore.ca import generate_csr
from meshcore.caclient import (
    CREATE_CERTIFICATE,
    PENDING_KEY_TTL,
    ControlPlaneCAProvider,
    build_request,
)
from meshcore.certs import WorkloadCertificate, split_pem_chain
from meshcore.errors import CertificateError
from meshcore.grpcwire import GrpcError
from meshcore.identity import SpiffeId
from meshcore.proto import workload_pb2
from meshcore.proto.convert import ADDRESS_TYPE
from tests.helpers import run
from tests.loopback.cpfixtures import (
    CLIENT_IP,
    DENY_SLEEP,
    NODE_A,
    NODE_B,
    VIP,
    base_manifests,
    call_echo,
    cp_settings,
    echo_backend,
    endpoint,
    eventually,
    running_controlplane,
    start_node,
    stop_node,
    write_manifests,
)

pytestmark = pytest.mark.timeout(90)


async def _manifest_edit_reaches_running_node_proxy(tmp_path: Path) -> None:
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    async with running_controlplane(cp_settings(tmp_path)) as cp, echo_backend():
        a = await start_node("node-a", NODE_A, ((VIP, 80),))
        b = await start_node("node-b", NODE_B)
        try:
            assert await call_echo(), "traffic through the mesh with control-plane config"
            echo = b.state.workload("Kubernetes//Pod/default/echo")
            assert echo is not None
            assert echo.tunnel_protocol.value == "HBONE"
            # Certificates came from the control plane's CA, for the node's own workloads only.
            assert [str(i) for i in b.proxy.ctx.certs.identities()] == [
                "spiffe://cluster.local/ns/default/sa/echo"
            ]
            # Edit the manifest directory: add a DENY policy.
            write_manifests(tmp_path / "manifests", "policy.yaml", [DENY_SLEEP])
            took = await eventually(
                lambda: b.state.policy("default/deny-sleep") is not None, 5, "policy pushed"
            )
            assert took < 5
            assert not await call_echo(), "the DENY policy is enforced"
            # Remove it again: traffic flows again.
            (tmp_path / "manifests" / "policy.yaml").unlink()
            await eventually(lambda: b.state.policy("default/deny-sleep") is None, 5)
            assert await call_echo()
            conns = cp.xds.debug_connections()
            assert sorted(c["node"] for c in conns) == ["node-a", "node-b"]
            assert all(t["nacks"] == 0 for c in conns for t in c["types"].values())
        finally:
            await stop_node(a)
            await stop_node(b)


async def _csr_for_service_account_on_another_node_is_refused(tmp_path: Path) -> None:
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    async with running_controlplane(cp_settings(tmp_path)):
        provider_a = ControlPlaneCAProvider(endpoint("node-a"))
        try:
            sleep = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
            echo = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo")
            cert = await provider_a.fetch(sleep)  # sleep runs on node-a: allowed
            assert cert.identity == sleep
            with pytest.raises(CertificateError, match=r"PERMISSION_DENIED.*node 'node-a'"):
                await provider_a.fetch(echo)  # echo runs on node-b only
            # A CSR for echo smuggled under a sleep ImpersonatedIdentity is refused too.
            _, csr = generate_csr(echo)
            # Over our own gRPC client (meshcore.grpcclient) against the grpcio server.
            conn = await endpoint("node-a").connect()
            request = build_request(sleep, csr, timedelta(hours=1)).SerializeToString()
            with pytest.raises(GrpcError) as err:
                await conn.unary(
                    CREATE_CERTIFICATE,
                    request,
                    metadata=endpoint("node-a").metadata(),
                    timeout=10,
                )
            assert err.value.code_name == "INVALID_ARGUMENT"
            # No credential at all.
            with pytest.raises(GrpcError) as err:
                await conn.unary(CREATE_CERTIFICATE, request, timeout=10)
            assert err.value.code_name == "UNAUTHENTICATED"
            conn.close()
        finally:
            await provider_a.close()


async def _bad_resource_is_nacked_alone(tmp_path: Path) -> None:
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    async with running_controlplane(cp_settings(tmp_path)) as cp:
        a = await start_node("node-a", NODE_A, ((VIP, 80),))
        try:
            # One response carrying a bad workload (3-byte address) and a good one.
            bad = workload_pb2.Address(
                workload=workload_pb2.Workload(
                    uid="Kubernetes//Pod/default/bad",
                    name="bad",
                    namespace="default",
                    addresses=[b"\x01\x02\x03"],
                )
            )
            good = workload_pb2.Address(
                workload=workload_pb2.Workload(
                    uid="Kubernetes//Pod/default/good",
                    name="good",
                    namespace="default",
                    addresses=[bytes([127, 0, 55, 9])],
                    node="node-c",
                )
            )
            bad_uid, good_uid = "Kubernetes//Pod/default/bad", "Kubernetes//Pod/default/good"
            for name, msg in ((bad_uid, bad), (good_uid, good)):
                packed = any_pb2.Any()
                packed.Pack(msg, type_url_prefix="type.googleapis.com/")
                cp.xds.table.set_any(ADDRESS_TYPE, name, packed)
            cp.xds._notify(
                {ADDRESS_TYPE: {"Kubernetes//Pod/default/bad", "Kubernetes//Pod/default/good"}},
                None,
            )
            await eventually(lambda: a.state.workload("Kubernetes//Pod/default/good") is not None)
            assert a.state.workload("Kubernetes//Pod/default/bad") is None
            assert a.state.workload("Kubernetes//Pod/default/echo") is not None  # rest kept
            assert "Kubernetes//Pod/default/bad" in a.xds.stats.last_nack
            await eventually(
                lambda: any(
                    c["types"][ADDRESS_TYPE]["nacks"] == 1 for c in cp.xds.debug_connections()
                )
            )
            conn = next(c for c in cp.xds.debug_connections() if c["node"] == "node-a")
            assert "4 or 16 bytes" in conn["types"][ADDRESS_TYPE]["last_error"]
        finally:
            await stop_node(a)


async def _controlplane_restart_node_proxies_keep_forwarding_and_resync(
    tmp_path: Path,
) -> None:
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    settings = cp_settings(tmp_path)
    cp = ControlPlane(settings)
    await cp.start()
    async with echo_backend():
        a = await start_node("node-a", NODE_A, ((VIP, 80),))
        b = await start_node("node-b", NODE_B)
        try:
            assert await call_echo()
            await cp.stop()  # control plane gone
            await eventually(lambda: not b.xds.stats.connected, 5, "client noticed")
            for _ in range(3):
                assert await call_echo(), "node proxies keep forwarding on the last good config"
            # Config changes while the control plane is down, then it comes back.
            write_manifests(tmp_path / "manifests", "policy.yaml", [DENY_SLEEP])
            connects = b.xds.stats.connects
            cp = ControlPlane(settings)
            await cp.start()
            await eventually(lambda: b.state.policy("default/deny-sleep") is not None, 10)
            assert b.xds.stats.connects > connects
            assert not await call_echo()
            # The resync sent only what changed: echo's workload was not re-sent... but its
            # authorization_policies changed, so exactly the changed records were.
            conn = next(c for c in cp.xds.debug_connections() if c["node"] == "node-b")
            assert conn["types"][ADDRESS_TYPE]["nacks"] == 0
        finally:
            await stop_node(a)
            await stop_node(b)
            await cp.stop()


async def _controlplane_restart_drops_no_held_connection(tmp_path: Path) -> None:
    """Issue 15: 50 connections held open through the node-proxy pair keep flowing while the
    control plane is down and after it is back (nothing is reset by the xDS reconnect)."""
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    settings = cp_settings(tmp_path)
    cp = ControlPlane(settings)
    await cp.start()
    async with echo_backend():
        a = await start_node("node-a", NODE_A, ((VIP, 80),))
        b = await start_node("node-b", NODE_B)
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(50):
                held.append(await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0)))

            async def exchange(tag: str) -> None:
                for i, (reader, writer) in enumerate(held):
                    data = f"{tag}/{i}".encode().ljust(64, b".")
                    writer.write(data)
                    assert await asyncio.wait_for(reader.readexactly(64), 5) == data

            await exchange("before")
            await cp.stop()
            await eventually(lambda: not b.xds.stats.connected, 5, "client noticed")
            await exchange("down")
            cp = ControlPlane(settings)
            await cp.start()
            await eventually(lambda: a.xds.stats.connected and b.xds.stats.connected, 10)
            await exchange("after")
            assert await call_echo()
        finally:
            for _, writer in held:
                writer.close()
            await stop_node(a)
            await stop_node(b)
            await cp.stop()


async def _tls_serving_and_trust_bundle(tmp_path: Path) -> None:
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    async with running_controlplane(cp_settings(tmp_path, plaintext=False)) as cp:
        roots = cp.ca.roots_pem
        provider = ControlPlaneCAProvider(endpoint("node-a", roots))
        try:
            cert = await provider.fetch(
                SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
            )
            assert cert.roots_pem == roots
        finally:
            await provider.close()
        # Without the roots (plaintext client against a TLS server) nothing works.
        plain = ControlPlaneCAProvider(endpoint("node-a"), timeout=2)
        with pytest.raises(CertificateError):
            await plain.fetch(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep"))
        await plain.close()


async def _root_rollover_bundle_has_both_roots(tmp_path: Path) -> None:
    from meshcore.ca import MeshCA

    old = MeshCA.create_root()
    extra = tmp_path / "old-root.pem"
    extra.write_bytes(old.root_pem)
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    from dataclasses import replace

    settings = replace(cp_settings(tmp_path), additional_roots=extra)
    async with running_controlplane(settings):
        provider = ControlPlaneCAProvider(endpoint("node-a"))
        try:
            cert = await provider.fetch(
                SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
            )
            assert len(split_pem_chain(cert.roots_pem)) == 2
            assert old.root_pem in split_pem_chain(cert.roots_pem)
        finally:
            await provider.close()


async def _retries_while_the_ca_is_down_send_one_csr(tmp_path: Path) -> None:
    """The CA down: the retries of a fetch send the CSR of the first attempt, the key pending
    in memory (before: a fresh key, a helper process of ~0.2 s CPU, per retry), fresh after
    PENDING_KEY_TTL; once the CA is back, the certificate comes for the pending key, and the
    next certificate gets a new key."""
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    sleep = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    now = [0.0]
    provider = ControlPlaneCAProvider(endpoint("node-a"), timeout=2, clock=lambda: now[0])
    made: list[bytes] = []
    real_csr = provider.helper.csr

    async def csr(identity: SpiffeId) -> tuple[bytes, bytes]:
        key_pem, csr_pem = await real_csr(identity)
        made.append(key_pem)
        return key_pem, csr_pem

    provider.helper.csr = csr  # type: ignore[method-assign]  # counts the keys made
    try:
        for _ in range(3):  # nothing listens on the control plane's address yet
            with pytest.raises(CertificateError, match="UNAVAILABLE"):
                await provider.fetch(sleep)
        assert len(made) == 1
        now[0] += PENDING_KEY_TTL
        with pytest.raises(CertificateError, match="UNAVAILABLE"):
            await provider.fetch(sleep)
        assert len(made) == 2
        async with running_controlplane(cp_settings(tmp_path)):
            got: list[WorkloadCertificate] = []

            async def fetched() -> bool:
                with contextlib.suppress(CertificateError):  # the channel's reconnect backoff
                    got.append(await provider.fetch(sleep))
                return bool(got)

            await eventually(fetched, 20, "a certificate once the CA is back")
            assert len(made) == 2
            assert got[0].key_pem == made[1]
            again = await provider.fetch(sleep)
            assert len(made) == 3
            assert again.key_pem == made[2] != got[0].key_pem
    finally:
        await provider.close()


async def _debug_endpoints(tmp_path: Path) -> None:
    write_manifests(
        tmp_path / "manifests",
        "mesh.yaml",
        [
            *base_manifests(),
            {"kind": "Pod", "metadata": {"name": "broken"}, "spec": {"nodeName": 7}},
        ],
    )
    async with running_controlplane(cp_settings(tmp_path)) as cp:
        a = await start_node("node-a", NODE_A, ((VIP, 80),))
        try:

            async def get(path: str) -> tuple[int, bytes]:
                r, w = await asyncio.open_connection("127.0.51.1", cp.debug_port)
                w.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                raw = await r.read()
                w.close()
                head, _, body = raw.partition(b"\r\n\r\n")
                return int(head.split()[1]), body

            status, body = await get("/debug/warnings")
            assert status == 200
            assert b"Pod default/broken" in body
            assert b"spec.nodeName" in body
            status, body = await get("/debug/connections")
            assert status == 200
            assert b'"node-a"' in body
            assert b"last_ack_nonce" in body
            status, body = await get("/metrics")
            assert b"controlplane_xds_connected_proxies 1.0" in body
            assert b"controlplane_xds_push_latency_seconds_bucket" in body
        finally:
            with contextlib.suppress(Exception):
                await stop_node(a)


def test_manifest_edit_reaches_running_node_proxy(tmp_path: Path) -> None:
    run(_manifest_edit_reaches_running_node_proxy(tmp_path), 60)


def test_csr_for_service_account_on_another_node_is_refused(tmp_path: Path) -> None:
    run(_csr_for_service_account_on_another_node_is_refused(tmp_path), 60)


def test_bad_resource_is_nacked_alone(tmp_path: Path) -> None:
    run(_bad_resource_is_nacked_alone(tmp_path), 60)


def test_controlplane_restart_node_proxies_keep_forwarding_and_resync(tmp_path: Path) -> None:
    run(_controlplane_restart_node_proxies_keep_forwarding_and_resync(tmp_path), 60)


def test_controlplane_restart_drops_no_held_connection(tmp_path: Path) -> None:
    run(_controlplane_restart_drops_no_held_connection(tmp_path))


def test_tls_serving_and_trust_bundle(tmp_path: Path) -> None:
    run(_tls_serving_and_trust_bundle(tmp_path), 60)


def test_root_rollover_bundle_has_both_roots(tmp_path: Path) -> None:
    run(_root_rollover_bundle_has_both_roots(tmp_path), 60)


def test_retries_while_the_ca_is_down_send_one_csr(tmp_path: Path) -> None:
    run(_retries_while_the_ca_is_down_send_one_csr(tmp_path), 60)


def test_debug_endpoints(tmp_path: Path) -> None:
    run(_debug_endpoints(tmp_path), 60)
