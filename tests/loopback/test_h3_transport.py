"""HBONE over HTTP/3 specifics on the in-process mesh: the fallback to HTTP/2, and what node B's
15008/udp listener does with hostile or broken peers (real UDP sockets, real certificates)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from meshcore.certs import utcnow
from meshcore.errors import PeerVerificationError, Unauthorized
from meshcore.hbone.aio import HboneSettings
from meshcore.hbone.h3 import _Stream, server_name_for
from meshcore.hbone.h3aio import H3Endpoint, H3Stream, connect_h3
from meshcore.hbone.pool import PoolKey
from meshcore.identity import SpiffeId
from tests.helpers import Sink, echo_handler, eventually, run
from tests.loopback.harness import (
    CLIENT_IP,
    SERVER_IP,
    VIP,
    Mesh,
    call_service,
    payload_for,
    running_mesh,
    start_backend,
)
from tests.loopback.test_refusals import echo_round, metric_text
from ztunnel.proxy.inbound_h3 import H3Listener

SLEEP_ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
ECHO_ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo")
H3 = (SERVER_IP, 15008)
HBONE = HboneSettings(trust_domain="cluster.local")
CLIENT_KEY = PoolKey(
    source=SLEEP_ID, expected=(ECHO_ID,), address=H3, source_ip=CLIENT_IP, transport="h3"
)
"""A raw HTTP/3 dial from the client pod's address to node B."""


def dial_h3_from_node_a(mesh: Mesh) -> None:
    """Node A tries HTTP/3 toward every node; node B (an "Istio" peer here) may not speak it."""
    ctx = mesh.node_a.ctx
    ctx.settings = dataclasses.replace(ctx.settings, http3=True, http3_peers=("*",))


def endpoint(mesh: Mesh) -> H3Endpoint:
    (listener,) = [x for x in mesh.node_b.hbone_listeners if isinstance(x, H3Listener)]
    assert listener.endpoint is not None
    return listener.endpoint


async def check_call(seed: int) -> None:
    (got, n), _ = await call_service(seed, 1000, 20_000)
    assert (got, n) == (hashlib.sha256(payload_for(seed, 20_000)).hexdigest(), 20_000)


# ---- choosing the transport --------------------------------------------------------------------


def test_no_udp_listener_falls_back_to_h2_at_once_and_remembers(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport="h2") as mesh:
            dial_h3_from_node_a(mesh)
            pool = mesh.node_a.ctx.pool
            start = time.monotonic()
            await check_call(1)
            # ICMP port unreachable ends the attempt well before the attempt timeout.
            assert time.monotonic() - start < pool.h3_attempt_timeout
            assert pool.h3_fallbacks == 1
            assert [c["transport"] for c in pool.snapshot()] == ["h2"]
            assert 'transport="h2"' in metric_text(mesh.node_a)
            # Remembered: a new connection to that peer goes straight to HTTP/2.
            pool.close_all()
            await eventually(lambda: not pool.snapshot())
            await check_call(2)
            assert pool.h3_fallbacks == 1
            assert pool.connections_opened == 2

    run(main(), 60)


def test_silently_dropped_udp_falls_back_after_a_bounded_attempt(tmp_path: Path) -> None:
    async def main() -> None:
        black_hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        black_hole.bind(H3)  # takes node B's UDP port and never answers (a firewall's DROP)
        try:
            async with running_mesh(tmp_path, transport="h2") as mesh:
                dial_h3_from_node_a(mesh)
                pool = mesh.node_a.ctx.pool
                pool.h3_attempt_timeout = 0.5
                start = time.monotonic()
                await check_call(1)
                assert 0.5 <= time.monotonic() - start < 3.0
                assert pool.h3_fallbacks == 1
                assert [c["transport"] for c in pool.snapshot()] == ["h2"]
        finally:
            black_hole.close()

    run(main(), 60)


