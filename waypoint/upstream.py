"""Upstream side of the waypoint: requests to a chosen endpoint over HBONE, with the
WAYPOINT's identity, through the endpoint's node proxy (:authority ``endpoint_ip:target_port``).

Owns: the `Upstreams` interface the handler sends a request through (one per protocol: this
module's for HTTP/1.1, `waypoint.http2` and `waypoint.upgrade` for the others), the
`UpstreamRequest` it sends (built once per request, the same for every try) and the
`UpstreamResponse` it gets back; `UpstreamPool` (idle HTTP/1.1 connections per endpoint, each one
HBONE CONNECT stream on a pooled mTLS connection from `meshcore.hbone.pool.HbonePool`; its
`request_h1` writes one request and reads its response head, `H1Response` streams the body),
`H1Conn` (one such connection), `poll_head` (the one reader of an HTTP/1.1 response head off
an upstream, 1xx heads skipped, `waypoint.upgrade`'s too), and the mapping of
failures to the error tree: the CONNECT refused or the TLS/TCP connect failing ->
`UpstreamConnectError` (retry condition connect-failure), a reset or EOF before the response head
-> `UpstreamReset` (reset), a bad response -> `UpstreamProtocolError`.

Invariants:
- A connection goes back to the idle list only when its response was read to the end, the
  request body was fully written, and both sides said keep-alive; anything else resets the
  tunnel stream (never a half-read connection reused).
- A request that fails on a REUSED idle connection before any response byte is retried once
  on a fresh connection when its body can be replayed (the server may have closed the idle
  connection as we reused it, RFC 9112 §9.3.1 retry of idempotent/unsent requests).
- DestinationRule ``connectionPool.http``: a connection that served ``maxRequestsPerConnection``
  requests is closed instead of reused; one idle longer than ``idleTimeout`` (or the pool's
  own limit, whichever is shorter) is closed.
- HTTP/1 trailers are neither sent nor passed on (Envoy's default ``enable_trailers`` false).
- The request body is pumped concurrently with reading the response (a server may answer
  before reading everything) with backpressure from the tunnel's send window.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, NamedTuple, Protocol

from meshcore.errors import HboneError, PeerVerificationError
from meshcore.hbone.pool import HbonePool, PoolKey
from meshcore.identity import SpiffeId
from waypoint.body import ReplayBody, Request
from waypoint.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamReset
from waypoint.protocol import http1
from waypoint.protocol.cluster import EndpointStats
from waypoint.tunnel import TunnelIO

HBONE_PORT = 15008


class EndpointKey(NamedTuple):
    """An endpoint as the pools key their connections (immutable; built per request: a
    NamedTuple, cheaper to build, hash and compare than a frozen dataclass)."""

    ip: str
    port: int
    identity: SpiffeId


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[str, str]]
    content_length: int | None

    @property
    def trailers(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def body_bytes(self) -> int: ...

    async def read(self) -> bytes: ...

    def finish(self) -> None: ...


class UpstreamRequest(NamedTuple):
    """A request as it goes upstream: built once per request by the handler, and sent as is by
    every try (a mirror sends a copy with its own authority and body). Immutable; a NamedTuple
    rather than a frozen dataclass because it is built per request, and a frozen dataclass's
    ``__init__`` (one ``object.__setattr__`` per field) costs several times a tuple's."""

    req: Request
    target: str
    """The (rewritten) origin-form target."""
    authority: str
    headers: list[tuple[str, str]]
    """Forwarded fields: no pseudo-headers, no host, no framing."""
    replay: ReplayBody
    """The body, replayable for retries within its buffer."""


class Upstreams(Protocol):
    """What the handler needs from the upstream side (per protocol)."""

    async def send(
        self, up: UpstreamRequest, ep: EndpointStats, connect_timeout: float
    ) -> UpstreamResponse: ...


