"""HTTP/2 (prior knowledge, h2c; gRPC) inside HBONE tunnels, both directions, with `h2`.

Owns: `H2Session` (an `h2.connection.H2Connection` over a `TunnelIO`: read loop, flow-
controlled sends), the downstream server (`serve_h2`: one handler task per request stream,
`H2Downstream` writes its response) and the upstream client (`H2Upstreams`: per endpoint a few
multiplexed HTTP/2 connections, each one HBONE stream, at most `max_h2_streams` streams each).

Invariants:
- Received DATA is credited (WINDOW_UPDATE) only when the consumer took it (`StreamBody.read`),
  so each stream buffers at most its window (1 MiB) and a slow reader stalls only its stream.
- Sends never exceed the peer's windows or frame size (RFC 9113 §6.9): a stream whose window is
  exhausted waits for WINDOW_UPDATE without blocking other streams.
- Connection-specific fields (RFC 9113 §8.2.2: connection, keep-alive, proxy-connection,
  transfer-encoding, upgrade; te other than "trailers") are never forwarded; gRPC's
  ``te: trailers`` and trailers (grpc-status) pass through, minus the fields that must not
  come from a trailer section (framing, routing, identity: `waypoint.protocol.hygiene`).
- RFC 8441 extended CONNECT (WebSocket over HTTP/2): the server advertises
  SETTINGS_ENABLE_CONNECT_PROTOCOL (§3). A CONNECT with ``:protocol: websocket`` is read, as
  Envoy's codec does, as the HTTP/1.1 upgrade handshake (GET + ``Upgrade: websocket``, a fresh
  ``Sec-WebSocket-Key`` when the client sent none: RFC 8441 §5 drops it, HTTP/1.1 servers need
  it) so RequestAuthentication, AuthorizationPolicy, routing and rate limits decide it as any
  handshake, and goes upstream as one (`waypoint.upgrade`); the upstream's ``101`` becomes the
  stream's ``:status 200`` (§5, without the HTTP/1.1 upgrade fields) and DATA frames carry the
  raw bytes both ways (flow control bounds them); an upstream 2xx without switching is a 502
  (a 2xx would tell the client its WebSocket is open). Any other ``:protocol`` is refused (400).
- Request hygiene is the handler's (`waypoint.protocol.hygiene`, same rules as HTTP/1.1). What the
  h2 library finds malformed (RFC 9113 §8.1.1: uppercase or invalid field names, CR/LF/NUL in
  values, several Host fields, Host differing from :authority, connection-specific fields, a
  content-length that is not digits) closes the connection with PROTOCOL_ERROR, recorded with
  flag DPE. The header list is limited to 60 KiB (SETTINGS_MAX_HEADER_LIST_SIZE, Envoy's
  max_request_headers_kb).
- An upstream response stream takes at most `MAX_INTERIM_HEADS` 1xx heads before its final
  one; then RST_STREAM(ENHANCE_YOUR_CALM) and 502 (UPE), as the HTTP/1.1 codec does.
- ``Expect: 100-continue`` is answered by the waypoint as over HTTP/1.1 (Envoy's default,
  ``proxy_100_continue: false``): ``:status 100`` once policy and routing admitted the request
  (none for a denied one), and the field is not forwarded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from meshcore.hbone.headerblock import MAX_INTERIM_HEADS, status_code
from waypoint.body import ReplayBody, Request
from waypoint.context import WaypointContext
from waypoint.errors import UpstreamProtocolError, UpstreamReset
from waypoint.handler import Handler
from waypoint.protocol.cluster import EndpointStats
from waypoint.protocol.hygiene import MAX_HEADERS_BYTES, forwardable_trailers
from waypoint.tunnel import Tunnel, TunnelIO
from waypoint.upgrade import PROTOCOL as UPGRADE_PROTOCOL
from waypoint.upgrade import UPGRADES
from waypoint.upstream import EndpointKey, UpstreamPool, UpstreamRequest

log = logging.getLogger("waypoint.h2")

STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
_UPGRADE_ONLY = frozenset({"connection", "upgrade", "sec-websocket-accept"})
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}
)


def _text(headers: Sequence[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    out = []
    for k, v in headers:
        ks = k.decode("latin-1") if isinstance(k, bytes) else k
        vs = v.decode("latin-1") if isinstance(v, bytes) else v
        out.append((ks, vs))
    return out


def forwardable(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (k, v)
        for k, v in headers
        if k not in _CONNECTION_SPECIFIC
        and not k.startswith(":")
        and (k != "te" or v == "trailers")
    ]


class StreamBody:
    """A received body (request or response) of one stream: a `BodySource`."""

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.reset_code: int | None = None
        self.trailers: tuple[tuple[str, str], ...] = ()
        self._waiter: asyncio.Future[None] | None = None
        self.bytes = 0

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        while not self.chunks:
            if self.reset_code is not None:
                raise ConnectionResetError(f"stream reset (code {self.reset_code})")
            if self.ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data, flow = self.chunks.popleft()
        self.bytes += len(data)
        self.session.credit(self.stream_id, flow)
        return data


class H2Session:
    """An HTTP/2 connection over one tunnel stream."""

    def __init__(self, io: TunnelIO, *, client: bool) -> None:
        self.io = io
        cfg = h2.config.H2Configuration(
            client_side=client, header_encoding=None, validate_inbound_headers=True
        )
        self.conn = h2.connection.H2Connection(cfg)
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADERS_BYTES,
        }
        if not client:  # RFC 8441 §3: extended CONNECT (WebSocket) is accepted
            settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        self.conn.local_settings = h2.settings.Settings(client=client, initial_values=settings)
        self.bodies: dict[int, StreamBody] = {}
        self._window = asyncio.Event()
        self.closed = False
        self._flush_pending = False

    def start(self) -> None:
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.io.was_reset:
            self.io.write(data)

    def credit(self, stream_id: int, flow: int) -> None:
        if self.closed or not flow:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.conn.acknowledge_received_data(flow, stream_id)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True

            def run() -> None:
                self._flush_pending = False
                self.flush()

            asyncio.get_running_loop().call_soon(run)

    async def send_data(self, stream_id: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.closed:
                raise ConnectionResetError("HTTP/2 connection closed")
            try:
                window = min(
                    self.conn.local_flow_control_window(stream_id),
                    self.conn.max_outbound_frame_size,
                )
            except (h2.exceptions.StreamClosedError, KeyError) as err:
                raise ConnectionResetError(f"stream {stream_id} closed") from err
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            chunk = view[:window]
            self.conn.send_data(stream_id, chunk.tobytes())
            view = view[window:]
            self.flush()
            await self.io.drain()

    def end(self, stream_id: int, trailers: Sequence[tuple[str, str]] = ()) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            if trailers:
                self.conn.send_headers(stream_id, list(trailers), end_stream=True)
            else:
                self.conn.end_stream(stream_id)
        self.flush()

    def reset(self, stream_id: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.reset_stream(stream_id, code)
        self.flush()

    async def run(self) -> None:
        """Read until the tunnel ends; dispatch events."""
        try:
            while True:
                data = await self.io.read()
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as err:
                    state = self.conn.state_machine.state
                    if state is not h2.connection.ConnectionState.CLOSED:
                        # (after a GOAWAY, late frames such as PINGs are moot: no error)
                        log.info("HTTP/2 protocol error: %s", err)
                        self.on_protocol_error(err)
                        self.flush()
                    break
                for ev in events:
                    self.on_event(ev)
                self.flush()
        except ConnectionError:
            pass
        finally:
            self.closed = True
            self._window.set()
            for body in self.bodies.values():
                if not body.ended and body.reset_code is None:
                    body.reset_code = h2.errors.ErrorCodes.CONNECT_ERROR
                body.wake()
            self.on_closed()
            self.io.close()

    def on_closed(self) -> None:
        pass

    def on_protocol_error(self, err: h2.exceptions.ProtocolError) -> None:
        pass

    def on_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            body = self.bodies.get(ev.stream_id)
            if body is None:
                self.credit(ev.stream_id, ev.flow_controlled_length)
            else:
                body.chunks.append((ev.data, ev.flow_controlled_length))
                body.wake()
        elif isinstance(ev, h2.events.StreamEnded):
            body = self.bodies.get(ev.stream_id)
            if body is not None:
                body.ended = True
                body.wake()
        elif isinstance(ev, h2.events.TrailersReceived):
            body = self.bodies.get(ev.stream_id)
            if body is not None:
                body.trailers = forwardable_trailers(_text(ev.headers))
        elif isinstance(ev, h2.events.StreamReset):
            body = self.bodies.get(ev.stream_id)
            if body is not None:
                body.reset_code = int(ev.error_code)
                body.wake()
            self._window.set()
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closed = True
            self._window.set()


# ---------------------------------------------------------------------------- downstream


class H2Downstream:
    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.head_sent = False

    async def send_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        content_length: int | None,
        end: bool = False,
    ) -> None:
        out = [(":status", str(status)), *forwardable(headers)]
        if content_length is not None and not any(k == "content-length" for k, _ in out):
            out.append(("content-length", str(content_length)))
        try:
            self.session.conn.send_headers(self.stream_id, out, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as err:
            raise ConnectionResetError(str(err)) from err
        self.head_sent = True
        self.session.flush()

    async def send_data(self, data: bytes) -> None:
        if data:
            await self.session.send_data(self.stream_id, data)

    async def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> None:
        self.session.end(self.stream_id, forwardable(trailers) if trailers else ())

    async def send_continue(self) -> None:
        # RFC 9113 §8.1: an interim (1xx) header block before the final response; the
        # request's Expect was not forwarded (the waypoint answers it, as over HTTP/1.1).
        try:
            self.session.conn.send_headers(self.stream_id, [(":status", "100")])
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as err:
            raise ConnectionResetError(str(err)) from err
        self.session.flush()

    def reset(self) -> None:
        self.session.reset(self.stream_id)


class H2ConnectDownstream(H2Downstream):
    """The response to an RFC 8441 WebSocket CONNECT: the upstream's ``101 Switching
    Protocols`` is the stream's ``200`` (§5), without the HTTP/1.1 upgrade fields."""

    async def send_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        content_length: int | None,
        end: bool = False,
    ) -> None:
        if status == 101:
            status, content_length = 200, None
            headers = [(k, v) for k, v in headers if k not in _UPGRADE_ONLY]
        elif 200 <= status < 300:
            # The app answered the handshake without switching: a 2xx here would tell the
            # client its WebSocket is open (RFC 8441 §5), so it is a 502 instead.
            log.info("extended CONNECT: upstream answered %d, not 101: 502", status)
            status, headers = 502, [("content-type", "text/plain")]
            content_length = None
        await super().send_head(status, headers, content_length=content_length, end=end)


