"""Sans-I/O HBONE connection: the subset of HTTP/2 (RFC 9113) that carries CONNECT tunnels.

Owns: frame parsing, HPACK, stream states, flow control, SETTINGS, PING keepalive and GOAWAY for
one HTTP/2 connection, in either role. Bytes go in through `receive_data`, events come out; bytes to
send accumulate and are taken with `data_to_send`. Time is passed in (`now`), never read.

Why not the `h2` package for this: HBONE moves bulk bytes, and per-chunk Python work is the cost.
This codec streams DATA payloads straight out of the receive buffer (no frame reassembly), sends one
DATA frame per application write, and batches WINDOW_UPDATEs at half-window. It speaks only what a
CONNECT tunnel needs: no server push (we send ENABLE_PUSH=0 and treat PUSH_PROMISE as a connection
error, §8.4), priorities are ignored (§5.3.2 allows it), requests must be CONNECT (§8.5) or are
answered 400 by the HBONE layer above.

Hostile peers (RFC 9113 §10.5; CVE-2023-44487 "rapid reset", CVE-2019-9512/9515/9518 floods,
CVE-2024-27316 CONTINUATION flood, "MadeYouReset"): every piece of work a peer can cause is
bounded per connection. A header block is bounded while it accumulates (`HEADER_BLOCK_LIMIT`
octets, `MAX_CONTINUATIONS` frames, `EMPTY_CONTINUATION_ALLOWANCE` empty ones) and its decoded
list by the advertised MAX_HEADER_LIST_SIZE (a request over it is answered 431, RFC 6585 §5);
streams the peer resets before we answered, streams we refuse and streams we reset for a stream
error spend a sliding-window budget, as do PINGs and SETTINGS (each forces a reply) and empty DATA
frames; an exhausted budget is a connection error ENHANCE_YOUR_CALM (GOAWAY). The reset budget
is also spent from one shared by all connections of the same peer (`peer_resets`, given by the
edge): spreading resets over many connections does not multiply it. A new stream id
must be above every id the peer used before (§5.1.1), else PROTOCOL_ERROR.

Timers follow aioquic: `get_timer()` says when the connection next needs `handle_timer(now)`;
the edge arms one timer for that instant instead of polling. PING payloads come from the `rng`
given to the constructor.

Invariants:
- A stream is in `_streams` exactly while it is open or half-closed (RFC 9113 §5.1); closed streams
  are forgotten, and late frames for them are ignored while still counting toward the connection
  window (§6.9).
- Outbound DATA never exceeds the peer's windows or MAX_FRAME_SIZE: excess waits in the stream's
  `pending` queue and leaves when WINDOW_UPDATE arrives (a `WindowOpened` event tells the edge).
- Received DATA is credited back (WINDOW_UPDATE) only when the application calls
  `acknowledge_received_data`, so a slow reader applies backpressure to the remote writer.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import hpack
from mypy_extensions import mypyc_attr

from meshcore.errors import H2ProtocolError
from meshcore.hbone.frames import (
    CLIENT_PREFACE,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    FRAME_HEADER,
    MAX_FRAME_LIMIT,
    MAX_WINDOW,
    ErrorCode,
    Flag,
    FrameType,
    Setting,
    encode_goaway,
    encode_ping,
    encode_rst_stream,
    encode_settings,
    encode_settings_ack,
    encode_window_update,
    frame_header,
)
from meshcore.hbone.headers import decode_simple
from meshcore.hbone.headers import encode as encode_headers

Headers = list[tuple[str, str]]

# Istio's HBONE HTTP/2 settings (docs/reference/ambient-facts.md): stream window 4 MiB,
# connection window 16 MiB, max frame 1 MiB, 200 concurrent streams on the server, PING every
# 10 s, dead after 20 s.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
SERVER_MAX_STREAMS = 200
# RFC 9113 §6.5.3: a setting binds the peer only once it acknowledged it; before that the peer may
# rightly assume the initial value (unlimited streams). Envoy, as an HBONE client, puts every
# pending tunnel on a new connection at once, before our SETTINGS reach it; refusing those loses
# them (its tcp_proxy does not retry). So, like the h2 crate of Istio's ztunnel, our advertised
# limit is enforced from the ACK on, and this hard bound applies before it.
PRE_ACK_MAX_STREAMS = 10_000
MAX_HEADER_LIST = 64 * 1024
MAX_STREAM_ID = 2**31 - 1  # RFC 9113 §5.1.1
# A compressed block (HEADERS + CONTINUATIONs) never needs more octets than the list it carries;
# twice the advertised list size leaves room for a peer's odd encoding. Above: ENHANCE_YOUR_CALM
# (the block cannot be kept to decode, and HPACK state would be lost with it, §4.3).
HEADER_BLOCK_LIMIT = 2 * MAX_HEADER_LIST
MAX_CONTINUATIONS = 16  # per header block; nghttp2 allows 8 after CVE-2024-27316
EMPTY_CONTINUATION_ALLOWANCE = 4  # per connection; then PROTOCOL_ERROR
# Sliding-window budgets (events per BUDGET_WINDOW seconds) of work a peer causes cheaply.
BUDGET_WINDOW = 10.0
RESET_BUDGET = 200  # streams reset before an answer, refused, or reset for a stream error
PEER_RESET_BUDGET = 1000  # the same, summed over all connections of one peer (`peer_resets`)
CONTROL_BUDGET = 1000  # PING and SETTINGS frames (each forces a reply frame)
EMPTY_DATA_BUDGET = 200  # zero-length DATA without END_STREAM (CVE-2019-9518)
RECENT_RESETS = 1024  # ids of streams we reset, whose late frames are ignored (§5.1)
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
# Slowloris bounds: the peer must acknowledge our SETTINGS (RFC 9113 §6.5.3 SETTINGS_TIMEOUT),
# and finish a header block once begun, within these many seconds.
SETTINGS_TIMEOUT = 10.0
HEADER_BLOCK_TIMEOUT = 10.0
# Output (`data_to_send_parts`): a DATA payload this large is written as a view of itself, not
# joined with the frames around it (a copy of every payload byte); the joined frames before it
# are topped up to whole TLS records (RFC 8446 §5.1: at most 2^14 octets of plaintext each).
TLS_RECORD = 16_384
BIG_PAYLOAD = 4 * TLS_RECORD
# A stream's pending (window-blocked) bytes above this ask the edge to stop reading its source.
PENDING_HIGH_WATER = 1024 * 1024
# The same for all streams of a connection together: over it, every source of the connection is
# paused (`pending_blocked`) until the queues are below half of it. Without it, a peer that never
# opens its windows pins streams x PENDING_HIGH_WATER (200 MiB) per connection (issue 9).
CONNECTION_PENDING_HIGH_WATER = 4 * PENDING_HIGH_WATER

# RFC 9113 §8.2.2: connection-specific header fields make a message malformed.
_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class StreamState(enum.Enum):
    """RFC 9113 §5.1 states a tunnel stream can be in while we track it."""

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"  # we sent END_STREAM
    HALF_CLOSED_REMOTE = "half_closed_remote"  # peer sent END_STREAM


class _Input(enum.Enum):
    SEND_END = "send_end"
    RECV_END = "recv_end"


# RFC 9113 §5.1 transitions on END_STREAM; None = closed. Pairs not in the table are errors.
_TRANSITIONS: dict[tuple[StreamState, _Input], StreamState | None] = {
    (StreamState.OPEN, _Input.SEND_END): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, _Input.RECV_END): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_REMOTE, _Input.SEND_END): None,
    (StreamState.HALF_CLOSED_LOCAL, _Input.RECV_END): None,
}


# ---- events ----


@mypyc_attr(allow_interpreted_subclasses=True)  # HTTP/3's own events (meshcore.hbone.h3)
@dataclass(slots=True)
class Event:
    """Base of events returned by `receive_data`."""


@dataclass(slots=True)
class RequestRefused(Event):
    """Server: a request stream answered or reset by the protocol itself, never handed up: a
    non-CONNECT request (`status` 400), a header list over our limit (431), a malformed one
    (status 0, RST_STREAM(PROTOCOL_ERROR), §8.1.1) or one over MAX_CONCURRENT_STREAMS (status 0,
    RST_STREAM(REFUSED_STREAM), §5.1.2). For the access log and counters."""

    stream_id: int
    status: int
    error_code: int
    reason: str
    headers: Headers


@dataclass(slots=True)
class RequestReceived(Event):
    """Server: a peer opened a CONNECT stream (RFC 9113 §8.5, validated: method CONNECT, no
    :scheme/:path/:protocol, :authority is host:port). `authority` is that value."""

    stream_id: int
    headers: Headers
    authority: str = ""


@dataclass(slots=True)
class ResponseReceived(Event):
    """Client: the response header block for a stream we opened. `status` parsed from :status."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(slots=True)
