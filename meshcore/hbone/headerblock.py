"""Header blocks of one HTTP/2 (HBONE) connection: the streams they open and answer (RFC 9113
§6.2, §6.10, §8), HPACK (RFC 7541), and the CONNECT requests HBONE accepts (§8.5).

Owns: `HeaderBlocks` (a layer of `meshcore.hbone.connection.HboneConnection`, above the
connection control): opening a CONNECT stream (`open_connect`; `open_request` for another
request, e.g. gRPC's POST) and answering one (`respond`), trailers handed up (`TrailersReceived`),
header blocks sent (HEADERS + CONTINUATION) and received (HEADERS/CONTINUATION assembly, the
HPACK decoder, request and response validation, streams the protocol refuses itself), and
the bounds on them (`HEADER_BLOCK_LIMIT`, `MAX_CONTINUATIONS`, `EMPTY_CONTINUATION_ALLOWANCE`,
`HEADER_BLOCK_TIMEOUT`, the advertised MAX_HEADER_LIST_SIZE, MAX_CONCURRENT_STREAMS).

Invariants (hostile peers, RFC 9113 §10.5; CVE-2024-27316 CONTINUATION flood):
- A header block is bounded while it accumulates (`HEADER_BLOCK_LIMIT` octets,
  `MAX_CONTINUATIONS` frames, `EMPTY_CONTINUATION_ALLOWANCE` empty ones per connection) and
  must be finished within `HEADER_BLOCK_TIMEOUT` (enforced by the connection's timer); its
  decoded list is bounded by the advertised MAX_HEADER_LIST_SIZE (a request over it is answered
  431, RFC 6585 §5). Every block is decoded, even a refused stream's: the HPACK table is
  connection state (§4.3).
- A new stream id must be above every id the peer used before (§5.1.1), else PROTOCOL_ERROR.
- Field octets are read as Latin-1 by both HPACK decoders (§8.2.1: values are octets); a name
  or value §8.2.1 forbids, a pseudo-header in trailers, an informational response ending its
  stream or a 101 (§8.1, §8.6), a :status not three digits make a message malformed: a stream
  error (a request's: `RequestRefused`). A client's peer opens no stream (we disable push).
  A response stream takes at most `MAX_INTERIM_HEADS` informational (1xx) header blocks, then
  RST_STREAM(ENHANCE_YOUR_CALM).
- A request is handed up (`RequestReceived`) only when well formed (§8.2-8.3) and a plain
  CONNECT (§8.5: no :scheme/:path/:protocol, :authority host:port); otherwise the protocol
  answers it itself (`RequestRefused`: 400, 431, or RST_STREAM), spending the reset budget.
  Streams over MAX_CONCURRENT_STREAMS are refused (REFUSED_STREAM): our advertised limit from
  the peer's SETTINGS ACK on, `PRE_ACK_MAX_STREAMS` before it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Final

import hpack

from meshcore.errors import H2ProtocolError, H2UsageError
from meshcore.hbone.budget import RateBudget
from meshcore.hbone.control import MAX_HEADER_LIST, ConnectionControl
from meshcore.hbone.events import (
    Event,
    Headers,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
)
from meshcore.hbone.flow import STREAM_WINDOW
from meshcore.hbone.frames import ErrorCode, Flag, FrameType, encode_rst_stream, frame_header
from meshcore.hbone.headers import decode_simple
from meshcore.hbone.headers import encode as encode_headers
from meshcore.hbone.streams import Role, Stream, StreamInput, StreamState

# RFC 9113 §6.5.3: a setting binds the peer only once it acknowledged it; before that the peer may
# rightly assume the initial value (unlimited streams). Envoy, as an HBONE client, puts every
# pending tunnel on a new connection at once, before our SETTINGS reach it; refusing those loses
# them (its tcp_proxy does not retry). So, like the h2 crate of Istio's ztunnel, our advertised
# limit is enforced from the ACK on, and this hard bound applies before it.
PRE_ACK_MAX_STREAMS = 10_000
# A compressed block (HEADERS + CONTINUATIONs) never needs more octets than the list it carries;
# twice the advertised list size leaves room for a peer's odd encoding. Above: ENHANCE_YOUR_CALM
# (the block cannot be kept to decode, and HPACK state would be lost with it, §4.3).
HEADER_BLOCK_LIMIT = 2 * MAX_HEADER_LIST
MAX_CONTINUATIONS = 16  # per header block; nghttp2 allows 8 after CVE-2024-27316
EMPTY_CONTINUATION_ALLOWANCE = 4  # per connection; then PROTOCOL_ERROR
# Slowloris bound: a header block once begun must be finished within these many seconds.
HEADER_BLOCK_TIMEOUT = 10.0
MAX_INTERIM_HEADS: Final = 16
"""Most interim (1xx) responses before the final one, per request (RFC 9110 §15.2 sets no
limit; each is a header block to decode and a wait that makes no progress). The HBONE client
resets a stream past it (RST_STREAM(ENHANCE_YOUR_CALM), RFC 9113 §5.4.2); the waypoint's
HTTP/1.1 codec refuses the response (502)."""


# RFC 9113 §8.2.2: connection-specific header fields make a message malformed.
_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
# RFC 9113 §8.2.1: a field name holds no octet in 0x00-0x20, 0x41-0x5a (uppercase), 0x7f-0xff
# and, but for a pseudo-header's leading one, no colon; a value no NUL, CR or LF, and neither
# starts nor ends with SP or HTAB. Either makes the message malformed (a stream error).
_BAD_NAME = re.compile("[\x00-\x20A-Z:\x7f-\xff]")


def _bad_value(value: str) -> bool:
    """RFC 9113 §8.2.1 (above); `in` tests, several times faster than one regex."""
    if "\x00" in value or "\r" in value or "\n" in value:
        return True
    return bool(value) and (value[0] in " \t" or value[-1] in " \t")


def _decoded(decoder: hpack.Decoder, block: bytes) -> Headers:
    """hpack's full decoder, its octets read as Latin-1 like `decode_simple` does: field values
    are octets (RFC 9113 §8.2.1, RFC 9110 §5.5 obs-text), not UTF-8 (hpack's ``raw=False`` made a
    non-UTF-8 value a COMPRESSION_ERROR only when the block used Huffman or indexing). Typed
    loosely inside: hpack's annotation says bytes pairs, mypyc must check neither."""
    pairs: list[tuple[object, object]] = list(decoder.decode(block, raw=True))
    return [(_text(k), _text(v)) for k, v in pairs]


