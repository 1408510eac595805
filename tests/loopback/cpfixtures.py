"""Shared fixtures for control-plane loopback tests: manifests, a control plane, node proxies
fed by it, and an echo backend.

Addresses (disjoint from the other loopback tests):
  control plane 127.0.51.1:15012 (gRPC xDS+CA), debug 127.0.51.1:15014
  node-a 127.0.52.1, client pod "sleep" 127.0.52.10
  node-b 127.0.53.1, server pod "echo" 127.0.53.10, echo backend on :8080
  service echo VIP 127.0.54.10:80 -> named target port "http" (8080)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from controlplane.app import ControlPlane, ControlPlaneSettings
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.state import MeshState
from meshcore.xds import ControlPlaneEndpoint, XdsClient, XdsSettings
from tests.helpers import eventually as eventually
from ztunnel.app import NodeProxy
from ztunnel.contexts import build_context
from ztunnel.proxy.context import ProxySettings

CP_IP = "127.0.51.1"
CP_ADDR = f"{CP_IP}:15012"
NODE_A, CLIENT_IP = "127.0.52.1", "127.0.52.10"
NODE_B, SERVER_IP = "127.0.53.1", "127.0.53.10"
VIP = "127.0.54.10"
TOKENS = {"node-a": "token-node-a-0123456789", "node-b": "token-node-b-0123456789"}


def node_b_args(tmp: Path) -> list[str]:
    """Node B's flags in control-plane mode (its token file written into `tmp`), bind capture."""
    token = tmp / "node-b.token"
    token.write_text(TOKENS["node-b"] + "\n")
    argv = ["--node", "node-b", "--node-ip", NODE_B, "--xds-address", CP_ADDR]
    return [*argv, "--node-credential-file", str(token), "--capture", "bind"]


def base_manifests() -> list[dict[str, object]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleep", "namespace": "default", "labels": {"app": "sleep"}},
            "spec": {"serviceAccountName": "sleep", "nodeName": "node-a"},
            "status": {"podIP": CLIENT_IP},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "echo", "namespace": "default", "labels": {"app": "echo"}},
            "spec": {
                "serviceAccountName": "echo",
                "nodeName": "node-b",
                "containers": [
                    {"name": "echo", "ports": [{"name": "http", "containerPort": 8080}]}
                ],
            },
            "status": {"podIP": SERVER_IP},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {
                "clusterIP": VIP,
                "selector": {"app": "echo"},
                "ports": [{"name": "tcp-echo", "port": 80, "targetPort": "http"}],
            },
        },
    ]


DENY_SLEEP: dict[str, object] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-sleep", "namespace": "default"},
    "spec": {
        "action": "DENY",
        "selector": {"matchLabels": {"app": "echo"}},
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}],
    },
}


def write_manifests(directory: Path, name: str, docs: list[dict[str, object]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.rename(directory / name)  # atomic: the poller never sees half a file


def cp_settings(tmp: Path, *, plaintext: bool = True) -> ControlPlaneSettings:
    creds = tmp / "node-credentials.yaml"
    creds.write_text(yaml.safe_dump(TOKENS))
    return ControlPlaneSettings(
        listen=CP_ADDR,
        debug_listen=f"{CP_IP}:15014",
        manifest_dir=tmp / "manifests",
        ca_dir=tmp / "ca",
        node_credentials=creds,
        plaintext=plaintext,
        poll_interval=0.05,
    )


@dataclass
class Node:
    proxy: NodeProxy
    xds: XdsClient
    task: asyncio.Task[None]

    @property
    def state(self) -> MeshState:
        return self.proxy.ctx.state


def endpoint(node: str, roots: bytes | None = None) -> ControlPlaneEndpoint:
    return ControlPlaneEndpoint(address=CP_ADDR, token=TOKENS[node], tls_roots=roots)


async def start_node(
    node: str,
    ip: str,
    outbound: tuple[tuple[str, int], ...] = (),
    roots: bytes | None = None,
    *,
    on_demand: bool = False,
) -> Node:
    ep = endpoint(node, roots)
    settings = ProxySettings(node=node, node_ip=ip, outbound_listen=outbound, drain_timeout=1.0)
    ctx = build_context(settings, MeshState.empty(), ControlPlaneCAProvider(ep))

    def on_update(state: MeshState) -> None:
        ctx.state = state
        ctx.sync_local_identities()

    xds = XdsSettings(node=node, backoff_cap=0.5, on_demand=on_demand)
    client = XdsClient(ep, xds, on_update=on_update)
    if on_demand:
        ctx.demand = client.demand
    task = asyncio.get_running_loop().create_task(client.run())
    await asyncio.wait_for(client.synced.wait(), 10)
    proxy = NodeProxy(ctx)
    await proxy.start()
    return Node(proxy=proxy, xds=client, task=task)


async def stop_node(node: Node) -> None:
    node.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await node.task
    await node.proxy.drain()


@contextlib.asynccontextmanager
async def echo_backend() -> AsyncIterator[asyncio.Server]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, SERVER_IP, 8080)
    try:
        yield server
    finally:
        server.close()


async def call_echo(payload: bytes = b"hello mesh") -> bool:
    """Client pod -> service VIP; True if the payload came back intact."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0)), 5
        )
    except OSError:
        return False
    try:
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 5)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
    return got == payload


@contextlib.asynccontextmanager
async def running_controlplane(settings: ControlPlaneSettings) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(settings)
    await cp.start()
    try:
        yield cp
    finally:
        await cp.stop()
