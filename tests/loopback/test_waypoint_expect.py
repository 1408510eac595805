"""``Expect: 100-continue`` through a real waypoint on loopback, HTTP/1.1 and HTTP/2: the
waypoint answers 100 itself once policy admitted the request (Envoy's default,
proxy_100_continue false), the client sends its body only then, the app gets the body without
the Expect field; a denied request gets its 403 without a 100 and nothing reaches the app."""

from __future__ import annotations

import asyncio
from pathlib import Path

import h2.events

from tests.loopback.test_waypoint_harness import (
    CLIENT_IP,
    GRPC_PORT,
    GRPC_VIP,
    PORT,
    REVIEWS_VIP,
    grpc_frame,
    run,
    start_grpc_backend,
    waypoint_mesh,
)
from tests.loopback.test_waypoint_websocket import DENY, _H2Client
from tests.waypoint_fixtures import REVIEWS_DR, SEED_VS, authorization_policy


async def _h1(path: str) -> tuple[bytes, bytes]:
    """(what came before the body was sent, the rest until the connection closed)."""
    reader, writer = await asyncio.open_connection(REVIEWS_VIP, PORT, local_addr=(CLIENT_IP, 0))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: reviews:{PORT}\r\nContent-Length: 5\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
    )
    async with asyncio.timeout(10):
        first = await reader.readuntil(b"\r\n\r\n")
        if first.startswith(b"HTTP/1.1 100"):
            writer.write(b"hello")
        rest = await reader.read()
    writer.close()
    return first, rest


DENY_GRPC = authorization_policy(
    """
targetRefs: [{kind: Service, name: grpc}]
action: DENY
rules: [{to: [{operation: {paths: ["/echo.Echo/Denied"]}}]}]
""",
    name="deny-grpc",
)


def test_expect_100_continue_on_http1_and_http2(tmp_path: Path) -> None:
    # main: over HTTP/2 no 100 was ever sent and Expect went upstream (the client waited for
    # a 100 that never came); over HTTP/1.1 a denied Expect request was drained for 1 s.
    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR, DENY, DENY_GRPC) as mesh:
            pods = mesh.backends.pods

            def seen(path: str) -> list[dict[str, object]]:
                return [r for p in pods.values() for r in p.requests if r["path"] == path]

            first, rest = await _h1("/h1")
            assert first.startswith(b"HTTP/1.1 100 Continue"), first
            assert rest.startswith(b"HTTP/1.1 200"), rest
            (got,) = seen("/h1")
            assert got["body_len"] == 5
            assert "expect" not in {k.lower() for k in got["headers"]}  # type: ignore[attr-defined]
            t0 = asyncio.get_running_loop().time()
            first, rest = await _h1("/private/h1")
            assert first.startswith(b"HTTP/1.1 403"), first  # no 100 before it
            assert asyncio.get_running_loop().time() - t0 < 0.9  # closed at once, no drain
            assert seen("/private/h1") == []

            # HTTP/2 (gRPC to a real grpcio server, the harness's HTTP/2 app).
            server = await start_grpc_backend()
            c = await _H2Client.open(GRPC_VIP, GRPC_PORT)
            try:
                for path, admitted in (("/echo.Echo/Say", True), ("/echo.Echo/Denied", False)):
                    sid = c.conn.get_next_available_stream_id()
                    c.conn.send_headers(
                        sid,
                        [
                            (":method", "POST"),
                            (":scheme", "http"),
                            (":path", path),
                            (":authority", f"grpc:{GRPC_PORT}"),
                            ("content-type", "application/grpc"),
                            ("te", "trailers"),
                            ("expect", "100-continue"),
                        ],
                    )
                    c.flush()

                    def interim(sid: int = sid) -> bool:
                        return any(
                            isinstance(ev, h2.events.InformationalResponseReceived)
                            and ev.stream_id == sid
                            for ev in c.events
                        )

                    def final(sid: int = sid) -> bool:
                        return c.status(sid) is not None

                    await c.until(lambda: interim() or final())
                    assert interim() is admitted, (path, c.events)
                    if admitted:
                        assert not final()  # the final answer waits for the body
                        c.conn.send_data(sid, grpc_frame(b"hi"), end_stream=True)
                        c.flush()
                        await c.until(lambda: b"hi" in c.data(sid))  # noqa: B023
                        assert c.status(sid) == "200"
                        assert c.data(sid) == grpc_frame(b"grpc-v1:hi")
                    else:
                        grpc_status = [
                            v
                            for ev in c.events
                            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid
                            for k, v in ev.headers or []
                            if k in ("grpc-status", b"grpc-status")
                        ]
                        assert grpc_status in (["7"], [b"7"]), c.events  # PERMISSION_DENIED
            finally:
                c.writer.close()
                await server.stop(0)

    run(main())