def _text(octets: object) -> str:
    return (
        bytes(octets).decode("latin-1") if isinstance(octets, (bytes, bytearray)) else str(octets)
    )


class HeaderBlocks(ConnectionControl):
    """Streams opened and answered by header blocks (a layer of `HboneConnection`)."""

    def __init__(
        self,
        role: Role,
        *,
        max_concurrent_streams: int,
        rng: random.Random | None,
        peer_resets: RateBudget | None,
    ) -> None:
        super().__init__(
            role, max_concurrent_streams=max_concurrent_streams, rng=rng, peer_resets=peer_resets
        )
        # The decoder's own bound stops an HPACK bomb (tiny block, huge list) mid-block; lists
        # between MAX_HEADER_LIST and it are decoded (keeping HPACK state) and answered 431.
        self._decoder = hpack.Decoder(max_header_list_size=HEADER_BLOCK_LIMIT)
        # CONTINUATION assembly (RFC 9113 §6.10).
        self._header_stream = 0
        self._header_chunks: list[bytes] = []
        self._header_size = 0
        self._header_frames = 0
        self._header_end_stream = False
        self._empty_continuations = 0
        self._header_started = 0.0

    # ---- sending ----

    def open_connect(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Client: open a CONNECT stream (RFC 9113 §8.5: no :scheme, no :path). Returns its id."""
        return self.open_request([(":method", "CONNECT"), (":authority", authority), *headers])

    def open_request(self, block: Sequence[tuple[str, str]]) -> int:
        """Client: open a stream with the request header block `block` (pseudo-headers first,
        the caller's to get right: CONNECT for HBONE, a gRPC POST for `meshcore.grpcwire`).
        Returns its id."""
        if self.role is not Role.CLIENT:
            raise H2UsageError("only a client opens streams", ErrorCode.INTERNAL_ERROR)
        if not self.can_open_stream(limit=self.peer_max_streams):
            raise H2UsageError("no stream available on this connection", ErrorCode.REFUSED_STREAM)
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        self._send_headers(stream_id, block, end_stream=False)
        self._streams[stream_id] = Stream(
            stream_id=stream_id,
            state=StreamState.OPEN,
            send_window=self.peer_initial_window,
            recv_window=STREAM_WINDOW,
            answered=True,  # the CONNECT's HEADERS: DATA may follow (§8.5)
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
            self._transition(stream, StreamInput.SEND_END)

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

    # ---- receiving ----

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
            if len(payload) < start:  # §4.2: too small for the priority fields
                raise H2ProtocolError("HEADERS too short", ErrorCode.FRAME_SIZE_ERROR)
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
            headers: Headers = simple if simple is not None else _decoded(self._decoder, block)
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
        if self.role is Role.CLIENT:
            if stream_id % 2 == 1 and stream_id < self._next_stream_id:
                return  # headers for a stream we opened and already closed/reset: ignore
            # §5.1: HEADERS may open only a stream the receiver may see opened; a server opens
            # one only by PUSH_PROMISE (§8.4), which we disabled: a connection error.
            raise H2ProtocolError("HEADERS on a stream the client did not open")
        if stream_id % 2 == 0:
            # §5.1.1: a client opens odd streams only; an unexpected id is a connection error.
            raise H2ProtocolError(f"HEADERS on even stream {stream_id} from a client")
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
        stream = Stream(
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
            self._transition(stream, StreamInput.RECV_END)

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
        self, stream: Stream, headers: Headers, end_stream: bool, events: list[Event]
    ) -> None:
        if stream.state is StreamState.HALF_CLOSED_REMOTE:
            self._stream_error(stream, ErrorCode.STREAM_CLOSED, events)
            return
        if not stream.got_headers and self.role is Role.CLIENT:
            status = _status(headers)
            # §8.1: an informational response never ends the stream, and HTTP/2 has no 101
            # (§8.6); either is malformed like a missing or non-numeric :status (§8.3.2).
            if (
                _malformed(headers, request=False)
                or not status
                or (status < 200 and (end_stream or status == 101))
            ):
                self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
                return
            if status < 200:
                # §8.1: informational responses precede the final one; a peer sending them
                # without end is refused with the code for excessive load (§5.4.2, §7).
                stream.interim += 1
                if stream.interim > MAX_INTERIM_HEADS:
                    self._stream_error(stream, ErrorCode.ENHANCE_YOUR_CALM, events)
                return
            stream.got_headers = True
            events.append(ResponseReceived(stream.stream_id, status, headers))
        elif not end_stream or _malformed(headers, request=None):
            # Trailers must end the stream and carry no pseudo-header (§8.1).
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        else:
            events.append(TrailersReceived(stream.stream_id, headers))
        if end_stream:
            events.append(StreamEnded(stream.stream_id))
            self._transition(stream, StreamInput.RECV_END)


def status_code(text: str) -> int:
    """A :status value as a status code when it is three digits in 100..599 (RFC 9110 §15),
    else 0. One owner for HTTP/2 and HTTP/3 HBONE and the waypoint's HTTP/2 upstream."""
    if len(text) != 3 or not text.isascii() or not text.isdigit():
        return 0  # "²" is a str.isdigit() digit that int() refuses
    status = int(text)
    return status if 100 <= status <= 599 else 0


def _status(headers: Headers) -> int:
    """A response's :status (`status_code`), 0 when missing or malformed."""
    return status_code(next((v for k, v in headers if k == ":status"), ""))


def _malformed(headers: Headers, *, request: bool | None) -> str:
    """RFC 9113 §8.2-8.3 checks of a request's (`request` True), a response's (False) or
    trailers' (None: no pseudo-header at all) fields; a reason, or "" when well formed."""
    seen_regular = False
    pseudo: set[str] = set()
    for name, value in headers:
        if _bad_value(value):
            return f"invalid value of {name!r}"
        if name.startswith(":"):
            if seen_regular or request is None:
                return f"pseudo-header {name} after regular header or in trailers"
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
            if not name or _BAD_NAME.search(name):
                return f"invalid header name {name!r}"
            if name in _CONNECTION_HEADERS or (name == "te" and value != "trailers"):
                return f"connection-specific header {name}"
    if request is None:
        return ""
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
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        return f"bad :authority {authority!r}: want host:port"
    return ""
