"""Consistent-hash load balancing through a real waypoint: one user, one pod."""

from __future__ import annotations

from pathlib import Path

from aiohttp import DummyCookieJar

from tests.loopback.test_waypoint_harness import REVIEWS, run, waypoint_mesh
from tests.waypoint_fixtures import destination_rule

DR = destination_rule(
    """
trafficPolicy:
  loadBalancer: {consistentHash: {httpHeaderName: x-user}}
""",
)


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


COOKIE_DR = destination_rule(
    """
trafficPolicy:
  loadBalancer:
    consistentHash:
      httpCookie: {name: route, ttl: 600s, path: /, attributes: [{name: SameSite, value: Lax}]}
      maglev: {tableSize: 65537}
""",
)


def test_generated_cookie_pins_the_session(tmp_path: Path) -> None:
    """httpCookie with a ttl: a request without the cookie gets ``Set-Cookie`` from the waypoint
    (Envoy's shape), and the session that sends it back stays on one pod (Maglev table); a
    request that already has the cookie gets no new one."""

    async def main() -> None:
        async with (
            waypoint_mesh(tmp_path, COOKIE_DR) as mesh,
            mesh.session(cookie_jar=DummyCookieJar()) as s,  # cookies sent by hand
        ):
            homes: list[str] = []
            for _session in range(12):
                async with s.get(f"{REVIEWS}/r") as r:
                    assert r.status == 200
                    (cookie,) = r.headers.getall("set-cookie")
                    home = r.headers["x-version"]
                name_value, *attrs = cookie.split("; ")
                assert name_value.startswith('route="')
                assert len(name_value) == 7 + 17
                assert attrs == ["Max-Age=600", "Path=/", "SameSite=Lax", "HttpOnly"]
                for _ in range(5):
                    async with s.get(f"{REVIEWS}/r", headers={"cookie": name_value}) as r:
                        assert r.status == 200
                        assert "set-cookie" not in r.headers
                        assert r.headers["x-version"] == home
                homes.append(home)
            assert len(set(homes)) >= 2  # sessions spread over the pods

    run(main())
