"""RequestAuthentication (JWT) through a real waypoint on loopback: HBONE from the client's
node proxy, the waypoint validating tokens (inline JWKS and a jwksUri served on loopback), and
AuthorizationPolicy requestPrincipals / request.auth.claims deciding."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from meshcore.jose import b64url_decode
from tests.jwtfixtures import jwk, jwks, mint, new_key
from tests.loopback.test_waypoint_harness import REVIEWS, run, waypoint_mesh
from tests.waypoint_fixtures import jwt_required
from waypoint.jwks import JwksCache

ISS = "https://issuer.example"
REMOTE_ISS = "https://remote.example"
DEAD_ISS = "https://dead.example"
JWKS_IP, JWKS_PORT = "127.0.85.10", 8080
RSA = new_key("RS256")
EC = new_key("ES256")


def claims(iss: str = ISS, **kw: Any) -> dict[str, Any]:
    now = time.time()
    base: dict[str, Any] = {
        "iss": iss,
        "sub": "alice",
        "aud": "reviews",
        "exp": now + 600,
        "groups": ["dev"],
    }
    base.update(kw)
    return base


def policies() -> str:
    inline = jwks(jwk(RSA, "rsa-1"))
    rules = f"""
- issuer: {ISS}
  audiences: [reviews]
  jwks: '{inline}'
  outputPayloadToHeader: x-jwt-payload
- issuer: {REMOTE_ISS}
  jwksUri: http://{JWKS_IP}:{JWKS_PORT}/jwks.json
  fromHeaders: [{{name: x-token}}]
- issuer: {DEAD_ISS}
  jwksUri: http://{JWKS_IP}:{JWKS_PORT + 1}/jwks.json
  fromHeaders: [{{name: x-dead}}]
  timeout: 1s
"""
    ops = """
- to: [{operation: {paths: ["/ops*"]}}]
  when: [{key: "request.auth.claims[groups]", notValues: [ops]}]
