"""Node proxy flags for HBONE over HTTP/3 and the per-destination transport choice (issue 16)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from meshcore.ca import MeshCA
from meshcore.certs import CertificateManager, LocalCAProvider
from meshcore.hbone.pool import HbonePool
from meshcore.model import Http3Endpoint, Workload
from meshcore.state import MeshState
from ztunnel import app
from ztunnel.app import bind_listeners
from ztunnel.flags import parse_args
from ztunnel.metrics import ConnectionTracker, ProxyMetrics
from ztunnel.proxy.context import ProxyContext, ProxySettings

BASE = ["--node", "node-a", "--mesh-config", "/dev/null"]


def test_flags() -> None:
    s, _ = parse_args(BASE)
    assert not s.http3
    assert s.http3_peers == ()
    s, _ = parse_args([*BASE, "--http3", "--http3-peer", "node-b", "--http3-peer", "node-c"])
    assert s.http3
    assert s.http3_peers == ("node-b", "node-c")


def test_http3_with_transparent_capture_serves_udp_on_the_node_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The TCP listeners (IP_TRANSPARENT on 0.0.0.0) need privileges: plain sockets here.
    monkeypatch.setattr(app, "make_listener", lambda *_a, **_k: socket.socket())
    s, _ = parse_args([*BASE, "--http3", "--capture", "transparent", "--node-ip", "127.0.0.2"])
    listeners = bind_listeners(s, MeshState.empty())
    for x in listeners:
        if x.role != "hbone-udp":
            x.sock.close()
    (udp,) = [x for x in listeners if x.role == "hbone-udp"]
    try:
        assert udp.sock.type == socket.SOCK_DGRAM
        assert udp.sock.getsockname() == ("127.0.0.2", 15008)
    finally:
        udp.sock.close()


def ctx(settings: ProxySettings) -> ProxyContext:
    metrics = ProxyMetrics()
    provider = LocalCAProvider(MeshCA.create_root(trust_domain="cluster.local"))
    return ProxyContext(
        settings=settings,
        state=MeshState.empty(),
        certs=CertificateManager(provider),
        metrics=metrics,
        tracker=ConnectionTracker(metrics),
        pool=HbonePool(None, trust_domain="cluster.local"),  # type: ignore[arg-type]
    )


TARGET = ("10.1.0.7", 8080)
SNI = "0a010007.hbone.invalid"
PUBLISHED = Http3Endpoint(address=ipaddress.ip_address("10.0.0.2"), port=15009)


@pytest.mark.parametrize(
    ("http3", "peers", "capture", "dest", "want"),
    [
        (False, ("*",), "bind", ("node-b", PUBLISHED), None),  # no UDP of our own: never HTTP/3
        (True, (), "bind", ("node-b", None), None),  # not configured (e.g. an Istio peer)
        (True, ("node-c",), "bind", ("node-b", None), None),
        (True, ("node-b",), "bind", ("node-b", None), (TARGET, SNI)),
        (True, ("*",), "bind", ("node-b", None), (TARGET, SNI)),
        (True, ("*",), "bind", (None, None), None),  # unknown workload (e.g. via a waypoint)
        (True, ("*",), "transparent", ("node-b", None), None),  # flags: bind capture only
        # Configuration: the endpoint the control plane published for the workload.
        (True, (), "transparent", ("node-b", PUBLISHED), (("10.0.0.2", 15009), SNI)),
        (True, (), "bind", ("node-b", PUBLISHED), (("10.0.0.2", 15009), SNI)),
    ],
)
def test_h3_target(
    http3: bool,
    peers: tuple[str, ...],
    capture: str,
    dest: tuple[str | None, Http3Endpoint | None],
    want: object,
) -> None:
    node, published = dest  # destination workload's node (None: unknown) and endpoint
    settings = ProxySettings(node="node-a", http3=http3, http3_peers=peers, capture=capture)
    workload = None
    if node is not None:
        workload = Workload(
            uid="K//Pod/ns/echo",
            name="echo",
            namespace="ns",
            addresses=(ipaddress.ip_address(TARGET[0]),),
            node=node,
            http3=published,
        )
    assert ctx(settings).h3_target(workload, TARGET) == want
