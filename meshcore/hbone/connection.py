"""Sans-I/O HBONE connection: the subset of HTTP/2 (RFC 9113) that carries CONNECT tunnels,
and, client role only, our gRPC client's calls (`meshcore.grpcclient`: a POST request, DATA
both ways, trailers).

Owns: `HboneConnection`, one HTTP/2 connection in either role, and its input: the frame reader
(connection preface, frame headers, partial frames), the dispatch of each frame to the layer
that handles it, DATA payloads streamed out as `DataReceived` events, the connection error that
ends an input (GOAWAY + `ConnectionTerminated`), output handed to the edge (`data_to_send`,
`data_to_send_parts`, cut by `meshcore.hbone.output`), and the timer (`get_timer`,
`handle_timer`). Bytes go in through `receive_data`, events (`meshcore.hbone.events`) come
out; bytes to send accumulate and are taken with `data_to_send`. Time is passed in (`now`),
never read.

The connection is built in layers, one concept each, one class on top of the other (mypyc
compiles them together, `meshcore.native`): the stream table and resets
(`meshcore.hbone.streams`), flow control (`meshcore.hbone.flow`), SETTINGS/PING/GOAWAY
(`meshcore.hbone.control`), header blocks and the streams they open (`meshcore.hbone.headerblock`),
then this module. Rate budgets: `meshcore.hbone.budget`. Hostile peers (RFC 9113 §10.5;
CVE-2023-44487 "rapid reset", CVE-2019-9512/9515/9518 floods, CVE-2024-27316 CONTINUATION flood,
"MadeYouReset"): every piece of work a peer can cause is bounded per connection, each bound
stated by the layer that enforces it.

Why not the `h2` package for this: HBONE moves bulk bytes, and per-chunk Python work is the cost.
This codec streams DATA payloads straight out of the receive buffer (no frame reassembly), sends one
DATA frame per application write, and batches WINDOW_UPDATEs at half-window. It speaks only what a
CONNECT tunnel needs: no server push (we send ENABLE_PUSH=0 and treat PUSH_PROMISE as a connection
error, §8.4), priorities are ignored (§5.3.2 allows it). As a server, requests must be CONNECT
(§8.5) or are answered 400 by the HBONE layer above; as a client it also opens other requests
(`open_request`, gRPC's POST) and hands up their trailers (`TrailersReceived`).

Timers follow aioquic: `get_timer()` says when the connection next needs `handle_timer(now)`;
the edge arms one timer for that instant instead of polling.

Invariants:
- Every frame is bounded before it is buffered: a frame over our MAX_FRAME_SIZE is
  FRAME_SIZE_ERROR; an incomplete frame waits as chunks joined once when complete (no
  re-concatenation per read); DATA payloads are never reassembled, and each payload byte is
  copied out of the edge's read buffer once.
- The peer's first frame is SETTINGS (§3.4); a frame other than CONTINUATION while a header
  block is open is PROTOCOL_ERROR (§6.10); PUSH_PROMISE is PROTOCOL_ERROR (§8.4); unknown frame
  types are ignored (§4.1). A frame too short for its fixed fields is FRAME_SIZE_ERROR (§4.2).
- A connection error raised by any layer ends the input: GOAWAY is queued and a
  `ConnectionTerminated` event ends the list; a closed connection parses nothing more.
- The peer must acknowledge our SETTINGS within `SETTINGS_TIMEOUT`, finish a header block
  within `HEADER_BLOCK_TIMEOUT`, and answer a PING within `PING_TIMEOUT` (Slowloris bounds);
  a connection quiet for `PING_INTERVAL` sends a PING.
"""

from __future__ import annotations

import random

import hpack

from meshcore.errors import H2ProtocolError
from meshcore.hbone.budget import RateBudget
from meshcore.hbone.control import (
    MAX_FRAME,
    PING_INTERVAL,
    PING_TIMEOUT,
    SERVER_MAX_STREAMS,
    SETTINGS_TIMEOUT,
)
from meshcore.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    StreamEnded,
)
from meshcore.hbone.frames import CLIENT_PREFACE, HEADER_LAYOUT, ErrorCode, Flag, FrameType
from meshcore.hbone.headerblock import HEADER_BLOCK_TIMEOUT, HeaderBlocks
from meshcore.hbone.output import vectored
from meshcore.hbone.streams import Role, Stream, StreamInput


