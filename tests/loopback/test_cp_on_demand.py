"""On-demand Address delivery (issue 14) on loopback: a real control plane over gRPC and two
on-demand node proxies' xDS clients (node-a, node-b) beside one wildcard client.

Each on-demand proxy holds only its own node's workloads, plus what it asked for (an address
as ``network/IP``: a VIP brings the service and its backing workloads), and every policy;
changes reach exactly the proxies holding the resource; an unknown address is answered as
removed, so a lookup never hangs. Addresses as in cpfixtures, plus a pod on node-c.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from controlplane.app import ControlPlane
from meshcore.proto import discovery_pb2 as dpb
from meshcore.xds import XdsClient, XdsSettings
from tests.helpers import run
from tests.loopback.cpfixtures import (
    CLIENT_IP,
    DENY_SLEEP,
    NODE_A,
    NODE_B,
    SERVER_IP,
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

pytestmark = pytest.mark.timeout(60)

FAR_IP = "127.0.55.10"
ECHO = "Kubernetes//Pod/default/echo"
SLEEP = "Kubernetes//Pod/default/sleep"
FAR = "Kubernetes//Pod/default/far"
SVC = "default/echo.default.svc.cluster.local"


def pod(name: str, node: str, ip: str, app: str, version: str = "v1") -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"app": app, "version": version},
        },
        "spec": {"serviceAccountName": name, "nodeName": node},
        "status": {"podIP": ip},
    }


def without_echo() -> list[dict[str, object]]:
    return [
        d
        for d in base_manifests()
        if d["metadata"] != {"name": "echo", "namespace": "default", "labels": {"app": "echo"}}
    ]


def settled(cp: ControlPlane) -> bool:
    """No xDS stream has changes waiting to be sent or responses not yet (N)ACKed."""
    return all(
        not c["unacked_nonces"] and not any(t["pending_changes"] for t in c["types"].values())
        for c in cp.xds.debug_connections()
    )


class Seen:
    """Address resource names (and removals) each client received after `reset`."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __call__(self, resp: dpb.DeltaDiscoveryResponse) -> None:
        self.names.update(r.name for r in resp.resources)
        self.names.update(resp.removed_resources)


