"""CORS through a real waypoint: allowed preflights answered by the waypoint (never reach the
app), actual requests decorated, other origins untouched. main: corsPolicy was ignored."""

from __future__ import annotations

from pathlib import Path

from tests.loopback.test_waypoint_harness import REVIEWS, run, waypoint_mesh
from tests.waypoint_fixtures import REVIEWS_DR, virtual_service

VS = virtual_service(
    """
- corsPolicy:
    allowOrigins: [{exact: "https://app.example"}]
    allowMethods: [GET, POST]
    allowHeaders: [x-a]
    exposeHeaders: [x-version]
    maxAge: 10m
  route: [{destination: {host: reviews, subset: v1}}]
""",
    name="reviews-route",
)


def test_cors_at_the_waypoint(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, VS, REVIEWS_DR) as mesh:
            pods = mesh.backends.pods

            def served() -> int:
                return sum(len(p.requests) for p in pods.values())

            async with mesh.session() as s:
                pre = {"origin": "https://app.example", "access-control-request-method": "POST"}
                async with s.options(f"{REVIEWS}/api", headers=pre) as r:
                    assert r.status == 200
                    assert r.headers["access-control-allow-origin"] == "https://app.example"
                    assert r.headers["access-control-allow-methods"] == "GET,POST"
                    assert r.headers["access-control-max-age"] == "600"
                assert served() == 0, "an allowed preflight is answered by the waypoint"
                async with s.get(f"{REVIEWS}/api", headers={"origin": "https://app.example"}) as r:
                    assert r.status == 200
                    assert r.headers["access-control-allow-origin"] == "https://app.example"
                    assert r.headers["access-control-expose-headers"] == "x-version"
                evil = {"origin": "https://evil.example", "access-control-request-method": "GET"}
                async with s.options(f"{REVIEWS}/api", headers=evil) as r:
                    assert "access-control-allow-origin" not in r.headers
                assert served() == 2, "an unmatched preflight is forwarded (FORWARD default)"
                async with s.get(f"{REVIEWS}/api", headers={"origin": "https://evil.example"}) as r:
                    assert "access-control-allow-origin" not in r.headers

    run(main())
