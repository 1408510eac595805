"""Waypoint routing on loopback: real node proxies, real HBONE both sides, aiohttp backends.

The seed's reviews-route VirtualService exactly as written; retries, timeouts, faults, mirrors,
outlier detection, connection-pool overflow, Gateway API HTTPRoute.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from meshcore.proto.yamlform import parse_mesh_config
from meshcore.state import MeshState
from tests.loopback.test_waypoint_harness import (
    REVIEWS,
    WaypointMesh,
    mesh_config,
    run,
    waypoint_mesh,
)
from tests.waypoint_fixtures import (
    REVIEWS_DR,
    SEED_VS,
    destination_rule,
    gateway_route,
    versions,
    virtual_service,
)


async def _versions(
    mesh: WaypointMesh, n: int, headers: dict[str, str] | None = None, concurrency: int = 32
) -> Counter[str]:
    urls = [f"{REVIEWS}/reviews/{i}" for i in range(n)]
    async with mesh.session(limit=concurrency) as s:
        return await versions(s, urls, headers, concurrency)


def test_seed_virtual_service_exactly_as_written(tmp_path: Path) -> None:
    """2,000 requests without the header split 90/10 within 4 sigma; with it, 100% v2."""

    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR) as mesh:
            n = 2000
            counts = await _versions(mesh, n)
            assert set(counts) <= {"v1", "v2"}, counts  # never v3, never an error
            assert counts["v1"] + counts["v2"] == n
            sigma = math.sqrt(n * 0.1 * 0.9)  # binomial(2000, 0.1): 13.4
            assert abs(counts["v2"] - 200) <= 4 * sigma, counts
            beta = await _versions(mesh, 300, {"user-type": "beta-tester"})
            assert beta == Counter({"v2": 300}), beta
            # The header match is exact: other values take the weighted route.
            other = await _versions(mesh, 200, {"user-type": "beta-testers"})
            assert other["v1"] > 150
            assert set(other) <= {"v1", "v2"}
            # Backends saw the real request path and a traceparent from the waypoint hop.
            req = mesh.backends.pods["v2"].requests[-1]
            assert req["path"].startswith("/reviews/")
            assert "traceparent" in {k.lower() for k in req["headers"]}

    run(main(), 180)


def test_seed_virtual_service_without_destination_rule_uses_version_labels(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS) as mesh:
            beta = await _versions(mesh, 50, {"user-type": "beta-tester"})
            assert beta == Counter({"v2": 50})
            assert any("subset 'v2'" in w for w in mesh.waypoint.ctx.warnings)

    run(main())


RETRY_VS = virtual_service(
    """
- match: [{uri: {prefix: /timeout}}]
  timeout: 0.3s
  retries: {attempts: 0}
  route: [{destination: {host: reviews, subset: v1}}]
- match: [{uri: {prefix: /delay}}]
  fault: {delay: {fixedDelay: 0.25s, percentage: {value: 100}}}
  route: [{destination: {host: reviews, subset: v1}}]
- match: [{uri: {prefix: /abort}}]
  fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
  route: [{destination: {host: reviews, subset: v1}}]
- match: [{uri: {prefix: /pertry}}]
  retries: {attempts: 2, perTryTimeout: 0.2s, retryOn: 5xx}
  route: [{destination: {host: reviews}}]
- route: [{destination: {host: reviews}}]
  retries: {attempts: 3, retryOn: "5xx"}