async def _on_demand(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    write_manifests(
        manifests, "mesh.yaml", [*base_manifests(), DENY_SLEEP, pod("far", "node-c", FAR_IP, "far")]
    )
    async with running_controlplane(cp_settings(tmp_path)) as cp:
        a = XdsClient(endpoint("node-a"), XdsSettings(node="node-a", on_demand=True))
        b = XdsClient(endpoint("node-b"), XdsSettings(node="node-b", on_demand=True))
        full = XdsClient(endpoint("node-a"), XdsSettings(node="node-a"))
        seen = {c: Seen() for c in (a, b)}
        for c in (a, b):
            c.on_response = seen[c]
        tasks = [asyncio.create_task(c.run()) for c in (a, b, full)]
        try:
            await asyncio.wait_for(asyncio.gather(*(c.synced.wait() for c in (a, b, full))), 10)
            # Full state: node-local workloads only; every policy.
            assert {w.uid for w in full.state.workloads} == {SLEEP, ECHO, FAR}
            assert {w.uid for w in a.state.workloads} == {SLEEP}
            assert {w.uid for w in b.state.workloads} == {ECHO}
            assert a.state.services == ()
            # A local pod brings the services it backs (with all their endpoints).
            assert [v.key for v in b.state.services] == [SVC]
            assert a.state.policies == b.state.policies == full.state.policies != ()
            conns = {c["node"]: c for c in cp.xds.debug_connections() if c["types"]}
            assert any(not t["wildcard"] for c in conns.values() for t in c["types"].values())

            # A lookup of the VIP brings the service and the workload backing it, applied to
            # the published state before demand() returns.
            assert a.state.service_by_vip(VIP) is None
            assert await a.demand(f"/{VIP}", timeout=5)
            svc = a.state.service_by_vip(VIP)
            assert svc is not None
            assert svc.key == SVC
            assert [e.workload.uid for e in a.state.endpoints(SVC)] == [ECHO]
            assert a.state.workload_by_address(FAR_IP) is None  # still not node-a's business
            # A pod IP lookup.
            assert await b.demand(f"/{CLIENT_IP}", timeout=5)
            sleep = b.state.workload_by_address(CLIENT_IP)
            assert sleep is not None
            assert sleep.uid == SLEEP
            # An address nobody has is answered (as removed): the lookup does not hang.
            t = asyncio.get_running_loop().time()
            assert await a.demand("/127.0.99.99", timeout=5)
            assert asyncio.get_running_loop().time() - t < 2
            assert a.state.workload_by_address("127.0.99.99") is None

            # Changes go to the proxies holding the resource, and to nobody else.
            for s in seen.values():
                s.names.clear()
            write_manifests(
                manifests,
                "mesh.yaml",
                [
                    *without_echo(),
                    DENY_SLEEP,
                    pod("far", "node-c", FAR_IP, "far", "v2"),
                    pod("sleep2", "node-a", "127.0.52.11", "sleep"),
                    {
                        **pod("echo", "node-b", SERVER_IP, "echo", "v2"),
                        "spec": {
                            "serviceAccountName": "echo",
                            "nodeName": "node-b",
                            "containers": [
                                {"name": "echo", "ports": [{"name": "http", "containerPort": 8080}]}
                            ],
                        },
                    },
                ],
            )
            sleep2 = "Kubernetes//Pod/default/sleep2"
            await eventually(lambda: a.state.workload(sleep2) is not None, 5, "new local pod")
            await eventually(
                lambda: (
                    full.state.workload(FAR) is not None and full.state.workload(sleep2) is not None
                ),
                5,
            )
            # Every push the change caused has been sent and acknowledged (the server's view of
            # each stream), so a stray one would have been seen by now.
            await eventually(lambda: settled(cp), 5, "every push acknowledged")
            assert FAR not in seen[a].names
            assert FAR not in seen[b].names
            assert sleep2 not in seen[b].names  # b looked up sleep, not sleep2
            assert a.state.workload(FAR) is None
            assert b.state.workload(FAR) is None

            # Removal of a resource a proxy holds (the echo pod, behind the VIP a looked up).
            write_manifests(manifests, "mesh.yaml", [*without_echo(), DENY_SLEEP])
            await eventually(lambda: a.state.workload(ECHO) is None, 5, "removal on node-a")
            await eventually(lambda: b.state.workload(ECHO) is None, 5, "removal on node-b")
            assert a.state.service(SVC) is not None
            assert a.state.endpoints(SVC) == ()
            assert all(c.stats.nacks == 0 for c in (a, b, full))
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def test_on_demand_address_delivery(tmp_path: Path) -> None:
    run(_on_demand(tmp_path))


async def _node_proxy_looks_up_on_first_connection(tmp_path: Path) -> None:
    """Real node proxies in on-demand mode: node-a does not hold the echo service until its pod
    connects to the VIP; the connection waits for the lookup and is carried by HBONE and
    authorized on node-b (a DENY policy, always delivered, is enforced)."""
    write_manifests(tmp_path / "manifests", "mesh.yaml", base_manifests())
    async with running_controlplane(cp_settings(tmp_path)), echo_backend():
        a = await start_node("node-a", NODE_A, ((VIP, 80),), on_demand=True)
        b = await start_node("node-b", NODE_B, on_demand=True)
        try:
            assert a.state.service_by_vip(VIP) is None
            assert a.state.workload(ECHO) is None
            assert await call_echo(), "first connection: looked up, then carried"
            assert a.state.service_by_vip(VIP) is not None
            assert a.state.workload(ECHO) is not None
            assert a.state.workload_by_address(FAR_IP) is None
            write_manifests(tmp_path / "manifests", "policy.yaml", [DENY_SLEEP])
            await eventually(lambda: b.state.policy("default/deny-sleep") is not None, 5)
            assert not await call_echo(), "the DENY policy is enforced on node-b"
        finally:
            await stop_node(a)
            await stop_node(b)


def test_node_proxy_looks_up_on_first_connection(tmp_path: Path) -> None:
    run(_node_proxy_looks_up_on_first_connection(tmp_path))
