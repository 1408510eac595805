"""What node B's real HBONE listener (127.0.22.10:15008) refuses, and what must keep working.

Every test uses real certificates and real loopback sockets against the in-process mesh of
`tests.loopback.harness`. Refusals are checked on both ends: the client sees the failure (or the
right status / GOAWAY code) and the backend behind node B never accepts a connection.
Tests taking `transport` run against node B's HTTP/2 listener (15008/tcp) and its HTTP/3 one
(15008/udp); the malformed-HTTP/2 tests are HTTP/2's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import pytest
import yaml
from cryptography import x509
from prometheus_client import generate_latest

from meshcore.ca import MeshCA
from meshcore.certs import LocalCAProvider, WorkloadCertificate, utcnow
from meshcore.errors import HboneError, PeerVerificationError
from meshcore.hbone.aio import HboneProtocol, HboneSettings, PoolKey, connect
from meshcore.hbone.h3aio import H3Protocol, connect_h3
from meshcore.identity import SpiffeId
from meshcore.proto.yamlform import load_mesh_config
from meshcore.sockets import CONNECT_SWEEP
from meshcore.state import MeshState
from meshcore.tls import client_context
from tests.helpers import Sink, blackholed, echo_handler, eventually, run
from tests.loopback.harness import (
    BACKEND_PORT,
    CLIENT_IP,
    ECHO,
    SERVER_IP,
    SLEEP,
    VIP,
    Mesh,
    MeshOptions,
    mesh_config,
    running_mesh,
    settings,
    start_backend,
)
from ztunnel.app import NodeProxy
from ztunnel.contexts import build_context
from ztunnel.proxy.inbound_h3 import H3Listener

HBONE = (SERVER_IP, 15008)
SLEEP_ID = SpiffeId.parse(SLEEP)
ECHO_ID = SpiffeId.parse(ECHO)
TD = "cluster.local"


def metric_text(proxy: NodeProxy) -> str:
    return generate_latest(proxy.ctx.metrics.registry).decode()


def failed_lines(proxy: NodeProxy) -> list[str]:
    return [
        x
        for x in metric_text(proxy).splitlines()
        if x.startswith("istio_tcp_connections_failed_total{")
    ]


def access_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The `error` field of every access-log record (JSON lines from ztunnel.access)."""
    out = []
    for rec in caplog.records:
        if rec.name == "ztunnel.access":
            out.append(str(json.loads(rec.getMessage()).get("error")))
    return out


async def dial(
    cert: WorkloadCertificate,
    *,
    expected: SpiffeId = ECHO_ID,
    trust_domain: str = TD,
    transport: str = "h2",
) -> HboneProtocol | H3Protocol:
    """A raw HBONE client connection to node B's listener, from the client pod's address."""
    key = PoolKey(
        source=cert.identity,
        expected=(expected,),
        address=HBONE,
        source_ip=CLIENT_IP,
        transport=transport,
    )
    settings = HboneSettings(trust_domain=trust_domain)
    if transport == "h3":
        return await connect_h3(key, cert, settings, timeout=5.0)
    return await connect(key, client_context(cert), settings, timeout=5.0)


async def connect_through(
    cert: WorkloadCertificate, *, settle: float = 0.0, transport: str = "h2"
) -> None:
    """Dial node B with `cert` and try to open a stream to the backend; must fail.

    `settle` waits before the CONNECT, so that a refusal the server sends after the client's
    side of the TLS 1.3 handshake (client certificates are checked last) has already arrived."""
    proto = await dial(cert, transport=transport)
    try:
        if settle:
            await asyncio.sleep(settle)
        await asyncio.wait_for(proto.open_stream(f"{SERVER_IP}:{BACKEND_PORT}", [], Sink()), 5)
    finally:
        proto.abort()


REFUSED = (ConnectionError, PeerVerificationError, ssl.SSLError, HboneError)