""",
    hosts="reviews.default.svc.cluster.local",
)


def test_retries_turn_503s_into_success_and_stop_at_the_limit(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, RETRY_VS, REVIEWS_DR) as mesh, mesh.session() as s:

            def total() -> int:
                return sum(len(p.requests) for p in mesh.backends.pods.values())

            before = total()
            async with s.get(f"{REVIEWS}/r", headers={"x-test-fail-times": "a:2"}) as r:
                assert r.status == 200
            assert total() - before == 3  # two injected 503s, then success
            before = total()
            async with s.get(f"{REVIEWS}/r", headers={"x-test-fail-times": "b:100"}) as r:
                assert r.status == 503
                assert "injected" in await r.text()  # the last upstream answer is passed on
            assert total() - before == 4  # 1 try + attempts: 3, not one more
            # Retried tries avoid the host that failed (previous-hosts predicate).
            peers = [
                p
                for p in mesh.backends.pods.values()
                if p.requests and p.requests[-1]["headers"].get("x-test-fail-times") == "b:100"
            ]
            assert len(peers) >= 2

    run(main())


def test_timeouts_and_fault_delay_and_abort_are_measured(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, RETRY_VS, REVIEWS_DR) as mesh, mesh.session() as s:
            t0 = time.monotonic()
            async with s.get(f"{REVIEWS}/timeout", headers={"x-test-delay": "2"}) as r:
                assert r.status == 504
                assert await r.text() == "upstream request timeout"
            elapsed = time.monotonic() - t0
            assert 0.28 <= elapsed < 1.0, elapsed
            t0 = time.monotonic()
            async with s.get(f"{REVIEWS}/delay") as r:
                assert r.status == 200
            assert time.monotonic() - t0 >= 0.25
            hits = mesh.backends.hits("v1", "/abort")
            async with s.get(f"{REVIEWS}/abort") as r:
                assert r.status == 418
            assert mesh.backends.hits("v1", "/abort") == hits  # aborted before the app
            # perTryTimeout 0.2s, 2 retries: a slow backend is tried 3 times then 504.
            t0 = time.monotonic()
            async with s.get(f"{REVIEWS}/pertry", headers={"x-test-delay": "1"}) as r:
                assert r.status == 504
            elapsed = time.monotonic() - t0
            assert 0.55 <= elapsed < 1.5, elapsed
            slow = sum(mesh.backends.hits(v, "/pertry") for v in ("v1", "v2", "v3"))
            assert slow == 3

    run(main())


MIRROR_VS = virtual_service(
    """
- route: [{destination: {host: reviews, subset: v1}}]
  mirror: {host: shadow}
  mirrorPercentage: {value: 100.0}
  headers:
    request:
      set: {x-set-by-route: "yes"}
      remove: [x-remove-me]
    response:
      add: {x-added-on-response: "1"}
""",
    namespace=None,
)


def test_mirror_copies_arrive_with_shadow_host(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, MIRROR_VS, REVIEWS_DR) as mesh, mesh.session() as s:
            for i in range(5):
                hdrs = {"x-remove-me": "1", "host": "reviews:9080"}
                async with s.post(f"{REVIEWS}/m/{i}", data=b"z" * 1000, headers=hdrs) as r:
                    assert r.status == 200
                    assert r.headers["x-version"] == "v1"
                    assert r.headers["x-added-on-response"] == "1"
            for _ in range(100):
                if len(mesh.backends.pods["shadow"].requests) == 5:
                    break
                await asyncio.sleep(0.02)
            shadow = mesh.backends.pods["shadow"].requests
            assert sorted(x["path"] for x in shadow) == [f"/m/{i}" for i in range(5)]
            assert all(x["host"] == "reviews-shadow:9080" for x in shadow)
            assert all(x["body_len"] == 1000 for x in shadow)
            primary = mesh.backends.pods["v1"].requests[-1]
            assert primary["headers"].get("x-set-by-route") == "yes"
            assert "x-remove-me" not in {k.lower() for k in primary["headers"]}

    run(main())


OUTLIER_DR = destination_rule(
    """
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  outlierDetection:
    consecutive5xxErrors: 3
    interval: 1s
    baseEjectionTime: 30s
    maxEjectionPercent: 100
""",
    namespace=None,
)
NO_RETRY_VS = virtual_service(
    """
- route: [{destination: {host: reviews}}]
  retries: {attempts: 0}
