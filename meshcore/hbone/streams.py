"""The stream table of one HTTP/2 (HBONE) connection: which streams exist, their RFC 9113 §5.1
states, their ids, and resets.

Owns: `Role`, `StreamState` and its END_STREAM transitions, the per-stream record `Stream`
(its flow-control fields are kept by `meshcore.hbone.flow`), and `StreamTable`, the base of the
connection core's layers (`meshcore.hbone.connection.HboneConnection` on top): the table, the
stream ids, stream resets (ours, the peer's RST_STREAM, stream errors) and their budget. The
base also holds what every layer shares: the role, the queue of frames to send (`_out`) and the
time of the input being processed (`_now`).

Invariants:
- A stream is in `_streams` exactly while it is open or half-closed (RFC 9113 §5.1); closed
  streams are forgotten, and late frames for them are ignored (`meshcore.hbone.flow` still
  counts their DATA toward the connection window, §6.9). The ids of streams we reset are
  remembered (at most `RECENT_RESETS`) so their late HEADERS are ignored too.
- A new stream id of the peer must be above every id it used before (§5.1.1), else
  PROTOCOL_ERROR (checked where streams open, `meshcore.hbone.headerblock`); DATA,
  WINDOW_UPDATE or RST_STREAM for an id never used (`_is_idle`) is PROTOCOL_ERROR too.
- Streams the peer resets before we answered (CVE-2023-44487 "rapid reset"), streams we refuse
  and streams we reset for a stream error ("MadeYouReset") spend the reset budget, and the one
  shared by all connections of the same peer (`peer_resets`, given by the edge): spreading
  resets over many connections does not multiply it.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from meshcore.errors import H2ProtocolError
from meshcore.hbone.budget import BUDGET_WINDOW, RESET_BUDGET, RateBudget, spend
from meshcore.hbone.events import Event, StreamReset
from meshcore.hbone.frames import ErrorCode, encode_rst_stream

MAX_STREAM_ID = 2**31 - 1  # RFC 9113 §5.1.1
RECENT_RESETS = 1024  # ids of streams we reset, whose late frames are ignored (§5.1)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class StreamState(enum.Enum):
    """RFC 9113 §5.1 states a tunnel stream can be in while we track it."""

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"  # we sent END_STREAM
    HALF_CLOSED_REMOTE = "half_closed_remote"  # peer sent END_STREAM


class StreamInput(enum.Enum):
    SEND_END = "send_end"
    RECV_END = "recv_end"


# RFC 9113 §5.1 transitions on END_STREAM; None = closed. Pairs not in the table are errors.
_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState | None] = {
    (StreamState.OPEN, StreamInput.SEND_END): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, StreamInput.RECV_END): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_REMOTE, StreamInput.SEND_END): None,
    (StreamState.HALF_CLOSED_LOCAL, StreamInput.RECV_END): None,
}


@dataclass(slots=True)
class Stream:
    stream_id: int
    state: StreamState
    send_window: int
    recv_window: int
    unacked: int = 0
    pending: deque[bytes | memoryview] = field(default_factory=deque)
    pending_bytes: int = 0
    pending_end: bool = False
    got_headers: bool = False
    answered: bool = False  # our HEADERS went out (client: the CONNECT; server: the response)
    interim: int = 0  # client: informational (1xx) responses received (`MAX_INTERIM_HEADS`)


class StreamTable:
    """The streams of one connection and their resets (base of `HboneConnection`)."""

    def __init__(self, role: Role, peer_resets: RateBudget | None) -> None:
        self.role = role
        self._out: list[bytes | memoryview] = []
        self._now = 0.0
        self._streams: dict[int, Stream] = {}
        self._next_stream_id = 1 if role is Role.CLIENT else 2
        self._highest_peer_stream = 0
        self._recent_resets: dict[int, None] = {}  # insertion-ordered, bounded
        self._reset_budget = RateBudget(RESET_BUDGET, BUDGET_WINDOW)
        self._peer_resets = peer_resets

    def is_open(self, stream_id: int) -> bool:
        """The stream is open or half-closed (not yet closed both ways or reset)."""
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM. For CONNECT, a TCP reset maps to CONNECT_ERROR (RFC 9113 §8.5)."""
        if self._streams.pop(stream_id, None) is not None:
            self._out.append(encode_rst_stream(stream_id, code))
            self._remember_reset(stream_id)

    def _is_idle(self, stream_id: int) -> bool:
        peer_initiated = (stream_id % 2 == 1) == (self.role is Role.SERVER)
        if peer_initiated:
            return stream_id > self._highest_peer_stream
        return stream_id >= self._next_stream_id

    def _stream_error(self, stream: Stream, code: int, events: list[Event]) -> None:
        self._streams.pop(stream.stream_id, None)
        self._out.append(encode_rst_stream(stream.stream_id, code))
        self._remember_reset(stream.stream_id)
        events.append(StreamReset(stream.stream_id, code, False))
        # "MadeYouReset": stream errors the peer provokes cost as much as its own resets.
        self._spend_reset("stream resets")

    def _spend_reset(self, what: str) -> None:
        spend(self._reset_budget, self._now, what)
        if self._peer_resets is not None:
            spend(self._peer_resets, self._now, f"{what} on all connections of this peer")

    def _remember_reset(self, stream_id: int) -> None:
        """Late frames for streams we reset are ignored (§5.1); keep a bounded memory of them."""
        recent = self._recent_resets
        recent[stream_id] = None
        if len(recent) > RECENT_RESETS:
            del recent[next(iter(recent))]

    def _transition(self, stream: Stream, inp: StreamInput) -> None:
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