def test_remembered_fallback_expires_and_http3_is_tried_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            pool = mesh.node_a.ctx.pool
            loop = asyncio.get_running_loop()
            pool.h3_unreachable[H3] = loop.time() + 0.5  # as left by a failed attempt
            await check_call(1)
            assert [c["transport"] for c in pool.snapshot()] == ["h2"]  # remembered: no try
            pool.close_all()
            await eventually(lambda: not pool.snapshot())
            await asyncio.sleep(0.6)
            await check_call(2)
            assert [c["transport"] for c in pool.snapshot()] == ["h3"]  # expired: tried again
            assert pool.h3_fallbacks == 0

    run(main())


def test_stream_rejected_unprocessed_over_h3_is_retried(tmp_path: Path) -> None:
    """A CONNECT the server rejects without processing it (H3_REQUEST_REJECTED, e.g. one that
    crossed its GOAWAY during an upgrade) is sent again (RFC 9114 §4.1.1): the client's TCP
    connection never sees it. Before, the tunnel failed."""

    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            await check_call(1)
            (first,) = endpoint(mesh).connections.values()
            server = first.conn
            reset_stream = server.quic.reset_stream

            def reject_once(stream_id: int, error_code: int) -> None:
                server.max_streams = 100  # only the next new stream is rejected
                reset_stream(stream_id, error_code)

            server.quic.reset_stream = reject_once  # type: ignore[method-assign]
            server.max_streams = 0  # node B rejects the next CONNECT unprocessed
            await check_call(2)
            assert mesh.node_a.ctx.pool.streams_retried == 1
            assert mesh.backend.accepted == 2  # one upstream connect per call: none for the
            # rejected stream

    run(main())


def test_refused_server_identity_does_not_fall_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            pool = mesh.node_a.ctx.pool
            other = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/other")
            key = PoolKey(source=SLEEP_ID, expected=(other,), address=H3, transport="h3")
            with pytest.raises(PeerVerificationError, match="not an expected identity"):
                await pool.open_stream(key, f"{SERVER_IP}:8080", [], Sink())
            assert pool.h3_fallbacks == 0  # no second try over TCP with the same identity
            assert not mesh.node_b.ctx.connections
            assert mesh.backend.accepted == 0

    run(main(), 60)


# ---- hostile peers on 15008/udp -----------------------------------------------------------------


