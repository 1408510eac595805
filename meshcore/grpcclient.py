"""asyncio edge of our gRPC client: one HTTP/2 connection (our sans-I/O core,
`meshcore.hbone.connection.HboneConnection` in client role) to the control plane, and its calls.

Owns: `connect` (TCP, then TLS verified against the control plane's roots and server name, ALPN
h2; or plaintext when no roots are given, as before: lab and loopback), `GrpcConnection` (the
asyncio protocol: bytes in -> core events -> calls; one flush per event batch; the core's one
timer for keepalive PINGs and the SETTINGS/header-block timeouts) and `GrpcCall` (one call:
`send`, `done_sending`, `recv`/`async for`, `cancel`; `unary` for a one-request call). The wire
rules (headers, message framing, status) are `meshcore.grpcwire`'s. Used by the node proxy's
and the waypoint's xDS and CA clients (`meshcore.xds`, `meshcore.caclient`), so that a worker
never imports grpcio (~13 MiB RSS and its threads, bench/README.md "Session 8").

Invariants:
- Nothing reconnects here: a lost connection fails its calls with UNAVAILABLE, and the caller's
  retry loop (`meshcore.backoff`, the one backoff owner) decides when to dial again.
- Memory per call is bounded: one partial message of at most `max_message` octets
  (`grpcwire.MessageReader`), plus whole messages the consumer has not taken yet, each
  accounted as its 5-octet prefix, its payload and `MESSAGE_ALLOWANCE` (the object holding it),
  so empty messages weigh too. Received DATA is credited back (WINDOW_UPDATE) at once while the
  queue accounts under `QUEUE_LIMIT` octets, and only as the consumer takes messages above it:
  a peer that outruns the consumer is held by HTTP/2 flow control once it used the credit it
  has (windows 4 MiB per stream, 16 MiB per connection: large xDS responses flow without
  waiting for a round trip per window). So a call holds at most QUEUE_LIMIT + one stream window
  + one message of received octets, and never more than `MAX_QUEUED_MESSAGES` messages: one
  more ends the call RESOURCE_EXHAUSTED (RST_STREAM CANCEL; a flood of tiny messages).
- A call queues at most `SEND_LIMIT` request octets the server's window does not take; one
  more ends it RESOURCE_EXHAUSTED.
- Keepalive is the core's: a PING after 10 s without input, the connection dead (aborted, its
  calls UNAVAILABLE) when no answer came 20 s later (`meshcore.hbone.control`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Sequence
from typing import cast

from meshcore.address import split_host_port
from meshcore.errors import H2ProtocolError
from meshcore.grpcwire import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    DEFAULT_MAX_MESSAGE,
    INTERNAL,
    PREFIX,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    GrpcError,
    ResponseReader,
    Status,
    frame_message,
    request_headers,
)
from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.control import PING_TIMEOUT
from meshcore.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from meshcore.hbone.frames import ErrorCode
from meshcore.hbone.streams import Role
from meshcore.sockets import connect_tcp

log = logging.getLogger(__name__)

QUEUE_LIMIT = 4 * 1024 * 1024
"""Octets of received, not yet consumed messages per call above which credit waits."""
SEND_LIMIT = 16 * 1024 * 1024
"""Request octets a call may have waiting for the server's window (a reconnecting xDS stream's
first request names every resource it has: ~1 MiB at 10,000 workloads); more ends the call."""
MESSAGE_ALLOWANCE = 64
"""Octets accounted per queued message beside its prefix and payload (the bytes object and its
queue slot), so a flood of empty messages is held by `QUEUE_LIMIT` too."""
MAX_QUEUED_MESSAGES = 65_536
"""Messages a call holds for its consumer at most; one more ends it RESOURCE_EXHAUSTED (credit
withheld at QUEUE_LIMIT still leaves the peer a stream window: 4 MiB of 5-octet messages)."""


def error_name(code: int) -> str:
    """An HTTP/2 error code's name (RFC 9113 §7), or its number when unknown."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


