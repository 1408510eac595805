"""Node-proxy telemetry as Istio's dashboards read it, on the real in-process loopback mesh.

Istio's standard TCP labels are written out here from istio.io "Istio Standard Metrics" and
ztunnel's ``CommonTrafficLabels`` (src/proxy/metrics.rs), not imported from the code under test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshcore.hbone.aio import HboneSettings, PoolKey, connect
from meshcore.identity import SpiffeId
from meshcore.tls import client_context
from tests.helpers import run
from tests.loopback.harness import (
    BACKEND_PORT,
    CLIENT_IP,
    SERVER_IP,
    SLEEP,
    VIP,
    Backend,
    call_service,
    running_mesh,
    start_backend,
)
from ztunnel.app import NodeProxy

ISTIO_TCP_LABELS = {
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
}


def samples(proxy: NodeProxy, name: str) -> list[tuple[dict[str, str], float]]:
    text = generate_latest(proxy.ctx.metrics.exposition_registry()).decode()
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out.append((dict(s.labels), s.value))
    return out


def test_tcp_series_carry_every_istio_standard_label(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path) as mesh:
            (_got, n), _ = await call_service(3, 100, 200)
            assert n == 200
            await asyncio.sleep(0.1)
            for proxy, reporter in ((mesh.node_a, "source"), (mesh.node_b, "destination")):
                for name in ("istio_tcp_connections_opened_total", "istio_tcp_sent_bytes_total"):
                    found = [lb for lb, _ in samples(proxy, name) if lb["reporter"] == reporter]
                    assert found, (name, reporter)
                    labels = found[0]
                    # Istio's labels, plus our one documented extra: the HBONE transport.
                    assert set(labels) == ISTIO_TCP_LABELS | {"transport"}
                    assert labels["transport"] == "h2"
                    # Canonical fields as istiod derives them when a pod has no such labels:
                    # the workload name and "latest"; the cluster from the proxy's settings.
                    assert labels["source_canonical_service"] == "sleep"
                    assert labels["source_canonical_revision"] == "latest"
                    assert labels["destination_canonical_service"] == "echo"
                    assert labels["destination_canonical_revision"] == "latest"
                    assert labels["source_app"] == labels["source_canonical_service"]
                    assert labels["destination_version"] == "latest"
                    assert labels["source_cluster"] == "Kubernetes"
                    assert labels["destination_cluster"] == "Kubernetes"

    run(main(), 60)


def test_no_created_series_and_process_and_build_metrics(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_mesh(tmp_path) as mesh:
            await call_service(4, 10, 10)
            await asyncio.sleep(0.1)
            text = generate_latest(mesh.node_a.ctx.metrics.exposition_registry()).decode()
            assert "_created" not in text
            assert 'istio_build{component="ztunnel"' in text
            assert "process_resident_memory_bytes" in text
            assert "process_cpu_seconds_total" in text

    run(main(), 60)


def test_bytes_are_counted_while_the_connection_is_open(tmp_path: Path) -> None:
    """A long-lived connection's bytes show before it closes (Istio counts as it copies)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main() -> None:
        backend: Backend = await start_backend(echo)
        async with running_mesh(tmp_path, backend=backend) as mesh:
            for node in (mesh.node_a, mesh.node_b):
                node.ctx.tracker.FLUSH_INTERVAL = 0.05
            reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
            try:
                writer.write(b"x" * 30_000)
                await writer.drain()
                got = 0
                while got < 30_000:
                    got += len(await reader.read(65536))
                for _ in range(100):
                    recv = samples(mesh.node_a, "istio_tcp_received_bytes_total")
                    sent = samples(mesh.node_b, "istio_tcp_sent_bytes_total")
                    if recv and sent and recv[0][1] >= 30_000 and sent[0][1] >= 30_000:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"bytes not counted while open: {recv} {sent}")
                closed = samples(mesh.node_a, "istio_tcp_connections_closed_total")
                assert all(v == 0 for _, v in closed)
            finally:
                writer.close()
            # At close the totals are exact, never counted twice.
            for _ in range(100):
                closed = samples(mesh.node_a, "istio_tcp_connections_closed_total")
                if closed and closed[0][1] == 1:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            assert samples(mesh.node_a, "istio_tcp_received_bytes_total")[0][1] == 30_000
            assert samples(mesh.node_a, "istio_tcp_sent_bytes_total")[0][1] == 30_000

    run(main(), 60)


def test_destination_infers_the_service_by_target_port(tmp_path: Path) -> None:
    """A client that names no service (a waypoint connecting to a pod) is still reported with
    the destination's service, found by target port as Istio's ztunnel does."""

    async def main() -> None:
        async with running_mesh(tmp_path) as mesh:
            sleep_id = SpiffeId.parse(SLEEP)
            cert = await mesh.node_a.ctx.certs.get(sleep_id)
            key = PoolKey(
                source=sleep_id,
                expected=(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo"),),
                address=(SERVER_IP, 15008),
                source_ip=CLIENT_IP,
            )
            proto = await connect(
                key, client_context(cert), HboneSettings(trust_domain="cluster.local"), timeout=5.0
            )
            try:

                class Sink:
                    write_paused = False

                    def tunnel_data(self, data: bytes) -> None: ...
                    def tunnel_eof(self) -> None: ...
                    def tunnel_reset(self, code: int, remote: bool) -> None: ...
                    def tunnel_pause_source(self) -> None: ...
                    def tunnel_resume_source(self) -> None: ...

                await asyncio.wait_for(
                    proto.open_stream(f"{SERVER_IP}:{BACKEND_PORT}", [], Sink()), 5
                )
                for _ in range(100):
                    opened = samples(mesh.node_b, "istio_tcp_connections_opened_total")
                    if opened:
                        break
                    await asyncio.sleep(0.02)
                assert opened[0][0]["destination_service"] == "echo.default.svc.cluster.local"
                assert opened[0][0]["destination_service_name"] == "echo"
                assert opened[0][0]["destination_service_namespace"] == "default"
            finally:
                proto.abort()

    run(main(), 60)
