"""HTTP/2 and gRPC through the waypoint; big and slow bodies do not stall other requests."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from tests.loopback.test_waypoint_harness import (
    GRPC_PORT,
    GRPC_VIP,
    REVIEWS,
    H2Client,
    grpc_frame,
    run,
    start_grpc_backend,
    waypoint_mesh,
)
from tests.waypoint_fixtures import REVIEWS_DR, SEED_VS, virtual_service

GRPC_VS = virtual_service(
    """
- match: [{uri: {exact: /echo.Echo/Fail}}]
  retries: {attempts: 0}
  route: [{destination: {host: grpc}}]
- match: [{headers: {x-deny: {exact: "1"}}}]
  fault: {abort: {httpStatus: 503}}
  route: [{destination: {host: grpc}}]
- route: [{destination: {host: grpc}}]
""",
    name="grpc",
    namespace=None,
    hosts="grpc",
)
GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


def test_grpc_and_http2_pass_through(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, GRPC_VS) as mesh:
            server = await start_grpc_backend()
            client = H2Client()
            try:
                await client.connect(GRPC_VIP, GRPC_PORT)
                auth = f"grpc:{GRPC_PORT}"
                # 50 concurrent unary calls multiplexed on one client connection.
                results = await asyncio.gather(
                    *(
                        client.request(
                            "POST",
                            "/echo.Echo/Say",
                            GRPC_HEADERS,
                            grpc_frame(b"call-%d" % i),
                            authority=auth,
                        )
                        for i in range(50)
                    )
                )
                for i, res in enumerate(results):
                    assert res.status == 200
                    assert res.reset is None
                    assert res.body == grpc_frame(b"grpc-v1:call-%d" % i)
                    assert res.trailers.get("grpc-status") == "0"  # trailers passed through
                    assert res.headers.get("x-version") == "grpc-v1"
                stream = await client.request(
                    "POST", "/echo.Echo/Many", GRPC_HEADERS, grpc_frame(b"5"), authority=auth
                )
                assert stream.body == b"".join(grpc_frame(b"msg-%d" % i) for i in range(5))
                assert stream.trailers["grpc-status"] == "0"
                fail = await client.request(
                    "POST", "/echo.Echo/Fail", GRPC_HEADERS, grpc_frame(b"x"), authority=auth
                )
                assert fail.headers.get("grpc-status") == "14"  # trailers-only error kept
                local = await client.request(
                    "POST",
                    "/echo.Echo/Say",
                    [*GRPC_HEADERS, ("x-deny", "1")],
                    grpc_frame(b"x"),
                    authority=auth,
                )
                # A local reply to a gRPC client is a gRPC status, not an HTML page.
                assert local.status == 200
                assert local.headers["grpc-status"] == "14"
                # Multiplexed upstream: far fewer HBONE streams than calls.
                assert mesh.waypoint.upstream_pool.opened <= 3
            finally:
                await client.close()
                await server.stop(0)

    run(main())


def test_huge_and_slow_bodies_do_not_stall_other_requests(tmp_path: Path) -> None:
    size = 48 * 1024 * 1024

    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR) as mesh:
            beta = {"user-type": "beta-tester"}
            async with mesh.session(limit=50, timeout=120) as s:
                # 1. A download nobody reads for a while: flow control holds it back (bounded
                #    memory) while other requests go through the same pooled HBONE connections.
                stalled = await s.get(f"{REVIEWS}/big?n={size}&cl=1", headers=beta)
                assert stalled.status == 200

                # 2. A slow upload (a chunk every 50 ms) in parallel.
                async def slow_body() -> object:
                    for _ in range(10):
                        yield b"s" * 1000
                        await asyncio.sleep(0.05)

                slow = asyncio.create_task(
                    s.post(f"{REVIEWS}/echo", data=slow_body(), headers=beta)
                )
                latencies = []
                for i in range(50):
                    t0 = time.monotonic()
                    async with s.get(f"{REVIEWS}/reviews/{i}") as r:
                        assert r.status == 200
                        await r.read()
                    latencies.append(time.monotonic() - t0)
                latencies.sort()
                assert latencies[-2] < 0.25, latencies[-5:]
                slow_resp = await slow
                assert slow_resp.status == 200
                assert len(await slow_resp.read()) == 10_000
                # 3. The stalled download now arrives intact.
                got = 0
                async for chunk in stalled.content.iter_chunked(1 << 20):
                    got += len(chunk)
                assert got == size
                stalled.release()
                # 4. A huge upload streams through (echoed back), chunked both ways.
                payload = hashlib.shake_256(b"seed").digest(size)
                digest = hashlib.sha256()
                async with s.post(f"{REVIEWS}/echo", data=payload, headers=beta) as r:
                    n = 0
                    async for chunk in r.content.iter_chunked(1 << 20):
                        digest.update(chunk)
                        n += len(chunk)
                assert n == size
                assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
                assert mesh.backends.pods["v2"].requests[-1]["body_len"] == size

    run(main(), 180)
