"""Locality failover through a real waypoint on loopback: the waypoint (region1/zone1) sends
reviews traffic to the endpoint in its own zone; as outlier detection ejects endpoints, traffic
moves to the same region's other zone, then to the failover region (Istio's priorities; the
workloads' localities as the control plane derives them from node labels)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.loopback.test_waypoint_harness import REVIEWS, mesh_config, run, waypoint_mesh
from tests.waypoint_fixtures import destination_rule, virtual_service

DR = destination_rule(
    """
trafficPolicy:
  outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s,
                     maxEjectionPercent: 100}
  loadBalancer:
    localityLbSetting:
      failover: [{from: region1, to: region3}]
""",
)
NO_RETRY = virtual_service(
    """
- route: [{destination: {host: reviews}}]
  retries: {attempts: 0}
""",
)
LOCALITY = {
    "waypoint": ("region1", "zone1"),
    "reviews-v1": ("region1", "zone1"),
    "reviews-v2": ("region1", "zone2"),
    "reviews-v3": ("region3", "zone9"),
}


def config() -> dict[str, object]:
    out = mesh_config()
    for wl in out["workloads"]:
        if wl["uid"] in LOCALITY:
            region, zone = LOCALITY[wl["uid"]]
            wl["locality"] = {"region": region, "zone": zone, "subzone": ""}
    return out


def test_locality_failover_follows_ejections(tmp_path: Path) -> None:
    # main: localityLbSetting was refused: the DestinationRule was not applied, and without
    # localities every endpoint took traffic.
    async def main() -> None:
        async with (
            waypoint_mesh(tmp_path, DR, NO_RETRY, config=config()) as mesh,
            mesh.session() as s,
        ):
            pods = mesh.backends.pods

            async def versions(n: int) -> Counter[str]:
                got: Counter[str] = Counter()
                for i in range(n):
                    async with s.get(f"{REVIEWS}/l/{i}") as r:
                        got[f"{r.headers.get('x-version', '?')}:{r.status}"] += 1
                return got

            assert await versions(20) == {"v1:200": 20}  # own zone only
            pods["v1"].fail_all = 503
            got = await versions(20)
            assert got["?:503"] == 2, got  # two 5xx (v1 failing) eject it (no retries here)
            assert got["v2:200"] == 18, got  # then the region's other zone
            pods["v2"].fail_all = 503
            got = await versions(20)
            assert got["?:503"] == 2, got
            assert got["v3:200"] == 18, got  # then the failover region
            clusters = mesh.waypoint.ctx.clusters
            (cluster,) = [c for _g, c in clusters.values() if c.name.startswith("reviews.")]
            assert {e.uid: e.priority for e in cluster.endpoints.values()} == {
                "reviews-v1": 0,
                "reviews-v2": 2,
                "reviews-v3": 3,
            }

    run(main())


REMOTE_RETRY = virtual_service(
    """
- match: [{headers: {x-remote: {exact: "yes"}}}]
  route: [{destination: {host: reviews}}]
  retries: {attempts: 1, retryOn: 5xx, retryRemoteLocalities: true}
- route: [{destination: {host: reviews}}]
  retries: {attempts: 1, retryOn: 5xx}
""",
)


def test_retry_remote_localities(tmp_path: Path) -> None:
    """A retry stays in the waypoint's locality priority (the same endpoint again: Envoy has no
    other in that priority) unless retryRemoteLocalities, which leaves the priority tried."""

    # main: retryRemoteLocalities was only warned about; retries stayed local.
    async def main() -> None:
        async with (
            waypoint_mesh(tmp_path, DR, REMOTE_RETRY, config=config()) as mesh,
            mesh.session() as s,
        ):
            for i, (remote, want) in enumerate((("no", "v1"), ("yes", "v2"))):
                hdrs = {"x-remote": remote, "x-test-fail-times": f"k{i}:1"}  # v1 fails once
                async with s.get(f"{REVIEWS}/r", headers=hdrs) as r:
                    assert r.status == 200
                    assert r.headers["x-version"] == want, (remote, r.headers)

    run(main())
