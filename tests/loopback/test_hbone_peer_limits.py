"""Per-peer tunnel bound of the node proxy's HBONE port (issue 9, "bounded per connection and
per peer"): a real `ztunnel` started with `--tunnels-per-peer 300`, a peer with a valid mesh
certificate that opens tunnels on several connections, each under its own stream limit.
Addresses: those of `robustness.py` (the module's node process is its own)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.helpers import loopback_block
from tests.loopback.robustness import (
    NodeB,
    Raw,
    connect_block,
    fd_count,
    headers_frame,
    legit_tunnel,
    start_echo_backend,
    start_node_b,
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeB]:
    yield from start_node_b(tmp_path_factory.mktemp("peer-limits"), "--tunnels-per-peer", "300")


def test_tunnels_are_bounded_per_peer_across_connections(node: NodeB) -> None:
    """Two connections x 200 open tunnels from one peer IP: 300 get 200 (upstream sockets), the
    100 beyond the peer's bound get 503 with an access-log line and a counter, no upstream
    socket; another peer is served meanwhile; once the peer's tunnels end, it may open again."""
    peer = loopback_block().ip(3)
    flag = {"response_flags": "PEER_LIMIT"}
    before = node.counter("istio_tcp_connections_failed_total", **flag)

    async def main() -> None:
        backend = await start_echo_backend()
        await legit_tunnel(node.cert)
        base_fds = fd_count(node.pid)
        backend.accepted = 0
        streams = range(1, 401, 2)
        raws = [await Raw.open(node.cert, source=peer) for _ in range(2)]
        for raw in raws:
            await raw.send(b"".join(headers_frame(s, connect_block()) for s in streams))
            await asyncio.sleep(1.0)
        statuses = [v for raw in raws for v in raw.seen.statuses.values()]
        assert statuses.count("200") == 300
        assert statuses.count("503") == 100
        assert backend.accepted == 300
        await legit_tunnel(node.cert)  # another peer (127.0.0.1)
        for raw in raws:
            raw.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while fd_count(node.pid) > base_fds + 2:
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
        again = await Raw.open(node.cert, source=peer)
        await again.send(headers_frame(1, connect_block()))
        await asyncio.sleep(0.5)
        assert again.seen.statuses == {1: "200"}
        again.abort()
        assert backend.server is not None
        backend.server.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert node.counter("istio_tcp_connections_failed_total", **flag) == before + 100
    assert "has 300 tunnels open" in node.log.read_text()