def debug_text(debug: bytes) -> str:
    """GOAWAY debug data as text for a status message (at most 200 characters)."""
    return debug[:200].decode("utf-8", "replace")


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (`meshcore.address.split_host_port`, port 1..65535) ->
    (host, port); GrpcError(UNAVAILABLE) otherwise (the caller's retry loop logs it, as it
    would a refused connection)."""
    try:
        host, port = split_host_port(address)
    except ValueError:
        port = 0
    if port == 0:
        raise GrpcError(UNAVAILABLE, f"control-plane address {address!r}: want host:port")
    return host, port


def client_context(roots_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+ verifying the server's chain against `roots_pem` and its name (the caller's
    server_hostname), offering only h2 (RFC 9113 §3.2; gRPC requires it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def connect(
    address: str,
    *,
    tls_roots: bytes | None,
    server_name: str,
    timeout: float = 10.0,
    max_message: int = DEFAULT_MAX_MESSAGE,
) -> GrpcConnection:
    """Dial `address`; with `tls_roots`, TLS verified against them for `server_name`.
    Failures raise GrpcError(UNAVAILABLE) naming the cause."""
    loop = asyncio.get_running_loop()
    host, port = split_address(address)
    authority = server_name if tls_roots is not None else address
    ctx = None
    if tls_roots is not None:  # before dialling: nothing to close when the roots are bad
        try:
            ctx = client_context(tls_roots)
        except (ssl.SSLError, ValueError) as err:  # UnicodeDecodeError is a ValueError
            raise GrpcError(UNAVAILABLE, f"control-plane TLS roots unusable: {err}") from None
    try:
        sock = await connect_tcp(host, port, timeout=timeout)
    except (OSError, TimeoutError) as err:
        raise GrpcError(UNAVAILABLE, f"connect to {address}: {err}") from None
    try:
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: GrpcConnection(authority, "https" if ctx else "http", max_message),
                sock=sock,
                ssl=ctx,
                server_hostname=server_name if ctx else None,
                ssl_handshake_timeout=timeout if ctx else None,
            ),
            timeout,
        )
    except (OSError, TimeoutError, ssl.SSLError) as err:
        sock.close()
        raise GrpcError(UNAVAILABLE, f"connect to {address}: {err}") from None
    except BaseException:
        sock.close()
        raise
    conn = proto
    if ctx is not None and conn.alpn != "h2":
        conn.abort()
        raise GrpcError(UNAVAILABLE, f"{address} did not negotiate h2 (ALPN {conn.alpn!r})")
    return conn


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection carrying gRPC calls (client role). Create with `connect`."""

    def __init__(self, authority: str, scheme: str, max_message: int) -> None:
        self.conn = HboneConnection(Role.CLIENT)
        self.authority = authority
        self.scheme = scheme
        self.max_message = max_message
        self.calls: dict[int, GrpcCall] = {}
        self.transport: asyncio.Transport | None = None
        self.alpn: str | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._flush_pending = False
        self._error = ""
        """Why we ended the connection (our GOAWAY for the server's HTTP/2 violation)."""
        self._goaway = ""
        """The server's GOAWAY (code and debug data), once received."""
        self._slot_freed: asyncio.Future[None] | None = None
        """Set when a stream slot may have freed or the connection ended (`wait_for_stream`)."""

    # ---- lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.alpn = ssl_object.selected_alpn_protocol()
        self.conn.initiate(self._loop.time())
        self.flush()
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        why = self._error or self._goaway or exc or "closed"
        reason = f"connection to the control plane lost: {why}"
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call._finish(call.reader.lost(reason))
        self.conn.discard()
        self.transport = None
        self._wake_slot_waiters()

    @property
    def alive(self) -> bool:
        """Not closed and no GOAWAY either way: new calls may start here, perhaps after waiting
        for a stream slot (`wait_for_stream`). A connection that is not alive is never closed
        for it by a caller: its open calls drain (the server's GOAWAY lets them finish, RFC
        9113 §6.8) and it closes itself once the last one ended (`_retire_if_drained`)."""
        c = self.conn
        return not self.closed and not c.closed and c.goaway_received is None and not c.goaway_sent

    @property
    def usable(self) -> bool:
        """A new call may start here now: alive, and a stream slot free under the server's
        MAX_CONCURRENT_STREAMS."""
        return self.alive and self.conn.can_open_stream(limit=self.conn.peer_max_streams)

    async def wait_for_stream(self) -> None:
        """Return once a call may start (`usable`); GrpcError(UNAVAILABLE) once the connection
        is no longer `alive`. Unbounded here: the caller's deadline bounds it."""
        while not self.usable:
            if not self.alive:
                raise GrpcError(UNAVAILABLE, f"connection to the control plane {self.why_not}")
            if self._slot_freed is None or self._slot_freed.done():
                self._slot_freed = self._loop.create_future()
            await asyncio.shield(self._slot_freed)

    @property
    def why_not(self) -> str:
        """Why the connection takes no new call (for a status message)."""
        return f"is closed ({self._ended_by()})" if self.closed else "is going away"

    def _ended_by(self) -> str:
        return self._error or self._goaway or "closed"

    def _retire_if_drained(self) -> None:
        """After the server's GOAWAY, close once no call is left (nothing more can start)."""
        if self.conn.goaway_received is not None and not self.calls and not self.closed:
            self.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """GOAWAY and close: calls still open end UNAVAILABLE."""
        if self.transport is not None and not self.closed:
            self.conn.close()
            self.flush()
            self.transport.close()

    # ---- I/O

    def _arm_timer(self) -> None:
        when = self.conn.get_timer()
        if when is not None and not self.closed:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        goaway_sent = self.conn.goaway_sent
        alive = self.conn.handle_timer(self._loop.time())
        self.flush()
        if not alive:  # no PING answer (or SETTINGS ACK) in time: the peer is gone
            if self.conn.goaway_sent and not goaway_sent:  # the core's GOAWAY says which
                why = "SETTINGS not acknowledged or a header block unfinished in time"
            else:
                why = f"no PING answer within {PING_TIMEOUT:g} s"
            self._error = self._error or why
            log.warning("control plane %s: %s; connection closed", self.authority, why)
            self.abort()
            return
        self._arm_timer()

    def flush(self) -> None:
        self._flush_pending = False
        if self.conn.has_output and self.transport is not None:
            self.transport.write(self.conn.data_to_send())
        self._wake_slot_waiters()

    def _wake_slot_waiters(self) -> None:
        fut = self._slot_freed
        if fut is not None and not fut.done() and (self.usable or not self.alive):
            fut.set_result(None)

    def schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def data_received(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data, self._loop.time()):
            kind = type(ev)
            if kind is ConnectionTerminated:
                ev = cast(ConnectionTerminated, ev)
                if not ev.remote:  # our GOAWAY for a protocol error: every call is over
                    debug = debug_text(ev.debug)
                    self._error = (
                        f"HTTP/2 error {error_name(ev.error_code)} from the server: {debug}"
                    )
                    log.warning("control plane %s: %s", self.authority, self._error)
                    self.flush()
                    self.abort()
                    return
                # The server's GOAWAY: the core reset the calls it did not take (REFUSED_STREAM);
                # the others may finish. Its code and debug data name the cause (RFC 9113 §6.8).
                self._goaway = f"GOAWAY {error_name(ev.error_code)} {debug_text(ev.debug)}".strip()
                log.warning("control plane %s sent %s", self.authority, self._goaway)
                continue
            call = self.calls.get(getattr(ev, "stream_id", -1))
            if call is None:
                if kind is DataReceived:  # a call we gave up: credit and drop
                    ev = cast(DataReceived, ev)
                    self.conn.acknowledge_received_data(ev.stream_id, ev.flow_length)
                continue
            if kind is DataReceived:
                call._on_data(cast(DataReceived, ev))
            elif kind is ResponseReceived:
                ev = cast(ResponseReceived, ev)
                call._on_status(call.reader.headers(ev.status, ev.headers))
            elif kind is TrailersReceived:
                call._on_status(call.reader.trailers(cast(TrailersReceived, ev).headers))
            elif kind is StreamEnded:
                call._finish(call.reader.ended())
            elif kind is StreamReset:
                ev = cast(StreamReset, ev)
                call._finish(call.reader.reset(ev.error_code, remote=ev.remote, why=self._goaway))
        self.flush()
        self._retire_if_drained()

    # ---- calls

    def start(
        self,
        path: str,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> GrpcCall:
        """Open a call of method `path` (``/package.Service/Method``)."""
        if not self.usable:
            why = self.why_not if not self.alive else "has no free stream (wait_for_stream)"
            raise GrpcError(UNAVAILABLE, f"connection to the control plane {why}")
        block = request_headers(
            path=path,
            authority=self.authority,
            scheme=self.scheme,
            metadata=metadata,
            timeout=timeout,
        )
        try:
            stream_id = self.conn.open_request(block)
        except H2ProtocolError as err:
            raise GrpcError(UNAVAILABLE, str(err)) from None
        call = GrpcCall(self, stream_id, ResponseReader(self.max_message))
        self.calls[stream_id] = call
        self.schedule_flush()
        return call

    async def unary(
        self,
        path: str,
        request: bytes,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float,
    ) -> bytes:
        """One request, exactly one response message, within `timeout` (DEADLINE_EXCEEDED),
        which also bounds the wait for a stream slot when the server's MAX_CONCURRENT_STREAMS
        calls are open. The call is cancelled (RST_STREAM) on every exit but a whole answer."""
        call: GrpcCall | None = None
        deadline = self._loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self.wait_for_stream()
                left = max(deadline - self._loop.time(), 0.001)
                call = self.start(path, metadata=metadata, timeout=left)
                call.send(request, end=True)
                response = await call.recv()
                if response is None:
                    raise GrpcError(INTERNAL, "call ended OK without a response message")
                if await call.recv() is not None:
                    raise GrpcError(INTERNAL, "more than one response message to a unary call")
        except TimeoutError:
            if call is not None:
                call.cancel()
            raise GrpcError(DEADLINE_EXCEEDED, f"no answer within {timeout:g}s") from None
        except BaseException:
            if call is not None:
                call.cancel()
            raise
        return response


class GrpcCall:
    """One call (an HTTP/2 stream) on a `GrpcConnection`."""

    def __init__(self, owner: GrpcConnection, stream_id: int, reader: ResponseReader) -> None:
        self._owner = owner
        self.stream_id = stream_id
        self.reader = reader
        self._messages: deque[bytes] = deque()
        self._queued = 0
        self._unacked = 0
        self._waiter: asyncio.Future[None] | None = None
        self.status: Status | None = None

    # ---- sending

    def send(self, message: bytes, *, end: bool = False) -> None:
        """Queue one request message (HTTP/2 flow control paces it); `end`: the last one. A
        call whose unsent octets exceed `SEND_LIMIT` (the server does not open its window)
        ends RESOURCE_EXHAUSTED (RST_STREAM CANCEL) instead of queueing more."""
        if self.status is not None:
            return  # the call is over: the message has nowhere to go
        owner = self._owner
        owner.conn.send_data(self.stream_id, frame_message(message), end_stream=end)
        owner.schedule_flush()
        unsent = owner.conn.pending_bytes(self.stream_id)
        if unsent > SEND_LIMIT:
            self._owner.conn.reset_stream(self.stream_id, ErrorCode.CANCEL)
            held = f"{unsent} request octets the server's flow-control window does not take"
            self._finish(Status(code=RESOURCE_EXHAUSTED, message=held))

    def done_sending(self) -> None:
        if self.status is None:
            self._owner.conn.end_stream(self.stream_id)
            self._owner.schedule_flush()

    def cancel(self) -> None:
        """RST_STREAM(CANCEL) (the spec's client cancellation); the call ends CANCELLED."""
        if self.status is None:
            self._owner.conn.reset_stream(self.stream_id, ErrorCode.CANCEL)
            self._owner.schedule_flush()
            self._finish(Status(code=CANCELLED, message="cancelled by the client"))

    # ---- receiving

    async def recv(self) -> bytes | None:
        """The next response message; None once the call ended OK; GrpcError otherwise."""
        while not self._messages:
            if self.status is not None:
                err = self.status.error()
                if err is not None:
                    raise err
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._messages.popleft()
        self._queued -= PREFIX + len(message) + MESSAGE_ALLOWANCE
        if self._unacked and self._queued <= QUEUE_LIMIT:
            self._owner.conn.acknowledge_received_data(self.stream_id, self._unacked)
            self._unacked = 0
            self._owner.schedule_flush()
        return message

    def __aiter__(self) -> GrpcCall:
        return self

    async def __anext__(self) -> bytes:
        message = await self.recv()
        if message is None:
            raise StopAsyncIteration
        return message

    # ---- from the connection

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_data(self, ev: DataReceived) -> None:
        try:
            messages = self.reader.data(ev.data)
        except GrpcError as err:
            self._owner.conn.acknowledge_received_data(ev.stream_id, ev.flow_length)
            self._owner.conn.reset_stream(self.stream_id, ErrorCode.CANCEL)
            self._finish(Status(code=err.code, message=err.details))
            return
        for message in messages:
            self._messages.append(message)
            self._queued += PREFIX + len(message) + MESSAGE_ALLOWANCE
        if len(self._messages) > MAX_QUEUED_MESSAGES:
            self._owner.conn.acknowledge_received_data(ev.stream_id, ev.flow_length)
            self._owner.conn.reset_stream(self.stream_id, ErrorCode.CANCEL)
            self._messages.clear()  # the call failed: what it held is dropped with it
            self._queued = 0
            held = f"more than {MAX_QUEUED_MESSAGES} response messages not taken yet"
            self._finish(Status(code=RESOURCE_EXHAUSTED, message=held))
            return
        if self._queued <= QUEUE_LIMIT:
            self._owner.conn.acknowledge_received_data(ev.stream_id, ev.flow_length)
        else:
            self._unacked += ev.flow_length
        if messages:
            self._wake()

    def _on_status(self, status: Status | None) -> None:
        """A status the response headers or trailers settled; a failed call is reset (the
        peer may still be sending) and over."""
        if status is None:
            return
        if status.code != 0:
            self._owner.conn.reset_stream(self.stream_id, ErrorCode.CANCEL)
        self._finish(status)

    def _finish(self, status: Status) -> None:
        if self.status is None:
            self.status = status
        owner = self._owner
        owner.calls.pop(self.stream_id, None)
        if self._unacked:
            owner.conn.acknowledge_received_data(self.stream_id, self._unacked)
            self._unacked = 0
        if owner.conn.is_open(self.stream_id):
            # Trailers before our END_STREAM (the spec's "early server closure"): RST NO_ERROR.
            owner.conn.reset_stream(self.stream_id, ErrorCode.NO_ERROR)
        owner.schedule_flush()
        self._wake()
        owner._retire_if_drained()
