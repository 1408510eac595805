"""Mirroring of any body size with bounded memory through a real waypoint on loopback: a 64 MiB
request body is copied to the shadow as it streams (a fast mirror gets all of it); a slow
mirror (16 KiB per 0.1 s: 64 MiB would take ~7 min) is dropped once it falls 4 MiB behind, and
the primary keeps its speed; the process's RSS (waypoint, node proxies and backends share it)
never grows by anything near the body's size."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import generate_latest

from tests.loopback.test_waypoint_harness import REVIEWS, run, waypoint_mesh
from tests.waypoint_fixtures import REVIEWS_DR, virtual_service

MIRROR_VS = virtual_service(
    """
- route: [{destination: {host: reviews, subset: v1}}]
  timeout: 120s
  mirror: {host: shadow}
  mirrorPercentage: {value: 100.0}
""",
)
SIZE = 64 * 1024 * 1024
BLOCK = b"m" * (256 * 1024)


async def body() -> AsyncIterator[bytes]:
    for _ in range(SIZE // len(BLOCK)):
        yield BLOCK


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_64mib_body_is_mirrored_streaming_and_a_slow_mirror_is_dropped(tmp_path: Path) -> None:
    # main: bodies over 64 KiB were never mirrored (the copy waited for a complete, buffered
    # body), so the shadow saw nothing here.
    async def main() -> None:
        async with (
            waypoint_mesh(tmp_path, MIRROR_VS, REVIEWS_DR) as mesh,
            mesh.session(timeout=120) as s,
        ):
            pods = mesh.backends.pods
            peak = [rss()]
            base = peak[0]

            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], rss())
                    await asyncio.sleep(0.02)

            sampler = asyncio.get_running_loop().create_task(sample())
            try:
                # 1. A fast mirror: the whole 64 MiB arrives at the shadow, as a stream.
                async with s.post(f"{REVIEWS}/sink", data=body()) as r:
                    assert r.status == 200
                    assert await r.text() == str(SIZE)
                for _ in range(500):
                    if pods["shadow"].requests and pods["shadow"].requests[-1]["complete"]:
                        break
                    await asyncio.sleep(0.02)
                shadow = pods["shadow"].requests[-1]
                assert shadow["host"] == "127.0.83.10-shadow:9080"  # authority + -shadow
                assert shadow["body_len"] == SIZE
                assert shadow["complete"]

                # 2. A slow mirror: dropped; the primary is not slowed to its pace.
                t0 = time.monotonic()
                hdrs = {"x-test-slow-shadow": "1"}
                async with s.post(f"{REVIEWS}/sink", data=body(), headers=hdrs) as r:
                    assert r.status == 200
                    assert await r.text() == str(SIZE)
                took = time.monotonic() - t0
                slow = pods["shadow"].requests[-1]
                assert "x-test-slow-shadow" in slow["headers"]
                for _ in range(200):
                    if not mesh.waypoint.handler.mirrors:
                        break
                    await asyncio.sleep(0.05)
            finally:
                sampler.cancel()
            text = generate_latest(mesh.waypoint.ctx.metrics.registry).decode()
            print(
                f"primary 64 MiB with a slow mirror: {took:.1f}s; RSS +{(peak[0] - base) >> 20} "
                f"MiB; shadow got {slow['body_len'] >> 10} KiB"
            )
            # At 160 KiB/s the shadow would hold the primary for ~7 minutes.
            assert took < 60, took
            assert 0 < slow["body_len"] < SIZE // 4
            assert not slow["complete"]
            assert 'waypoint_mirror_requests_total{result="dropped"} 1.0' in text
            assert 'waypoint_mirror_requests_total{result="completed"} 1.0' in text
            # Two 64 MiB bodies went through the process: its RSS never grew by one.
            assert peak[0] - base < 40 * 1024 * 1024, (peak[0] - base) >> 20

    run(main(), timeout=200)
