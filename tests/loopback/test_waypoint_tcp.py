"""TCP through a real waypoint on loopback: a non-HTTP client bound to the waypoint is carried
L4 (today: 400), server-first protocols after the detection timeout, L4 policy at the waypoint,
TCP metrics with the destination's identity, TCPRoute and TLSRoute (SNI passthrough)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from prometheus_client import generate_latest

from meshcore.telemetry import TCP_LABELS
from tests.loopback.test_waypoint_harness import (
    CLIENT_IP,
    DB_PORT,
    DB_VIP,
    V1,
    V2,
    WaypointMesh,
    run,
    waypoint_mesh,
)
from tests.waypoint_fixtures import authorization_policy, gateway_route

REVIEWS_ID = "spiffe://cluster.local/ns/default/sa/reviews"


@asynccontextmanager
async def db_servers(greeting: bool = False) -> AsyncIterator[list[asyncio.Server]]:
    """An echo server on each db pod: answers ``<pod>:`` + what it received, line by line;
    with `greeting`, says ``hello from <pod>`` first (a server-first protocol)."""
    servers = []
    for name, ip in (("v1", V1), ("v2", V2)):

        async def handle(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str = name
        ) -> None:
            if greeting:
                w.write(f"hello from {name}\n".encode())
            while data := await r.read(65536):
                w.write(f"{name}:".encode() + data)
                await w.drain()
            w.write_eof()  # half-close answered
            w.close()

        servers.append(await asyncio.start_server(handle, ip, DB_PORT))
    try:
        yield servers
    finally:
        for s in servers:
            s.close()


async def talk(data: bytes, *, read_first: bool = False) -> bytes:
    r, w = await asyncio.open_connection(DB_VIP, DB_PORT, local_addr=(CLIENT_IP, 0))
    out = b""
    if read_first:
        out += await asyncio.wait_for(r.readline(), 5)
    w.write(data)
    await w.drain()
    w.write_eof()
    with suppress(ConnectionError, asyncio.IncompleteReadError):
        out += await asyncio.wait_for(r.read(), 10)
    w.close()
    return out


def test_tcp_client_is_carried_l4_with_metrics(tmp_path: Path) -> None:
    # main: the waypoint parsed the bytes as HTTP and answered 400.
    async def main() -> None:
        async with waypoint_mesh(tmp_path) as mesh, db_servers():
            payload = b"\x00\x00\x00\x08\x04\xd2\x16/" + b"binary\r\n" * 1000  # pg-ish bytes
            got = await talk(payload)
            assert got.startswith((b"v1:", b"v2:")), got[:40]
            assert got.endswith(b"binary\r\n"), got[-40:]
            assert len(got) == len(payload) + 3 * (got.count(b"v1:") + got.count(b"v2:"))
            text = generate_latest(mesh.waypoint.ctx.metrics.registry).decode()
            opened = [
                x for x in text.splitlines() if x.startswith("istio_tcp_connections_opened_total{")
            ]
            assert len(opened) == 1
            assert opened[0].endswith(" 1.0")
            wants = (
                'reporter="waypoint"',
                'destination_service="db.default.svc.cluster.local"',
                f'destination_principal="{REVIEWS_ID}"',
                'request_protocol="tcp"',
                'source_workload="client"',
            )
            for want in wants:
                assert want in opened[0], (want, opened[0])
            # The node proxy's label set and workload mapping (meshcore.telemetry), not a copy.
            names = re.findall(r'(\w+)="', opened[0])
            assert sorted(names) == sorted(TCP_LABELS)
            recv = next(
                x for x in text.splitlines() if x.startswith("istio_tcp_received_bytes_total{")
            )
            assert recv.endswith(f" {float(len(payload))}")
            # An HTTP client to the same port is still served as HTTP (routing, L7 policy): the
            # waypoint itself answers (the echo app does not speak HTTP: 502).
            got = await talk(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 502")
            assert b"server: waypoint" in got

    run(main())


def test_server_first_protocol_after_the_detection_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path) as mesh, db_servers(greeting=True):
            ctx = mesh.waypoint.ctx
            ctx.settings = dataclasses.replace(ctx.settings, protocol_detection_timeout=0.2)
            got = await talk(b"QUIT\n", read_first=True)
            assert got.startswith(b"hello from v")
            assert b":QUIT\n" in got

    run(main())


DENY_SLEEP = authorization_policy(
    """
targetRefs: [{kind: Service, name: db}]
action: DENY
rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]}]
""",
    name="deny",
)

ALLOW_HTTP_ONLY = authorization_policy(
    """
targetRefs: [{kind: Service, name: db}]
rules: [{to: [{operation: {methods: [GET]}}]}]
""",
    name="allow-get",
)


def test_l4_policy_at_the_waypoint(tmp_path: Path) -> None:
    async def main() -> None:
        for doc in (DENY_SLEEP, ALLOW_HTTP_ONLY):
            async with waypoint_mesh(tmp_path, doc) as mesh, db_servers() as servers:
                got = await talk(b"\x01\x02hello")
                assert got == b"", (doc, got)  # reset before any byte reached the app
                del servers
                text = generate_latest(mesh.waypoint.ctx.metrics.registry).decode()
                assert "istio_tcp_connections_opened_total{" not in text

    run(main())


TCP_ROUTE = gateway_route(
    "TCPRoute",
    """
parentRefs: [{group: "", kind: Service, name: db, port: 7000}]
rules: [{backendRefs: [{name: db-v2, port: 7000}]}]
""",
    name="db",
)

TLS_ROUTE = gateway_route(
    "TLSRoute",
    """
parentRefs: [{group: "", kind: Service, name: db}]
hostnames: ["*.v2.example"]
rules: [{backendRefs: [{name: db-v2, port: 7000}]}]
""",
    name="db-tls",
)


def client_hello(server_name: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def each(mesh: WaypointMesh, n: int, data: bytes) -> set[bytes]:
    return {(await talk(data))[:3] for _ in range(n)}


def test_tcp_route_and_tls_route_by_sni(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, TCP_ROUTE) as mesh, db_servers():
            assert await each(mesh, 8, b"\x00ping") == {b"v2:"}
        async with waypoint_mesh(tmp_path, TLS_ROUTE) as mesh, db_servers():
            hello = client_hello("api.v2.example")
            got = await talk(hello)
            # Passthrough: the ClientHello reached db-v2 byte for byte.
            assert got == b"v2:" + hello
            # No TLSRoute matches this SNI (and no TCPRoute): refused.
            assert await talk(client_hello("other.example")) == b""
            # Not TLS at all: no SNI: refused too.
            assert await talk(b"\x00plain") == b""

    run(main())
