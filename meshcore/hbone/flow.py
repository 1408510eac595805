"""HTTP/2 flow control of one HBONE connection (RFC 9113 §5.2, §6.9): the windows both ways,
the DATA queued while they are shut, and the credit given back to the peer.

Owns: `FlowControl` (a layer of `meshcore.hbone.connection.HboneConnection`, above the stream
table): our windows (`STREAM_WINDOW`, `CONNECTION_WINDOW`) and the peer's, sending DATA
(`send_data`, `send_data_in_place`, `end_stream`), the per-stream `pending` queues and their
high-water marks, WINDOW_UPDATE in both directions, the accounting of every received DATA frame
against our windows, and the empty-DATA budget (CVE-2019-9518).

Invariants:
- Outbound DATA never exceeds the peer's windows or MAX_FRAME_SIZE: excess waits in the stream's
  `pending` queue and leaves when WINDOW_UPDATE (or a larger INITIAL_WINDOW_SIZE, §6.9.2)
  arrives (a `WindowOpened` event tells the edge).
- DATA (END_STREAM included) never precedes our HEADERS on a stream (RFC 9113 §8.1): a server
  sending before `respond` is our misuse of the core, `H2UsageError(INTERNAL_ERROR)`.
- Queued bytes are bounded: a stream over `PENDING_HIGH_WATER` asks the edge to pause its source
  (`send_data` returns False); all streams together over `CONNECTION_PENDING_HIGH_WATER` set
  `pending_blocked` (every source paused) until they are below half of it.
- Received DATA is credited back (WINDOW_UPDATE) only when the application calls
  `acknowledge_received_data`, batched at half a window, so a slow reader applies backpressure
  to the remote writer. DATA for streams that are gone or in error still counts toward the
  connection window (§6.9) and is credited back without waiting for an application; DATA over
  a window is FLOW_CONTROL_ERROR (the connection's: a connection error; a stream's: a stream
  error).
"""

from __future__ import annotations

from meshcore.errors import H2ProtocolError, H2UsageError
from meshcore.hbone.budget import BUDGET_WINDOW, EMPTY_DATA_BUDGET, RateBudget, spend
from meshcore.hbone.events import Event, WindowOpened
from meshcore.hbone.frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    FRAME_HEADER,
    HEADER_LAYOUT,
    MAX_WINDOW,
    ErrorCode,
    Flag,
    FrameType,
    encode_window_update,
    frame_header,
)
from meshcore.hbone.streams import Role, Stream, StreamInput, StreamState, StreamTable

# Istio's HBONE HTTP/2 windows (docs/reference/ambient-facts.md): stream 4 MiB, connection 16 MiB.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
# A stream's pending (window-blocked) bytes above this ask the edge to stop reading its source.
PENDING_HIGH_WATER = 1024 * 1024
# The same for all streams of a connection together: over it, every source of the connection is
# paused (`pending_blocked`) until the queues are below half of it. Without it, a peer that never
# opens its windows pins streams x PENDING_HIGH_WATER (200 MiB) per connection (issue 9).
CONNECTION_PENDING_HIGH_WATER = 4 * PENDING_HIGH_WATER