class _ServerSession(H2Session):
    def __init__(self, handler: Handler, io: TunnelIO, tunnel: Tunnel) -> None:
        super().__init__(io, client=False)
        self.handler = handler
        self.tunnel = tunnel
        self.tasks: set[asyncio.Task[None]] = set()

    def on_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._request(ev)
        else:
            super().on_event(ev)

    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        headers = _text(ev.headers or [])
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        body = StreamBody(self, sid)
        ended = ev.stream_ended is not None
        if ended:
            body.ended = True
        self.bodies[sid] = body
        regular = [(k, v) for k, v in headers if not k.startswith(":")]
        if pseudo.get(":method") == "CONNECT" and ":protocol" in pseudo:
            self._extended_connect(sid, pseudo, regular, body)
            return
        cl = next((v for k, v in regular if k == "content-length"), None)
        expect = any(k == "expect" and v.lower() == "100-continue" for k, v in regular)
        req = Request(
            protocol="h2",
            method=pseudo.get(":method", ""),  # absent: refused by the handler (400)
            target=pseudo.get(":path", ""),  # CONNECT has none: refused (400)
            authority=pseudo.get(":authority", "")
            or next((v for k, v in regular if k == "host"), ""),
            scheme=pseudo.get(":scheme", "http"),
            headers=[
                (k, v) for k, v in forwardable(regular) if k not in ("content-length", "expect")
            ],
            body=body,
            has_body=not ended,
            content_length=int(cl) if cl is not None and cl.isascii() and cl.isdigit() else None,
            expect_continue=expect and not ended,
        )
        task = asyncio.get_running_loop().create_task(self._serve(req, sid))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _extended_connect(
        self, sid: int, pseudo: dict[str, str], regular: list[tuple[str, str]], body: StreamBody
    ) -> None:
        """RFC 8441 §4: the WebSocket handshake as an HTTP/1.1 upgrade request (module doc)."""
        protocol = pseudo[":protocol"].lower()
        fields = [(k, v) for k, v in forwardable(regular) if k != "content-length"]
        if protocol in UPGRADES and not any(k == "sec-websocket-key" for k, _ in fields):
            key = base64.b64encode(self.handler.ctx.rng.getrandbits(128).to_bytes(16, "big"))
            fields.append(("sec-websocket-key", key.decode()))
        req = Request(
            protocol=UPGRADE_PROTOCOL if protocol in UPGRADES else "h2",
            # Another :protocol stays a CONNECT, which request hygiene refuses (400).
            method="GET" if protocol in UPGRADES else "CONNECT",
            target=pseudo.get(":path", ""),
            authority=pseudo.get(":authority", ""),
            scheme=pseudo.get(":scheme", "http"),
            headers=fields,
            body=body,
            has_body=False,  # the stream's DATA is the upgraded protocol, not a request body
            content_length=None,
            extra={"upgrade": protocol, "rfc8441": "1"},
        )
        task = asyncio.get_running_loop().create_task(
            self._serve(req, sid, H2ConnectDownstream(self, sid))
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, req: Request, sid: int, down: H2Downstream | None = None) -> None:
        try:
            await self.handler.serve(req, down or H2Downstream(self, sid), self.tunnel)
        finally:
            self.bodies.pop(sid, None)

    def on_closed(self) -> None:
        for task in self.tasks:
            task.cancel()

    def on_protocol_error(self, err: h2.exceptions.ProtocolError) -> None:
        # A malformed request (RFC 9113 §8.1.1) closes the connection with PROTOCOL_ERROR; it
        # is still one access-log record with flag DPE (status 0: no response was sent).
        self.handler.refused(self.tunnel, protocol="h2", status=0, error=str(err)[:200])


