"""asyncio edge of HBONE: moves bytes between a TLS transport and `HboneConnection`.

Owns: one `HboneProtocol` per mTLS connection (client or server role; what a listener's or a
pool's connections share is one `HboneSettings`, built once), the client dial `connect` of a
`PoolKey`, the `HboneStream` handle the proxies use, and peer verification timing: the peer
certificate is checked right after the TLS handshake and before any HTTP/2 byte is processed or
sent. Also the stream-event handlers both edges share (`on_stream_data`, `on_stream_ended`,
`on_response`, `on_window_opened`; the HTTP/3 edge `meshcore.hbone.h3aio` calls them with its own
streams and core).

Transport independence: proxies see only `TunnelStream` (write / write_eof / reset) and feed a
`TunnelSink` (data / eof / reset / backpressure). HBONE over HTTP/3 (`h3aio.H3Stream`) provides
the same two interfaces, so nothing above this module knows which transport carries a tunnel.

Invariants:
- Every event batch from `receive_data` is followed by exactly one flush of the connection's
  output (`data_to_send_parts`: one TLS write, or one vectored write when it carries large DATA).
- Received DATA is credited back to the peer only once the sink has accepted it without being
  paused; a paused sink acknowledges on resume, which keeps per-stream memory bounded by the
  stream window (4 MiB).
- Bytes the TLS transport cannot hand to the kernel stop every source of the connection past
  the transport's high-water mark (`pause_writing`), so a peer that opens its windows but does
  not read holds us to that mark, not to its windows (4 MiB per stream, 16 MiB per connection).
- Bytes queued for a peer that does not open its windows stop the source of their stream past
  the stream's high-water mark, and EVERY source of the connection past the connection's
  (`HboneConnection.pending_blocked`), so a connection pins a few MiB, not 200 streams' worth.
- Work started for a stream (`HboneStream.work`, e.g. the upstream connect of a CONNECT) is
  cancelled the moment the stream is reset or the connection is lost: work cancelled before
  it first runs never creates its socket (CVE-2023-44487 "rapid reset").
- One timer per connection, armed for `HboneConnection.get_timer()` (no periodic polling).
- A stream that leaves the connection's table (closed both ways, reset, refused, or its
  connection lost) lets go of its sink: a sink holds its stream, and the two must not be a
  reference cycle per tunnel that only the cyclic GC frees.
- `connect`'s socket has one owner: the dial until the loop's transport takes it, then the
  transport (closed by the loop when the dial fails or is cancelled; uvloop >= 0.23 detaches
  the socket object then), never closed by the dial once taken: a second close hits whatever
  connection was given the number meanwhile (tests/unit/test_hbone_connect.py).
- A closed connection drops its protocol state (`conn`'s buffers, streams, callbacks) and its
  transport at once. The SSL transport outlives `connection_lost` (measured on asyncio: one
  reference to it that no GC-tracked object holds, so `gc.collect()` frees nothing); through our
  `transport` attribute it used to keep this protocol and whatever a peer cut mid-frame had left
  in its buffers (up to a 1 MiB frame each) alive for good (issue 9).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, cast

from mypy_extensions import mypyc_attr

from meshcore.errors import H2ProtocolError, HboneError, PeerVerificationError, StreamRefused
from meshcore.hbone.budget import RateBudget
from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.control import SERVER_MAX_STREAMS
from meshcore.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from meshcore.hbone.flow import PENDING_HIGH_WATER
from meshcore.hbone.frames import FRAME_HEADER, ErrorCode
from meshcore.hbone.headerblock import MAX_INTERIM_HEADS
from meshcore.hbone.output import BIG_PAYLOAD
from meshcore.hbone.streams import Role
from meshcore.identity import SpiffeId
from meshcore.sockets import connect_tcp
from meshcore.tls import verify_peer


class TunnelSink(Protocol):
    """What a tunnel delivers to (the local side of a relay)."""

    write_paused: bool

    def tunnel_data(self, data: bytes) -> None: ...

    def tunnel_eof(self) -> None: ...

    def tunnel_reset(self, code: int, remote: bool) -> None:
        """The stream was reset: by the peer or with the connection (`remote`), or by us for
        the peer's error on it (a malformed response, too many interim ones)."""

    def tunnel_pause_source(self) -> None:
        """The tunnel can't take more now: stop reading the local source."""

    def tunnel_resume_source(self) -> None: ...