@asynccontextmanager
async def mesh_with_ca(
    tmp: Path, ca: MeshCA, config: dict[str, Any] | None = None, transport: str = "h2"
) -> AsyncIterator[Mesh]:
    """Like `running_mesh`, but with a CA built by the test (e.g. trusting an extra root)."""
    cfg_path = tmp / "mesh.yaml"
    cfg_path.write_text(yaml.safe_dump(config or mesh_config()))
    state = MeshState.from_config(load_mesh_config(cfg_path))
    provider = LocalCAProvider(ca)
    node_a = NodeProxy(
        build_context(settings("node-a", "127.0.21.1", ((VIP, 80),), transport), state, provider)
    )
    node_b = NodeProxy(
        build_context(settings("node-b", "127.0.22.1", transport=transport), state, provider)
    )
    backend = await start_backend()
    await node_a.start()
    await node_b.start()
    try:
        yield Mesh(ca=ca, node_a=node_a, node_b=node_b, backend=backend, tmp=tmp)
    finally:
        await node_a.drain()
        await node_b.drain()
        if backend.server is not None:
            backend.server.close()


# ---- 1-3: client certificates node B must refuse ------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("settle", [0.0, 0.3])
def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, settle: float, loop: str, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """The TLS handshake itself fails on node B (accept_tls, under both event loops)."""
    caplog.set_level(logging.INFO, logger="ztunnel.access")

    async def main() -> None:
        async with running_mesh(tmp_path, transport=transport) as mesh:
            rogue = MeshCA.create_root(trust_domain=TD)
            issued = rogue.issue(SLEEP_ID, now=utcnow())
            # The client trusts node B (so the refusal is node B's), node B does not trust it.
            cert = WorkloadCertificate.from_chain(
                SLEEP_ID, issued.key_pem, issued.chain_pem, rogue.roots_pem + mesh.ca.roots_pem
            )
            with pytest.raises(REFUSED):
                await connect_through(cert, settle=settle, transport=transport)
            await eventually(lambda: any("TLS_FAILURE" in x for x in failed_lines(mesh.node_b)))
            assert mesh.backend.accepted == 0
            assert "istio_tcp_connections_opened_total{" not in metric_text(mesh.node_b)

    run(main(), 60, loop=loop)
    assert any("certificate verify failed" in e for e in access_errors(caplog))


def test_other_trust_domain_chaining_to_a_trusted_root_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    caplog.set_level(logging.INFO, logger="ztunnel.access")

    async def main() -> None:
        other = MeshCA.create_root(trust_domain="other.local")
        ca = MeshCA.create_root(trust_domain=TD)
        ca.add_trusted_root(other.root_pem)  # before any workload certificate is issued
        async with mesh_with_ca(tmp_path, ca, transport=transport) as mesh:
            b_cert = await mesh.node_b.ctx.certs.get(ECHO_ID)
            assert other.root_pem in b_cert.roots_pem  # node B's TLS accepts the chain...
            foreign = SpiffeId.parse("spiffe://other.local/ns/default/sa/sleep")
            issued = other.issue(foreign, now=utcnow())
            cert = WorkloadCertificate.from_chain(
                foreign, issued.key_pem, issued.chain_pem, ca.roots_pem
            )
            with pytest.raises(REFUSED):
                await connect_through(cert, settle=0.2, transport=transport)
            # ...and verify_peer refuses the trust domain.
            await eventually(lambda: any("TLS_FAILURE" in x for x in failed_lines(mesh.node_b)))
            assert mesh.backend.accepted == 0

    run(main(), 60)
    assert any("trust domain 'other.local'" in e for e in access_errors(caplog))


def test_expired_client_certificate_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    caplog.set_level(logging.INFO, logger="ztunnel.access")

    async def main() -> None:
        async with running_mesh(tmp_path, transport=transport) as mesh:
            cert = mesh.ca.issue(
                SLEEP_ID, ttl=timedelta(minutes=5), now=utcnow() - timedelta(days=1)
            )
            assert cert.expired(utcnow())
            with pytest.raises(REFUSED):
                await connect_through(cert, settle=0.2, transport=transport)
            await eventually(lambda: any("TLS_FAILURE" in x for x in failed_lines(mesh.node_b)))
            assert mesh.backend.accepted == 0

    run(main(), 60)
    assert any("expired" in e for e in access_errors(caplog))


