"""ztunnel's xDS client metrics (``istio_xds_message_total{url}``,
``istio_xds_message_bytes_total{url}``, ``istio_xds_connection_terminations_total{reason}``,
issue 12) on the node proxy's scrape, through the app's own control-plane wiring
(`ztunnel.contexts.controlplane_context`) against a real control plane."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.app import ControlPlane
from meshcore.proto.convert import ADDRESS_TYPE
from meshcore.telemetry import XdsCollector
from meshcore.xds import ControlPlaneEndpoint, XdsClient, XdsSettings
from tests.loopback.cpfixtures import (
    CP_ADDR,
    NODE_A,
    TOKENS,
    base_manifests,
    cp_settings,
    eventually,
    running_controlplane,
    write_manifests,
)
from ztunnel.contexts import controlplane_context
from ztunnel.flags import parse_args


def scrape(registry: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("istio_xds_", "ambient_xds_"))
    }


def test_node_proxy_exports_its_xds_client_metrics(tmp_path: Path) -> None:
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    token = tmp_path / "token"
    token.write_text(TOKENS["node-a"])
    settings, args = parse_args(
        [
            "--node",
            "node-a",
            "--node-ip",
            NODE_A,
            "--xds-address",
            CP_ADDR,
            "--node-credential-file",
            str(token),
        ]
    )

    async def main() -> None:
        cp = ControlPlane(cp_settings(tmp_path))
        await cp.start()
        ctx, client = controlplane_context(settings, args)
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await asyncio.wait_for(client.synced.wait(), 10)
            registry = ctx.metrics.exposition_registry()
            got = scrape(registry)
            url = (("url", ADDRESS_TYPE),)
            assert got[("istio_xds_message_total", url)] >= 1
            assert got[("istio_xds_message_bytes_total", url)] > 100
            assert not [k for k in got if k[0] == "istio_xds_connection_terminations_total"]
            await cp.stop()  # the stream ends: one termination, by its reason
            await eventually(lambda: not client.stats.connected, 5, "client noticed")
            ended = {
                k[1]: v
                for k, v in scrape(registry).items()
                if k[0] == "istio_xds_connection_terminations_total"
            }
            assert sum(ended.values()) >= 1, ended
            assert {dict(k)["reason"] for k in ended} <= {"Complete", "ConnectionError", "Error"}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await cp.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_refused_stream_is_counted_by_grpc_status(tmp_path: Path) -> None:
    """A node credential the control plane refuses: each stream ends UNAUTHENTICATED (the
    grpcio server's trailers-only answer), named in the last error and counted by status on
    the scrape (``ambient_xds_grpc_status_total{code}``); the state stays empty."""
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())

    async def main() -> None:
        async with running_controlplane(cp_settings(tmp_path)):
            ep = ControlPlaneEndpoint(address=CP_ADDR, token="not-a-node-token")
            client = XdsClient(ep, XdsSettings(node="node-a", backoff_cap=0.2))
            task = asyncio.get_running_loop().create_task(client.run())
            try:
                await eventually(
                    lambda: client.stats.statuses.get("UNAUTHENTICATED", 0) >= 2, 10, "refused"
                )
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert client.stats.last_error.startswith("UNAUTHENTICATED: "), client.stats
            assert not client.synced.is_set()
            registry = CollectorRegistry()
            registry.register(XdsCollector(lambda: client.stats))
            key = ("ambient_xds_grpc_status_total", (("code", "UNAUTHENTICATED"),))
            assert scrape(registry)[key] >= 2

    asyncio.run(asyncio.wait_for(main(), 60))


def test_response_over_max_message_ends_the_stream(tmp_path: Path) -> None:
    """A response larger than the client's `max_message` (here 64 octets: every response of
    the base mesh is larger) is refused from its length prefix: the stream ends
    RESOURCE_EXHAUSTED, nothing of it is applied, the next stream is tried with backoff."""
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())

    async def main() -> None:
        async with running_controlplane(cp_settings(tmp_path)):
            ep = ControlPlaneEndpoint(address=CP_ADDR, token=TOKENS["node-a"], max_message=64)
            client = XdsClient(ep, XdsSettings(node="node-a", backoff_cap=0.2))
            task = asyncio.get_running_loop().create_task(client.run())
            try:
                await eventually(
                    lambda: client.stats.statuses.get("RESOURCE_EXHAUSTED", 0) >= 2, 10, "refused"
                )
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert "larger than the limit (64 octets)" in client.stats.last_error
            assert client.stats.responses == 0
            assert not client.synced.is_set()

    asyncio.run(asyncio.wait_for(main(), 60))