class TunnelStream(Protocol):
    """What the proxies write into: one tunnelled TCP connection, whatever the transport."""

    peer_identity: SpiffeId | None

    def attach(self, sink: TunnelSink) -> None: ...

    def write(self, data: bytes) -> None: ...

    def write_in_place(self, frame: memoryview) -> None:
        """`write(frame[FRAME_HEADER:])`, where `frame` is a view of the caller's read buffer
        with FRAME_HEADER octets of room in front of the bytes read. The buffer is the caller's
        again when this returns (what is kept is copied)."""

    def write_eof(self) -> None: ...

    def reset(self, code: int = ErrorCode.CONNECT_ERROR) -> None: ...

    def acknowledge(self, length: int) -> None: ...


class StreamWork(Protocol):
    """Work started for a stream (`HboneStream.work`): cancelled when the stream goes away
    (reset, connection lost, or answered), at most once; a no-op once the work is over."""

    def cancel(self) -> object: ...


def copied_payload(frame: memoryview) -> bytes:
    """`write_in_place`'s fallback: its payload copied, for `write` (what can't leave at once)."""
    return bytes(frame[FRAME_HEADER:])


@mypyc_attr(allow_interpreted_subclasses=True)  # meshcore.hbone.h3aio.H3Stream
class HboneStream:
    """One CONNECT stream on an `HboneProtocol`."""

    __slots__ = (
        "_early",
        "_proto",
        "authority",
        "closed",
        "headers",
        "peer_identity",
        "response",
        "sink",
        "stream_id",
        "work",
    )

    transport: ClassVar[str] = "h2"  # for telemetry; HTTP/3 streams (meshcore.hbone.h3aio) say "h3"

    def __init__(self, proto: HboneProtocol, stream_id: int) -> None:
        self._proto = proto
        self._start(stream_id, proto.peer_identity)

    def _start(self, stream_id: int, peer_identity: SpiffeId | None) -> None:
        """The stream's state, whatever the transport (`h3aio.H3Stream` starts the same)."""
        self.stream_id = stream_id
        self.sink: TunnelSink | None = None
        self.peer_identity = peer_identity
        self.headers: list[tuple[str, str]] = []
        self.authority = ""
        self.response: asyncio.Future[int] | None = None
        self._early: list[bytes | None] = []  # data (None = EOF) arriving before a sink attaches
        self.closed = False
        self.work: StreamWork | None = None  # work for this stream; cancelled on reset

    def _gone(self) -> None:
        """The stream is closed or reset: stop any work still pending for it."""
        self.closed = True
        work, self.work = self.work, None
        if work is not None:
            work.cancel()

    def attach(self, sink: TunnelSink) -> None:
        self.sink = sink
        early, self._early = self._early, []
        for chunk in early:
            if chunk is None:
                sink.tunnel_eof()
            else:
                sink.tunnel_data(chunk)
                self._proto.ack(self.stream_id, len(chunk))

    def respond(self, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Server side: send the CONNECT response (200 opens the tunnel)."""
        self._proto.conn.respond(self.stream_id, status, headers)
        if status != 200:
            self._proto.forget(self.stream_id)
        self._proto.schedule_flush()

    def write(self, data: bytes) -> None:
        proto = self._proto
        if not proto.conn.send_data(self.stream_id, data):
            if proto.conn.pending_blocked:
                proto.pause_all_sources()
            elif self.sink is not None:
                self.sink.tunnel_pause_source()
        elif proto.write_paused and self.sink is not None:
            self.sink.tunnel_pause_source()  # the TLS transport is over its mark
        proto.schedule_flush()

    def write_in_place(self, frame: memoryview) -> None:
        """A payload that can leave at once becomes a DATA frame in the caller's buffer (its
        header in the room in front). A large one is flushed now: the TLS layer encrypts it
        during this call, so nothing refers to the buffer afterwards and no byte was copied. A
        small one is copied once, header and payload together, and leaves with the loop
        iteration's coalesced flush. Anything else (windows shut, data queued) is copied and
        written as by `write`."""
        proto = self._proto
        big = len(frame) - FRAME_HEADER >= BIG_PAYLOAD
        if proto.transport is not None and proto.conn.send_data_in_place(
            self.stream_id, frame, copy=not big
        ):
            if big:
                proto.flush()
            if proto.write_paused and self.sink is not None:
                self.sink.tunnel_pause_source()  # the TLS transport is over its mark
            if not big:
                proto.schedule_flush()
            return
        self.write(copied_payload(frame))

    def write_eof(self) -> None:
        proto = self._proto
        proto.conn.end_stream(self.stream_id)
        if not proto.conn.is_open(self.stream_id):
            proto.forget(self.stream_id)  # the peer had ended too: closed both ways
        proto.schedule_flush()

    def reset(self, code: int = ErrorCode.CONNECT_ERROR) -> None:
        if not self.closed:
            self.closed = True
            self._proto.conn.reset_stream(self.stream_id, code)
            self._proto.forget(self.stream_id)
            self._proto.schedule_flush()

    def acknowledge(self, length: int) -> None:
        proto = self._proto
        proto.ack(self.stream_id, length)
        if proto.conn.has_output:  # credit is batched (half a window): most acks queue nothing
            proto.schedule_flush()


class AcknowledgesData(Protocol):
    """The sans-I/O core's flow-control credit (`HboneConnection`, `h3.H3HboneConnection`)."""

    def acknowledge_received_data(self, stream_id: int, flow_length: int) -> None: ...


