"""Two real node proxies on loopback carrying TCP over HBONE (mTLS + HTTP/2 CONNECT, or QUIC +
HTTP/3 CONNECT: every test taking `transport` runs over both)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from meshcore.hbone.aio import HboneStream
from tests.helpers import eventually, run
from tests.loopback.harness import (
    CLIENT_IP,
    ECHO,
    SLEEP,
    VIP,
    MeshOptions,
    call_service,
    mesh_config,
    payload_for,
    running_mesh,
    start_backend,
    stream_exchange,
)
from ztunnel.metrics import ConnectionRecord
from ztunnel.proxy.inbound import _Upstream
from ztunnel.proxy.outbound import OutboundConnection


def metric_text(proxy: object) -> str:
    return generate_latest(proxy.ctx.metrics.registry).decode()  # type: ignore[attr-defined]


def test_64mib_each_way_on_concurrent_streams_arrive_intact(tmp_path: Path, transport: str) -> None:
    streams, per_stream = 16, 4 * 1024 * 1024  # 64 MiB each way in total

    async def main() -> None:
        async with running_mesh(tmp_path, transport=transport) as mesh:
            results = await asyncio.gather(
                *(call_service(seed, per_stream, per_stream) for seed in range(streams))
            )
            for seed, ((got_hash, got_len), _sent_hash) in enumerate(results):
                assert got_len == per_stream
                assert got_hash == hashlib.sha256(payload_for(seed, per_stream)).hexdigest()
            # Backend records "sha:len" of what it received per connection; check all of them.
            # It records after its own read loop ends, which may be just after ours (over HTTP/3
            # on a loaded machine, seconds after): wait up to 15 s.
            for _ in range(1500):
                received = sorted(p for p in mesh.backend.peers if ":" in p and len(p) > 20)
                if len(received) == streams:
                    break
                await asyncio.sleep(0.01)
            expected = sorted(
                f"{hashlib.sha256(payload_for(s + 1_000_000, per_stream)).hexdigest()}:{per_stream}"
                for s in range(streams)
            )
            assert received == expected
            # Original source kept: the backend saw the client pod's IP, not the proxy's.
            assert mesh.backend.peers.count(CLIENT_IP) == streams
            # Streams were multiplexed: far fewer TLS connections than streams.
            assert mesh.node_a.ctx.pool.connections_opened <= 2

    run(main(), 120)


def test_identities_in_metrics_and_both_sides(tmp_path: Path, transport: str) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path, transport=transport) as mesh:
            (_got, n), _ = await call_service(7, 1000, 5000)
            assert n == 5000
            assert [c["transport"] for c in mesh.node_a.ctx.pool.snapshot()] == [transport]
            await asyncio.sleep(0.1)
            dest = metric_text(mesh.node_b)
            src = metric_text(mesh.node_a)
            line = next(
                x for x in dest.splitlines() if x.startswith("istio_tcp_connections_opened_total{")
            )
            assert 'reporter="destination"' in line
            assert f'source_principal="{SLEEP}"' in line
            assert f'destination_principal="{ECHO}"' in line
            assert 'connection_security_policy="mutual_tls"' in line
            assert f'transport="{transport}"' in line
            # The destination learns the addressed service from `forwarded: ...;host=`.
            assert 'destination_service="echo.default.svc.cluster.local"' in line
            line = next(
                x for x in src.splitlines() if x.startswith("istio_tcp_connections_opened_total{")
            )
            assert 'reporter="source"' in line
            assert f'destination_principal="{ECHO}"' in line
            assert f'transport="{transport}"' in line
            assert 'destination_service="echo.default.svc.cluster.local"' in line
            sent = [x for x in dest.splitlines() if x.startswith("istio_tcp_sent_bytes_total{")]
            assert sent
            assert float(sent[0].rsplit(" ", 1)[1]) == 5000

    run(main(), 120)


def test_denied_connection_never_reaches_backend(tmp_path: Path, transport: str) -> None:
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
            reader, writer = await asyncio.open_connection(
                "127.0.23.10", 80, local_addr=(CLIENT_IP, 0)
            )
            writer.write(b"\0" * 8)
            try:
                data = await asyncio.wait_for(reader.read(100), 10)
            except ConnectionResetError:
                data = b""
            assert data == b""  # closed (reset) without any byte from the server
            writer.close()
            # Node B has decided (and counted) the refusal: nothing can reach the backend later.
            await eventually(lambda: 'response_flags="DENY"' in metric_text(mesh.node_b))
            assert mesh.backend.accepted == 0
            text = metric_text(mesh.node_b)
            assert "istio_tcp_connections_failed_total{" in text

    run(main(), 120)


@pytest.mark.parametrize("uvloop_enabled", [False, True])
def test_event_loops(tmp_path: Path, uvloop_enabled: bool) -> None:
    """The same exchange under asyncio's loop and uvloop."""
    if uvloop_enabled:
        uvloop = pytest.importorskip("uvloop")
        runner = uvloop.run
    else:
        runner = asyncio.run

    async def main() -> None:
        async with running_mesh(tmp_path):
            results = await asyncio.gather(*(call_service(s, 300_000, 200_000) for s in range(8)))
            for seed, ((h, n), _) in enumerate(results):
                assert n == 200_000
                assert h == hashlib.sha256(payload_for(seed, 200_000)).hexdigest()

    runner(asyncio.wait_for(main(), 60))