# ---- 4: the client refuses the server -------------------------------------------------------


def test_unexpected_server_san_raises_before_connect(tmp_path: Path, transport: str) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport=transport) as mesh:
            cert = mesh.ca.issue(SLEEP_ID, now=utcnow())
            other = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/other")
            with pytest.raises(PeerVerificationError, match="not an expected identity"):
                await dial(cert, expected=other, transport=transport)
            # Node B took part in the handshake, so it holds the connection until it has seen
            # the client go: once it let go, anything the client sent has been processed.
            await eventually(lambda: not client_connections(mesh.node_b), what="node B let go")
            assert mesh.backend.accepted == 0
            text = metric_text(mesh.node_b)
            assert "istio_tcp_connections_opened_total{" not in text
            assert 'response_flags="CONNECT"' not in text  # no CONNECT reached node B

    run(main(), 60)


# ---- 5-7: CONNECT-level refusals -------------------------------------------------------------


async def h2_over_tls(
    cert: WorkloadCertificate,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, h2.connection.H2Connection]:
    reader, writer = await asyncio.open_connection(
        *HBONE, ssl=client_context(cert), server_hostname="", local_addr=(CLIENT_IP, 0)
    )
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    await writer.drain()
    return reader, writer, conn


async def h2_events(
    reader: asyncio.StreamReader, conn: h2.connection.H2Connection, until: type
) -> list[h2.events.Event]:
    """Feed received bytes to `conn` until an event of type `until` (or EOF)."""
    seen: list[h2.events.Event] = []
    while True:
        try:
            data = await reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            return seen
        seen += conn.receive_data(data)
        if any(isinstance(e, until) for e in seen):
            return seen


def test_non_connect_request_gets_400(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path) as mesh:
            reader, writer, conn = await h2_over_tls(mesh.ca.issue(SLEEP_ID, now=utcnow()))
            conn.send_headers(
                1,
                [
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/"),
                    (":authority", f"{SERVER_IP}:{BACKEND_PORT}"),
                ],
                end_stream=True,
            )
            writer.write(conn.data_to_send())
            events = await h2_events(reader, conn, h2.events.ResponseReceived)
            writer.close()
            resp = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
            # h2 decodes to str here (header_encoding); its annotations say bytes.
            headers = cast("list[tuple[str, str]]", resp.headers)
            assert dict(headers)[":status"] == "400"
            assert mesh.backend.accepted == 0

    run(main(), 60)


def test_connect_denied_by_policy_gets_401_without_upstream(tmp_path: Path, transport: str) -> None:
    deny_sleep = {
        "name": "deny-sleep",
        "namespace": "default",
        "scope": "NAMESPACE",
        "action": "DENY",
        "rules": [
            {
                "clauses": [
                    {"matches": [{"principals": [{"exact": SLEEP.removeprefix("spiffe://")}]}]}
                ]
            }
        ],
    }

    async def main() -> None:
        async with running_mesh(tmp_path, mesh_config([deny_sleep]), transport=transport) as mesh:
            proto = await dial(mesh.ca.issue(SLEEP_ID, now=utcnow()), transport=transport)
            with pytest.raises(HboneError) as info:
                await proto.open_stream(f"{SERVER_IP}:{BACKEND_PORT}", [], Sink())
            assert getattr(info.value, "status", None) == 401
            assert mesh.backend.accepted == 0
            assert any('response_flags="DENY"' in x for x in failed_lines(mesh.node_b))
            # The connection itself survives a refused stream.
            assert not proto.closed
            proto.abort()

    run(main(), 60)


