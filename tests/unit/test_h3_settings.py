"""Node proxy flags for HBONE over HTTP/3 and the per-destination transport choice (issue 16)."""

from __future__ import annotations

import pytest

from meshcore.ca import MeshCA
from meshcore.certs import CertificateManager, LocalCAProvider
from meshcore.hbone.pool import HbonePool
from meshcore.state import MeshState
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


def test_http3_with_transparent_capture_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--http3", "--capture", "transparent"])


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


@pytest.mark.parametrize(
    ("http3", "peers", "capture", "node", "want"),
    [
        (False, ("*",), "bind", "node-b", "h2"),  # no UDP sockets of our own: never HTTP/3
        (True, (), "bind", "node-b", "h2"),  # not configured for that node (e.g. Istio's)
        (True, ("node-c",), "bind", "node-b", "h2"),
        (True, ("node-b",), "bind", "node-b", "h3"),
        (True, ("*",), "bind", "node-b", "h3"),
        (True, ("*",), "bind", None, "h2"),  # unknown node (e.g. via a waypoint)
        (True, ("*",), "transparent", "node-b", "h2"),
    ],
)
def test_transport_for(
    http3: bool, peers: tuple[str, ...], capture: str, node: str | None, want: str
) -> None:
    settings = ProxySettings(node="node-a", http3=http3, http3_peers=peers, capture=capture)
    assert ctx(settings).transport_for(node) == want