""",
    namespace=None,
)


def test_outlier_detection_ejects_the_failing_endpoint(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, NO_RETRY_VS, OUTLIER_DR) as mesh:
            mesh.backends.pods["v1"].fail_all = 500
            counts = await _versions(mesh, 90, concurrency=1)
            # v1 answered 500 exactly 3 times in a row (round robin: every third request),
            # then it was ejected and got nothing more.
            assert len(mesh.backends.pods["v1"].requests) == 3
            assert counts["500"] == 3
            assert counts["v2"] + counts["v3"] == 87
            clusters = mesh.waypoint.debug_clusters()
            ejected = [e["uid"] for c in clusters for e in c["endpoints"] if e["ejected"]]
            assert ejected == ["reviews-v1"]

    run(main())


POOL_DR = destination_rule(
    """
trafficPolicy:
  connectionPool:
    tcp: {maxConnections: 1}
    http: {http1MaxPendingRequests: 1}
""",
    namespace=None,
)


def test_connection_pool_overflow_is_503_uo(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, NO_RETRY_VS, POOL_DR) as mesh, mesh.session() as s:

            async def one() -> tuple[int, str]:
                async with s.get(f"{REVIEWS}/p", headers={"x-test-delay": "0.3"}) as r:
                    return r.status, r.headers.get("x-envoy-overloaded", "")

            results = await asyncio.gather(*(one() for _ in range(6)))
            ok = [r for r in results if r[0] == 200]
            over = [r for r in results if r[0] == 503]
            # One runs, one waits (pending limit 1), the other four overflow.
            assert len(ok) == 2, results
            assert len(over) == 4, results
            assert all(flag == "true" for _, flag in over)
            served = sum(len(p.requests) for p in mesh.backends.pods.values())
            assert served == 2  # overflowed requests never reached a backend

    run(main())


PER_CONNECTION_DR = destination_rule(
    """
trafficPolicy:
  connectionPool:
    http: {maxRequestsPerConnection: %d}
""",
    namespace=None,
)


def test_max_requests_per_connection_closes_upstream_connections(tmp_path: Path) -> None:
    # main: parsed, never used: every request reused the same upstream connection.
    async def opened(limit: int) -> int:
        async with (
            waypoint_mesh(tmp_path / str(limit), NO_RETRY_VS, PER_CONNECTION_DR % limit) as mesh,
            mesh.session() as s,
        ):
            for _ in range(4):  # sequential: each finds the previous connection idle
                async with s.get(f"{REVIEWS}/p") as r:
                    assert r.status == 200
                    await r.read()
            return mesh.waypoint.upstream_pool.opened

    async def main() -> None:
        assert await opened(0) <= 3  # unlimited: reused (at most one per endpoint, 3 here)
        assert await opened(1) == 4  # one request per connection

    run(main())


HTTP_ROUTE = gateway_route(
    "HTTPRoute",
    """
parentRefs:
- {group: "", kind: Service, name: reviews, port: 9080}
rules:
- matches: [{path: {type: PathPrefix, value: /old}}]
  filters:
  - type: RequestRedirect
    requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
- matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "1"}]}]
  filters:
  - type: URLRewrite
    urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
  - type: RequestHeaderModifier
    requestHeaderModifier: {set: [{name: x-route, value: canary}], remove: [x-drop]}
  backendRefs: [{name: reviews-v2, port: 9080}]
- matches: [{path: {type: PathPrefix, value: /}}]
  filters:
  - type: RequestMirror
    requestMirror: {backendRef: {name: shadow, port: 9080}}
  backendRefs:
  - {name: reviews-v1, port: 9080, weight: 3}
  - {name: reviews-v2, port: 9080, weight: 1}
