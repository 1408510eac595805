"""HTTP/1.1 inside an HBONE tunnel (downstream side): keep-alive request loop.

Owns: reading requests with `waypoint.protocol.http1.Http1Parser` from a `TunnelIO`, handing each to
`waypoint.handler.Handler`, and framing its response (`H1Downstream`): Content-Length when the
upstream gave one, else chunked (HTTP/1.1 clients) or close-delimited (HTTP/1.0).

Invariants:
- One request at a time per connection (pipelined requests wait in the parser's buffer), so
  responses go out in request order (RFC 9112 §9.3.2).
- A request whose body was not read to the end (denied, answered early) is drained up to
  64 KiB for keep-alive; past that the connection is closed instead of reading a body nobody
  wants.
- A malformed request gets its status (400/431/501/505) and ``connection: close``, and one
  access-log record with flag DPE (`Handler.refused`); never a reset or a traceback.
- A request head must be complete `WaypointSettings.request_head_timeout` after its first
  byte (408 and close; the refusal's record as above); a keep-alive connection waiting with
  nothing received is not timed here.
- An HTTP/1.0 request gets 426 Upgrade Required (Envoy's default, ``accept_http_10`` false)
  unless the ``accept_http_10`` setting is on (Istio: PILOT_HTTP10).
- HTTP/1 trailers are parsed (and bounded) but never forwarded, in either direction (Envoy's
  default: ``enable_trailers`` false), so no field can be smuggled in behind the body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from waypoint.body import EmptyBody, Request
from waypoint.errors import BadRequest
from waypoint.handler import Handler
from waypoint.protocol import http1
from waypoint.tunnel import Tunnel, TunnelIO
from waypoint.upgrade import PROTOCOL as UPGRADE_PROTOCOL
from waypoint.upgrade import RawBody, upgrade_of

DRAIN_LIMIT = 64 * 1024
_NOT_FORWARDED_UP = http1.hop_by_hop_and("host", "content-length", "expect")
"""Request fields the handler never sees as fields: hop-by-hop (RFC 9110 §7.6.1), Host (the
request's authority), the framing (the upstream side frames anew) and Expect (answered here)."""
_NOT_FORWARDED_DOWN = http1.hop_by_hop_and("content-length")
"""Response fields not copied into the client's head: hop-by-hop, and the framing (set anew)."""


class _Reader:
    """The request parser fed from the tunnel without a coroutine per read: `poll` parses what
    has arrived (`TunnelIO.take`), and the callers await `io.readable()` only when it holds no
    event yet."""

    def __init__(self, io: TunnelIO, first: bytes) -> None:
        self.io = io
        self.parser = http1.Http1Parser(http1.Role.REQUEST)
        self.parser.feed(first)
        self.eof = False
        self.ended = False
        """The client ended the stream cleanly between requests."""

    def poll(self) -> http1.Event | None:
        """The next event if what has arrived holds one; None: wait for `io.readable()`, or,
        with `ended`, no more requests. A message cut short by the end raises
        HttpParseError, a reset ConnectionResetError."""
        parser = self.parser
        while True:
            ev = parser.next_event()
            if ev is not None:
                return ev
            if self.eof:
                self.ended = True
                return None
            data = self.io.take()
            if data is None:
                return None
            if data:
                parser.feed(data)
            else:
                self.eof = True
                if parser.idle:
                    self.ended = True
                    return None
                parser.feed_eof()


class H1Body:
    """The body of the current request (a `BodySource`)."""

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.finished = False
        self.failed = ""

    async def read(self) -> bytes:
        if self.finished:
            return b""
        if self.failed:
            raise BadRequest(self.failed)
        reader = self.reader
        try:
            ev = reader.poll()
            while ev is None and not reader.ended:
                await reader.io.readable()
                ev = reader.poll()
        except http1.HttpParseError as err:
            # A malformed body (chunk framing, trailers) is the client's error: 400 with flag
            # DPE from the handler (or a reset if the response already started), and the
            # connection is not reused.
            self.failed = str(err)
            raise BadRequest(str(err), status=err.status) from None
        if isinstance(ev, http1.Body):
            return ev.data
        if isinstance(ev, http1.EndOfMessage):
            self.finished = True  # trailers dropped (module docstring)
            return b""
        raise ConnectionResetError("request body cut short")


class H1Downstream:
    """A `Downstream` writing one HTTP/1.1 response."""

    def __init__(self, io: TunnelIO, head: http1.RequestHead, upgrade: str | None = None) -> None:
        self.io = io
        self.upgrade_ok = upgrade
        """The Upgrade this request asked for (a 101 may only switch to it)."""
        self.method = head.method
        self.version = head.version
        self.keep_alive = head.keep_alive
        self.head_sent = False
        self.ended = False
        self.was_reset = False
        self.chunked = False
        self.bytes = 0
        self.upgraded = False
        self.continued = False

    async def send_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        content_length: int | None,
        end: bool = False,
    ) -> None:
        if status == 101 and self.upgrade_ok:
            # Switching Protocols (waypoint.upgrade): no framing; raw bytes follow both ways.
            out = http1.strip_hop_by_hop(headers)
            out += [("connection", "upgrade"), ("upgrade", self.upgrade_ok)]
            self.io.write(http1.encode_response_head(101, "", out))
            self.head_sent = self.upgraded = True
            await self.io.drain()
            return
        out = http1.strip_hop_by_hop(headers, _NOT_FORWARDED_DOWN)
        bodyless = self.method == "HEAD" or status in (204, 304) or status < 200
        if content_length is not None and status not in (204, 304):
            out.append(("content-length", str(content_length)))
        elif not bodyless and not end:
            if self.version == "HTTP/1.1":
                out.append(("transfer-encoding", "chunked"))
                self.chunked = True
            else:
                self.keep_alive = False  # close-delimited body (RFC 9112 §6.3 rule 8)
        elif end and not bodyless:
            out.append(("content-length", "0"))
        if not self.keep_alive:
            out.append(("connection", "close"))
        self.io.write(http1.encode_response_head(status, "", out))
        self.head_sent = True
        if end:
            await self.send_end()
        else:
            await self.io.drain()

    async def send_data(self, data: bytes) -> None:
        if not data or (self.method == "HEAD" and not self.upgraded):
            return
        self.bytes += len(data)
        self.io.write(http1.encode_chunk(data) if self.chunked else data)
        await self.io.drain()

    async def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> None:
        if self.ended:
            return
        self.ended = True
        if self.chunked:
            self.io.write(http1.encode_last_chunk())  # HTTP/1 trailers are not sent

    async def send_continue(self) -> None:
        self.continued = True
        self.io.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def reset(self) -> None:
        self.was_reset = True
        self.io.reset()


