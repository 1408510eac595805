"""HTTP/1.1 Upgrade (WebSocket) through the waypoint, policy applied to the handshake.

Owns: `upgrade_of` (which Upgrade a request asks for), `RawBody` (the client's bytes after the
handshake, as the request "body"), and `UpgradeUpstreams` (the `waypoint.handler.Upstreams` for
upgrade requests: a fresh, never pooled HBONE stream to the endpoint; the handshake request with
``Connection: upgrade`` and ``Upgrade``; a ``101 Switching Protocols`` answer makes both
directions raw bytes until either side closes; any other answer is an ordinary response and
the connection is not reused).

Semantics (RFC 9110 §7.8, RFC 6455 §4; Istio enables Envoy's ``websocket`` upgrade on every HTTP
route): only ``websocket`` is upgraded; another Upgrade value is dropped as a hop-by-hop field
(the request proceeds as plain HTTP, as before). The handshake is an ordinary request for the
handler: RequestAuthentication, AuthorizationPolicy, routing, rate limits and faults decide it
before anything goes upstream; a denied handshake is answered (401/403/429...) and never
reaches the app. After a 101 the waypoint relays bytes without interpreting WebSocket frames.

Invariants: the response head read from the upstream is bounded (`waypoint.protocol.http1` limits);
the relay uses the tunnels' flow control (`waypoint.tunnel.TunnelIO`), so memory per upgraded
connection is bounded whatever the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence

from meshcore.errors import HboneError, PeerVerificationError
from meshcore.hbone.pool import PoolKey
from waypoint.body import ReplayBody
from waypoint.context import WaypointContext
from waypoint.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamReset
from waypoint.protocol import http1
from waypoint.protocol.cluster import EndpointStats
from waypoint.tunnel import TunnelIO
from waypoint.upstream import (
    HBONE_PORT,
    EndpointKey,
    H1Conn,
    UpstreamPool,
    UpstreamRequest,
    poll_head,
)

PROTOCOL = "http/1.1-upgrade"
"""`Request.protocol` of an upgrade request (selects `UpgradeUpstreams` in the handler)."""
UPGRADES = frozenset({"websocket"})


def upgrade_of(headers: Sequence[tuple[str, str]]) -> str | None:
    """The Upgrade a request asks for (RFC 9110 §7.8: ``Connection: upgrade`` + ``Upgrade``),
    lower-cased, when it is one the mesh upgrades; else None."""
    conn = http1.header_value(headers, "connection") or ""
    if "upgrade" not in [t.strip().lower() for t in conn.split(",")]:
        return None
    value = (http1.header_value(headers, "upgrade") or "").strip().lower()
    return value if value in UPGRADES else None


class RawBody:
    """The client's bytes after the handshake head (what the parser had buffered, then the
    tunnel until EOF)."""

    def __init__(self, io: TunnelIO, leftover: bytes) -> None:
        self.io = io
        self.leftover = leftover
        self.trailers: tuple[tuple[str, str], ...] = ()

    async def read(self) -> bytes:
        if self.leftover:
            data, self.leftover = self.leftover, b""
            return data
        return await self.io.read()


class _Response:
    """An `UpstreamResponse` over one upstream stream (raw after a 101)."""

    def __init__(
        self,
        head: http1.ResponseHead,
        parser: http1.Http1Parser,
        up: TunnelIO,
        pump: asyncio.Task[None] | None,
    ) -> None:
        self.status = head.status
        self.headers = list(head.headers)
        self.content_length = None if head.status == 101 else head.content_length
        self.parser = parser
        self.up = up
        self.pump = pump
        self.raw = head.status == 101
        self._leftover = parser.take_buffered() if self.raw else b""
        self._bytes = 0
        self._done = False

    @property
    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ()

    @property
    def body_bytes(self) -> int:
        return self._bytes

    async def read(self) -> bytes:
        if self._done:
            return b""
        if self.raw:
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                data = await self.up.read()
            if not data:
                self._done = True
                # Upstream finished: let the client's direction finish too (half-close).
                if self.pump is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(self.pump), 1.0)
            self._bytes += len(data)
            return data
        while True:
            ev = self.parser.next_event()
            if ev is None:
                more = await self.up.read()
                if more:
                    self.parser.feed(more)
                else:
                    self.parser.feed_eof()
                continue
            if isinstance(ev, http1.Body):
                self._bytes += len(ev.data)
                return ev.data
            self._done = True
            return b""

    def finish(self) -> None:
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
        if self.up.closed:
            self.up.close()
        else:
            self.up.reset()


class UpgradeUpstreams:
    def __init__(self, ctx: WaypointContext, pool: UpstreamPool) -> None:
        self.ctx = ctx
        self.pool = pool
        self.upgraded = 0

    async def _open(self, ep: EndpointStats, connect_timeout: float) -> TunnelIO:
        up = TunnelIO()
        pk = PoolKey(
            source=self.ctx.settings.identity,
            expected=(ep.identity,),
            address=(ep.ip, HBONE_PORT),
            source_ip=self.pool.source_ip,
        )
        authority = f"[{ep.ip}]:{ep.port}" if ":" in ep.ip else f"{ep.ip}:{ep.port}"
        try:
            async with asyncio.timeout(connect_timeout):
                up.stream = await self.ctx.pool.open_stream(pk, authority, (), up)
        except HboneError as err:
            raise UpstreamConnectError(f"CONNECT {authority}: {err}") from err
        except (OSError, ConnectionError, TimeoutError, PeerVerificationError, ssl.SSLError) as err:
            raise UpstreamConnectError(f"HBONE to {ep.ip}: {err or type(err).__name__}") from err
        return up

    async def send(
        self, request: UpstreamRequest, ep: EndpointStats, connect_timeout: float
    ) -> _Response:
        req = request.req
        up = await self._open(ep, connect_timeout)
        upgrade = req.extra.get("upgrade", "websocket")
        head = [
            ("host", request.authority),
            *request.headers,
            ("connection", "upgrade"),
            ("upgrade", upgrade),
        ]
        # The head is read as every HTTP/1.1 upstream's is (`poll_head`: 1xx heads skipped
        # and capped, a 101 final here); this connection is never pooled.
        conn = H1Conn(EndpointKey(ep.ip, ep.port, ep.identity), up)
        conn.parser.expect_response_to(req.method)
        try:
            up.write(http1.encode_request_head(req.method, request.target, head))
            await up.drain()
            ev = poll_head(conn, upgrade=True)
            while ev is None:
                await up.readable()
                ev = poll_head(conn, upgrade=True)
        except (UpstreamProtocolError, UpstreamReset) as err:
            up.reset()
            raise err
        except ConnectionError as err:
            up.reset()
            raise UpstreamReset(f"upstream reset during the handshake: {err}") from err
        pump = None
        if ev.status == 101:
            self.upgraded += 1
            pump = asyncio.ensure_future(_pump(request.replay, up))
        return _Response(ev, conn.parser, up, pump)


async def _pump(replay: ReplayBody, up: TunnelIO) -> None:
    """Client -> upstream after the 101; the client's EOF half-closes the upstream."""
    try:
        async for chunk in replay.iterate():
            up.write(chunk)
            await up.drain()
        up.write_eof()
    except ConnectionError:
        up.reset()
