"""Consistent-hash load balancing through a real waypoint: one user, one pod."""

from __future__ import annotations

from pathlib import Path

from tests.loopback.test_waypoint_harness import REVIEWS, run, waypoint_mesh

DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
"""


def test_same_key_same_pod(tmp_path: Path) -> None:
    # main: consistentHash was refused, so the DestinationRule was not applied (no stickiness).
    async def main() -> None:
        async with waypoint_mesh(tmp_path, DR) as mesh:
            async with mesh.session() as s:
                homes: dict[str, set[str]] = {}
                for _round in range(4):
                    for u in range(12):
                        async with s.get(f"{REVIEWS}/r", headers={"x-user": f"user{u}"}) as r:
                            assert r.status == 200
                            homes.setdefault(f"user{u}", set()).add(r.headers["x-version"])
            assert all(len(v) == 1 for v in homes.values()), homes
            assert len({next(iter(v)) for v in homes.values()}) >= 2  # keys spread over pods

    run(main())