class HboneConnection(HeaderBlocks):
    """One HTTP/2 connection carrying HBONE streams. Not thread-safe; one owner at a time."""

    def __init__(
        self,
        role: Role,
        *,
        max_concurrent_streams: int = SERVER_MAX_STREAMS,
        rng: random.Random | None = None,
        peer_resets: RateBudget | None = None,
    ) -> None:
        """`peer_resets`: a reset budget shared by every connection of the same peer (the
        edge keys it by peer address), so resets spread over connections stay bounded too.
        `rng`: where PING payloads come from."""
        super().__init__(
            role, max_concurrent_streams=max_concurrent_streams, rng=rng, peer_resets=peer_resets
        )
        # An incomplete frame waits as chunks until `_need` octets are there, then is joined
        # once: re-concatenating on every read would copy a 1 MiB frame ~64 times (quadratic
        # CPU and a heap fragmented by ever larger short-lived buffers).
        self._buf: list[bytes] = []
        self._buffered = 0
        self._need = 0
        self._preface_expected = role is Role.SERVER
        # §3.4: the peer's connection preface ends with (server: is) a SETTINGS frame, its
        # first frame; anything else first is an invalid preface, PROTOCOL_ERROR.
        self._settings_expected = True
        # Streaming DATA payload state: bytes left of the current frame, its stream and flags.
        self._data_left = 0
        self._data_stream: Stream | None = None
        self._data_end = False
        # The DataReceived being built in this `receive_data` call and its payload pieces:
        # consecutive DATA frames of one stream become one event, joined once at the end.
        self._open_data: DataReceived | None = None
        self._pieces: list[bytes | memoryview] = []

    # ---- output ----

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def data_to_send_parts(self) -> list[bytes | memoryview]:
        """What `data_to_send` returns, as parts for a vectored write that copies no large DATA
        payload (`meshcore.hbone.output.vectored`): each part becomes one TLS write."""
        out = self._out
        if not out:
            return []
        self._out = []
        if len(out) == 1 and type(out[0]) is bytes:
            return out  # one frame (the common case): `vectored` would return it as its part
        return vectored(out)

    @property
    def has_output(self) -> bool:
        """Frames are queued for `data_to_send`."""
        return bool(self._out)

    # ---- timer ----

    def get_timer(self) -> float | None:
        """When `handle_timer` must run next (aioquic's contract), or None (closed)."""
        if self.closed:
            return None
        if self._ping_outstanding is not None:
            when = self._ping_sent_at + PING_TIMEOUT
        else:
            when = self._last_activity + PING_INTERVAL
        if self._settings_sent_at is not None:
            when = min(when, self._settings_sent_at + SETTINGS_TIMEOUT)
        if self._header_stream:
            when = min(when, self._header_started + HEADER_BLOCK_TIMEOUT)
        return when

    def handle_timer(self, now: float) -> bool:
        """Keepalive: PING after PING_INTERVAL of quiet; returns False when the peer is dead or
        too slow (our SETTINGS unacknowledged, a header block unfinished): then a GOAWAY is
        queued, to be flushed before the transport is closed."""
        if self.closed:
            return False
        if self._settings_sent_at is not None and now - self._settings_sent_at >= SETTINGS_TIMEOUT:
            self.close(ErrorCode.SETTINGS_TIMEOUT, b"SETTINGS not acknowledged")
            return False
        if self._header_stream and now - self._header_started >= HEADER_BLOCK_TIMEOUT:
            self.close(ErrorCode.ENHANCE_YOUR_CALM, b"header block not finished in time")
            return False
        if self._ping_outstanding is not None:
            return now - self._ping_sent_at < PING_TIMEOUT
        if now - self._last_activity >= PING_INTERVAL:
            self.ping(now)
        return True

    def discard(self) -> None:
        """The transport is gone: drop every buffer and stream (nothing more is sent or parsed)."""
        self.closed = True
        self._buf = []
        self._buffered = 0
        self._header_chunks = []
        self._streams.clear()
        self._out.clear()
        self._data_stream = None
        self._recent_resets.clear()
        self._decoder = hpack.Decoder()

    # ---- receiving ----

    def receive_data(self, data: bytes | memoryview, now: float = 0.0) -> list[Event]:
        """Feed bytes from the transport. On a connection error, GOAWAY is queued and
        a ConnectionTerminated event ends the list; the caller should flush and close.

        `data` may be a view of the edge's read buffer, valid only during this call: what
        outlives it (DATA payloads in events, a partial frame) is copied out, each byte once."""
        events: list[Event] = []
        if self.closed:
            return events
        self._last_activity = self._now = now
        try:
            self._receive(data, events)
            if self.pending_blocked:
                self._unblock(events)
        except H2ProtocolError as err:
            debug = str(err).encode()[:200]
            self.close(err.code, debug)
            events.append(ConnectionTerminated(err.code, self._highest_peer_stream, False, debug))
        finally:
            self._close_data()
        return events

    def _receive(self, data: bytes | memoryview, events: list[Event]) -> None:
        if self._buf:
            self._buffered += len(data)
            if self._buffered < self._need:
                self._buf.append(bytes(data))
                return
            data = b"".join([*self._buf, data])
            self._buf = []
            self._buffered = 0
        if self._preface_expected:
            rest = self._after_preface(bytes(data))
            if rest is None:
                return
            data = rest
        pos = 0
        end = len(data)
        word: int
        flags: int
        stream_id: int
        while pos < end:
            if self._data_left:
                pos = self._receive_data_payload(data, pos, end, events)
                continue
            if end - pos < 9:
                break
            word, flags, stream_id = HEADER_LAYOUT.unpack_from(data, pos)
            length = word >> 8
            ftype = word & 0xFF
            stream_id &= 0x7FFFFFFF  # §4.1: the reserved bit is ignored
            if length > MAX_FRAME:
                raise H2ProtocolError(
                    f"frame of {length} octets exceeds SETTINGS_MAX_FRAME_SIZE",
                    ErrorCode.FRAME_SIZE_ERROR,
                )
            if self._header_stream or self._settings_expected:
                self._check_order(ftype, flags)
            if ftype == FrameType.DATA and not flags & Flag.PADDED:
                # Fast path: stream the payload out as it arrives, no reassembly.
                pos += 9
                self._begin_data(stream_id, flags, length, events)
                if length == 0:
                    self._finish_data(events)
                continue
            if end - pos < 9 + length:
                break
            payload = bytes(data[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self._handle_frame(ftype, flags, stream_id, payload, events)
        if pos < end:
            self._keep_partial(bytes(data[pos:]))

    def _check_order(self, ftype: int, flags: int) -> None:
        """The frames that must come next: the CONTINUATIONs of an open header block (§6.10),
        the peer's SETTINGS first (§3.4)."""
        if self._header_stream and ftype != FrameType.CONTINUATION:
            raise H2ProtocolError("expected CONTINUATION", ErrorCode.PROTOCOL_ERROR)
        if self._settings_expected:
            if ftype != FrameType.SETTINGS or flags & Flag.ACK:
                raise H2ProtocolError("preface not followed by SETTINGS", ErrorCode.PROTOCOL_ERROR)
            self._settings_expected = False

    def _after_preface(self, data: bytes) -> bytes | None:
        """Server: what follows the client connection preface (RFC 9113 §3.4) in `data`, or
        None while the preface is still incomplete (kept until it is)."""
        if len(data) < len(CLIENT_PREFACE):
            if not CLIENT_PREFACE.startswith(data):
                raise H2ProtocolError("invalid connection preface", ErrorCode.PROTOCOL_ERROR)
            self._buf, self._buffered, self._need = [data], len(data), len(CLIENT_PREFACE)
            return None
        if not data.startswith(CLIENT_PREFACE):
            raise H2ProtocolError("invalid connection preface", ErrorCode.PROTOCOL_ERROR)
        self._preface_expected = False
        return data[len(CLIENT_PREFACE) :]

    def _keep_partial(self, rest: bytes) -> None:
        """Buffer the start of a frame until `_need` bytes of it are here."""
        self._buf, self._buffered = [rest], len(rest)
        if len(rest) < 9:
            self._need = 9
        else:  # the payload of a frame other than plain DATA (DATA is streamed)
            self._need = 9 + (int.from_bytes(rest[:3], "big"))

    def _begin_data(self, stream_id: int, flags: int, length: int, events: list[Event]) -> None:
        self._data_stream = self._charge_data(stream_id, flags, length, events)
        self._data_left = length
        self._data_end = bool(flags & Flag.END_STREAM)

    def _receive_data_payload(
        self, data: bytes | memoryview, pos: int, end: int, events: list[Event]
    ) -> int:
        take = min(self._data_left, end - pos)
        stream = self._data_stream
        if stream is not None:
            piece: bytes | memoryview
            if isinstance(data, memoryview):
                piece = data[pos : pos + take]  # the edge's read buffer: copied in _close_data
            elif pos == 0 and take == end:
                piece = data
            else:
                piece = memoryview(data)[pos : pos + take]
            last = self._open_data
            if last is not None and events[-1] is last and last.stream_id == stream.stream_id:
                # The next frame of the same stream, nothing between: one event, so the edge
                # writes the local socket once per read, not once per frame.
                self._pieces.append(piece)
                last.flow_length += take
            else:
                self._close_data()
                event = DataReceived(stream.stream_id, b"", take)
                events.append(event)
                self._open_data, self._pieces = event, [piece]
        self._data_left -= take
        if self._data_left == 0:
            self._finish_data(events)
        return pos + take

    def _close_data(self) -> None:
        """Give the event being built its payload: the one copy out of the read buffer."""
        event = self._open_data
        if event is not None:
            pieces = self._pieces
            first = pieces[0]
            event.data = (
                first if len(pieces) == 1 and isinstance(first, bytes) else b"".join(pieces)
            )
            self._open_data, self._pieces = None, []

    def _on_padded_data(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        """Slow path for PADDED DATA (RFC 9113 §6.1): padding counts toward flow control."""
        if not payload:  # §4.2: too small for the Pad Length field
            raise H2ProtocolError("empty padded DATA", ErrorCode.FRAME_SIZE_ERROR)
        if payload[0] >= len(payload):
            raise H2ProtocolError("DATA padding exceeds payload", ErrorCode.PROTOCOL_ERROR)
        self._begin_data(stream_id, flags, len(payload), events)
        self._data_left = 0
        stream = self._data_stream
        if stream is not None:
            body = payload[1 : len(payload) - payload[0]]
            if body:
                events.append(DataReceived(stream_id, body, len(body)))
            # The pad-length octet and padding carry nothing: credit them straight back.
            self.acknowledge_received_data(stream_id, len(payload) - len(body))
        self._finish_data(events)

    def _finish_data(self, events: list[Event]) -> None:
        stream = self._data_stream
        self._data_stream = None
        if stream is not None and self._data_end:
            events.append(StreamEnded(stream.stream_id))
            self._transition(stream, StreamInput.RECV_END)

    def _handle_frame(
        self, ftype: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if ftype == FrameType.DATA:
            self._on_padded_data(flags, stream_id, payload, events)
        elif ftype == FrameType.HEADERS:
            self._on_headers(flags, stream_id, payload, events)
        elif ftype == FrameType.CONTINUATION:
            self._on_continuation(flags, stream_id, payload, events)
        elif ftype == FrameType.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload, events)
        elif ftype == FrameType.SETTINGS:
            self._on_settings(flags, stream_id, payload, events)
        elif ftype == FrameType.PING:
            self._on_ping(flags, stream_id, payload, events)
        elif ftype == FrameType.RST_STREAM:
            self._on_rst_stream(stream_id, payload, events)
        elif ftype == FrameType.GOAWAY:
            self._on_goaway(stream_id, payload, events)
        elif ftype == FrameType.PRIORITY:
            # §6.3: on stream 0 PROTOCOL_ERROR; not 5 octets FRAME_SIZE_ERROR (a stream error
            # there, §5.4.1 lets us end the connection instead: the frame may name an idle
            # stream, which RST_STREAM must not, §5.1).
            if stream_id == 0:
                raise H2ProtocolError("PRIORITY on stream 0", ErrorCode.PROTOCOL_ERROR)
            if len(payload) != 5:
                raise H2ProtocolError("PRIORITY length", ErrorCode.FRAME_SIZE_ERROR)
        elif ftype == FrameType.PUSH_PROMISE:
            # §8.4: we disabled push (client) / clients never push (server).
            raise H2ProtocolError("PUSH_PROMISE not allowed", ErrorCode.PROTOCOL_ERROR)
        # §4.1: unknown frame types are ignored.