def test_refused_upstream_gets_503(tmp_path: Path, transport: str) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport=transport) as mesh:
            proto = await dial(mesh.ca.issue(SLEEP_ID, now=utcnow()), transport=transport)
            with pytest.raises(HboneError) as info:
                await proto.open_stream(f"{SERVER_IP}:9", [], Sink())
            assert getattr(info.value, "status", None) == 503
            assert mesh.backend.accepted == 0
            # A good CONNECT on the same connection still works afterwards.
            sink = Sink()
            stream = await proto.open_stream(f"{SERVER_IP}:{BACKEND_PORT}", [], sink)
            assert stream.peer_identity == ECHO_ID
            stream.write((1).to_bytes(4, "big") + (1000).to_bytes(4, "big"))
            stream.write_eof()
            await asyncio.wait_for(sink.eof.wait(), 5)
            assert len(sink.data) == 1000
            assert sink.reset_code is None
            assert mesh.backend.accepted == 1
            proto.abort()

    run(main(), 60)


def test_blackholed_upstream_gets_503_at_the_connect_timeout(
    tmp_path: Path, transport: str
) -> None:
    """An upstream whose connect hangs (SYNs dropped): the CONNECT is answered 503 once the
    node proxy's connect timeout has passed (shared coarse timer, `CONNECT_SWEEP`), recorded as a
    failed connection; the HBONE connection carries on."""

    async def main() -> None:
        async with running_mesh(tmp_path, transport=transport) as mesh:
            ctx = mesh.node_b.ctx
            ctx.settings = dataclasses.replace(ctx.settings, connect_timeout=0.5)
            proto = await dial(mesh.ca.issue(SLEEP_ID, now=utcnow()), transport=transport)
            loop = asyncio.get_running_loop()
            with blackholed((SERVER_IP, 9001)):
                started = loop.time()
                with pytest.raises(HboneError) as info:
                    await proto.open_stream(f"{SERVER_IP}:9001", [], Sink())
                elapsed = loop.time() - started
            assert getattr(info.value, "status", None) == 503
            assert 0.5 <= elapsed < 0.5 + CONNECT_SWEEP + 0.5
            assert any('response_flags="CONNECT"' in x for x in failed_lines(mesh.node_b))
            assert not proto.closed
            proto.abort()

    run(main(), 60)


# ---- 8: certificate rotation under live traffic ----------------------------------------------


async def echo_round(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seed: int, size: int
) -> None:
    data = hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(size), 10)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def peer_serial(conn: asyncio.BaseTransport | H3Protocol) -> int:
    """Serial of the certificate the peer presented on an HBONE connection (either transport)."""
    if isinstance(conn, H3Protocol):
        leaf = conn.conn.quic.tls._peer_certificate
        assert leaf is not None
        return leaf.serial_number
    der = conn.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def client_connections(node: NodeProxy) -> int:
    """Node B's connections (TCP or QUIC, handshaking or established) from the client pod."""
    count = 0
    for listener in node.hbone_listeners:
        if isinstance(listener, H3Listener):
            if listener.endpoint is not None:
                count += sum(addr[0] == CLIENT_IP for addr in listener.endpoint.connections)
        else:
            count += listener.peers.connections(CLIENT_IP)
    return count


def inbound_connections(node: NodeProxy) -> list[asyncio.BaseTransport | H3Protocol]:
    """Node B's accepted HBONE connections: TLS transports, and QUIC connections per listener."""
    conns: list[asyncio.BaseTransport | H3Protocol] = list(node.ctx.connections)
    for listener in node.hbone_listeners:
        if isinstance(listener, H3Listener) and listener.endpoint is not None:
            conns.extend(listener.endpoint.connections.values())
    return conns


