"""The node proxy's on-demand lookup fails closed (issue 14): an address the state does not
hold is asked for before any decision, and an unanswered lookup (control plane unreachable)
is reported as such, so the outbound connection is refused instead of treated as "unknown"
(which would send a mesh pod's traffic in plaintext)."""

from __future__ import annotations

import asyncio

from meshcore.ca import MeshCA
from meshcore.certs import LocalCAProvider
from meshcore.proto.yamlform import parse_workload
from meshcore.state import MeshState
from meshcore.xds import ControlPlaneEndpoint, XdsClient, XdsSettings
from ztunnel.contexts import build_context
from ztunnel.proxy.context import ProxySettings


def test_unanswered_lookup_is_not_success_and_held_addresses_need_none() -> None:
    async def go() -> None:
        settings = ProxySettings(node="n1", node_ip="127.0.0.1", connect_timeout=0.2)
        ctx = build_context(settings, MeshState.empty(), LocalCAProvider(MeshCA.create_root()))
        asked: list[tuple[str, float]] = []

        async def demand(name: str, timeout: float) -> bool:
            asked.append((name, timeout))
            return False  # the control plane did not answer in time

        assert await ctx.ensure_address("10.0.0.9")  # no on-demand: everything is held
        ctx.demand = demand
        assert not await ctx.ensure_address("10.0.0.9")
        assert asked == [("/10.0.0.9", 0.2)]
        ctx.state = MeshState.build(
            workloads=[
                parse_workload(
                    {
                        "uid": "w",
                        "name": "w",
                        "namespace": "d",
                        "addresses": ["10.0.0.1"],
                        "node": "n2",
                    }
                )
            ]
        )
        assert await ctx.ensure_address("10.0.0.1")  # held: no lookup
        assert len(asked) == 1

    asyncio.run(go())


def test_client_demand_times_out_without_a_control_plane() -> None:
    async def go() -> None:
        cp = ControlPlaneEndpoint(address="127.0.0.1:9")
        client = XdsClient(cp, XdsSettings(node="n1", on_demand=True))
        assert not await client.demand("/10.0.0.9", timeout=0.05)
        plain = XdsClient(cp, XdsSettings(node="n1"))
        assert await plain.demand("/10.0.0.9", timeout=0.05)  # wildcard: nothing to ask for

    asyncio.run(go())
