"""Client-chosen ports cannot grow the waypoint's cluster tables (hostile input).

A workload-addressed tunnel's port is the client's (a pod declares no ports: any port of a
workload bound to the waypoint may be addressed), and it becomes the cluster's port. Before,
`WaypointContext.clusters` kept one cluster per (workload, port) forever: up to 65,535 per
workload. A route to a service without a port took the tunnel's port the same way.
"""

from __future__ import annotations

import pytest

from meshcore.ca import MeshCA
from meshcore.certs import LocalCAProvider
from meshcore.config.routes import Destination, WaypointConfig
from meshcore.proto.yamlform import parse_mesh_config
from meshcore.state import MeshState
from tests.loopback.test_waypoint_harness import (
    PORT,
    V1,
    WAYPOINT_SVC,
    mesh_config,
    waypoint_settings,
)
from waypoint.app import build_context
from waypoint.context import MAX_WORKLOAD_CLUSTERS, WaypointContext
from waypoint.derived import Derived
from waypoint.errors import NoHealthyUpstream, Overflow
from waypoint.handler import Handler
from waypoint.server import WaypointServer
from waypoint.tunnel import Tunnel

REVIEWS_HOST = "reviews.default.svc.cluster.local"


def _ctx() -> WaypointContext:
    cfg = mesh_config()
    for wl in cfg["workloads"]:
        if wl["uid"] == "reviews-v1":
            wl["waypoint"] = {"hostname": WAYPOINT_SVC}  # workload-addressed traffic too
    for svc in cfg["services"]:
        if svc["name"] == "reviews":  # two ports: a missing one is not the only one
            svc["ports"].append({"servicePort": PORT + 1, "targetPort": PORT + 1})
    state = MeshState.from_config(parse_mesh_config(cfg))
    return build_context(
        waypoint_settings(), state, WaypointConfig(), LocalCAProvider(MeshCA.create_root())
    )


def test_many_ports_of_a_workload_keep_the_workload_clusters_bounded() -> None:
    ctx = _ctx()
    handler = Handler(ctx, {})
    server = WaypointServer(ctx, handler)
    to_workload = Destination(host="")
    n = MAX_WORKLOAD_CLUSTERS + 500
    for port in range(1, n + 1):
        tunnel = server._target(f"{V1}:{port}")
        assert isinstance(tunnel, Tunnel), tunnel
        assert tunnel.workload is not None
        assert tunnel.workload.uid == "reviews-v1"
        cluster = handler._cluster(to_workload, tunnel)
        assert [(e.uid, e.port) for e in cluster.endpoints.values()] == [("reviews-v1", port)]
        assert len(ctx.workload_clusters) <= MAX_WORKLOAD_CLUSTERS  # main: one per port, kept
    assert len(ctx.clusters) == 0  # main: every (workload, port) kept there, 1,524
    assert len(ctx.workload_clusters) == MAX_WORKLOAD_CLUSTERS
    # A kept (workload, port) keeps its cluster (its counters).
    tunnel = server._target(f"{V1}:{n}")
    assert isinstance(tunnel, Tunnel)
    assert handler._cluster(to_workload, tunnel) is ctx.workload_clusters[("reviews-v1", n)]
    # Every kept cluster in use: a new port is an overflow (503 UO), none is dropped.
    for cluster in ctx.workload_clusters.values():
        cluster.active = 1
    tunnel = server._target(f"{V1}:{n + 1}")
    assert isinstance(tunnel, Tunnel)
    with pytest.raises(Overflow) as err:
        handler._cluster(to_workload, tunnel)
    assert (err.value.status, err.value.flag) == (503, "UO")
    assert len(ctx.workload_clusters) == MAX_WORKLOAD_CLUSTERS
    # One idle again: it is the one dropped.
    ctx.workload_clusters[("reviews-v1", n)].active = 0
    handler._cluster(to_workload, tunnel)
    assert ("reviews-v1", n) not in ctx.workload_clusters
    assert ("reviews-v1", n + 1) in ctx.workload_clusters


def test_a_route_to_a_service_without_a_port_does_not_take_any_client_port() -> None:
    """A destination without a port takes the tunnel's; not a port of the service (a
    workload-addressed tunnel's, chosen by the client): no such service port (Envoy has no
    such cluster), 503 UH, and no cluster is built for it."""
    ctx = _ctx()
    derived = Derived(ctx)
    dest = Destination(host=REVIEWS_HOST)
    for port in range(1, 2001):
        if port in (PORT, PORT + 1):
            continue
        with pytest.raises(NoHealthyUpstream):
            derived.cluster(dest, port)
    assert not ctx.clusters  # main: one (empty) cluster per port
    assert derived.cluster(dest, PORT).name.endswith(f"|{PORT}")
    assert len(ctx.clusters) == 1
