"""WebSocket (HTTP/1.1 Upgrade) through a real waypoint on loopback, with policy on the
handshake. main: Upgrade was stripped as hop-by-hop, so the handshake never completed."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.loopback.test_waypoint_harness import REVIEWS, REVIEWS_DR, SEED_VS, run, waypoint_mesh

DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-private, namespace: default}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/private*"]}}]}]
"""


def test_websocket_through_the_waypoint(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR, DENY) as mesh:
            pods = mesh.backends.pods
            async with mesh.session() as s:
                async with s.ws_connect(
                    f"{REVIEWS}/ws", headers={"user-type": "beta-tester"}
                ) as ws:
                    for i in range(20):
                        await ws.send_str(f"m{i}")
                        assert (await ws.receive_str(timeout=5)) == f"v2:m{i}"  # routed to v2
                    big = bytes(range(256)) * 4096  # 1 MiB, both ways through flow control
                    await ws.send_bytes(big)
                    assert (await ws.receive_bytes(timeout=10)) == b"v2:" + big
                # Policy applies to the handshake: denied, and the app never saw it.
                before = sum(len(p.requests) for p in pods.values())
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await s.ws_connect(f"{REVIEWS}/private/ws")
                assert err.value.status == 403
                assert sum(len(p.requests) for p in pods.values()) == before
                # A plain request after that still works (new connection).
                async with s.get(f"{REVIEWS}/reviews/1") as r:
                    assert r.status == 200
            assert mesh.waypoint.handler.upstreams["http/1.1-upgrade"].upgraded == 1  # type: ignore[attr-defined]

    run(main())