def _split_target(target: str, host: str) -> tuple[str, str]:
    """(authority, origin-form target); absolute-form is accepted and its authority replaces
    Host (RFC 9112 §3.2.2). Userinfo is refused later with the authority (RFC 9110 §4.2.4);
    an empty host is invalid (RFC 9110 §4.2.1)."""
    lower = target[:8].lower()
    if lower.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        authority, path = rest[:end], rest[end:]
        if not authority:
            raise http1.HttpParseError("absolute-form target with an empty host")
        if not path.startswith("/"):
            path = "/" + path
        return authority, path
    return host, target


async def serve_h1(handler: Handler, io: TunnelIO, tunnel: Tunnel, first: bytes) -> None:
    reader = _Reader(io, first)
    while True:
        try:
            ev = reader.poll()
            parser = reader.parser
            while ev is None and not reader.ended and parser.idle:  # nothing of a head yet
                await io.readable()
                ev = reader.poll()
            if ev is None and not reader.ended:  # part of a head: the rest has a deadline
                ev = await _head_rest(reader, handler.ctx.settings.request_head_timeout)
        except http1.HttpParseError as err:
            await _refuse(handler, tunnel, io, err.status, str(err))
            return
        except ConnectionResetError:
            return
        except TimeoutError:
            timeout = handler.ctx.settings.request_head_timeout
            await _refuse(handler, tunnel, io, 408, f"request head not complete in {timeout:g} s")
            return
        if ev is None:
            io.write_eof()
            return
        if not isinstance(ev, http1.RequestHead):
            await _refuse(handler, tunnel, io, 400, "expected a request head")
            return
        head = ev
        if head.version == "HTTP/1.0" and not handler.ctx.settings.accept_http_10:
            # Envoy's HTTP/1 codec (what Istio's waypoints run) answers 426 unless
            # ``http_protocol_options.accept_http_10`` is set; Istio sets it only with
            # PILOT_HTTP10 (envoy.config.core.v3.Http1ProtocolOptions).
            await _refuse(handler, tunnel, io, 426, "HTTP/1.0 is not accepted (accept_http_10)")
            return
        upgrade = upgrade_of(head.headers) if not head.chunked and not head.content_length else None
        host = http1.header_value(head.headers, "host") or ""
        try:
            authority, target = _split_target(head.target, host)
        except http1.HttpParseError as err:
            await _refuse(handler, tunnel, io, err.status, str(err))
            return
        expect = (http1.header_value(head.headers, "expect") or "").lower() == "100-continue"
        has_body = head.chunked or bool(head.content_length)
        body = H1Body(reader) if has_body else None
        if body is None:
            end = reader.parser.next_event()  # a bodiless request ends right after its head
            assert isinstance(end, http1.EndOfMessage)
        req = Request(
            protocol="http/1.1" if upgrade is None else UPGRADE_PROTOCOL,
            method=head.method,
            target=target,
            authority=authority,
            scheme="http",
            headers=http1.strip_hop_by_hop(head.headers, _NOT_FORWARDED_UP),
            body=body if body is not None else EmptyBody(),
            has_body=has_body,
            extra={"upgrade": upgrade} if upgrade else {},
            content_length=head.content_length if not head.chunked else None,
            expect_continue=expect and has_body,
        )
        if upgrade is not None:
            # After the handshake the client's bytes are the upgraded protocol (waypoint.upgrade).
            req.body = RawBody(io, reader.parser.take_buffered())
        down = H1Downstream(io, head, upgrade)
        await handler.serve(req, down, tunnel)
        if not await _reusable(io, down, req, body):
            return