def test_same_node_fast_path_keeps_identity_policy_and_source(tmp_path: Path) -> None:
    """A client on node-b calling a service whose endpoint is also on node-b: the node proxy
    handles both halves in-process, still authorizing with the client's identity."""
    local_client, vip2 = "127.0.22.20", "127.0.23.20"
    config = mesh_config()
    config["workloads"].append(
        {
            "uid": "c2",
            "name": "local",
            "namespace": "default",
            "serviceAccount": "local",
            "addresses": [local_client],
            "node": "node-b",
            "tunnelProtocol": "HBONE",
        }
    )
    config["services"].append(
        {
            "name": "echo2",
            "namespace": "default",
            "hostname": "echo2.default.svc.cluster.local",
            "addresses": [{"address": vip2}],
            "ports": [{"servicePort": 80, "targetPort": 8080}],
        }
    )
    config["workloads"][1]["services"]["default/echo2.default.svc.cluster.local"] = {
        "ports": [{"servicePort": 80, "targetPort": 8080}]
    }
    config["policies"] = [
        {
            "name": "only-sleep",
            "namespace": "default",
            "scope": "NAMESPACE",
            "action": "ALLOW",
            "rules": [
                {
                    "clauses": [
                        {
                            "matches": [
                                {"principals": [{"exact": "cluster.local/ns/default/sa/local"}]}
                            ]
                        }
                    ]
                }
            ],
        },
    ]

    async def main() -> None:
        options = MeshOptions(node_b_outbound=((vip2, 80),))
        async with running_mesh(tmp_path, config, options=options) as mesh:
            reader, writer = await asyncio.open_connection(vip2, 80, local_addr=(local_client, 0))
            head = (3).to_bytes(4, "big") + (4096).to_bytes(4, "big")
            got = await stream_exchange(reader, writer, head + b"x" * 1000)
            writer.close()
            assert got == (hashlib.sha256(payload_for(3, 4096)).hexdigest(), 4096)
            assert local_client in mesh.backend.peers  # original source kept
            await asyncio.sleep(0.05)
            text = metric_text(mesh.node_b)
            dest = [
                x
                for x in text.splitlines()
                if x.startswith("istio_tcp_connections_opened_total{")
                and 'reporter="destination"' in x
            ]
            assert dest
            assert 'source_principal="spiffe://cluster.local/ns/default/sa/local"' in dest[0]
            assert mesh.node_b.ctx.pool.connections_opened == 0  # no HBONE connection needed
            # The same policy still applies: the node-a client (sa sleep) is now denied.
            try:
                (_h, n), _ = await call_service(1, 10, 10)
            except ConnectionResetError:
                n = 0
            assert n == 0

    run(main(), 120)


def test_resets_propagate_both_ways(tmp_path: Path, transport: str) -> None:
    """TCP RST <-> RST_STREAM(CONNECT_ERROR) <-> TCP RST (RFC 9113 §8.5), in both directions."""
    import socket
    import struct

    server_saw: list[str] = []

    def rst(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(100)
        if first.startswith(b"reset-me"):
            rst(writer)  # the backend resets: the client must see a reset, not a clean EOF
            return
        try:
            while await reader.read(65536):
                pass
            server_saw.append("eof")
        except ConnectionResetError:
            server_saw.append("reset")

    async def main() -> None:
        backend = await start_backend(handler)
        async with running_mesh(tmp_path, backend=backend, transport=transport):
            reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
            writer.write(b"reset-me")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(100), 10)
            writer.close()
            # The client resets: the backend must see a reset too.
            reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
            writer.write(b"hello")
            await writer.drain()
            await asyncio.sleep(0.2)
            rst(writer)
            for _ in range(100):
                if server_saw:
                    break
                await asyncio.sleep(0.02)
            assert server_saw == ["reset"]

    run(main(), 120)


def test_idle_pooled_connection_is_released(tmp_path: Path, transport: str) -> None:
    """A pooled HBONE connection with no stream for the idle timeout (5 min) is closed."""

    async def main() -> None:
        async with running_mesh(tmp_path, transport=transport) as mesh:
            pool = mesh.node_a.ctx.pool
            (_h, n), _ = await call_service(1, 100, 100)
            assert n == 100
            assert len(pool.snapshot()) == 1
            now = asyncio.get_running_loop().time()
            assert pool.sweep(now + 10) == 0  # idle, but not for long enough
            for _ in range(50):  # the stream is forgotten once both sides ended
                if pool.sweep(now + pool.idle_timeout + 1):
                    break
                await asyncio.sleep(0.02)
            for _ in range(50):
                if not pool.snapshot():
                    break
                await asyncio.sleep(0.02)
            assert pool.snapshot() == []
            (_h, n), _ = await call_service(2, 100, 100)  # a new connection is dialled
            assert n == 100
            assert pool.connections_opened == 2

    run(main(), 120)


def test_a_finished_connection_is_freed_without_the_cyclic_gc(tmp_path: Path) -> None:
    """Issue 14: nothing of a proxied connection is left in a reference cycle once it is over
    (the relay's sides, their records, the HBONE streams), so reference counting frees it; a
    cycle per connection made the cyclic GC's passes 10-20 % of a node proxy's CPU per new
    connection (bench/README.md)."""
    per_connection = (OutboundConnection, _Upstream, ConnectionRecord, HboneStream)

    async def main() -> None:
        async with running_mesh(tmp_path) as mesh:
            await call_service(0, 100, 100)  # the pooled HBONE connection, caches
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for seed in range(1, 6):
                    await call_service(seed, 1000, 1000)
                tracker = mesh.node_b.ctx.tracker
                await eventually(
                    lambda: not tracker._live and not mesh.node_a.ctx.tracker._live,
                    what="every connection closed",
                )
                gc.collect()
                cyclic = Counter(
                    type(o).__name__ for o in gc.garbage if isinstance(o, per_connection)
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            assert not cyclic

    run(main(), 60)