class DataReceived(Event):
    """Tunnel bytes. `flow_length` counts toward flow control; acknowledge it once consumed."""

    stream_id: int
    data: bytes
    flow_length: int


@dataclass(slots=True)
class StreamEnded(Event):
    """The peer sent END_STREAM: the TCP equivalent of a FIN (half-close)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The stream was reset, by the peer (`remote`) or by us because of a stream error."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(slots=True)
class WindowOpened(Event):
    """Pending data of these streams was sent after a WINDOW_UPDATE or SETTINGS change."""

    stream_ids: tuple[int, ...]


@dataclass(slots=True)
class SettingsReceived(Event):
    """The peer's SETTINGS (first one = the connection is usable for new streams)."""

    changed: dict[int, int]


@dataclass(slots=True)
class PingAcked(Event):
    opaque: bytes


@dataclass(slots=True)
class ConnectionTerminated(Event):
    """GOAWAY received (remote) or sent because of a connection error (local)."""

    error_code: int
    last_stream_id: int
    remote: bool
    debug: bytes = b""


# ---- per-stream bookkeeping ----


@dataclass(slots=True)
class _Stream:
    stream_id: int
    state: StreamState
    send_window: int
    recv_window: int
    unacked: int = 0
    pending: deque[bytes | memoryview] = field(default_factory=deque)
    pending_bytes: int = 0
    pending_end: bool = False
    got_headers: bool = False
    answered: bool = False  # server: our response headers went out