async def serve_h2(handler: Handler, io: TunnelIO, tunnel: Tunnel, first: bytes) -> None:
    session = _ServerSession(handler, io, tunnel)
    session.start()
    try:
        events = session.conn.receive_data(first)
    except h2.exceptions.ProtocolError as err:
        session.on_protocol_error(err)
        session.flush()
        io.close()
        return
    for ev in events:
        session.on_event(ev)
    session.flush()
    await session.run()


# ---------------------------------------------------------------------------- upstream


class H2Response:
    """One upstream response on a multiplexed connection."""

    def __init__(self, client: _ClientSession, sid: int, body: StreamBody) -> None:
        self.client = client
        self.sid = sid
        self.body = body
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self._finished = False

    @property
    def trailers(self) -> tuple[tuple[str, str], ...]:
        return self.body.trailers

    @property
    def body_bytes(self) -> int:
        return self.body.bytes

    async def read(self) -> bytes:
        try:
            return await self.body.read()
        except ConnectionResetError as err:
            raise UpstreamReset(str(err)) from err

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if not self.body.ended or self.body.chunks:
            self.client.reset(self.sid)
        self.client.forget(self.sid)


class _ClientSession(H2Session):
    def __init__(self, key: EndpointKey, io: TunnelIO) -> None:
        super().__init__(io, client=True)
        self.key = key
        self.heads: dict[int, asyncio.Future[list[tuple[str, str]]]] = {}
        self.interim: dict[int, int] = {}  # stream -> 1xx heads received (`MAX_INTERIM_HEADS`)
        self.active = 0
        self.task: asyncio.Task[None] | None = None

    def on_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            fut = self.heads.get(ev.stream_id)
            if fut is not None and not fut.done():
                fut.set_result(_text(ev.headers or []))
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            self._interim(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            fut = self.heads.get(ev.stream_id)
            if fut is not None and not fut.done():
                fut.set_exception(UpstreamReset(f"stream reset by upstream ({ev.error_code!r})"))
            super().on_event(ev)
        else:
            super().on_event(ev)

    def _interim(self, sid: int) -> None:
        """A 1xx head (RFC 9110 §15.2: no limit on their number, each one decoded and a wait
        without progress): past `MAX_INTERIM_HEADS`, the bound of the HTTP/1.1 codec and the
        HBONE client, the stream is reset with ENHANCE_YOUR_CALM (RFC 9113 §5.4.2) and the
        request fails as a bad response (502, UPE: counted with the requests)."""
        fut = self.heads.get(sid)
        if fut is None or fut.done():
            return
        self.interim[sid] = count = self.interim.get(sid, 0) + 1
        if count > MAX_INTERIM_HEADS:
            log.info(
                "HTTP/2 upstream %s:%d: more than %d interim (1xx) responses on stream %d: reset",
                self.key.ip,
                self.key.port,
                MAX_INTERIM_HEADS,
                sid,
            )
            self.reset(sid, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            fut.set_exception(
                UpstreamProtocolError(f"more than {MAX_INTERIM_HEADS} interim (1xx) responses")
            )

    def on_closed(self) -> None:
        for fut in self.heads.values():
            if not fut.done():
                fut.set_exception(UpstreamReset("upstream HTTP/2 connection closed"))

    def forget(self, sid: int) -> None:
        self.bodies.pop(sid, None)
        self.heads.pop(sid, None)
        self.interim.pop(sid, None)
        self.active -= 1

    @property
    def usable(self) -> bool:
        return not self.closed and not self.io.closed

    async def request(
        self,
        headers: list[tuple[str, str]],
        replay: ReplayBody,
        has_body: bool,
    ) -> H2Response:
        try:
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, headers, end_stream=not has_body)
        except h2.exceptions.ProtocolError as err:
            raise UpstreamReset(f"cannot open a stream: {err}") from err
        self.active += 1
        body = StreamBody(self, sid)
        self.bodies[sid] = body
        fut: asyncio.Future[list[tuple[str, str]]] = asyncio.get_running_loop().create_future()
        self.heads[sid] = fut
        self.flush()
        resp = H2Response(self, sid, body)
        pump = asyncio.get_running_loop().create_task(self._pump(sid, replay)) if has_body else None
        try:
            if pump is not None:
                await asyncio.wait((fut, pump), return_when=asyncio.FIRST_COMPLETED)
                if not fut.done() and pump.done() and pump.exception() is not None:
                    failure = pump.exception()
                    assert failure is not None
                    raise failure
            got = await fut
        except BaseException:
            if pump is not None:
                pump.cancel()
            resp.finish()
            raise
        status = next((v for k, v in got if k == ":status"), "")
        # RFC 9110 §15: three digits in 100..599 (h2 lets any text through; "²" is a
        # str.isdigit() digit int() refuses: that was a 500 and a traceback, not a 502).
        resp.status = status_code(status)
        if not resp.status:
            resp.finish()
            raise UpstreamProtocolError(f"response without a valid :status ({status[:8]!r})")
        resp.headers = [(k, v) for k, v in got if not k.startswith(":")]
        cl = next((v for k, v in resp.headers if k == "content-length"), None)
        resp.content_length = int(cl) if cl is not None and cl.isascii() and cl.isdigit() else None
        return resp

    async def _pump(self, sid: int, replay: ReplayBody) -> None:
        async for chunk in replay.iterate():
            await self.send_data(sid, chunk)
        self.end(sid, replay.trailers)


class H2Upstreams:
    """`waypoint.handler.Upstreams` for HTTP/2 requests (h2c to the endpoint, in HBONE)."""

    def __init__(self, ctx: WaypointContext, pool: UpstreamPool) -> None:
        self.ctx = ctx
        self.pool = pool
        self.max_streams = ctx.settings.max_h2_streams
        self._conns: dict[EndpointKey, list[_ClientSession]] = {}
        self._dialing: dict[EndpointKey, asyncio.Task[_ClientSession]] = {}

    async def _connection(self, key: EndpointKey, connect_timeout: float) -> _ClientSession:
        while True:
            for c in self._conns.get(key, ()):
                if c.usable and c.active < self.max_streams:
                    return c
            task = self._dialing.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._dial(key, connect_timeout))
                self._dialing[key] = task
                task.add_done_callback(functools.partial(self._dialed, key))
            session = await asyncio.shield(task)
            if session.usable and session.active < self.max_streams:
                return session

    def _dialed(self, key: EndpointKey, _task: asyncio.Task[_ClientSession]) -> None:
        self._dialing.pop(key, None)

    async def _dial(self, key: EndpointKey, connect_timeout: float) -> _ClientSession:
        h1 = await self.pool._open(key, connect_timeout)
        session = _ClientSession(key, h1.io)
        session.start()
        session.task = asyncio.get_running_loop().create_task(session.run())
        conns = self._conns.setdefault(key, [])
        conns.append(session)

        def gone(_t: asyncio.Task[None]) -> None:
            if session in conns:
                conns.remove(session)

        session.task.add_done_callback(gone)
        return session

    async def send(
        self, up: UpstreamRequest, ep: EndpointStats, connect_timeout: float
    ) -> H2Response:
        key = EndpointKey(ep.ip, ep.port, ep.identity)
        session = await self._connection(key, connect_timeout)
        req = up.req
        block = [
            (":method", req.method),
            (":scheme", req.scheme or "http"),
            (":authority", up.authority),
            (":path", up.target),
            *forwardable(up.headers),
        ]
        if req.content_length is not None:
            block.append(("content-length", str(req.content_length)))
        return await session.request(block, up.replay, req.has_body)

    def close_all(self) -> None:
        for conns in self._conns.values():
            for c in conns:
                c.io.reset()