def test_junk_datagrams_create_no_state(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            ep = endpoint(mesh)
            junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            junk.bind((CLIENT_IP, 0))
            try:
                for i in range(50):
                    junk.sendto(bytes([i]) * (10 + i * 30), H3)  # short, or not an Initial
                junk.sendto(b"\xc0" + b"\0" * 1300, H3)  # long header, version 0: no Initial
                await eventually(lambda: ep.dropped >= 51)
                assert not ep.connections
                assert not ep._pending
            finally:
                junk.close()
            await check_call(1)

    run(main(), 60)


def test_stateless_resets_sent_are_counted_in_the_metrics(tmp_path: Path) -> None:
    """A short-header packet for a connection node B has no state for gets a Stateless Reset
    (RFC 9000 §10.3), smaller than the packet; each one sent is counted in
    `ztunnel_hbone_stateless_resets_sent_total`."""

    def sent(text: str) -> float:
        prefix = "ztunnel_hbone_stateless_resets_sent_total "
        line = next(x for x in text.splitlines() if x.startswith(prefix))
        return float(line.removeprefix(prefix))

    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            assert sent(metric_text(mesh.node_b)) == 0
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.bind((CLIENT_IP, 0))
            peer.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                # Short headers (0b01...) naming a connection ID node B never issued.
                for i in range(5):
                    peer.sendto(bytes([0x40 | i]) + bytes(range(i, i + 60)), H3)
                for _ in range(5):
                    reset = await asyncio.wait_for(loop.sock_recv(peer, 2048), 5)
                    assert reset[0] & 0xC0 == 0x40  # a short header, as a reset looks
                    assert 21 <= len(reset) < 61  # smaller than what triggered it
            finally:
                peer.close()
            assert sent(metric_text(mesh.node_b)) == 5

    run(main(), 60)


def test_handshake_flood_from_one_ip_is_bounded_and_times_out(tmp_path: Path) -> None:
    async def main() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        async with running_mesh(tmp_path, transport="h3") as mesh:
            ep = endpoint(mesh)
            ep.handshake_timeout = 0.5
            socks = []
            try:
                for _ in range(ep.peers.max_handshakes + 10):
                    # Real client Initials that will never finish (their sender goes silent).
                    client = QuicConnection(
                        configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"])
                    )
                    client.connect(H3, now=time.monotonic())
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind((CLIENT_IP, 0))
                    socks.append(s)
                    for data, _ in client.datagrams_to_send(now=time.monotonic()):
                        s.sendto(data, H3)
                await eventually(lambda: ep.dropped >= 10)
                assert len(ep.connections) + len(ep._pending) <= ep.peers.max_handshakes
                # Each one is given up after the handshake timeout and recorded.
                await eventually(
                    lambda: not ep.connections and not ep.peers.handshakes(CLIENT_IP), 5
                )
                assert ep.peers.connections(CLIENT_IP) == 0  # every dropped one uncounted
                failed = [
                    x
                    for x in metric_text(mesh.node_b).splitlines()
                    if x.startswith("istio_tcp_connections_failed_total{")
                    and 'response_flags="TLS_FAILURE"' in x
                ]
                assert failed
                assert float(failed[0].rsplit(" ", 1)[1]) == ep.peers.max_handshakes
                # Recorded, and nothing more: no "Future exception was never retrieved" per
                # dropped handshake (once 64 tracebacks in the log per flood).
                gc.collect()
                assert [e["message"] for e in errors] == []
            finally:
                for s in socks:
                    s.close()
            await check_call(1)  # the proxy still serves

    run(main(), 60)


def test_connections_per_peer_ip_are_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            ep = endpoint(mesh)
            ep.peers.max_connections = 2
            cert = mesh.ca.issue(SLEEP_ID, now=utcnow())

            async def dial() -> Any:
                return await connect_h3(
                    CLIENT_KEY,
                    cert,
                    HBONE,
                    timeout=1.0,
                )

            first, second = await dial(), await dial()
            with pytest.raises(TimeoutError):
                await dial()  # no answer at all: the third Initial is dropped
            assert len(ep.connections) == 2
            assert ep.dropped >= 1
            first.abort()
            await eventually(lambda: len(ep.connections) == 1)
            third = await dial()  # a slot is free again
            assert third.peer_identity == ECHO_ID
            second.abort()
            third.abort()

    run(main(), 60)


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],  # not CONNECT
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https"),
            (b":path", b"/"),
        ],  # extended CONNECT (RFC 9220): not HBONE
    ],
)
def test_non_connect_request_gets_400_over_h3(
    tmp_path: Path, headers: list[tuple[bytes, bytes]]
) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            proto = await connect_h3(
                CLIENT_KEY,
                mesh.ca.issue(SLEEP_ID, now=utcnow()),
                HBONE,
            )
            conn = proto.conn
            assert conn.h3 is not None
            sid = conn.quic.get_next_available_stream_id()
            authority = (b":authority", f"{SERVER_IP}:8080".encode())
            conn.h3.send_headers(sid, [*headers, authority], end_stream=True)
            conn._streams[sid] = _Stream(sid)  # track the response like open_connect does
            stream = H3Stream(proto, sid)
            stream.response = asyncio.get_running_loop().create_future()
            proto.streams[sid] = stream
            proto.flush()
            assert await asyncio.wait_for(stream.response, 5) == 400
            proto.abort()
            assert mesh.backend.accepted == 0

    run(main(), 60)