@dataclass(slots=True)
class RateBudget:
    """At most `limit` events in any `window` seconds, estimated with two fixed buckets (the
    previous bucket weighted by its overlap with the sliding window). Time is passed in."""

    limit: int
    window: float
    _start: float = float("-inf")
    _current: int = 0
    _previous: int = 0

    def spend(self, now: float, cost: int = 1) -> bool:
        """Count `cost` events at `now`; False once the window holds more than `limit`."""
        elapsed = now - self._start
        if elapsed >= self.window:
            if elapsed < 2 * self.window:
                self._previous, self._start = self._current, self._start + self.window
            else:
                self._previous, self._start = 0, now
            self._current = 0
            elapsed = now - self._start
        self._current += cost
        overlap = 1.0 - elapsed / self.window
        return self._previous * overlap + self._current <= self.limit


def _decoded(decoder: hpack.Decoder, block: bytes) -> list[tuple[object, object]]:
    """hpack's full decoder with ``raw=False``: its annotation says bytes pairs, but it returns
    str pairs; typed as objects so compiled code (mypyc) checks neither."""
    pairs: list[tuple[object, object]] = list(decoder.decode(block, raw=False))
    return pairs


class HboneConnection:
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
        edge keys it by peer address), so resets spread over connections stay bounded too."""
        self.role = role
        self._rng = rng if rng is not None else random.SystemRandom()
        self._out: list[bytes | memoryview] = []
        # An incomplete frame waits as chunks until `_need` octets are there, then is joined
        # once: re-concatenating on every read would copy a 1 MiB frame ~64 times (quadratic
        # CPU and a heap fragmented by ever larger short-lived buffers).
        self._buf: list[bytes] = []
        self._buffered = 0
        self._need = 0
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1 if role is Role.CLIENT else 2
        self._highest_peer_stream = 0
        # The decoder's own bound stops an HPACK bomb (tiny block, huge list) mid-block; lists
        # between MAX_HEADER_LIST and it are decoded (keeping HPACK state) and answered 431.
        self._decoder = hpack.Decoder(max_header_list_size=HEADER_BLOCK_LIMIT)
        # Local settings (what the peer must honour) and the peer's (what we must honour).
        self.local_max_streams = max_concurrent_streams
        self.peer_max_streams = 100  # assume the §6.5.2 suggested minimum until told otherwise
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.conn_send_window = DEFAULT_WINDOW
        self.conn_recv_window = CONNECTION_WINDOW
        self._conn_unacked = 0
        self._settings_received = False
        self._preface_expected = role is Role.SERVER
        # Streaming DATA payload state: bytes left of the current frame, its stream and flags.
        self._data_left = 0
        self._data_stream: _Stream | None = None
        self._data_end = False
        # The DataReceived being built in this `receive_data` call and its payload pieces:
        # consecutive DATA frames of one stream become one event, joined once at the end.
        self._open_data: DataReceived | None = None
        self._pieces: list[bytes | memoryview] = []
        # CONTINUATION assembly (RFC 9113 §6.10).
        self._header_stream = 0
        self._header_chunks: list[bytes] = []
        self._header_size = 0
        self._header_frames = 0
        self._header_end_stream = False
        self._empty_continuations = 0
        self._reset_budget = RateBudget(RESET_BUDGET, BUDGET_WINDOW)
        self._peer_resets = peer_resets
        self._control_budget = RateBudget(CONTROL_BUDGET, BUDGET_WINDOW)
        self._empty_data_budget = RateBudget(EMPTY_DATA_BUDGET, BUDGET_WINDOW)
        self._recent_resets: dict[int, None] = {}  # insertion-ordered, bounded
        self._now = 0.0
        self._settings_sent_at: float | None = None  # until the peer's SETTINGS ACK
        self._header_started = 0.0
        self.goaway_received: ConnectionTerminated | None = None
        self.goaway_sent = False
        self.closed = False
        self._ping_outstanding: bytes | None = None
        self.pending_blocked = False  # queued bytes over CONNECTION_PENDING_HIGH_WATER
        self._ping_sent_at = 0.0
        self._last_activity = 0.0

    # ---- setup ----

    def initiate(self, now: float = 0.0) -> None:
        """Queue the preface (client), our SETTINGS and the connection-window raise (§6.9.2)."""
        settings = {
            Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            Setting.MAX_FRAME_SIZE: MAX_FRAME,
            Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            Setting.ENABLE_PUSH: 0,
        }
        if self.role is Role.SERVER:
            settings[Setting.MAX_CONCURRENT_STREAMS] = self.local_max_streams
            del settings[Setting.ENABLE_PUSH]  # §6.5.2: only a client may send ENABLE_PUSH
        else:
            self._out.append(CLIENT_PREFACE)
        self._out.append(encode_settings({int(k): v for k, v in settings.items()}))
        self._out.append(encode_window_update(0, CONNECTION_WINDOW - DEFAULT_WINDOW))
        self._last_activity = now
        self._settings_sent_at = now

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def data_to_send_parts(self) -> list[bytes | memoryview]:
        """What `data_to_send` returns, as parts for a vectored write that copies no large DATA
        payload: small frames are joined, a payload of at least `BIG_PAYLOAD` octets is passed
        as a view of itself, after the joined part has been topped up with its first octets to
        a whole number of TLS records (`TLS_RECORD`). Each part becomes one TLS write, so the
        records stay full-sized and no tiny record carries a frame header alone."""
        out = self._out
        if not out:
            return []
        self._out = []
        parts: list[bytes | memoryview] = []
        small: list[bytes | memoryview] = []
        small_len = 0
        for item in out:
            size = len(item)
            if size < BIG_PAYLOAD:
                small.append(item)
                small_len += size
                continue
            fill = -small_len % TLS_RECORD
            view = memoryview(item)
            if small:
                small.append(view[:fill])
                parts.append(b"".join(small))
                small = []
                small_len = 0
                parts.append(view[fill:])
            else:
                parts.append(item)
        if small:
            parts.append(b"".join(small))
        return parts

    @property
    def has_output(self) -> bool:
        """Frames are queued for `data_to_send`."""
        return bool(self._out)

    @property
    def ready(self) -> bool:
        """True once the peer's SETTINGS arrived (client: safe to size streams by them)."""
        return self._settings_received

    def is_open(self, stream_id: int) -> bool:
        """The stream is open or half-closed (not yet closed both ways or reset)."""
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def can_open_stream(self, limit: int = 100) -> bool:
        """A new stream fits under the peer's MAX_CONCURRENT_STREAMS and our pool's `limit`, and
        a stream id is left (RFC 9113 §5.1.1: ids are not reused; a client that runs out opens
        a new connection. 2^30 tunnels on one pooled connection is a day at 12k/s)."""
        if self.closed or self.goaway_received is not None or self.goaway_sent:
            return False
        if self._next_stream_id > MAX_STREAM_ID:
            return False
        return len(self._streams) < min(limit, self.peer_max_streams)

    # ---- sending ----

    def open_connect(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Client: open a CONNECT stream (RFC 9113 §8.5: no :scheme, no :path). Returns its id."""
        if self.role is not Role.CLIENT:
            raise H2ProtocolError("only a client opens streams")
        if not self.can_open_stream(limit=self.peer_max_streams):
            raise H2ProtocolError(
                "no stream available on this connection", ErrorCode.REFUSED_STREAM
            )
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        block = [(":method", "CONNECT"), (":authority", authority), *headers]
        self._send_headers(stream_id, block, end_stream=False)
        self._streams[stream_id] = _Stream(
            stream_id=stream_id,
            state=StreamState.OPEN,
            send_window=self.peer_initial_window,
            recv_window=STREAM_WINDOW,
        )
        return stream_id

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Server: answer a CONNECT. 2xx opens the tunnel; anything else ends the stream."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # reset meanwhile; nothing to answer
        end = not 200 <= status < 300
        stream.answered = True
        self._send_headers(stream_id, [(":status", str(status)), *headers], end_stream=end)
        if end:
            self._transition(stream, _Input.SEND_END)

    def _send_headers(
        self, stream_id: int, headers: Sequence[tuple[str, str]], *, end_stream: bool
    ) -> None:
        block = encode_headers(headers)
        flags = Flag.END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        first, rest = block[:limit], block[limit:]
        self._out.append(
            frame_header(
                len(first), FrameType.HEADERS, flags | (0 if rest else Flag.END_HEADERS), stream_id
            )
        )
        self._out.append(first)
        while rest:  # RFC 9113 §6.10: the remainder of the block goes in CONTINUATION frames
            chunk, rest = rest[:limit], rest[limit:]
            last = Flag.END_HEADERS if not rest else 0
            self._out.append(frame_header(len(chunk), FrameType.CONTINUATION, last, stream_id))
            self._out.append(chunk)

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> bool:
        """Queue tunnel bytes. Returns False when the stream is over its high-water mark (pause)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.HALF_CLOSED_LOCAL or stream.pending_end:
            return True  # stream gone or already ended: the bytes have nowhere to go
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
                self._transition(stream, _Input.SEND_END)
            return True
        stream.pending.append(data)
        stream.pending_bytes += size
        stream.pending_end = end_stream
        self._flush_stream(stream)
        return self._below_high_water(stream)

    def send_data_in_place(self, stream_id: int, frame: memoryview) -> bool:
        """`send_data` of `frame[FRAME_HEADER:]` without a copy, when it can leave as one DATA
        frame now (nothing queued on the stream, the windows and the peer's MAX_FRAME_SIZE
        take it all): the header is written into `frame[:FRAME_HEADER]`, room the caller left
        in front of the payload, and `frame` itself is queued. True if so; then `frame` must be
        flushed before its buffer is reused. False, and nothing done, otherwise."""
        size = len(frame) - FRAME_HEADER
        stream = self._streams.get(stream_id)
        if (
            stream is None
            or stream.state is StreamState.HALF_CLOSED_LOCAL
            or stream.pending_end
            or stream.pending
            or size > stream.send_window
            or size > self.conn_send_window
            or size > self.peer_max_frame
        ):
            return False
        stream.send_window -= size
        self.conn_send_window -= size
        frame[:FRAME_HEADER] = frame_header(size, FrameType.DATA, 0, stream_id)
        self._out.append(frame)
        return True

    def _below_high_water(self, stream: _Stream) -> bool:
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

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM. For CONNECT, a TCP reset maps to CONNECT_ERROR (RFC 9113 §8.5)."""
        if self._streams.pop(stream_id, None) is not None:
            self._out.append(encode_rst_stream(stream_id, code))
            self._remember_reset(stream_id)

    def pending_bytes(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.pending_bytes if stream else 0

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

    def ping(self, now: float) -> None:
        """Send a keepalive PING unless one is already outstanding."""
        if self._ping_outstanding is None:
            self._ping_outstanding = self._rng.getrandbits(64).to_bytes(8, "big")
            self._ping_sent_at = now
            self._out.append(encode_ping(self._ping_outstanding))

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

    def close(self, code: int = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """Send GOAWAY (graceful when NO_ERROR: streams already open may finish, RFC 9113 §6.8)."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self._out.append(encode_goaway(self._highest_peer_stream, code, debug))
        if code != ErrorCode.NO_ERROR:
            self.closed = True

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
        while pos < end:
            if self._data_left:
                pos = self._receive_data_payload(data, pos, end, events)
                continue
            if end - pos < 9:
                break
            word = int.from_bytes(data[pos : pos + 4], "big")
            length = word >> 8
            ftype = word & 0xFF
            flags = data[pos + 4]
            stream_id = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if length > MAX_FRAME:
                raise H2ProtocolError(
                    f"frame of {length} octets exceeds SETTINGS_MAX_FRAME_SIZE",
                    ErrorCode.FRAME_SIZE_ERROR,
                )
            if self._header_stream and ftype != FrameType.CONTINUATION:
                raise H2ProtocolError("expected CONTINUATION", ErrorCode.PROTOCOL_ERROR)
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
        if stream_id == 0:
            raise H2ProtocolError("DATA on stream 0", ErrorCode.PROTOCOL_ERROR)
        if length == 0 and not flags & Flag.END_STREAM:
            self._spend(self._empty_data_budget, "empty DATA frames")
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
        self._data_stream = stream
        self._data_left = length
        self._data_end = bool(flags & Flag.END_STREAM)

    def _receive_data_payload(
        self, data: bytes | memoryview, pos: int, end: int, events: list[Event]
    ) -> int:
        take = min(self._data_left, end - pos)
        stream = self._data_stream
        if stream is not None:
            whole = pos == 0 and take == end and isinstance(data, bytes)
            piece = data if whole else memoryview(data)[pos : pos + take]
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
        if not payload or payload[0] >= len(payload):
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
            self._transition(stream, _Input.RECV_END)

    def _conn_credit_dropped(self, length: int) -> None:
        self._conn_unacked += length
        if self._conn_unacked >= CONNECTION_WINDOW // 2:
            self._out.append(encode_window_update(0, self._conn_unacked))
            self.conn_recv_window += self._conn_unacked
            self._conn_unacked = 0

    def _is_idle(self, stream_id: int) -> bool:
        peer_initiated = (stream_id % 2 == 1) == (self.role is Role.SERVER)
        if peer_initiated:
            return stream_id > self._highest_peer_stream
        return stream_id >= self._next_stream_id

    def _stream_error(self, stream: _Stream, code: int, events: list[Event]) -> None:
        self._streams.pop(stream.stream_id, None)
        self._out.append(encode_rst_stream(stream.stream_id, code))
        self._remember_reset(stream.stream_id)
        events.append(StreamReset(stream.stream_id, code, False))
        # "MadeYouReset": stream errors the peer provokes cost as much as its own resets.
        self._spend_reset("stream resets")

    def _spend(self, budget: RateBudget, what: str) -> None:
        if not budget.spend(self._now):
            raise H2ProtocolError(
                f"too many {what} (over {budget.limit} in {budget.window:.0f}s)",
                ErrorCode.ENHANCE_YOUR_CALM,
            )

    def _spend_reset(self, what: str) -> None:
        self._spend(self._reset_budget, what)
        if self._peer_resets is not None:
            self._spend(self._peer_resets, f"{what} on all connections of this peer")

    def _remember_reset(self, stream_id: int) -> None:
        """Late frames for streams we reset are ignored (§5.1); keep a bounded memory of them."""
        recent = self._recent_resets
        recent[stream_id] = None
        if len(recent) > RECENT_RESETS:
            del recent[next(iter(recent))]

    def _transition(self, stream: _Stream, inp: _Input) -> None:
        key = (stream.state, inp)
        if key not in _TRANSITIONS:
            raise H2ProtocolError(
                f"stream {stream.stream_id}: {inp.value} in state {stream.state.value}",
                ErrorCode.STREAM_CLOSED,
            )
        new_state = _TRANSITIONS[key]
        if new_state is None:
            del self._streams[stream.stream_id]
        else:
            stream.state = new_state

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
            if stream_id == 0 or len(payload) != 5:  # §6.3
                raise H2ProtocolError("malformed PRIORITY", ErrorCode.PROTOCOL_ERROR)
        elif ftype == FrameType.PUSH_PROMISE:
            # §8.4: we disabled push (client) / clients never push (server).
            raise H2ProtocolError("PUSH_PROMISE not allowed", ErrorCode.PROTOCOL_ERROR)
        # §4.1: unknown frame types are ignored.

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise H2ProtocolError("HEADERS on stream 0", ErrorCode.PROTOCOL_ERROR)
        start = 0
        stop = len(payload)
        if flags & Flag.PADDED:  # §6.2
            if not payload:
                raise H2ProtocolError("empty padded HEADERS", ErrorCode.FRAME_SIZE_ERROR)
            start = 1
            stop -= payload[0]
        if flags & Flag.PRIORITY:
            start += 5
        if stop < start:
            raise H2ProtocolError("HEADERS padding exceeds payload", ErrorCode.PROTOCOL_ERROR)
        block = payload[start:stop]
        end_stream = bool(flags & Flag.END_STREAM)
        if len(block) > HEADER_BLOCK_LIMIT:
            raise H2ProtocolError("header block too large", ErrorCode.ENHANCE_YOUR_CALM)
        if flags & Flag.END_HEADERS:
            self._on_header_block(stream_id, block, end_stream, events)
        else:
            self._header_stream = stream_id
            self._header_chunks = [block]
            self._header_size = len(block)
            self._header_frames = 0
            self._header_end_stream = end_stream
            self._header_started = self._now

    def _on_continuation(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id != self._header_stream or stream_id == 0:
            raise H2ProtocolError("unexpected CONTINUATION", ErrorCode.PROTOCOL_ERROR)
        end_headers = bool(flags & Flag.END_HEADERS)
        if not payload and not end_headers:
            self._empty_continuations += 1
            if self._empty_continuations > EMPTY_CONTINUATION_ALLOWANCE:
                raise H2ProtocolError("empty CONTINUATION frames", ErrorCode.PROTOCOL_ERROR)
        # Bounded while accumulating, not after (CVE-2024-27316): size and frame count.
        self._header_frames += 1
        if self._header_frames > MAX_CONTINUATIONS:
            raise H2ProtocolError("too many CONTINUATION frames", ErrorCode.ENHANCE_YOUR_CALM)
        self._header_size += len(payload)
        if self._header_size > HEADER_BLOCK_LIMIT:
            raise H2ProtocolError("header block too large", ErrorCode.ENHANCE_YOUR_CALM)
        self._header_chunks.append(payload)
        if end_headers:
            block = b"".join(self._header_chunks)
            self._header_chunks, self._header_size, self._header_stream = [], 0, 0
            self._on_header_block(stream_id, block, self._header_end_stream, events)

    def _on_header_block(
        self, stream_id: int, block: bytes, end_stream: bool, events: list[Event]
    ) -> None:
        try:
            # Always decode: the HPACK table is connection state even for refused streams (§4.3).
            simple = decode_simple(block)
            headers: Headers = (
                simple
                if simple is not None
                else [(str(k), str(v)) for k, v in _decoded(self._decoder, block)]
            )
        except Exception as err:  # hpack raises several unrelated classes
            raise H2ProtocolError(f"HPACK: {err}", ErrorCode.COMPRESSION_ERROR) from err
        # RFC 7541 §4.1 accounting, as SETTINGS_MAX_HEADER_LIST_SIZE is defined (RFC 9113 §6.5.2).
        oversized = sum(len(k) + len(v) + 32 for k, v in headers) > MAX_HEADER_LIST
        stream = self._streams.get(stream_id)
        if stream is not None:
            if oversized:
                self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
                return
            self._on_stream_headers(stream, headers, end_stream, events)
            return
        peer_initiated = (stream_id % 2 == 1) == (self.role is Role.SERVER)
        if not peer_initiated:
            if stream_id < self._next_stream_id:
                return  # headers for a stream we opened and already closed/reset: ignore
            raise H2ProtocolError(
                "HEADERS on idle stream we did not open", ErrorCode.PROTOCOL_ERROR
            )
        if stream_id <= self._highest_peer_stream:
            if stream_id in self._recent_resets:
                return  # late HEADERS (trailers) of a stream we reset (§5.1)
            # §5.1.1: a new stream's id must exceed every id the peer used before.
            raise H2ProtocolError(
                f"HEADERS on stream {stream_id}, not above {self._highest_peer_stream}",
                ErrorCode.PROTOCOL_ERROR,
            )
        self._highest_peer_stream = stream_id
        if self.goaway_sent:
            return  # §6.8: streams above our GOAWAY's last id are ignored
        limit = self.local_max_streams if self._settings_sent_at is None else PRE_ACK_MAX_STREAMS
        if len(self._streams) >= limit:
            reason = "over MAX_CONCURRENT_STREAMS"
            self._refuse(
                RequestRefused(stream_id, 0, ErrorCode.REFUSED_STREAM, reason, headers), events
            )
            return
        stream = _Stream(
            stream_id=stream_id,
            state=StreamState.OPEN,
            send_window=self.peer_initial_window,
            recv_window=STREAM_WINDOW,
            got_headers=True,
        )
        self._streams[stream_id] = stream
        if oversized:
            reason = "header list over MAX_HEADER_LIST_SIZE"
            self._refuse(
                RequestRefused(stream_id, 431, ErrorCode.NO_ERROR, reason, headers), events
            )
            return
        problem = _malformed(headers, request=True)
        if problem:
            self._refuse(
                RequestRefused(stream_id, 0, ErrorCode.PROTOCOL_ERROR, problem, headers), events
            )
            return
        problem = _not_connect(headers)
        if problem:
            self._refuse(
                RequestRefused(stream_id, 400, ErrorCode.NO_ERROR, problem, headers), events
            )
            return
        authority = next((v for k, v in headers if k == ":authority"), "")
        events.append(RequestReceived(stream_id, headers, authority))
        if end_stream:
            events.append(StreamEnded(stream_id))
            self._transition(stream, _Input.RECV_END)

    def _refuse(self, refused: RequestRefused, events: list[Event]) -> None:
        """Answer a request stream ourselves, and report it (`refused`): `status` with
        END_STREAM, then RST_STREAM(`error_code`) (NO_ERROR after a complete response, §8.1:
        stop sending the request); with status 0 only the RST_STREAM. Spends the reset budget."""
        stream_id = refused.stream_id
        self._streams.pop(stream_id, None)
        if refused.status:
            self._send_headers(stream_id, [(":status", str(refused.status))], end_stream=True)
        self._out.append(encode_rst_stream(stream_id, refused.error_code))
        self._remember_reset(stream_id)
        events.append(refused)
        self._spend_reset("refused or reset streams")

    def _on_stream_headers(
        self, stream: _Stream, headers: Headers, end_stream: bool, events: list[Event]
    ) -> None:
        if stream.state is StreamState.HALF_CLOSED_REMOTE:
            self._stream_error(stream, ErrorCode.STREAM_CLOSED, events)
            return
        if not stream.got_headers and self.role is Role.CLIENT:
            status_text = next((v for k, v in headers if k == ":status"), "")
            if _malformed(headers, request=False) or not status_text.isdigit():
                self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
                return
            status = int(status_text)
            if 100 <= status < 200:
                return  # §8.1: informational responses precede the final one
            stream.got_headers = True
            events.append(ResponseReceived(stream.stream_id, status, headers))
        elif not end_stream:
            # Trailers must end the stream (§8.1).
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        if end_stream:
            events.append(StreamEnded(stream.stream_id))
            self._transition(stream, _Input.RECV_END)

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

    def _flush_all(self, events: list[Event]) -> None:
        opened = tuple(
            s.stream_id for s in list(self._streams.values()) if s.pending and self._flush_stream(s)
        )
        if opened:
            events.append(WindowOpened(opened))

    def _flush_stream(self, stream: _Stream) -> bool:
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
                self._transition(stream, _Input.SEND_END)
                return was_high
        return was_high and stream.pending_bytes < PENDING_HIGH_WATER

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError("SETTINGS on a stream", ErrorCode.PROTOCOL_ERROR)
        if flags & Flag.ACK:
            if payload:
                raise H2ProtocolError("SETTINGS ACK with payload", ErrorCode.FRAME_SIZE_ERROR)
            self._settings_sent_at = None
            return
        if len(payload) % 6:
            raise H2ProtocolError("SETTINGS length not a multiple of 6", ErrorCode.FRAME_SIZE_ERROR)
        self._spend(self._control_budget, "PING and SETTINGS frames")
        changed: dict[int, int] = {}
        for off in range(0, len(payload), 6):
            ident = int.from_bytes(payload[off : off + 2], "big")
            value = int.from_bytes(payload[off + 2 : off + 6], "big")
            changed[ident] = value
            self._apply_setting(ident, value)
        self._out.append(encode_settings_ack())
        self._settings_received = True
        events.append(SettingsReceived(changed))
        if Setting.INITIAL_WINDOW_SIZE in changed:
            self._flush_all(events)

    def _apply_setting(self, ident: int, value: int) -> None:
        # RFC 9113 §6.5.2 ranges.
        if ident == Setting.INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise H2ProtocolError("INITIAL_WINDOW_SIZE too large", ErrorCode.FLOW_CONTROL_ERROR)
            delta = value - self.peer_initial_window
            self.peer_initial_window = value
            for stream in self._streams.values():  # §6.9.2: adjust every open stream
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise H2ProtocolError("stream window overflow", ErrorCode.FLOW_CONTROL_ERROR)
        elif ident == Setting.MAX_FRAME_SIZE:
            if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                raise H2ProtocolError("MAX_FRAME_SIZE out of range", ErrorCode.PROTOCOL_ERROR)
            self.peer_max_frame = value
        elif ident == Setting.MAX_CONCURRENT_STREAMS:
            self.peer_max_streams = value
        elif ident == Setting.ENABLE_PUSH and (value > 1 or (value and self.role is Role.CLIENT)):
            raise H2ProtocolError("invalid ENABLE_PUSH", ErrorCode.PROTOCOL_ERROR)
        # HEADER_TABLE_SIZE only bounds a dynamic table our encoder never uses;
        # MAX_HEADER_LIST_SIZE is advisory; unknown settings are ignored (§6.5.2).

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError("PING on a stream", ErrorCode.PROTOCOL_ERROR)
        if len(payload) != 8:
            raise H2ProtocolError("PING length", ErrorCode.FRAME_SIZE_ERROR)
        if flags & Flag.ACK:
            if payload == self._ping_outstanding:
                self._ping_outstanding = None
                events.append(PingAcked(payload))
            return
        self._spend(self._control_budget, "PING and SETTINGS frames")
        self._out.append(encode_ping(payload, ack=True))

    def _on_rst_stream(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise H2ProtocolError("RST_STREAM on stream 0", ErrorCode.PROTOCOL_ERROR)
        if len(payload) != 4:
            raise H2ProtocolError("RST_STREAM length", ErrorCode.FRAME_SIZE_ERROR)
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            events.append(StreamReset(stream_id, int.from_bytes(payload, "big"), True))
            if self.role is Role.SERVER and not stream.answered:
                # CVE-2023-44487: a request reset before we could answer it is work for nothing.
                self._spend_reset("streams reset before an answer")
        elif self._is_idle(stream_id):
            raise H2ProtocolError("RST_STREAM on idle stream", ErrorCode.PROTOCOL_ERROR)

    def _on_goaway(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError("GOAWAY on a stream", ErrorCode.PROTOCOL_ERROR)
        if len(payload) < 8:
            raise H2ProtocolError("GOAWAY length", ErrorCode.FRAME_SIZE_ERROR)
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        code = int.from_bytes(payload[4:8], "big")
        event = ConnectionTerminated(code, last, True, payload[8:])
        self.goaway_received = event
        events.append(event)
        # §6.8: streams we opened above `last` were not processed: they are reset (retryable).
        for sid in [
            s for s in self._streams if s > last and (s % 2 == 1) == (self.role is Role.CLIENT)
        ]:
            del self._streams[sid]
            events.append(StreamReset(sid, ErrorCode.REFUSED_STREAM, True))


def _malformed(headers: Headers, *, request: bool) -> str:
    """RFC 9113 §8.2-8.3 checks; returns a reason or "" when the header block is well formed."""
    seen_regular = False
    pseudo: set[str] = set()
    for name, value in headers:
        if name.startswith(":"):
            if seen_regular:
                return "pseudo-header after regular header"
            if name in pseudo:
                return f"duplicate {name}"
            allowed = (
                {":method", ":authority", ":scheme", ":path", ":protocol"}
                if request
                else {":status"}
            )
            if name not in allowed:
                return f"unknown pseudo-header {name}"
            pseudo.add(name)
        else:
            seen_regular = True
            if name != name.lower():
                return "uppercase header name"
            if name in _CONNECTION_HEADERS or (name == "te" and value != "trailers"):
                return f"connection-specific header {name}"
    if request and ":method" not in pseudo:
        return "missing :method"
    if not request and ":status" not in pseudo:
        return "missing :status"
    return ""


def _not_connect(headers: Headers) -> str:
    """HBONE accepts only a plain CONNECT (RFC 9113 §8.5): no :scheme, :path or :protocol
    (extended CONNECT, RFC 8441), and an :authority of host:port. Reason, or ""."""
    method = next((v for k, v in headers if k == ":method"), "")
    if method != "CONNECT":
        return f"method {method!r}: only CONNECT"
    if any(k in (":path", ":scheme", ":protocol") for k, _ in headers):
        return "CONNECT with :scheme/:path/:protocol"
    authority = next((v for k, v in headers if k == ":authority"), "")
    host, sep, port = authority.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"bad :authority {authority!r}: want host:port"
    return ""