"""
    return jwt_required(rules, paths='["/private*"]', extra_rules=ops)


async def jwks_server(hits: list[int]) -> web.AppRunner:
    doc = jwks(jwk(EC, "ec-1"))

    async def serve(_request: web.Request) -> web.Response:
        hits.append(1)
        return web.Response(text=doc, content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, JWKS_IP, JWKS_PORT).start()
    return runner


def test_jwt_through_the_waypoint(tmp_path: Path) -> None:
    async def main() -> None:
        hits: list[int] = []
        server = await jwks_server(hits)
        try:
            async with waypoint_mesh(tmp_path, policies()) as mesh:
                pods = mesh.backends.pods

                seen: list[int] = [0] * len(pods)

                def last() -> dict[str, Any]:
                    """The request the app received since the previous call."""
                    new = []
                    for i, p in enumerate(pods.values()):
                        new += p.requests[seen[i] :]
                        seen[i] = len(p.requests)
                    assert len(new) == 1, new
                    return new[0]

                def served() -> int:
                    return sum(len(p.requests) for p in pods.values())

                good = mint(RSA, "RS256", claims(), kid="rsa-1")
                ops = mint(RSA, "RS256", claims(groups=["dev", "ops"]), kid="rsa-1")
                remote = mint(EC, "ES256", claims(REMOTE_ISS, aud="x"), kid="ec-1")
                dead = mint(EC, "ES256", claims(DEAD_ISS), kid="ec-1")
                bearer = {"authorization": f"Bearer {good}"}
                cases: list[tuple[str, dict[str, str], int]] = [
                    ("/public", {}, 200),  # no token: RequestAuthentication alone allows
                    ("/private", {}, 403),  # ... an AuthorizationPolicy requires one
                    ("/private", bearer, 200),
                    ("/public", {"authorization": "Bearer garbage"}, 401),
                    (
                        "/public",
                        {
                            "authorization": "Bearer "
                            + mint(RSA, "RS256", claims(exp=time.time() - 120), kid="rsa-1")
                        },
                        401,
                    ),
                    (
                        "/public",
                        {
                            "authorization": "Bearer "
                            + mint(RSA, "RS256", claims(aud="payments"), kid="rsa-1")
                        },
                        401,
                    ),
                    (
                        "/public",
                        {"authorization": "Bearer " + mint(RSA, "none", claims(), kid="rsa-1")},
                        401,
                    ),
                    ("/ops", bearer, 403),
                    ("/ops", {"authorization": f"Bearer {ops}"}, 200),
                    ("/private", {"x-token": remote}, 200),  # jwksUri, fetched
                    ("/private", {"x-dead": dead}, 401),  # unreachable JWKS: fail closed
                    ("/public", {}, 200),  # ... and requests without a token still pass
                ]
                async with mesh.session() as s:
                    for path, headers, want in cases:
                        before = served()
                        async with s.get(f"{REVIEWS}{path}", headers=headers) as r:
                            body = await r.text()
                            assert r.status == want, (path, headers, r.status, body)
                            if want == 401:
                                assert "invalid_token" in r.headers["www-authenticate"]
                        assert served() == before + (want == 200), (path, "reached the app?")
                        got_request = last() if want == 200 else None
                        if path == "/private" and want == 200 and "authorization" in headers:
                            assert got_request is not None
                            got = {k.lower(): v for k, v in got_request["headers"].items()}
                            # forwardOriginalToken false: the token is not sent upstream; the
                            # payload header is the verified one.
                            assert "authorization" not in got
                            payload = json.loads(b64url_decode(got["x-jwt-payload"]))
                            assert payload["sub"] == "alice"
                    # A client's own payload header never reaches the app unverified.
                    async with s.get(f"{REVIEWS}/public", headers={"x-jwt-payload": "e30"}) as r:
                        assert r.status == 200
                        assert "x-jwt-payload" not in {k.lower() for k in last()["headers"]}
                assert len(hits) == 1, "the JWKS is cached"
                assert mesh.waypoint.ctx.jwks.failures == 1
        finally:
            await server.cleanup()

    run(main())


def test_jwks_cache_single_flight_retry_and_refresh() -> None:
    async def main() -> None:
        now = [0.0]
        calls: list[str] = []
        fail = [True]
        doc = jwks(jwk(EC, "ec-1")).encode()

        async def fetch(uri: str, timeout: float) -> bytes:
            calls.append(uri)
            await asyncio.sleep(0.01)
            if fail[0]:
                raise OSError("connection refused")
            return doc

        cache = JwksCache(fetch=fetch, clock=lambda: now[0], refresh=100.0, retry=10.0)
        got = await asyncio.gather(*(cache.get("u", 1.0) for _ in range(20)))
        assert got == [None] * 20
        assert len(calls) == 1
        assert await cache.get("u", 1.0) is None
        assert len(calls) == 1
        now[0] = 11.0
        fail[0] = False
        keys = await cache.get("u", 1.0)
        assert keys is not None
        assert len(calls) == 2
        now[0] = 200.0
        fail[0] = True
        assert await cache.get("u", 1.0) is keys  # refresh runs; the old keys stay in use
        await asyncio.sleep(0.05)
        assert len(calls) == 3
        assert await cache.get("u", 1.0) is keys

        async def slow(uri: str, timeout: float) -> bytes:
            await asyncio.sleep(5)
            return doc

        slow_cache = JwksCache(fetch=slow, clock=lambda: now[0])
        t0 = time.monotonic()
        assert await slow_cache.get("u", 0.2) is None
        assert time.monotonic() - t0 < 1.0  # bounded by the rule's timeout

    run(main())


def test_openid_discovery_refresh_and_bounds_through_the_waypoint(tmp_path: Path) -> None:
    """A rule with neither jwks nor jwksUri (Istio: keys from OpenID Connect discovery): the
    waypoint reads ``<issuer>/.well-known/openid-configuration``, then its ``jwks_uri``; a key
    rotation is picked up at the refresh (old keys in use until it lands); a configuration
    naming another issuer and a JWKS over 256 KiB fail closed (401), and requests without a
    token still pass."""
    base = f"http://{JWKS_IP}:{JWKS_PORT + 2}"
    good_iss, evil_iss, big_iss = f"{base}/good", f"{base}/evil", f"{base}/big"
    k1, k2 = new_key("ES256"), new_key("RS256")
    served = {"keys": jwks(jwk(k1, "k1"))}
    hits: list[str] = []

    async def config(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hits.append(f"{name}/config")
        issuer = f"{base}/{name}" if name != "evil" else "https://someone.else"
        return web.json_response({"issuer": issuer, "jwks_uri": f"{base}/{name}/keys"})

    async def keys(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hits.append(f"{name}/keys")
        text = served["keys"] if name != "big" else " " * (300 * 1024) + served["keys"]
        return web.Response(text=text, content_type="application/json")

    rules = "\n".join(
        f"  - issuer: {iss}\n    fromHeaders: [{{name: x-{n}}}]"
        for n, iss in (("good", good_iss), ("evil", evil_iss), ("big", big_iss))
    )
    policy = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: oidc, namespace: default}}
spec:
  targetRefs: [{{kind: Service, name: reviews}}]
  jwtRules:
{rules}
"""

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{name}/.well-known/openid-configuration", config)
        app.router.add_get("/{name}/keys", keys)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, JWKS_IP, JWKS_PORT + 2).start()
        try:
            async with waypoint_mesh(tmp_path, policy) as mesh:
                now = [1000.0]
                mesh.waypoint.ctx.jwks.clock = lambda: now[0]

                async def status(header: str, token: str) -> int:
                    async with s.get(f"{REVIEWS}/x", headers={header: token}) as r:
                        return r.status

                async with mesh.session() as s:
                    t1 = mint(k1, "ES256", claims(good_iss), kid="k1")
                    assert await status("x-good", t1) == 200
                    assert hits == ["good/config", "good/keys"]
                    assert await status("x-good", t1) == 200
                    assert len(hits) == 2  # cached
                    # Rotation: the provider now serves k2 only.
                    served["keys"] = jwks(jwk(k2, "k2"))
                    t2 = mint(k2, "RS256", claims(good_iss), kid="k2")
                    assert await status("x-good", t2) == 401  # not refreshed yet
                    now[0] += 20 * 60  # Istio's 20 min refresh interval
                    await status("x-good", t2)  # starts the refresh (old keys meanwhile)
                    for _ in range(100):
                        if hits.count("good/keys") == 2:
                            break
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.05)
                    assert hits.count("good/config") == 2  # configuration re-read too
                    assert await status("x-good", t2) == 200
                    assert await status("x-good", t1) == 401  # k1 is gone
                    evil = mint(k1, "ES256", claims(evil_iss), kid="k1")
                    assert await status("x-evil", evil) == 401
                    assert "evil/keys" not in hits  # the configuration was refused first
                    big = mint(k1, "ES256", claims(big_iss), kid="k1")
                    assert await status("x-big", big) == 401
                    async with s.get(f"{REVIEWS}/x") as r:
                        assert r.status == 200
                assert mesh.waypoint.ctx.jwks.failures == 2
        finally:
            await runner.cleanup()

    run(main())