""",
    name="reviews",
)


def test_gateway_api_http_route(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, HTTP_ROUTE) as mesh:
            async with mesh.session() as s:
                async with s.get(
                    f"{REVIEWS}/old/x", allow_redirects=False, headers={"host": "reviews:9080"}
                ) as r:
                    assert r.status == 301
                    assert r.headers["location"] == "http://reviews:9080/new"
                async with s.get(
                    f"{REVIEWS}/api/items?q=1", headers={"x-canary": "1", "x-drop": "y"}
                ) as r:
                    assert r.headers["x-version"] == "v2"
                seen = mesh.backends.pods["v2"].requests[-1]
                assert seen["path"] == "/items?q=1"
                assert seen["headers"]["x-route"] == "canary"
                assert "x-drop" not in {k.lower() for k in seen["headers"]}
            counts = await _versions(mesh, 800)
            sigma = math.sqrt(800 * 0.25 * 0.75)
            assert set(counts) == {"v1", "v2"}, counts
            assert abs(counts["v2"] - 200) <= 4 * sigma, counts
            for _ in range(100):
                if len(mesh.backends.pods["shadow"].requests) >= 800:
                    break
                await asyncio.sleep(0.05)
            assert len(mesh.backends.pods["shadow"].requests) == 800

    run(main(), 180)


async def _version(s: ClientSession) -> str:
    """The version that answers a reviews request on `s` (its status when none did)."""
    async with s.get(f"{REVIEWS}/reviews/1") as r:
        await r.read()
        return r.headers.get("x-version", str(r.status))


def test_a_routing_change_applies_to_the_next_request_on_the_same_connection(
    tmp_path: Path,
) -> None:
    """The handler resolves a destination's cluster once per destination, state and config
    (session 10, `waypoint.derived`): a new config must take effect on the very next request
    of a keep-alive connection, also when the destination itself (host, subset, port) is the
    same and only what its subset selects changed."""
    to_v1 = virtual_service("- route: [{destination: {host: reviews, subset: v1}}]")
    v1_is_v3 = destination_rule("subsets: [{name: v1, labels: {version: v3}}]")

    async def main() -> None:
        async with (
            waypoint_mesh(tmp_path, to_v1, REVIEWS_DR) as mesh,
            mesh.session(limit=1) as s,  # one connection: every request after the first reuses it
        ):
            assert [await _version(s), await _version(s)] == ["v1", "v1"]
            mesh.set_config(to_v1, v1_is_v3)  # same destination, other endpoints
            assert [await _version(s), await _version(s)] == ["v3", "v3"]
            mesh.set_config(to_v1.replace("subset: v1", "subset: v2"), REVIEWS_DR)
            assert await _version(s) == "v2"
            mesh.set_config(to_v1, REVIEWS_DR)
            assert await _version(s) == "v1"

    run(main())


def _state(mutate: Callable[[dict[str, Any]], None]) -> MeshState:
    """The loopback mesh's state with `mutate` applied to (a copy of) its config."""
    cfg = copy.deepcopy(mesh_config())
    mutate(cfg)
    return MeshState.from_config(parse_mesh_config(cfg))


def test_a_state_change_applies_to_the_next_request_on_the_same_connection(
    tmp_path: Path,
) -> None:
    """As above for a new mesh state (`WaypointContext.set_state`), the config unchanged: the
    handler's per-(state, config) destination clusters and endpoint workloads
    (`waypoint.derived`) must not outlive the state they came from."""
    to_v1 = virtual_service("- route: [{destination: {host: reviews, subset: v1}}]")

    def drop_v1(cfg: dict[str, Any]) -> None:
        for wl in cfg["workloads"]:
            if wl["uid"] == "reviews-v1":
                wl["services"] = {k: v for k, v in wl["services"].items() if "/reviews." not in k}

    def v3_is_v1(cfg: dict[str, Any]) -> None:
        drop_v1(cfg)
        for wl in cfg["workloads"]:
            if wl["uid"] == "reviews-v3":
                wl["canonicalRevision"] = "v1"

    async def main() -> None:
        async with (
            waypoint_mesh(tmp_path, to_v1, REVIEWS_DR) as mesh,
            mesh.session(limit=1) as s,  # one connection: every request after the first reuses it
        ):
            assert [await _version(s), await _version(s)] == ["v1", "v1"]
            mesh.waypoint.ctx.set_state(_state(drop_v1))  # subset v1 has no endpoint
            assert await _version(s) == "503"
            mesh.waypoint.ctx.set_state(_state(v3_is_v1))  # subset v1 is the v3 pod
            assert await _version(s) == "v3"
            mesh.waypoint.ctx.set_state(_state(lambda cfg: None))
            assert await _version(s) == "v1"

    run(main())
