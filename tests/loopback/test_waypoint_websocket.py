"""WebSocket (HTTP/1.1 Upgrade) through a real waypoint on loopback, with policy on the
handshake. main: Upgrade was stripped as hop-by-hop, so the handshake never completed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import h2.config
import h2.connection
import h2.events
import pytest

from tests.loopback.test_waypoint_harness import (
    CLIENT_IP,
    PORT,
    REVIEWS,
    REVIEWS_VIP,
    run,
    waypoint_mesh,
)
from tests.waypoint_fixtures import REVIEWS_DR, SEED_VS, authorization_policy

DENY = authorization_policy(
    """
targetRefs: [{kind: Service, name: reviews}]
action: DENY
rules: [{to: [{operation: {paths: ["/private*"]}}]}]
""",
    name="deny-private",
)


def test_websocket_through_the_waypoint(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR, DENY) as mesh:
            pods = mesh.backends.pods
            async with mesh.session() as s:
                async with s.ws_connect(
                    f"{REVIEWS}/ws", headers={"user-type": "beta-tester"}
                ) as ws:
                    for i in range(20):
                        await ws.send_str(f"m{i}")
                        assert (await ws.receive_str(timeout=5)) == f"v2:m{i}"  # routed to v2
                    big = bytes(range(256)) * 4096  # 1 MiB, both ways through flow control
                    await ws.send_bytes(big)
                    assert (await ws.receive_bytes(timeout=10)) == b"v2:" + big
                # Policy applies to the handshake: denied, and the app never saw it.
                before = sum(len(p.requests) for p in pods.values())
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await s.ws_connect(f"{REVIEWS}/private/ws")
                assert err.value.status == 403
                assert sum(len(p.requests) for p in pods.values()) == before
                # A plain request after that still works (new connection).
                async with s.get(f"{REVIEWS}/reviews/1") as r:
                    assert r.status == 200
            assert mesh.waypoint.handler.upstreams["http/1.1-upgrade"].upgraded == 1  # type: ignore[attr-defined]

    run(main())


def _ws_frame(payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A masked client text frame (RFC 6455 §5.2), payload < 126 bytes."""
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


class _H2Client:
    """A raw HTTP/2 client (h2) in the client pod, for RFC 8441 extended CONNECT."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.events: list[h2.events.Event] = []

    @classmethod
    async def open(cls, host: str = REVIEWS_VIP, port: int = PORT) -> _H2Client:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(CLIENT_IP, 0))
        c = cls(reader, writer)
        c.conn.initiate_connection()
        c.flush()
        await c.until(lambda: c.conn.remote_settings.enable_connect_protocol == 1)
        return c

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def until(self, cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not cond():
                data = await self.reader.read(65536)
                assert data, "connection closed"
                for ev in self.conn.receive_data(data):
                    self.events.append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self.flush()

    def connect(self, path: str, *extra: tuple[str, str]) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [
                (":method", "CONNECT"),
                (":protocol", "websocket"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"reviews:{PORT}"),
                ("sec-websocket-version", "13"),
                *extra,
            ],
        )
        self.flush()
        return sid

    def status(self, sid: int) -> str | None:
        for ev in self.events:
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                for k, v in ev.headers or []:
                    if k in (":status", b":status"):
                        return v.decode() if isinstance(v, bytes) else str(v)
        return None

    def data(self, sid: int) -> bytes:
        got = [ev for ev in self.events if isinstance(ev, h2.events.DataReceived)]
        return b"".join(ev.data or b"" for ev in got if ev.stream_id == sid)


def test_websocket_over_http2_extended_connect(tmp_path: Path) -> None:
    """RFC 8441 through the waypoint: SETTINGS_ENABLE_CONNECT_PROTOCOL is advertised, a
    CONNECT with :protocol websocket gets :status 200 and carries WebSocket frames to the
    HTTP/1.1 app (upgraded upstream) and back; policy decides the handshake (403, never sent
    upstream); routing applies (user-type header -> v2)."""

    # main: the waypoint did not advertise extended CONNECT and refused CONNECT (400).
    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR, DENY) as mesh:
            pods = mesh.backends.pods
            c = await _H2Client.open()
            sid = c.connect("/ws")
            await c.until(lambda: c.status(sid) is not None)
            assert c.status(sid) == "200"
            for i in range(5):
                c.conn.send_data(sid, _ws_frame(f"m{i}".encode()))
                c.flush()
                want = f":m{i}".encode()
                await c.until(lambda want=want: want in c.data(sid))  # type: ignore[misc]
            frames = c.data(sid)
            assert frames.startswith(b"\x81")  # unmasked server text frames, raw through
            assert b"v1:m0" in frames or b"v2:m0" in frames
            # A denied handshake: 403 on its stream, the app never saw it.
            before = sum(len(p.requests) for p in pods.values())
            denied = c.connect("/private/ws")
            await c.until(lambda: c.status(denied) is not None)
            assert c.status(denied) == "403"
            assert sum(len(p.requests) for p in pods.values()) == before
            # The app answers without switching (200): never a 2xx to the client, which would
            # take it for an open WebSocket.
            plain = c.connect("/ws-refused", ("x-test-no-upgrade", "1"))
            await c.until(lambda: c.status(plain) is not None)
            assert c.status(plain) == "502"
            # The client ends its stream: the upgraded connection closes cleanly.
            c.conn.end_stream(sid)
            c.flush()
            await c.until(
                lambda: any(
                    isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid for ev in c.events
                )
            )
            c.writer.close()
            ws = [p for p in pods.values() if any(r["path"] == "/ws" for r in p.requests)]
            assert len(ws) == 1
            hs = next(r for r in ws[0].requests if r["path"] == "/ws")
            assert hs["method"] == "GET"
            assert hs["headers"].get("Upgrade", "").lower() == "websocket"
            assert hs["headers"].get("Sec-WebSocket-Key")  # generated for the HTTP/1.1 app

    run(main())