# Stream events handled the same way by both edges (this HTTP/2 one and `h3aio`'s HTTP/3 one).


def on_stream_data(
    streams: Mapping[int, HboneStream], conn: AcknowledgesData, ev: DataReceived
) -> None:
    """DATA to the stream's sink (credited at once unless it paused), or kept until a sink
    attaches; DATA of a stream we forgot is credited and dropped."""
    stream = streams.get(ev.stream_id)
    if stream is None:
        conn.acknowledge_received_data(ev.stream_id, ev.flow_length)
    elif stream.sink is None:
        stream._early.append(ev.data)
    else:
        stream.sink.tunnel_data(ev.data)
        if not stream.sink.write_paused:
            conn.acknowledge_received_data(ev.stream_id, ev.flow_length)


def on_stream_ended(streams: Mapping[int, HboneStream], ev: StreamEnded) -> None:
    stream = streams.get(ev.stream_id)
    if stream is not None:
        if stream.sink is None:
            stream._early.append(None)
        else:
            stream.sink.tunnel_eof()


def on_response(
    streams: Mapping[int, HboneStream], forget: Callable[[int], None], ev: ResponseReceived
) -> None:
    """The CONNECT's response to its opener; a refusal (not 200) ends the stream."""
    stream = streams.get(ev.stream_id)
    if stream is not None and stream.response is not None:
        stream.headers = ev.headers
        if not stream.response.done():
            stream.response.set_result(ev.status)
        if ev.status != 200:
            forget(ev.stream_id)


def on_window_opened(streams: Mapping[int, HboneStream], ev: WindowOpened) -> None:
    for sid in ev.stream_ids:
        stream = streams.get(sid)
        if stream is not None and stream.sink is not None:
            stream.sink.tunnel_resume_source()