def test_rotation_keeps_old_streams_and_new_connections_use_new_certs(
    tmp_path: Path, transport: str
) -> None:
    async def main() -> None:
        backend = await start_backend(echo_handler)
        async with running_mesh(
            tmp_path,
            backend=backend,
            transport=transport,
            options=MeshOptions(cert_ttl=timedelta(minutes=10)),
        ) as mesh:
            a, b = mesh.node_a.ctx, mesh.node_b.ctx
            reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
            await echo_round(reader, writer, 1, 100_000)
            old_sleep, old_echo = await a.certs.get(SLEEP_ID), await b.certs.get(ECHO_ID)
            assert a.pool.connections_opened == 1
            (old_conn,) = inbound_connections(mesh.node_b)
            assert peer_serial(old_conn) == old_sleep.serial

            # Both nodes reach their refresh time (the clock is injected through tick's `now`).
            for ctx, cert in ((a, old_sleep), (b, old_echo)):
                due = cert.refresh_at + timedelta(seconds=1)
                assert cert.identity in await ctx.certs.tick(due)
            new_sleep, new_echo = await a.certs.get(SLEEP_ID), await b.certs.get(ECHO_ID)
            assert new_sleep.serial != old_sleep.serial
            assert new_echo.serial != old_echo.serial

            # The old stream keeps working both ways, on its old connection.
            for seed in range(2, 6):
                await echo_round(reader, writer, seed, 300_000)

            # A new connection after rotation: a new HBONE connection with the new certs.
            r2, w2 = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
            await echo_round(r2, w2, 9, 50_000)
            assert a.pool.connections_opened == 2
            (proto,) = [p for conns in a.pool._conns.values() for p in conns]
            conn = proto if isinstance(proto, H3Protocol) else proto.transport
            assert conn is not None
            assert peer_serial(conn) == new_echo.serial
            serials = {peer_serial(t) for t in inbound_connections(mesh.node_b)}
            assert serials == {old_sleep.serial, new_sleep.serial}

            # Old stream still fine after the new connection came up; then both finish cleanly.
            await echo_round(reader, writer, 10, 10_000)
            for r, w in ((reader, writer), (r2, w2)):
                w.write_eof()
                assert await asyncio.wait_for(r.read(), 5) == b""
                w.close()
            # The retired connection closes once its last stream has ended.
            await eventually(lambda: old_conn not in inbound_connections(mesh.node_b))
            assert mesh.backend.accepted == 2

    run(main(), 60)


# ---- 9: malformed HTTP/2 from an authenticated peer ------------------------------------------


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """RFC 9113 §4.1 frame header + payload."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes([ftype, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(0x8, 0, 0, (0).to_bytes(4, "big")), 0x1),  # §6.9 zero WINDOW_UPDATE: PROTOCOL_ERROR
        (frame(0x4, 0, 0, b"\0" * 5), 0x6),  # §6.5 SETTINGS length % 6 != 0: FRAME_SIZE_ERROR
        (frame(0x0, 0, 0, b"x"), 0x1),  # §6.1 DATA on stream 0: PROTOCOL_ERROR
        (frame(0x6, 0, 0, b"\0" * 7), 0x6),  # §6.7 PING of 7 octets: FRAME_SIZE_ERROR
        (frame(0x1, 0x4, 1, b"\xff\xff\xff\xff"), 0x9),  # §4.3 undecodable HPACK: COMPRESSION_ERROR
    ],
)
def test_malformed_h2_gets_goaway_and_others_keep_working(
    tmp_path: Path, bad: bytes, code: int
) -> None:
    async def main() -> None:
        backend = await start_backend(echo_handler)
        async with running_mesh(tmp_path, backend=backend) as mesh:
            # A healthy stream through the mesh, open across the bad peer's lifetime.
            reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
            await echo_round(reader, writer, 1, 10_000)

            r, w, conn = await h2_over_tls(mesh.ca.issue(SLEEP_ID, now=utcnow()))
            w.write(bad)
            events = await asyncio.wait_for(h2_events(r, conn, h2.events.ConnectionTerminated), 5)
            w.close()
            goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaway
            assert goaway[0].error_code == code
            assert mesh.backend.accepted == 1

            await echo_round(reader, writer, 2, 10_000)
            r2, w2 = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
            await echo_round(r2, w2, 3, 10_000)
            for rr, ww in ((reader, writer), (r2, w2)):
                ww.write_eof()
                assert await asyncio.wait_for(rr.read(), 5) == b""
                ww.close()

    run(main(), 60)