def test_h3_source_named_by_forwarded_only_for_the_peers_own_identity(tmp_path: Path) -> None:
    """Node proxies dial a peer node's shared UDP socket from their node address, so the source
    workload comes from `forwarded: for=`; a peer may name only an address of the identity it
    proved (here sleep claims the echo workload's address: 401, no upstream connect)."""

    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            key = PoolKey(
                source=SLEEP_ID,
                expected=(ECHO_ID,),
                address=H3,
                source_ip="127.0.21.99",  # not a workload: "a node address"
                transport="h3",
                server_name=server_name_for(SERVER_IP),
            )
            proto = await connect_h3(key, mesh.ca.issue(SLEEP_ID, now=utcnow()), HBONE)
            authority = f"{SERVER_IP}:8080"
            # The error of its status (`HboneError.for_status`), as on HTTP/2: DENY in the
            # access log, not a plain HboneError.
            with pytest.raises(Unauthorized) as refused:
                await proto.open_stream(authority, [("forwarded", f'for="{SERVER_IP}:1"')], Sink())
            assert refused.value.status == 401
            # A claim that is not an address is refused the same way (it killed the stream's
            # task with a ValueError: no answer, no counter).
            with pytest.raises(Unauthorized) as refused:
                await asyncio.wait_for(
                    proto.open_stream(authority, [("forwarded", 'for="not-an-ip:1"')], Sink()), 10
                )
            assert mesh.backend.accepted == 0
            # Its own workload's address is accepted: the backend sees the client workload.
            stream = await proto.open_stream(
                authority, [("forwarded", f'for="{CLIENT_IP}:1"')], Sink()
            )
            assert stream.transport == "h3"
            await eventually(lambda: mesh.backend.accepted == 1)
            proto.abort()

    run(main())


def test_sni_naming_no_local_workload_gets_no_certificate(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport="h3") as mesh:
            # SNI naming node A's workload, not B's.
            key = dataclasses.replace(CLIENT_KEY, server_name=server_name_for(CLIENT_IP))
            with pytest.raises((TimeoutError, OSError, PeerVerificationError)):
                await connect_h3(key, mesh.ca.issue(SLEEP_ID, now=utcnow()), HBONE, timeout=1.0)
            assert endpoint(mesh).dropped >= 1
            assert not endpoint(mesh).connections

    run(main())


def test_malformed_h3_closes_only_that_connection(tmp_path: Path) -> None:
    async def main() -> None:
        backend = await start_backend(echo_handler)
        async with running_mesh(tmp_path, backend=backend, transport="h3") as mesh:
            reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
            await echo_round(reader, writer, 1, 10_000)
            proto = await connect_h3(
                CLIENT_KEY,
                mesh.ca.issue(SLEEP_ID, now=utcnow()),
                HBONE,
            )
            quic = proto.conn.quic
            sid = quic.get_next_available_stream_id()
            quic.send_stream_data(sid, b"\x00\x01x")  # DATA before HEADERS (RFC 9114 §4.1)
            proto.flush()
            await eventually(lambda: quic._close_event is not None)
            assert quic._close_event is not None
            assert quic._close_event.error_code == 0x105  # H3_FRAME_UNEXPECTED
            proto.abort()
            assert mesh.backend.accepted == 1
            await echo_round(reader, writer, 2, 10_000)  # the healthy tunnel is unaffected
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    run(main(), 60)


@pytest.mark.parametrize("flag", [[], ["--http3"]])
def test_loopback_demo_runs_over_each_transport(flag: list[str]) -> None:
    """`scripts/demo --loopback [--http3]`: real node-proxy processes, static config."""
    proc = subprocess.run(
        [sys.executable, "-m", "ambientctl.lab.loopback_demo", *flag],
        capture_output=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    want = "h3" if flag else "h2"
    assert out.count(f"transport={want}") == 2
    assert f"OK, mutual TLS between node proxies over {want}" in out