async def _head_rest(reader: _Reader, timeout: float) -> http1.Event | None:
    """The rest of a request head whose first bytes arrived: at most `timeout` seconds more
    (settings.request_head_timeout; raises TimeoutError)."""
    async with asyncio.timeout(timeout):
        while True:
            await reader.io.readable()
            ev = reader.poll()
            if ev is not None or reader.ended:
                return ev


async def _reusable(io: TunnelIO, down: H1Downstream, req: Request, body: H1Body | None) -> bool:
    """After the response: whether the connection carries another request. When it does not,
    it has been ended here (closed, half-closed or reset as the exchange requires)."""
    if down.upgraded:
        io.close()
        return False
    if down.upgrade_ok is not None and not down.was_reset:
        # Not switched (denied, or the app said no): the client's later bytes were handed to
        # the upgrade, so the connection ends here.
        io.write_eof()
        return False
    if down.was_reset or io.was_reset:
        return False
    if not down.head_sent:  # cannot happen: serve always answers or resets
        io.reset()
        return False
    if req.expect_continue and not down.continued and body is not None and not body.finished:
        # Answered without 100 Continue (denied, or a local reply): the client may or may
        # not send its body now (RFC 9110 §10.1.1), so the connection cannot be reused.
        down.keep_alive = False
    elif body is not None and (body.failed or (not body.finished and not await _drain(body))):
        down.keep_alive = False
    if not down.keep_alive:
        io.write_eof()
        return False
    return True


async def _drain(body: H1Body) -> bool:
    read = 0
    try:
        async with asyncio.timeout(1.0):
            while chunk := await body.read():
                read += len(chunk)
                if read > DRAIN_LIMIT:
                    return False
    except (TimeoutError, ConnectionError, http1.HttpParseError, BadRequest):
        return False
    return True


async def _refuse(
    handler: Handler, tunnel: Tunnel, io: TunnelIO, status: int, message: str
) -> None:
    handler.refused(tunnel, protocol="http", status=status, error=message)
    body = f"{http1.reason_phrase(status)}: {message}".encode()
    with contextlib.suppress(ConnectionError):
        io.write(
            http1.encode_response_head(
                status, "", [("content-length", str(len(body))), ("connection", "close")]
            )
            + body
        )
        io.write_eof()
