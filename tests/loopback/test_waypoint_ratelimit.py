"""Local rate limiting through a real waypoint on loopback: N concurrent clients against a
frozen clock are admitted exactly the bucket's size; 429s carry Envoy's body, x-ratelimit-*
headers, and the RL flag in metrics and the access log; per-route limits."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tests.loopback.test_waypoint_harness import REVIEWS, run, waypoint_mesh
from tests.waypoint_fixtures import REVIEWS_DR, SEED_VS, statuses

SERVICE_LIMIT = """
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: reviews-rl, namespace: default}
spec:
  targetRef: {kind: Service, name: reviews}
  total: {requestsPerSecond: 20}
"""

ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - name: slow
    matches: [{path: {type: PathPrefix, value: /slow}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: slow-route, namespace: default}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews, sectionName: slow}
  identity: {requestsPerSecond: 3}
"""


def test_concurrent_clients_are_admitted_exactly_the_bucket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR, SERVICE_LIMIT) as mesh:
            now = [100.0]
            mesh.waypoint.ctx.ratelimit_clock = lambda: now[0]
            mesh.waypoint.ctx.metrics.log_enabled = True
            pods = mesh.backends.pods

            async def one(s: object, i: int) -> tuple[int, dict[str, str], str]:
                # header names lower-cased (HTTP field names are case-insensitive)
                async with s.get(f"{REVIEWS}/r/{i}") as r:  # type: ignore[attr-defined]
                    return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.text()

            async with mesh.session(limit=60) as s:
                results = await asyncio.gather(*(one(s, i) for i in range(60)))
                codes = [c for c, _h, _b in results]
                assert codes.count(200) == 20, codes
                assert codes.count(429) == 40, codes
                assert sum(len(p.requests) for p in pods.values()) == 20
                _c, headers, body = next(r for r in results if r[0] == 429)
                assert body == "local_rate_limited"
                assert headers["x-ratelimit-limit"] == "20"
                assert headers["x-ratelimit-remaining"] == "0"
                assert headers["x-ratelimit-reset"] == "1"
                # Half a second later the bucket refilled 10 tokens (20/s): exactly 10 more.
                now[0] += 0.5
                results = await asyncio.gather(*(one(s, i) for i in range(30)))
                assert [c for c, _h, _b in results].count(200) == 10
            text = generate_latest(mesh.waypoint.ctx.metrics.registry).decode()
            limited = [
                x
                for x in text.splitlines()
                if x.startswith("istio_requests_total{") and 'response_code="429"' in x
            ]
            assert len(limited) == 1
            assert 'response_flags="RL"' in limited[0]
            assert limited[0].endswith(" 60.0")

    with caplog.at_level(logging.INFO, logger="waypoint.access"):
        run(main())
    entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "waypoint.access"]
    flags = [e.get("response_flags") for e in entries if e["response_code"] == 429]
    assert len(flags) == 60
    assert set(flags) == {"RL"}


def test_per_route_limit_leaves_other_routes_alone(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, ROUTE) as mesh:
            mesh.waypoint.ctx.ratelimit_clock = lambda: 5.0
            async with mesh.session() as s:
                assert await statuses(s, f"{REVIEWS}/slow/x", 5) == [200, 200, 200, 429, 429]
                assert await statuses(s, f"{REVIEWS}/fast", 10) == [200] * 10

    run(main())


def test_admitted_responses_carry_the_ratelimit_headers(tmp_path: Path) -> None:
    """Envoy's local_ratelimit with enable_x_ratelimit_headers DRAFT_VERSION_03: every response
    of a checked request carries x-ratelimit-limit/-remaining/-reset (remaining counts down);
    the 429 adds x-envoy-ratelimited; a route no policy applies to gets none of them."""

    async def main() -> None:
        async with waypoint_mesh(tmp_path, ROUTE) as mesh:
            mesh.waypoint.ctx.ratelimit_clock = lambda: 5.0
            async with mesh.session() as s:
                seen = []
                for _ in range(4):
                    async with s.get(f"{REVIEWS}/slow/x") as r:
                        h = {k.lower(): v for k, v in r.headers.items()}
                        seen.append(
                            (
                                r.status,
                                h.get("x-ratelimit-limit"),
                                h.get("x-ratelimit-remaining"),
                                h.get("x-ratelimit-reset"),
                                h.get("x-envoy-ratelimited"),
                            )
                        )
                assert seen == [
                    (200, "3", "2", "0", None),
                    (200, "3", "1", "0", None),
                    (200, "3", "0", "1", None),
                    (429, "3", "0", "1", "true"),
                ], seen
                async with s.get(f"{REVIEWS}/fast") as r:
                    assert r.status == 200
                    assert not any(k.lower().startswith("x-ratelimit") for k in r.headers)

    run(main())