class FlowControl(StreamTable):
    """Windows, queued DATA and credit of one connection (a layer of `HboneConnection`)."""

    def __init__(self, role: Role, peer_resets: RateBudget | None) -> None:
        super().__init__(role, peer_resets)
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.conn_send_window = DEFAULT_WINDOW
        self.conn_recv_window = CONNECTION_WINDOW
        self._conn_unacked = 0
        self.pending_blocked = False  # queued bytes over CONNECTION_PENDING_HIGH_WATER
        self._empty_data_budget = RateBudget(EMPTY_DATA_BUDGET, BUDGET_WINDOW)

    # ---- sending ----

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> bool:
        """Queue tunnel bytes. Returns False when the stream is over its high-water mark (pause)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.HALF_CLOSED_LOCAL or stream.pending_end:
            return True  # stream gone or already ended: the bytes have nowhere to go
        if not stream.answered:
            # RFC 9113 §8.1: a response is HEADERS, then DATA; DATA first is malformed for the
            # peer. Our misuse of the core (a server before `respond`), never the peer's.
            raise H2UsageError(
                f"stream {stream_id}: DATA before our HEADERS", ErrorCode.INTERNAL_ERROR
            )
        if stream.pending:
            stream.pending.append(data)
            stream.pending_bytes += len(data)
            stream.pending_end = end_stream
            return self._below_high_water(stream)
        size = len(data)
        if (
            size <= stream.send_window
            and size <= self.conn_send_window
            and size <= self.peer_max_frame
        ):
            # Fast path: one frame, windows allow it.
            stream.send_window -= size
            self.conn_send_window -= size
            self._out.append(
                frame_header(size, FrameType.DATA, Flag.END_STREAM if end_stream else 0, stream_id)
            )
            if size:
                self._out.append(data)
            if end_stream:
                self._transition(stream, StreamInput.SEND_END)
            return True
        stream.pending.append(data)
        stream.pending_bytes += size
        stream.pending_end = end_stream
        self._flush_stream(stream)
        return self._below_high_water(stream)

    def send_data_in_place(self, stream_id: int, frame: memoryview, *, copy: bool = False) -> bool:
        """`send_data` of `frame[FRAME_HEADER:]` without a copy of the payload alone, when it can
        leave as one DATA frame now (nothing queued on the stream, the windows and the peer's
        MAX_FRAME_SIZE take it all): the header is written into `frame[:FRAME_HEADER]`, room
        the caller left in front of the payload. Then `frame` itself is queued, to be flushed
        before its buffer is reused, or with `copy` one `bytes` copy of the whole frame (header
        and payload in one object: a small write costs one copy, not a copied payload, a
        header and their join). True if so; False, and nothing done, otherwise."""
        size = len(frame) - FRAME_HEADER
        stream = self._streams.get(stream_id)
        if (
            stream is None
            or stream.state is StreamState.HALF_CLOSED_LOCAL
            or stream.pending_end
            or not stream.answered  # `send_data` raises
            or stream.pending
            or size > stream.send_window
            or size > self.conn_send_window
            or size > self.peer_max_frame
        ):
            return False
        stream.send_window -= size
        self.conn_send_window -= size
        HEADER_LAYOUT.pack_into(frame, 0, size << 8 | FrameType.DATA, 0, stream_id)
        self._out.append(bytes(frame) if copy else frame)
        return True

    def _below_high_water(self, stream: Stream) -> bool:
        """After queueing on `stream`: may its source go on? No when the stream's queue or the
        connection's (all streams, `pending_blocked`: the edge then pauses every source) is
        over its high-water mark."""
        if stream.pending_bytes >= PENDING_HIGH_WATER or self.pending_blocked:
            return False
        if self._pending_total() >= CONNECTION_PENDING_HIGH_WATER:
            self.pending_blocked = True
            return False
        return True

    def _pending_total(self) -> int:
        return sum(s.pending_bytes for s in self._streams.values())

    def _unblock(self, events: list[Event]) -> None:
        """Resume every stream once the connection's queues fell below half the mark (data
        sent, or streams with queued data gone)."""
        if self.pending_blocked and self._pending_total() < CONNECTION_PENDING_HIGH_WATER // 2:
            self.pending_blocked = False
            events.append(WindowOpened(tuple(self._streams)))

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (TCP FIN from the local socket -> END_STREAM, RFC 9113 §8.5)."""
        self.send_data(stream_id, b"", end_stream=True)

    def pending_bytes(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.pending_bytes if stream else 0

    def _flush_all(self, events: list[Event]) -> None:
        opened = tuple(
            s.stream_id for s in list(self._streams.values()) if s.pending and self._flush_stream(s)
        )
        if opened:
            events.append(WindowOpened(opened))

    def _flush_stream(self, stream: Stream) -> bool:
        """Send what the windows allow from the stream's queue; True if it fell below high water."""
        was_high = stream.pending_bytes >= PENDING_HIGH_WATER
        while stream.pending:
            allowed = min(stream.send_window, self.conn_send_window, self.peer_max_frame)
            chunk = stream.pending[0]
            if len(chunk) > allowed:
                if allowed <= 0:
                    break
                # Views, not copies: a 256 KiB write cut into 16 KiB frames (a peer's default
                # MAX_FRAME_SIZE) copied the rest of the chunk per frame. A view keeps the whole
                # chunk until its last frame leaves: one write more than `pending_bytes` counts.
                view = memoryview(chunk)
                stream.pending[0] = view[allowed:]
                chunk = view[:allowed]
            else:
                stream.pending.popleft()
            size = len(chunk)
            stream.pending_bytes -= size
            stream.send_window -= size
            self.conn_send_window -= size
            last = not stream.pending and stream.pending_end
            self._out.append(
                frame_header(size, FrameType.DATA, Flag.END_STREAM if last else 0, stream.stream_id)
            )
            if size:
                self._out.append(chunk)
            if last:
                stream.pending_end = False
                self._transition(stream, StreamInput.SEND_END)
                return was_high
        return was_high and stream.pending_bytes < PENDING_HIGH_WATER

    def _on_window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise H2ProtocolError("WINDOW_UPDATE length", ErrorCode.FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise H2ProtocolError("zero WINDOW_UPDATE", ErrorCode.PROTOCOL_ERROR)
            self.conn_send_window += increment
            if self.conn_send_window > MAX_WINDOW:
                raise H2ProtocolError("connection window overflow", ErrorCode.FLOW_CONTROL_ERROR)
            self._flush_all(events)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                raise H2ProtocolError("WINDOW_UPDATE on idle stream", ErrorCode.PROTOCOL_ERROR)
            return
        if increment == 0:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        if stream.pending and self._flush_stream(stream):
            events.append(WindowOpened((stream_id,)))

    def _set_peer_initial_window(self, value: int) -> None:
        """The peer's SETTINGS_INITIAL_WINDOW_SIZE (§6.5.2 range; §6.9.2: every open stream's
        window moves by the change). The caller flushes the queues once the frame is applied."""
        if value > MAX_WINDOW:
            raise H2ProtocolError("INITIAL_WINDOW_SIZE too large", ErrorCode.FLOW_CONTROL_ERROR)
        delta = value - self.peer_initial_window
        self.peer_initial_window = value
        for stream in self._streams.values():  # §6.9.2: adjust every open stream
            stream.send_window += delta
            if stream.send_window > MAX_WINDOW:
                raise H2ProtocolError("stream window overflow", ErrorCode.FLOW_CONTROL_ERROR)

    # ---- receiving ----

    def _charge_data(
        self, stream_id: int, flags: int, length: int, events: list[Event]
    ) -> Stream | None:
        """Account a received DATA frame of `length` octets (the whole frame, padding included,
        §6.9) against our windows: the stream its payload is for, or None when the payload is
        to be dropped (stream gone, closed to the peer, or over its window: a stream error)."""
        if stream_id == 0:
            raise H2ProtocolError("DATA on stream 0", ErrorCode.PROTOCOL_ERROR)
        if length == 0 and not flags & Flag.END_STREAM:
            spend(self._empty_data_budget, self._now, "empty DATA frames")
        # RFC 9113 §6.9: the whole frame, padding included, counts against both windows.
        self.conn_recv_window -= length
        if self.conn_recv_window < 0:
            raise H2ProtocolError(
                "connection flow-control window exceeded", ErrorCode.FLOW_CONTROL_ERROR
            )
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                raise H2ProtocolError("DATA on idle stream", ErrorCode.PROTOCOL_ERROR)
            self._conn_credit_dropped(length)  # late frame for a closed stream: ignore (§5.1)
        elif stream.state is StreamState.HALF_CLOSED_REMOTE or not stream.got_headers:
            self._conn_credit_dropped(length)
            self._stream_error(stream, ErrorCode.STREAM_CLOSED, events)
            stream = None
        else:
            stream.recv_window -= length
            if stream.recv_window < 0:
                self._conn_credit_dropped(length)
                self._stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR, events)
                stream = None
        return stream

    def acknowledge_received_data(self, stream_id: int, length: int) -> None:
        """Credit consumed bytes back to the peer, batched at half a window (RFC 9113 §6.9)."""
        self._conn_unacked += length
        if self._conn_unacked >= CONNECTION_WINDOW // 2:
            self._out.append(encode_window_update(0, self._conn_unacked))
            self.conn_recv_window += self._conn_unacked
            self._conn_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.HALF_CLOSED_REMOTE:
            return  # the peer sends no more on it: no stream credit needed
        stream.unacked += length
        if stream.unacked >= STREAM_WINDOW // 2:
            self._out.append(encode_window_update(stream_id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _conn_credit_dropped(self, length: int) -> None:
        self._conn_unacked += length
        if self._conn_unacked >= CONNECTION_WINDOW // 2:
            self._out.append(encode_window_update(0, self._conn_unacked))
            self.conn_recv_window += self._conn_unacked
            self._conn_unacked = 0
