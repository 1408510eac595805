"""What an HBONE connection core reports to its edge: the events `receive_data` returns.

Owns: `Event` and its kinds, shared by HTTP/2 (`meshcore.hbone.connection`) and HTTP/3
(`meshcore.hbone.h3`, which maps QUIC stream events onto these), so the asyncio edges and the
proxies above them handle one set whatever the transport.

Invariants: events are plain records (no behaviour); a `DataReceived`'s `flow_length` is what
counts toward flow control and must be acknowledged once the bytes are consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mypy_extensions import mypyc_attr

Headers = list[tuple[str, str]]


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
class TrailersReceived(Event):
    """A trailer section (RFC 9113 §8.1: the last header block, with END_STREAM, no
    pseudo-header), validated; a `StreamEnded` follows. gRPC's status travels here; HBONE's
    edges ignore it."""

    stream_id: int
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