DELAYED_CLOSE = 1.0  # seconds between our GOAWAY for a protocol error and the abort
RequestHandler = Callable[[HboneStream], None]
RefusalHandler = Callable[["HboneProtocol", RequestRefused], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class HboneSettings:
    """What every connection of one listener or one pool shares: built once, not per connection."""

    trust_domain: str
    max_concurrent_streams: int = SERVER_MAX_STREAMS
    """SETTINGS_MAX_CONCURRENT_STREAMS we advertise (RFC 9113 §6.5.2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HboneHooks:
    """Who an `HboneProtocol` tells about requests, refusals, its protocol errors and its end."""

    on_request: RequestHandler | None = None
    on_close: Callable[[HboneProtocol], None] | None = None
    on_refused: RefusalHandler | None = None
    on_error: Callable[[HboneProtocol, ConnectionTerminated], None] | None = None


NO_HOOKS = HboneHooks()


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolKey:
    """Where a client connection goes, from where, and whom it accepts. `connect` and
    `meshcore.hbone.h3aio.connect_h3` dial one; `meshcore.hbone.pool.HbonePool` keys its
    connections by it (like Istio's pool)."""

    source: SpiffeId
    """Identity whose certificate the client presents."""
    expected: tuple[SpiffeId, ...]
    """Server identities accepted for this destination."""
    address: tuple[str, int]
    """Where the HBONE connection goes (ip, 15008)."""
    source_ip: str | None = None
    """Bind the connection to this source IP (original-source mode), or None."""
    transparent: bool = False
    """Bind `source_ip` with IP_TRANSPARENT (it is not an address of this node)."""
    transport: str = "h2"
    """"h2": HBONE over HTTP/2 (TLS over TCP); "h3": try HTTP/3 (QUIC) first (see the pool)."""
    h3_address: tuple[str, int] | None = None
    """Where HTTP/3 goes (UDP) when not `address`: a node proxy's shared socket."""
    server_name: str | None = None
    """SNI of the HTTP/3 connection, naming the destination workload (`server_name_for`)."""


class HboneProtocol(asyncio.BufferedProtocol):
    """An mTLS connection speaking HBONE. Create with `connect()` or `HboneServer`."""

    def __init__(
        self,
        role: Role,
        settings: HboneSettings,
        hooks: HboneHooks = NO_HOOKS,
        *,
        expected: Collection[SpiffeId] | None = None,
        peer_resets: RateBudget | None = None,
    ) -> None:
        """`expected`: the server identities a client accepts (None: any of the trust domain).
        `peer_resets`: a reset budget shared by the peer's connections (`HboneConnection`)."""
        self.conn = HboneConnection(
            role, max_concurrent_streams=settings.max_concurrent_streams, peer_resets=peer_resets
        )
        self.on_refused = hooks.on_refused
        self.on_error = hooks.on_error
        self.role = role
        self.trust_domain = settings.trust_domain
        self.expected = expected
        self.on_request = hooks.on_request
        self.on_close = hooks.on_close
        self.transport: asyncio.Transport | None = None
        self.peer_identity: SpiffeId | None = None
        self.streams: dict[int, HboneStream] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.idle_since = asyncio.get_running_loop().time()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._flush_pending = False
        self.write_paused = False  # the TLS transport's buffer is over its high-water mark

    # ---- lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Client role: called after the TLS handshake (create_connection with ssl=...).
        self.tls_established(cast(asyncio.Transport, transport))

    def tls_established(self, transport: asyncio.Transport) -> None:
        """Verify the peer before any HTTP/2 byte moves, then send the preface/SETTINGS."""
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            if ssl_object is None:
                raise PeerVerificationError("HBONE requires TLS")
            self.peer_identity = verify_peer(
                ssl_object, trust_domain=self.trust_domain, expected=self.expected
            )
        except PeerVerificationError as err:
            self.closed = True
            if not self.ready.done():
                self.ready.set_exception(err)
            transport.abort()
            return
        self.conn.initiate(self._loop.time())
        self.flush()
        self._arm_timer()
        if self.role is Role.SERVER and not self.ready.done():
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionResetError("HBONE connection closed"))
        self._fail_streams()
        on_close, self.on_close = self.on_close, None
        # Drop the protocol state now: a peer cut mid-frame leaves up to a frame (1 MiB) and a
        # header block in `conn`, and the closed transport (which outlives this call) must not
        # keep them: see the module docstring.
        self.conn.discard()
        self.on_request = None
        self.on_refused = None
        self.on_error = None
        if on_close is not None:
            on_close(self)
        self.transport = None  # break the protocol <-> transport cycle

    def _fail_streams(self) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._gone()
            if stream.response is not None and not stream.response.done():
                stream.response.set_exception(ConnectionResetError("HBONE connection lost"))
            if stream.sink is not None:
                stream.sink.tunnel_reset(ErrorCode.CONNECT_ERROR, True)
            stream.sink = None  # see `forget`

    def _arm_timer(self) -> None:
        when = self.conn.get_timer()
        if when is not None and not self.closed:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        if not self.conn.handle_timer(self._loop.time()):
            self.flush()  # the GOAWAY, if the connection timed the peer out
            self.abort()  # no PING answer within the timeout: the peer is gone
            return
        self.flush()
        self._arm_timer()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Graceful: GOAWAY(NO_ERROR); open streams may finish; closes when the last one ends."""
        self.conn.close()
        self.flush()
        if not self.streams and self.transport is not None:
            self.transport.close()

    # ---- I/O -------------------------------------------------------------------------------

    def flush(self) -> None:
        self._flush_pending = False
        if not self.conn.has_output:
            return  # most reads queue nothing to send (credit is batched at half a window)
        parts = self.conn.data_to_send_parts()  # large DATA payloads are not copied (joined)
        if parts and self.transport is not None:
            if len(parts) == 1:
                self.transport.write(parts[0])
            else:
                self.transport.writelines(parts)

    def schedule_flush(self) -> None:
        """Coalesce: frames queued by many streams in one loop iteration (each fed by its own
        TCP socket) leave in ONE TLS write, i.e. one record batch and one syscall, at the end
        of the iteration (call_soon runs after this iteration's I/O callbacks)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def pause_writing(self) -> None:
        """The TLS transport holds more than its high-water mark (the peer or the network does
        not take our bytes as fast as the sources produce them): stop reading every source. So
        what a connection buffers is bounded by the transport's mark, not by the peer's windows
        (4 MiB per stream, 16 MiB per connection), which only bound what is in flight."""
        self.write_paused = True
        self.pause_all_sources()

    def resume_writing(self) -> None:
        """Below the transport's low-water mark: resume the sources that nothing else holds
        (their stream's queue and the connection's are below their marks)."""
        self.write_paused = False
        if self.conn.pending_blocked:
            return  # the connection's queues resume every source with one WindowOpened
        for sid, stream in list(self.streams.items()):
            if stream.sink is not None and self.conn.pending_bytes(sid) < PENDING_HIGH_WATER:
                stream.sink.tunnel_resume_source()

    def pause_all_sources(self) -> None:
        """The connection's queued bytes are over their mark: stop reading every source (the
        protocol core resumes them all with one `WindowOpened`)."""
        for stream in self.streams.values():
            if stream.sink is not None:
                stream.sink.tunnel_pause_source()

    def ack(self, stream_id: int, length: int) -> None:
        self.conn.acknowledge_received_data(stream_id, length)

    def forget(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream._gone()
            # Nothing is delivered to a forgotten stream: let go of its sink, which holds the
            # stream (a `waypoint.tunnel.TunnelIO`), so the two are not a reference cycle that
            # only the cyclic GC would free (one per tunnel).
            stream.sink = None
        if not self.streams:
            self.idle_since = self._loop.time()
            # After a graceful GOAWAY the last stream closes the connection. After one for a
            # protocol error (conn.closed) the delayed close does it, once the GOAWAY is out.
            if self.conn.goaway_sent and not self.conn.closed and self.transport is not None:
                self.flush()
                self.transport.close()

    # BufferedProtocol: the TLS layer decrypts straight into our buffer. With a plain Protocol,
    # uvloop's TLS reader allocates a fresh 256 KiB bytes object per read, which costs more than
    # the decryption of a small record. One buffer serves every connection of the process: the
    # event loop is single-threaded and `buffer_updated` copies the bytes out before any other
    # protocol is asked for the buffer. The protocol core parses the frames in place and copies
    # each DATA payload out once (a copy of the whole read first, then of the payloads, cost a
    # second pass over every byte: bench/README.md, "Bulk and memory, session 5").
    _read_view: ClassVar[memoryview] = memoryview(bytearray(256 * 1024))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        events = self.conn.receive_data(data, self._loop.time())
        if len(events) == 1 and type(events[0]) is DataReceived:
            # Hot path: one DATA chunk for an attached, unpaused sink.
            ev = events[0]
            stream = self.streams.get(ev.stream_id)
            if stream is not None and stream.sink is not None:
                sink = stream.sink
                sink.tunnel_data(ev.data)
                if not sink.write_paused:
                    self.conn.acknowledge_received_data(ev.stream_id, ev.flow_length)
                self.flush()
                return
        self._dispatch(events)
        self.flush()

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            if type(ev) is DataReceived:
                on_stream_data(self.streams, self.conn, ev)
            elif type(ev) is StreamEnded:
                on_stream_ended(self.streams, ev)
            elif type(ev) is RequestReceived:
                self._on_request(ev)
            elif type(ev) is RequestRefused:
                if self.on_refused is not None:
                    self.on_refused(self, ev)
            elif type(ev) is ResponseReceived:
                on_response(self.streams, self.forget, ev)
            elif type(ev) is StreamReset:
                self._on_reset(ev)
            elif type(ev) is WindowOpened:
                if not self.write_paused:  # else `resume_writing` resumes them
                    on_window_opened(self.streams, ev)
            elif type(ev) is ConnectionTerminated:
                self._on_terminated(ev)
        for sid in [s for s in self.streams if not self.conn.is_open(s)]:
            self.forget(sid)  # closed in both directions by END_STREAMs

    def _on_reset(self, ev: StreamReset) -> None:
        stream = self.streams.pop(ev.stream_id, None)
        if stream is None:
            return
        stream._gone()
        pending = stream.response
        if pending is not None and pending.done():
            pending = None
        if pending is not None and ev.error_code == ErrorCode.REFUSED_STREAM:
            # Not processed (GOAWAY's last id, or refused): the pool retries it on another
            # connection, so the sink must not see a reset.
            pending.set_exception(StreamRefused(f"CONNECT {stream.authority}"))
        else:
            if pending is not None:
                pending.set_exception(ConnectionResetError(_reset_reason(ev)))
            if stream.sink is not None:
                stream.sink.tunnel_reset(ev.error_code, ev.remote)
        stream.sink = None  # see `forget`
        self.forget(ev.stream_id)

    def _on_terminated(self, ev: ConnectionTerminated) -> None:
        if not ev.remote:
            # Our GOAWAY for a protocol error. Closing now would discard it: a socket closed
            # with unread input sends RST, and the peer loses what it had not read yet. Like
            # Envoy's delayed close, keep reading (and discarding, the connection is closed)
            # for DELAYED_CLOSE, then abort.
            if self.on_error is not None:
                self.on_error(self, ev)
            self.flush()
            self._fail_streams()
            self._loop.call_later(DELAYED_CLOSE, self.abort)
        elif not self.streams and self.transport is not None:
            self.transport.close()

    def _on_request(self, ev: RequestReceived) -> None:
        # Validated by the protocol core: a plain CONNECT with a host:port :authority.
        stream = HboneStream(self, ev.stream_id)
        stream.headers = ev.headers
        stream.authority = ev.authority
        self.streams[ev.stream_id] = stream
        if self.on_request is None:
            stream.respond(503)
            return
        self.on_request(stream)

    # ---- client ----------------------------------------------------------------------------

    def start_stream(
        self, authority: str, headers: Sequence[tuple[str, str]], sink: TunnelSink
    ) -> HboneStream:
        """Send CONNECT (with this loop iteration's flush); its status arrives in the stream's
        `response` future. Raises StreamRefused (nothing was sent: the pool may retry on
        another connection) or ConnectionResetError."""
        if self.closed or self.conn.goaway_received is not None:
            # connection_lost already failed every pending response; a stream opened after it
            # would wait forever (e.g. TLS 1.3: the server rejects our certificate only after
            # our side of the handshake completed, so connect() returned a doomed connection).
            raise StreamRefused("HBONE connection closed before the CONNECT was sent")
        try:
            sid = self.conn.open_connect(authority, headers)
        except H2ProtocolError as err:
            raise ConnectionResetError(str(err)) from err
        stream = HboneStream(self, sid)
        stream.authority = authority
        stream.response = self._loop.create_future()
        self.streams[sid] = stream
        stream.sink = sink  # data only flows after 200; attach now so nothing is buffered
        self.schedule_flush()  # the CONNECTs of one loop iteration leave in one TLS write
        return stream

    async def open_stream(
        self, authority: str, headers: Sequence[tuple[str, str]], sink: TunnelSink
    ) -> HboneStream:
        """Send CONNECT and wait for the response. Raises HboneError for a non-200 status."""
        stream = self.start_stream(authority, headers, sink)
        assert stream.response is not None
        status = await stream.response
        if status != 200:
            raise HboneError.for_status(status, f"CONNECT {authority} refused with {status}")
        return stream


async def accept_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    proto: HboneProtocol,
    timeout: float = 10.0,
) -> None:
    """Server role: TLS handshake on an accepted socket with a context chosen by the caller
    (from the destination address: HBONE clients send no SNI), then peer verification.
    `loop.connect_accepted_socket` works the same on asyncio and uvloop (start_tls does not)."""
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_accepted_socket(
            lambda: proto, sock, ssl=context, ssl_handshake_timeout=timeout
        )
    except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as err:
        sock.close()
        # Raise, don't return: the caller records TLS_FAILURE only when this raises, and a
        # client certificate OpenSSL rejects (unknown CA, expired) fails right here.
        failure = PeerVerificationError(f"TLS handshake failed: {err}")
        if not proto.ready.done():
            proto.ready.set_exception(failure)
            proto.ready.exception()  # mark retrieved: we raise it ourselves
        raise failure from err
    await proto.ready


def _reset_reason(ev: StreamReset) -> str:
    """Who reset a CONNECT before its answer, for the opener's access log. Ours (`remote`
    False): the peer broke the protocol on the stream; a client's only stream error with
    ENHANCE_YOUR_CALM is the interim cap (`headerblock.MAX_INTERIM_HEADS`), the rest a
    malformed response (PROTOCOL_ERROR)."""
    if ev.remote:
        return f"stream reset by peer ({ev.error_code})"
    if ev.error_code == ErrorCode.ENHANCE_YOUR_CALM:
        return f"stream reset by us: more than {MAX_INTERIM_HEADS} interim (1xx) responses"
    return f"stream reset by us for a peer error ({ev.error_code})"


async def connect(
    key: PoolKey,
    context: ssl.SSLContext,
    settings: HboneSettings,
    *,
    timeout: float = 10.0,
    on_close: Callable[[HboneProtocol], None] | None = None,
) -> HboneProtocol:
    """Open an mTLS HBONE connection to `key.address` (from `key.source_ip`, transparently if
    asked) presenting `context`'s certificate, and verify the server is one of `key.expected`."""
    loop = asyncio.get_running_loop()
    sock = await connect_tcp(
        key.address[0],
        key.address[1],
        source_ip=key.source_ip,
        transparent=key.transparent,
        timeout=timeout,
    )
    hooks = NO_HOOKS if on_close is None else HboneHooks(on_close=on_close)
    made: list[HboneProtocol] = []
    turned: list[bool] = []

    def factory() -> HboneProtocol:
        # Called by the loop as it takes `sock` into its transport (asyncio and uvloop alike,
        # in the same step): from here on the transport owns the descriptor, once built.
        made.append(HboneProtocol(Role.CLIENT, settings, hooks, expected=key.expected))
        loop.call_soon(turned.append, True)  # create_connection waited after the factory
        return made[0]

    try:
        # Inline (not wait_for's task): a cancel or the timeout reaches create_connection only
        # where it waits, so the socket is either never taken or the transport's.
        async with asyncio.timeout(timeout):
            _, proto = await loop.create_connection(
                factory,
                sock=sock,
                ssl=context,
                server_hostname="",  # HBONE sends no SNI
                ssl_handshake_timeout=timeout,
            )
    except BaseException as err:
        # One owner of the descriptor. The loop closed (aborted) its transport when the wait
        # ended mid-handshake; closing `sock` too closed the descriptor under uvloop's handle,
        # whose own close later hit whatever connection had reused the number.
        if not made or not turned:
            # Never taken by the loop, or its transport's constructor raised (an error in the
            # same turn as the factory, before create_connection first waited: e.g. the TLS
            # object refused the context): nobody else closes it.
            sock.close()
        elif made[0].transport is not None:
            made[0].abort()  # established after all: its transport is ours to end
        raise err
    if proto.closed:
        await proto.ready  # raises the PeerVerificationError
    if not proto.ready.done():
        proto.ready.set_result(None)
    return proto