class H1Conn:
    """An HTTP/1.1 connection to one endpoint, carried by one HBONE stream."""

    def __init__(self, key: EndpointKey, io: TunnelIO) -> None:
        self.key = key
        self.io = io
        self.parser = http1.Http1Parser(http1.Role.RESPONSE)
        self.requests = 0
        self.idle_since = 0.0
        self.eof = False
        self.max_requests = 0
        """DestinationRule maxRequestsPerConnection (0 = unlimited)."""
        self.idle_timeout: float | None = None
        """DestinationRule http idleTimeout (None: the pool's)."""

    @property
    def usable(self) -> bool:
        return not self.eof and not self.io.closed and not self.io.sent_eof and self.parser.idle

    def poll(self) -> http1.Event | None:
        """The next response event if what has arrived holds one, else None (await
        `io.readable()`); ConnectionResetError if the stream ends between messages."""
        parser = self.parser
        while True:
            ev = parser.next_event()
            if ev is not None:
                return ev
            if self.eof:
                raise ConnectionResetError("upstream closed the connection")
            data = self.io.take()
            if data is None:
                return None
            if data:
                parser.feed(data)
            else:
                self.eof = True
                parser.feed_eof()

    async def next_event(self) -> http1.Event:
        """The next response event (`poll`, waiting as needed)."""
        while True:
            ev = self.poll()
            if ev is not None:
                return ev
            await self.io.readable()


