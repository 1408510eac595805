"""Two node proxies, a backend and a client on 127.0.0.0/8, all in one event loop.

Addresses (loopback is all local on Linux, so no privileges are needed):
  node-a 127.0.21.1, client pod 127.0.21.10 (sa sleep)
  node-b 127.0.22.1, server pod 127.0.22.10 (sa echo), backend listening on 127.0.22.10:8080
  service echo.default.svc.cluster.local VIP 127.0.23.10:80 -> 8080
Node A's outbound listener is bound on the VIP, so `getsockname()` gives the original destination
exactly as transparent capture does.

`TRANSPORTS` ("h2", "h3"): the tunnel transport between the nodes. Tests that are about HBONE
semantics take the `transport` fixture (tests/loopback/conftest.py) and pass it to
`running_mesh`, so they run over HTTP/2 and over HTTP/3 (issue 16).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from meshcore.ca import MeshCA
from meshcore.certs import LocalCAProvider
from meshcore.proto.yamlform import load_mesh_config
from meshcore.state import MeshState
from tests.helpers import echo_mesh_config
from ztunnel.app import NodeProxy
from ztunnel.contexts import build_context
from ztunnel.proxy.context import ProxySettings

CLIENT_IP = "127.0.21.10"
SERVER_IP = "127.0.22.10"
VIP = "127.0.23.10"
BACKEND_PORT = 8080
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
ECHO = "spiffe://cluster.local/ns/default/sa/echo"


def mesh_config(
    policies: list[dict[str, Any]] | None = None, target_port: int = 8080
) -> dict[str, Any]:
    return echo_mesh_config(CLIENT_IP, SERVER_IP, VIP, target_port=target_port, policies=policies)


@dataclass
class Backend:
    """Counts accepted connections and records what each one saw."""

    accepted: int = 0
    peers: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None


@dataclass
class Mesh:
    ca: MeshCA
    node_a: NodeProxy
    node_b: NodeProxy
    backend: Backend
    tmp: Path


async def stream_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> tuple[str, int]:
    """Write `payload` then FIN, while reading until EOF. Returns (sha256 of read, length)."""

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 256 * 1024):
            writer.write(view[i : i + 256 * 1024])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    digest = hashlib.sha256()
    total = 0
    while chunk := await reader.read(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    await sender
    return digest.hexdigest(), total


def payload_for(seed: int, size: int) -> bytes:
    """Random-looking but reproducible bytes, so both ends know the expected hash."""
    return os.urandom(16) if size == 0 else hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)


async def start_backend(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any] | None = None,
) -> Backend:
    backend = Backend()

    async def default(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Protocol: the client's first 8 bytes are a seed+size header; reply with that payload.
        head = await reader.readexactly(8)
        seed, size = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
        got, n = await stream_exchange(reader, writer, payload_for(seed, size))
        writer.close()
        backend.peers.append(f"{got}:{n}")

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend.accepted += 1
        peer = writer.get_extra_info("peername")[0]
        backend.peers.append(peer)
        await (handler or default)(reader, writer)

    backend.server = await asyncio.start_server(accept, SERVER_IP, BACKEND_PORT)
    return backend


TRANSPORTS = ("h2", "h3")


def settings(
    node: str, ip: str, outbound: tuple[tuple[str, int], ...] = (), transport: str = "h2"
) -> ProxySettings:
    h3 = transport == "h3"
    return ProxySettings(
        node=node,
        node_ip=ip,
        outbound_listen=outbound,
        drain_timeout=2.0,
        http3=h3,
        http3_peers=("*",) if h3 else (),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshOptions:
    """The less common knobs of `running_mesh`."""

    cert_ttl: timedelta = timedelta(hours=24)
    """Lifetime of the workload certificates the node proxies get."""
    node_b_outbound: tuple[tuple[str, int], ...] = ()
    """Outbound listeners of node-b (node-a always listens on the VIP)."""


@asynccontextmanager
async def running_mesh(
    tmp: Path,
    config: dict[str, Any] | None = None,
    *,
    backend: Backend | None = None,
    transport: str = "h2",
    options: MeshOptions | None = None,
) -> AsyncIterator[Mesh]:
    opts = options or MeshOptions()
    cfg_path = tmp / "mesh.yaml"
    cfg_path.write_text(yaml.safe_dump(config or mesh_config()))
    state = MeshState.from_config(load_mesh_config(cfg_path))
    ca = MeshCA.load_or_create(tmp / "ca")
    provider = LocalCAProvider(ca, ttl=opts.cert_ttl)
    node_a = NodeProxy(
        build_context(settings("node-a", "127.0.21.1", ((VIP, 80),), transport), state, provider)
    )
    node_b_settings = settings("node-b", "127.0.22.1", opts.node_b_outbound, transport)
    node_b = NodeProxy(build_context(node_b_settings, state, provider))
    backend = backend or await start_backend()
    await node_a.start()
    await node_b.start()
    try:
        yield Mesh(ca=ca, node_a=node_a, node_b=node_b, backend=backend, tmp=tmp)
        # An HTTP/3 run must not have silently fallen back to HTTP/2.
        for node in (node_a, node_b) if transport == "h3" else ():
            assert node.ctx.pool.h3_fallbacks == 0, "HTTP/3 fell back to HTTP/2"
    finally:
        await node_a.drain()
        await node_b.drain()
        if backend.server is not None:
            backend.server.close()


async def call_service(seed: int, up: int, down: int) -> tuple[tuple[str, int], str]:
    """Client pod -> VIP: send `up` bytes, receive `down` bytes. Returns (got, sha of sent)."""
    reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
    head = seed.to_bytes(4, "big") + down.to_bytes(4, "big")
    body = payload_for(seed + 1_000_000, up)
    got = await stream_exchange(reader, writer, head + body)
    writer.close()
    return got, hashlib.sha256(head + body).hexdigest()
