"""The `waypoint` command as a real process in static mode: serves the seed VirtualService,
reloads on SIGHUP (a bad file keeps the running config), exposes metrics, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

from tests.loopback.test_waypoint_harness import (
    REVIEWS,
    run,
    static_waypoint_argv,
    waypoint_mesh,
)
from tests.waypoint_fixtures import REVIEWS_DR, SEED_VS, versions, virtual_service

ADMIN = ("127.0.84.10", 15920)
DEBUG_PORT = 15900
ALL_V3 = virtual_service(
    """
- route: [{destination: {host: reviews, subset: v3}}]
""",
    name="reviews-route",
    namespace=None,
)


async def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def _wait_ready(proc: asyncio.subprocess.Process) -> None:
    for _ in range(200):
        if proc.returncode is not None:
            raise AssertionError(f"waypoint exited with {proc.returncode}")
        try:
            status, _ = await _get(*ADMIN, "/healthz/ready")
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("waypoint not ready")


def test_waypoint_cli_static_mode_reload_and_drain(tmp_path: Path) -> None:
    l7 = tmp_path / "l7.yaml"
    l7.write_text(SEED_VS + "---\n" + REVIEWS_DR)

    async def main() -> None:
        async with waypoint_mesh(tmp_path, start_waypoint=False) as mesh:
            proc = await asyncio.create_subprocess_exec(
                *static_waypoint_argv(
                    tmp_path,
                    "--config",
                    str(l7),
                    "--admin",
                    f"{ADMIN[0]}:{ADMIN[1]}",
                    "--debug-listen",
                    f"127.0.0.1:{DEBUG_PORT}",
                ),
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await _wait_ready(proc)
                async with mesh.session() as s:

                    def reviews(n: int, headers: dict[str, str]) -> Awaitable[Counter[str]]:
                        return versions(s, [f"{REVIEWS}/r"] * n, headers)

                    assert await reviews(20, {"user-type": "beta-tester"}) == {"v2": 20}
                    # Reload: everything to v3.
                    l7.write_text(ALL_V3 + "---\n" + REVIEWS_DR)
                    proc.send_signal(signal.SIGHUP)
                    for _ in range(100):
                        if (await reviews(1, {}))["v3"]:
                            break
                        await asyncio.sleep(0.05)
                    assert await reviews(10, {"user-type": "beta-tester"}) == {"v3": 10}
                    # A broken file is refused; the running config stays.
                    l7.write_text("kind: VirtualService\n  bad: [yaml")
                    proc.send_signal(signal.SIGHUP)
                    await asyncio.sleep(0.3)
                    assert await reviews(5, {}) == {"v3": 5}
                status, body = await _get(*ADMIN, "/metrics")
                assert status == 200
                assert b'reporter="waypoint"' in body
                assert b"istio_requests_total{" in body
                status, body = await _get("127.0.0.1", DEBUG_PORT, "/debug/config")
                assert b"default/reviews.default.svc.cluster.local" in body
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 15) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
            assert "reload refused" in stderr

    run(main())