class H1Response:
    """The response of one exchange; read the body with `read()`, then `finish()`."""

    def __init__(
        self,
        pool: UpstreamPool,
        conn: H1Conn,
        head: http1.ResponseHead,
        pump: asyncio.Task[None] | None,
        keep_alive_request: bool,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.head = head
        self.status = head.status
        self.headers = list(head.headers)
        self.content_length = head.content_length
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.done = False
        self.body_bytes = 0
        self._pump = pump
        self._keep_alive_request = keep_alive_request
        self._finished = False

    async def read(self) -> bytes:
        if self.done:
            return b""
        try:
            # The body of a small response came with its head: no wait (nor coroutine), and
            # one poll per wake-up.
            conn = self.conn
            ev = conn.poll()
            while ev is None:
                await conn.io.readable()
                ev = conn.poll()
        except http1.HttpParseError as err:
            raise UpstreamProtocolError(str(err)) from err
        if isinstance(ev, http1.Body):
            self.body_bytes += len(ev.data)
            return ev.data
        if isinstance(ev, http1.EndOfMessage):
            self.done = True  # HTTP/1 trailers are not forwarded (Envoy's default)
            return b""
        raise UpstreamProtocolError("unexpected message head inside a response body")

    def finish(self) -> None:
        """Release the connection: back to the idle list if cleanly reusable, else reset."""
        if self._finished:
            return
        self._finished = True
        pump = self._pump
        pump_ok = True
        if pump is not None:
            pump_ok = pump.done() and not pump.cancelled() and pump.exception() is None
            if not pump.done():
                pump.cancel()
        if self.done and pump_ok and self.head.keep_alive and self._keep_alive_request:
            self.pool.release(self.conn)
        else:
            self.conn.io.reset()


async def _pump_body(io: TunnelIO, body: AsyncIterator[bytes], chunked: bool) -> None:
    async for chunk in body:
        io.write(http1.encode_chunk(chunk) if chunked else chunk)
        await io.drain()
    if chunked:
        io.write(http1.encode_last_chunk())  # no trailers (module docstring)


class UpstreamPool:
    def __init__(
        self,
        hbone: HbonePool,
        identity: SpiffeId,
        *,
        clock: Callable[[], float],
        idle_timeout: float = 60.0,
        max_idle_per_endpoint: int = 64,
    ) -> None:
        self.hbone = hbone
        self.source_ip: str | None = None
        """Bind upstream connections to the waypoint's own address (what node proxies see; set
        once the waypoint knows its bound address)."""
        self.identity = identity
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle_per_endpoint
        self._idle: dict[EndpointKey, list[H1Conn]] = {}
        self.opened = 0
        self.reused = 0

    async def _open(self, key: EndpointKey, connect_timeout: float) -> H1Conn:
        io = TunnelIO()
        pk = PoolKey(
            source=self.identity,
            expected=(key.identity,),
            address=(key.ip, HBONE_PORT),
            source_ip=self.source_ip,
        )
        authority = f"[{key.ip}]:{key.port}" if ":" in key.ip else f"{key.ip}:{key.port}"
        try:
            async with asyncio.timeout(connect_timeout):
                stream = await self.hbone.open_stream(pk, authority, (), io)
        except HboneError as err:
            raise UpstreamConnectError(f"CONNECT {authority}: {err}") from err
        except (OSError, ConnectionError, TimeoutError, PeerVerificationError, ssl.SSLError) as err:
            raise UpstreamConnectError(f"HBONE to {key.ip}: {err or type(err).__name__}") from err
        io.stream = stream
        self.opened += 1
        return H1Conn(key, io)

    def _idle_limit(self, conn: H1Conn) -> float:
        return min(self.idle_timeout, conn.idle_timeout or self.idle_timeout)

    def _take_idle(self, key: EndpointKey) -> H1Conn | None:
        conns = self._idle.get(key)
        now = self.clock()
        while conns:
            conn = conns.pop()
            if conn.usable and now - conn.idle_since < self._idle_limit(conn):
                return conn
            conn.io.reset()
        return None

    def release(self, conn: H1Conn) -> None:
        if not conn.usable or (conn.max_requests and conn.requests >= conn.max_requests):
            # DestinationRule maxRequestsPerConnection: the connection is not reused.
            conn.io.reset()
            return
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self.max_idle:
            conn.io.reset()
            return
        conn.idle_since = self.clock()
        conns.append(conn)

    @staticmethod
    def _limit(conn: H1Conn, ep: EndpointStats) -> None:
        conn.max_requests = ep.max_requests_per_connection
        conn.idle_timeout = ep.idle_timeout

    def sweep(self) -> int:
        now = self.clock()
        closed = 0
        for key, conns in list(self._idle.items()):
            keep = []
            for c in conns:
                if c.usable and now - c.idle_since < self._idle_limit(c):
                    keep.append(c)
                else:
                    c.io.reset()
                    closed += 1
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return closed

    def close_all(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.io.reset()
        self._idle.clear()

    async def request_h1(
        self, up: UpstreamRequest, ep: EndpointStats, connect_timeout: float
    ) -> H1Response:
        """Send one request and wait for its response head (1xx heads are skipped)."""
        key = EndpointKey(ep.ip, ep.port, ep.identity)
        headers = [("host", up.authority), *up.headers]
        conn = self._take_idle(key)
        reused = conn is not None
        if conn is None:
            conn = await self._open(key, connect_timeout)
        self._limit(conn, ep)
        try:
            return await self._exchange(conn, up, headers)
        except UpstreamReset:
            if not reused or not up.replay.replayable:
                raise
        # The idle connection died under us before any response byte: once more, fresh.
        conn = await self._open(key, connect_timeout)
        self._limit(conn, ep)
        return await self._exchange(conn, up, headers)

    async def _exchange(
        self, conn: H1Conn, up: UpstreamRequest, headers: Sequence[tuple[str, str]]
    ) -> H1Response:
        """`up` on `conn`, with `headers` (host included) as its field section."""
        method, target = up.req.method, up.target
        has_body, content_length = up.req.has_body, up.req.content_length
        conn.requests += 1
        framing: list[tuple[str, str]] = []
        chunked = False
        if content_length is not None:
            framing.append(("content-length", str(content_length)))
        elif has_body:
            framing.append(("transfer-encoding", "chunked"))
            chunked = True
        conn.parser.expect_response_to(method)
        try:
            conn.io.write(http1.encode_request_head(method, target, [*headers, *framing]))
        except ConnectionResetError as err:
            raise UpstreamReset(str(err)) from err
        if not has_body:
            # Fast path (most requests): nothing to pump, just wait for the response head
            # (here: no coroutine per read).
            try:
                head_ev = poll_head(conn)
                while head_ev is None:
                    await conn.io.readable()
                    head_ev = poll_head(conn)
            except BaseException:
                conn.io.reset()
                raise
            return H1Response(self, conn, head_ev, None, keep_alive_request=True)
        loop = asyncio.get_running_loop()
        pump = loop.create_task(_pump_body(conn.io, up.replay.iterate(), chunked))
        head = loop.create_task(self._read_head(conn))
        try:
            await asyncio.wait((head, pump), return_when=asyncio.FIRST_COMPLETED)
            if not head.done():
                failure = pump.exception()
                if failure is not None:
                    # The body could not be sent: the upstream tunnel broke (reset), or the
                    # downstream went away / sent a malformed body (re-raised as is).
                    if conn.io.was_reset and isinstance(failure, ConnectionResetError):
                        raise UpstreamReset(str(failure)) from failure
                    raise failure
            return H1Response(self, conn, await head, pump, keep_alive_request=True)
        except BaseException as exc:
            head.cancel()
            pump.cancel()
            # Wait for both to end without raising, take their outcomes (none is reported as
            # never retrieved), then raise `exc` BY NAME: compiled with mypyc, a bare `raise`
            # after an `await` inside an except block re-raises whatever exception the thread
            # state holds after the suspension (a freed one: a crash), and a CancelledError
            # thrown into `with contextlib.suppress(...): await task` is not suppressed.
            await asyncio.wait((head, pump))
            for task in (head, pump):
                if not task.cancelled():
                    task.exception()
            conn.io.reset()
            raise exc

    async def _read_head(self, conn: H1Conn) -> http1.ResponseHead:
        while True:
            head = poll_head(conn)
            if head is not None:
                return head
            await conn.io.readable()


def poll_head(conn: H1Conn, *, upgrade: bool = False) -> http1.ResponseHead | None:
    """The response head if it has arrived (1xx heads skipped, at most
    `http1.MAX_INTERIM_HEADS`), else None; a bad response -> `UpstreamProtocolError`, the
    stream ending before it -> `UpstreamReset`. A 101 is the final head only for an Upgrade
    request (`upgrade`, `waypoint.upgrade`)."""
    while True:
        try:
            ev = conn.poll()
        except http1.HttpParseError as bad:
            raise UpstreamProtocolError(str(bad)) from bad
        except ConnectionResetError as reset:
            # Its own name: compiled, one name for both would be typed as the native
            # HttpParseError, and binding this to it raised TypeError (`test_native`).
            raise UpstreamReset(str(reset)) from reset
        if ev is None:
            return None
        if isinstance(ev, http1.ResponseHead):
            if ev.status == 101 and upgrade:
                return ev
            if ev.status == 101:
                # Switching Protocols to a request without Upgrade (the upgrade path is
                # waypoint.upgrade's): what follows is not HTTP/1.1 (RFC 9110 §15.2.2).
                raise UpstreamProtocolError("101 Switching Protocols to a request without Upgrade")
            if ev.informational:
                # 100 Continue (the waypoint answered Expect itself), 103 Early Hints: a 1xx
                # has no body, its end follows at once, then the final head (RFC 9110 §15.2:
                # a client parses any number of them before the final response).
                conn.parser.next_event()
                continue
            return ev
        raise UpstreamProtocolError(f"unexpected {type(ev).__name__} before a response")


class H1Upstreams:
    """`waypoint.handler.Upstreams` for HTTP/1.1 requests."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def send(
        self, up: UpstreamRequest, ep: EndpointStats, connect_timeout: float
    ) -> Coroutine[Any, Any, H1Response]:
        """`UpstreamPool.request_h1`'s coroutine itself (no coroutine wrapping it per
        request)."""
        return self.pool.request_h1(up, ep, connect_timeout)
