"""Sans-I/O HBONE over HTTP/3 (RFC 9114) on QUIC (RFC 9000/9001), on aioquic's sans-I/O cores.

Owns: one QUIC connection carrying HBONE CONNECT streams (RFC 9114 §4.4) in either role, with
our mutual-TLS peer verification, bounded flow control, keepalive, and the mapping of QUIC/HTTP/3
stream events onto the events of `meshcore.hbone.events` (so the asyncio edge,
`meshcore.hbone.h3aio`, mirrors `meshcore.hbone.aio`). Datagrams go in with `receive_datagram`,
out with `datagrams_to_send`; time is passed in (`now`), never read; the timer is aioquic's
get_timer()/handle_timer(now) pattern plus our keepalive.

aioquic 1.7.2 (pinned in pyproject.toml) is used beyond its public API in the places below, each
checked by tests/unit/test_h3_aioquic_contract.py so an upgrade that changes them fails loudly
(also: a received GOAWAY is skipped unread by aioquic; `_MeshH3` notes its arrival):
- A server asks for a client certificate only through the private
  `tls.Context._request_client_certificate` flag; we set it in `_MeshQuic._initialize`.
- aioquic never verifies a client's chain, accepts an empty client Certificate message, and
  checks a server against a host name SPIFFE certificates don't carry. So both sides run with
  aioquic's verification off and run `meshcore.tls.verify_peer_chain` (chain to the mesh roots,
  key usage, trust domain, one URI SAN, the expected identities) on the peer's certificates
  (`tls._peer_certificate[_chain]`) when the handshake completes, BEFORE the HTTP/3 layer exists:
  no SETTINGS are sent and no stream byte is looked at until the peer passed. A refused peer
  gets CONNECTION_CLOSE with CRYPTO_ERROR(bad_certificate) (RFC 9001 §4.8).
- aioquic's server never tells which server name a client asked for, and one node-proxy UDP
  socket serves many identities; `client_hello_server_name` reads the SNI out of the client's
  first Initial (decrypted with the public Initial keys, RFC 9001 §5.2) so the endpoint picks
  the certificate before it creates the connection (`server_name_for` is the naming).
- aioquic doubles a receive window each time half of it is used, so a peer can make us buffer
  without bound behind a slow reader. `_MeshQuic` keeps MAX_STREAM_DATA at credited + window
  and MAX_DATA at credited + connection window, where "credited" is what the application has
  consumed (`acknowledge_received_data`), as `meshcore.hbone.connection` does for HTTP/2.
- aioquic draws stateless reset tokens at random (`_host_cids`, `_replenish_connection_ids`)
  and never recognises a Stateless Reset it receives. A server here derives its tokens from a
  key instead (`reset_token`, RFC 9000 §10.3.2), so another process holding the key (a node
  proxy that takes its UDP socket back from a dead successor, `ztunnel.udp_relay`) can reset
  the connections it has no state for (`stateless_reset`); a client compares the tail of each
  short-header datagram with the tokens its peer issued (`_peer_cid`, `_peer_cid_available`)
  and ends the connection at once (`is_stateless_reset`, §10.3.1) instead of waiting out the
  idle timeout.
- aioquic's CUBIC restarts the window of a busy connection whose RTT exceeds 2 s: our
  connections use `meshcore.hbone.h3cc.MeshCubic` (restart after idle only).

Invariants:
- Windows as HTTP/2 HBONE: 4 MiB per stream, 16 MiB per connection; at most 128 concurrent
  peer-opened streams (aioquic's initial MAX_STREAMS, raised only as streams finish).
- Unsent + unacknowledged bytes of a stream above `PENDING_HIGH_WATER` make `send_data` return
  False (the edge stops reading the TCP source); `WindowOpened` says when it drained.
- ALPN is "h3"; no session tickets are issued or used, so no resumption and no 0-RTT
  (RFC 9001 §4.6); connection migration is ignored by the edge (datagrams from another address
  are dropped).
- Graceful close (drain, rotation, idle): GOAWAY, no new streams either way, CONNECTION_CLOSE
  once the last stream ended and its data was acknowledged.
- TCP FIN <-> stream FIN; TCP RST <-> RESET_STREAM + STOP_SENDING with H3_CONNECT_ERROR
  (RFC 9114 §4.4); HTTP/2 error codes the proxies pass in are mapped by `h3_error_code`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aioquic._buffer import Buffer
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived as H3DataReceived
from aioquic.h3.events import HeadersReceived
from aioquic.quic import events as qev
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    QuicProtocolVersion,
    pull_quic_header,
)
from aioquic.tls import AlertDescription, pull_client_hello
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshcore.certs import WorkloadCertificate
from meshcore.errors import PeerVerificationError
from meshcore.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from meshcore.hbone.frames import ErrorCode
from meshcore.hbone.h3cc import CONGESTION_CONTROL
from meshcore.hbone.headerblock import status_code
from meshcore.hbone.streams import Role
from meshcore.identity import SpiffeId
from meshcore.tls import PeerPolicy, verify_peer_chain

ALPN_H3 = "h3"
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
PENDING_HIGH_WATER = 1024 * 1024
KEEPALIVE_INTERVAL = 10.0  # as HTTP/2 HBONE's PING interval
IDLE_TIMEOUT = 30.0  # QUIC idle timeout (RFC 9000 §10.1): keepalives keep a live peer within it
MAX_DATAGRAM = 1350  # fits a 1500-byte MTU with IPv6 + UDP headers
MIN_STREAM_FRAME_SPACE = 32  # bytes left in a packet below which no STREAM frame is tried
RESET_TOKEN_SIZE = 16  # RFC 9000 §10.3
RESET_KEY_SIZE = 32
MIN_RESET = 21  # RFC 9000 §10.3: 5 unpredictable bytes (the first 0b01xxxxxx) + the token
MAX_RESET = 43  # §10.3: one byte shorter than a trigger of <= 43 bytes; 43 for longer ones

# RFC 9114 §8.1 error codes.
H3_NO_ERROR = 0x100
H3_INTERNAL_ERROR = 0x102
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_CANCELLED = 0x10C
H3_CONNECT_ERROR = 0x10F

_TO_H3: dict[int, int] = {
    ErrorCode.NO_ERROR: H3_NO_ERROR,
    ErrorCode.CANCEL: H3_REQUEST_CANCELLED,
    ErrorCode.REFUSED_STREAM: H3_REQUEST_REJECTED,
    ErrorCode.INTERNAL_ERROR: H3_INTERNAL_ERROR,
    ErrorCode.CONNECT_ERROR: H3_CONNECT_ERROR,
}
_FROM_H3 = {v: k for k, v in _TO_H3.items()}
_VERSIONS = (QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2)


def h3_error_code(h2_code: int) -> int:
    """The HTTP/3 code for an HTTP/2 code the proxies use (TCP RST = CONNECT_ERROR, RFC 9114
    §4.4); anything else is H3_CONNECT_ERROR, the CONNECT tunnel's generic failure."""
    return _TO_H3.get(h2_code, H3_CONNECT_ERROR)


def h2_error_code(h3_code: int) -> int:
    """The reverse, for `TunnelSink.tunnel_reset` (whose codes are HTTP/2's)."""
    return int(_FROM_H3.get(h3_code, ErrorCode.CONNECT_ERROR))


@dataclass(slots=True)
class PeerVerified(Event):
    """The handshake completed and the peer passed `verify_peer_chain`: streams may flow."""

    identity: SpiffeId


@dataclass(slots=True)
class PeerRefused(Event):
    """The peer failed verification; the connection is being closed. No stream event follows."""

    error: PeerVerificationError


def initial_dcid(datagram: bytes) -> bytes | None:
    """The Destination Connection ID of a datagram that may open a connection: a long-header
    Initial packet of a version we speak, in a datagram of at least 1200 bytes (RFC 9000
    §14.1: smaller ones are dropped, which bounds amplification). Otherwise None."""
    if len(datagram) < SMALLEST_MAX_DATAGRAM_SIZE:
        return None
    try:
        header = pull_quic_header(Buffer(data=datagram), host_cid_length=8)
    except ValueError:
        return None
    if header.packet_type != QuicPacketType.INITIAL or header.version not in _VERSIONS:
        return None
    return header.destination_cid


SNI_SUFFIX = ".hbone.invalid"
"""Server names we send name a destination workload's address: ``<hex of the packed IP>`` +
this suffix (RFC 6066 §3 forbids IP literals in SNI; ``.invalid`` never resolves, RFC 6761 §6.4)."""


def server_name_for(ip: str) -> str:
    """The SNI naming destination workload `ip`: the server presents that workload's
    certificate (one node-proxy UDP socket serves every local workload, see
    `ztunnel.proxy.inbound_h3`)."""
    return ipaddress.ip_address(ip).packed.hex() + SNI_SUFFIX


def address_from_server_name(name: str) -> str | None:
    """The workload address a server name made by `server_name_for` names; None otherwise."""
    label = name.lower().removesuffix(SNI_SUFFIX)
    if label == name.lower() or len(label) not in (8, 32):
        return None
    try:
        return str(ipaddress.ip_address(bytes.fromhex(label)))
    except ValueError:
        return None


def client_hello_server_name(datagram: bytes) -> str | None:
    """The SNI of the ClientHello in a client's first Initial packet, read before any
    connection state exists, so the server can pick the certificate to present (aioquic 1.7.2
    has no server-side SNI hook). The Initial is decrypted with the keys every party can derive
    from its Destination Connection ID (RFC 9001 §5.2); its CRYPTO frames from offset 0 must
    hold the whole ClientHello (aioquic's and our clients' fit one packet). None when the
    datagram is not such a packet, the hello is split or has no SNI."""
    if initial_dcid(datagram) is None:
        return None
    buf = Buffer(data=datagram)
    try:
        header = pull_quic_header(buf, host_cid_length=8)
        assert header.version is not None
        crypto = CryptoPair()
        crypto.setup_initial(header.destination_cid, is_client=False, version=header.version)
        _, payload, _ = crypto.decrypt_packet(datagram[: header.packet_length], buf.tell(), 0)
        frames = Buffer(data=payload)
        chunks: dict[int, bytes] = {}
        while not frames.eof():
            kind = frames.pull_uint_var()
            if kind == QuicFrameType.CRYPTO:
                offset = frames.pull_uint_var()
                chunks[offset] = frames.pull_bytes(frames.pull_uint_var())
            elif kind not in (QuicFrameType.PADDING, QuicFrameType.PING):
                return None  # RFC 9000 §17.2.2: a first Initial carries nothing else we need
        data = b""
        while len(data) in chunks:
            data += chunks[len(data)]
        if len(data) < 4 or len(data) < 4 + int.from_bytes(data[1:4], "big"):
            return None  # ClientHello split over several packets
        return pull_client_hello(Buffer(data=data)).server_name
    except Exception:  # undecryptable or malformed: not a hello we serve
        return None


def quic_configuration(
    cert: WorkloadCertificate, role: Role, server_name: str | None = None
) -> QuicConfiguration:
    """aioquic settings for HBONE: our certificate, ALPN h3, our windows, aioquic's own peer
    verification off (we verify, see the module docstring), no session ticket; a client sends
    `server_name` as SNI (`server_name_for`) or none."""
    leaf, *chain = [x509.load_pem_x509_certificate(p) for p in cert.presented_pem]
    cfg = QuicConfiguration(
        is_client=role is Role.CLIENT,
        alpn_protocols=[ALPN_H3],
        idle_timeout=IDLE_TIMEOUT,
        max_data=CONNECTION_WINDOW,
        max_stream_data=STREAM_WINDOW,
        max_datagram_size=MAX_DATAGRAM,
        congestion_control_algorithm=CONGESTION_CONTROL,
        verify_mode=ssl.CERT_NONE,
        server_name=server_name,
    )
    cfg.certificate = leaf
    cfg.certificate_chain = chain
    cfg.private_key = serialization.load_pem_private_key(cert.key_pem, password=None)
    return cfg


def reset_token(key: bytes, cid: bytes) -> bytes:
    """The stateless reset token of a connection ID we issued: HMAC-SHA256(key, cid), first 16
    bytes (RFC 9000 §10.3.2: a static key, so whoever holds it can reset without state)."""
    return hmac.new(key, cid, hashlib.sha256).digest()[:RESET_TOKEN_SIZE]


def stateless_reset(key: bytes, datagram: bytes, unpredictable: bytes) -> bytes | None:
    """The Stateless Reset (RFC 9000 §10.3) answering `datagram`, a short-header packet for a
    connection we have no state for, whose Destination Connection ID we issued with `key`;
    None when it is not one or too short to answer with something shorter (§10.3.3: a reset
    is always smaller than what triggered it, so two endpoints cannot loop; never larger, so
    no amplification). `unpredictable`: at least MAX_RESET random bytes (injected)."""
    cid_len = QuicConfiguration.connection_id_length
    if not datagram or datagram[0] & 0x80 or len(datagram) <= max(MIN_RESET, 1 + cid_len):
        return None  # a long header (Initial, Handshake...) or too short to be answered
    size = min(len(datagram) - 1, MAX_RESET)
    head = bytes([0x40 | (unpredictable[0] & 0x3F)]) + unpredictable[1 : size - RESET_TOKEN_SIZE]
    return head + reset_token(key, datagram[1 : 1 + cid_len])


class _MeshH3(H3Connection):
    """aioquic's HTTP/3 layer, which skips a peer's GOAWAY unread: we note that one arrived (its
    frame header is checked as soon as it is parsed), so no new stream is opened on a connection
    the peer is draining (RFC 9114 §5.2). The ID it carries is not needed: we open no new
    streams at all after it."""

    goaway_received = False

    def _check_control_frame_type(self, frame_type: int) -> None:
        super()._check_control_frame_type(frame_type)  # raises for frames not allowed there
        if frame_type == FrameType.GOAWAY:
            self.goaway_received = True


class _MeshQuic(QuicConnection):
    """aioquic's QUIC core with a client-certificate request and bounded receive windows."""

    def __init__(
        self,
        configuration: QuicConfiguration,
        odcid: bytes | None = None,
        reset_key: bytes | None = None,
    ) -> None:
        super().__init__(configuration=configuration, original_destination_connection_id=odcid)
        self.credited: dict[int, int] = {}  # stream id -> stream offset the app has consumed
        self.credited_total = 0
        self.reset_key = None if configuration.is_client else reset_key
        self._derive_reset_tokens()

    def _derive_reset_tokens(self) -> None:
        """Server: each connection ID's token from our key (aioquic drew them at random; none
        has been sent yet: the first goes out in the transport parameters, the others in
        NEW_CONNECTION_ID frames written after `_replenish_connection_ids`)."""
        if self.reset_key is not None:
            for host_cid in self._host_cids:
                host_cid.stateless_reset_token = reset_token(self.reset_key, host_cid.cid)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._derive_reset_tokens()

    def is_stateless_reset(self, datagram: bytes) -> bool:
        """Client: `datagram` ends with the stateless reset token our peer issued for the
        connection ID we use. RFC 9000 §10.3.1: an endpoint MUST NOT check the tokens of
        connection IDs it has not used (nor of retired ones)."""
        if not self._is_client or len(datagram) < MIN_RESET or datagram[0] & 0x80:
            return False
        token = self._peer_cid.stateless_reset_token
        return bool(token) and hmac.compare_digest(token, datagram[-RESET_TOKEN_SIZE:])

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # RFC 8446 §4.3.2: ask for the client's certificate (aioquic: private flag).
            self.tls._request_client_certificate = True

    def credit(self, stream_id: int, offset: int) -> None:
        """The application consumed stream `stream_id` up to `offset` (monotonic)."""
        old = self.credited.get(stream_id, 0)
        if offset > old:
            self.credited[stream_id] = offset
            self.credited_total += offset - old

    def forget_credit(self, stream_id: int) -> None:
        self.credited.pop(stream_id, None)

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        limit = self._local_max_data
        target = self.credited_total + self._configuration.max_data
        if target - limit.value >= self._configuration.max_data // 2:
            limit.value = target  # RFC 9000 §4.2: MAX_DATA after half the window was consumed
        used, limit.used = limit.used, 0  # aioquic doubles the limit when used*2 > value
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used

    def _write_stream_frame(self, builder: Any, space: Any, stream: Any, max_offset: int) -> int:
        # aioquic offers every stream a place in every packet it builds, also once the packet is
        # full (~14 offers per 1350-byte packet with 16 busy tunnels): skip those at once.
        if builder.remaining_flight_space < MIN_STREAM_FRAME_SPACE:
            return 0
        sent: int = super()._write_stream_frame(builder, space, stream, max_offset)
        return sent

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        # Called for every stream for every packet built: keep the common case cheap.
        local = stream.max_stream_data_local
        if local:
            window = self._configuration.max_stream_data
            target = self.credited.get(stream.stream_id, 0) + window
            if target - local >= window // 2:
                stream.max_stream_data_local = local = target
        if stream.max_stream_data_local_sent == local:
            return  # nothing to announce
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0  # same doubling
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest


@dataclass(slots=True)
class _Stream:
    stream_id: int
    received: int = 0  # QUIC stream bytes handed to the HTTP/3 layer
    delivered: int = 0  # tunnel payload bytes handed to the application
    acked: int = 0  # ... of which the application has consumed
    send_ended: bool = False
    recv_ended: bool = False
    got_headers: bool = False
    paused: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class H3Settings:
    """What an `H3HboneConnection` is and whom it accepts. A server endpoint builds one for all
    its connections; a client builds one per dial (as it builds its QUIC configuration)."""

    role: Role
    trust_domain: str
    expected: Collection[SpiffeId] | None = None
    """Server identities a client accepts; None (a server): any client of the trust domain."""
    server_name: str | None = None
    """Client role: the SNI to send (`server_name_for`), or none."""
    max_streams: int = 100


class H3HboneConnection:
    """One QUIC connection carrying HBONE streams. Not thread-safe; one owner at a time."""

    def __init__(
        self,
        cert: WorkloadCertificate,
        settings: H3Settings,
        *,
        wall_clock: datetime,
        original_dcid: bytes | None = None,
        reset_key: bytes | None = None,
    ) -> None:
        """`original_dcid`: server role, the Destination Connection ID of the client's first
        Initial packet (RFC 9000 §7.3). `reset_key`: server role, the key its stateless reset
        tokens derive from."""
        role = settings.role
        self.role = role
        self.quic = _MeshQuic(
            quic_configuration(cert, role, settings.server_name), original_dcid, reset_key
        )
        self.h3: _MeshH3 | None = None  # created only once the peer is verified
        self.trust_domain = settings.trust_domain
        self.expected = settings.expected
        self.roots_pem = cert.roots_pem
        self.wall_clock = wall_clock  # validity is checked at this instant (injected clock)
        self.peer_identity: SpiffeId | None = None
        self.refused: PeerVerificationError | None = None
        self.terminated = False
        self.goaway_sent = False
        self.max_streams = settings.max_streams
        self._streams: dict[int, _Stream] = {}
        self._next_ping = 0.0
        self._ping_uid = 0
        self._highest_request_id = -4
        self._goaway_id: int | None = None

    # ---- connection ------------------------------------------------------------------------

    def connect(self, addr: tuple[str, int], now: float) -> None:
        """Client: start the handshake toward `addr`."""
        self.quic.connect(addr, now=now)
        self._next_ping = now + KEEPALIVE_INTERVAL

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> list[Event]:
        if not self._next_ping:
            self._next_ping = now + KEEPALIVE_INTERVAL
        self.quic.receive_datagram(data, addr, now)
        return self._process()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        return self.quic.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        timer = self.quic.get_timer()
        if self.peer_identity is not None and not self.terminated:
            timer = self._next_ping if timer is None else min(timer, self._next_ping)
        return timer

    def handle_timer(self, now: float) -> list[Event]:
        if self.peer_identity is not None and now >= self._next_ping and not self.terminated:
            self._ping_uid += 1
            self.quic.send_ping(self._ping_uid)  # keepalive: the peer's idle timer restarts
            self._next_ping = now + KEEPALIVE_INTERVAL
        timer = self.quic.get_timer()
        if timer is not None and now >= timer:
            self.quic.handle_timer(now)
        return self._process()

    def close(self) -> None:
        """Graceful: GOAWAY (server: the first request stream ID it will not serve, RFC 9114
        §5.2), then CONNECTION_CLOSE(H3_NO_ERROR) once no stream is open and all data is
        acknowledged."""
        if not self.goaway_sent and self.h3 is not None and not self.terminated:
            control = self.h3._local_control_stream_id
            if control is not None:
                if self.role is Role.SERVER:
                    last = max((sid for sid in self._streams if sid % 4 == 0), default=-4)
                    ident = max(last + 4, self._highest_request_id + 4)
                else:
                    ident = 0  # a client's GOAWAY carries a push ID; we allow no pushes
                self._goaway_id = ident
                frame = encode_frame(FrameType.GOAWAY, encode_uint_var(ident))
                self.quic.send_stream_data(control, frame)
        self.goaway_sent = True
        self._maybe_finish_close()

    def _maybe_finish_close(self) -> None:
        """After GOAWAY: CONNECTION_CLOSE once no stream is open and every byte we sent on a
        request stream was acknowledged (aioquic discards unsent stream data when it closes).
        Control streams are not waited for: CONNECTION_CLOSE supersedes the GOAWAY on them."""
        if not self.goaway_sent or self._streams or self.terminated or self.quic._close_pending:
            return
        if any(
            len(qs.sender._buffer) for sid, qs in self.quic._streams.items() if sid % 4 < 2
        ):  # RFC 9000 §2.1: IDs 0b00 / 0b01 mod 4 are bidirectional (request) streams
            return
        self.quic.close(error_code=H3_NO_ERROR)

    # ---- streams ---------------------------------------------------------------------------

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def can_open_stream(self, limit: int = 100) -> bool:
        return (
            self.h3 is not None
            and not self.terminated
            and not self.goaway_sent
            and not self.h3.goaway_received
            and len(self._streams) < min(limit, self.max_streams)
        )

    def open_connect(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Client: send CONNECT (RFC 9114 §4.4: :method and :authority only)."""
        if self.h3 is None or self.terminated:
            raise ConnectionResetError("HTTP/3 connection not usable")
        sid = self.quic.get_next_available_stream_id()
        block = [(b":method", b"CONNECT"), (b":authority", authority.encode("latin-1"))]
        block += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self.h3.send_headers(sid, block)
        self._streams[sid] = _Stream(sid)
        return sid

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or self.h3 is None:
            return
        block = [(b":status", str(status).encode())]
        block += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if status == 200:
            self.h3.send_headers(stream_id, block)
            return
        # A refusal ends the response and stops reading the request (RFC 9114 §4.1.1).
        self.h3.send_headers(stream_id, block, end_stream=True)
        self.quic.stop_stream(stream_id, H3_NO_ERROR)
        self._drop(stream_id)

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> bool:
        """Queue tunnel bytes; False when the stream's backlog is above the high-water mark."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.send_ended or self.h3 is None:
            return True
        self.h3.send_data(stream_id, data, end_stream=end_stream)
        if end_stream:
            self._ended_sending(stream)
            return True
        if self._backlog(stream_id) > PENDING_HIGH_WATER:
            stream.paused = True
            return False
        return True

    def end_stream(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.send_ended and self.h3 is not None:
            self.h3.send_data(stream_id, b"", end_stream=True)
            self._ended_sending(stream)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CONNECT_ERROR) -> None:
        """Abort both directions (a TCP RST): RESET_STREAM and STOP_SENDING (RFC 9000 §3.5)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        h3code = h3_error_code(code)
        if not stream.send_ended:
            self.quic.reset_stream(stream_id, h3code)
        if not stream.recv_ended:
            self.quic.stop_stream(stream_id, h3code)
        self._drop(stream_id)

    def pending_bytes(self, stream_id: int) -> int:
        return self._backlog(stream_id)

    def acknowledge_received_data(self, stream_id: int, length: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.acked += length
        self._credit(stream)

    # ---- internals -------------------------------------------------------------------------

    def _backlog(self, stream_id: int) -> int:
        qs = self.quic._streams.get(stream_id)
        return 0 if qs is None else len(qs.sender._buffer)

    def _credit(self, stream: _Stream) -> None:
        buffered = 0
        if self.h3 is not None:
            hs = self.h3._stream.get(stream.stream_id)
            buffered = len(hs.buffer) if hs is not None else 0
        unconsumed = stream.delivered - stream.acked
        self.quic.credit(stream.stream_id, stream.received - buffered - unconsumed)

    def _ended_sending(self, stream: _Stream) -> None:
        stream.send_ended = True
        if stream.recv_ended:
            self._drop(stream.stream_id)

    def _drop(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            # Everything the peer sent on it counts as consumed for the connection window.
            qs = self.quic._streams.get(stream_id)
            final = max(stream.received, qs.receiver.highest_offset if qs is not None else 0)
            self.quic.credit(stream_id, final)
            self.quic.forget_credit(stream_id)

    def _verify(self) -> None:
        tls = self.quic.tls
        try:
            if tls.alpn_negotiated != ALPN_H3:
                raise PeerVerificationError(
                    f"ALPN protocol is {tls.alpn_negotiated!r}, HBONE over QUIC requires 'h3'"
                )
            if tls.session_resumed or tls.early_data_accepted:
                raise PeerVerificationError("session resumption / 0-RTT is not allowed")
            leaf = tls._peer_certificate
            self.peer_identity = verify_peer_chain(
                None if leaf is None else leaf.public_bytes(serialization.Encoding.DER),
                [c.public_bytes(serialization.Encoding.DER) for c in tls._peer_certificate_chain],
                PeerPolicy(
                    peer_side="server" if self.role is Role.CLIENT else "client",
                    trust_domain=self.trust_domain,
                    expected=self.expected,
                ),
                roots_pem=self.roots_pem,
                now=self.wall_clock,
            )
        except PeerVerificationError as err:
            self.refused = err
            self.quic.close(
                error_code=QuicErrorCode.CRYPTO_ERROR + AlertDescription.bad_certificate,
                reason_phrase=str(err)[:200],
            )
            return
        self.h3 = _MeshH3(self.quic)

    def _process(self) -> list[Event]:
        out: list[Event] = []
        while (ev := self.quic.next_event()) is not None:
            if self.refused is not None:
                if isinstance(ev, qev.ConnectionTerminated):
                    self.terminated = True
                continue  # nothing from a refused peer is looked at
            if isinstance(ev, qev.HandshakeCompleted):
                self._verify()
                if self.refused is not None:
                    out.append(PeerRefused(error=self.refused))
                else:
                    assert self.peer_identity is not None
                    out.append(PeerVerified(identity=self.peer_identity))
                continue
            if isinstance(ev, qev.ConnectionTerminated):
                self.terminated = True
                out.append(
                    ConnectionTerminated(
                        error_code=ev.error_code,
                        last_stream_id=0,
                        remote=True,
                        debug=ev.reason_phrase.encode("utf-8", "replace"),
                    )
                )
                continue
            if self.h3 is None:
                if isinstance(ev, qev.StreamDataReceived | qev.StreamReset):
                    # Cannot happen with aioquic 1.7.2 (1-RTT keys come after the handshake);
                    # if it ever does, no stream may be served before verification.
                    self.quic.close(
                        error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                        reason_phrase="stream data before the peer was verified",
                    )
                continue
            self._on_quic_event(ev, out)
        self._check_windows(out)
        self._maybe_finish_close()
        return out

    def _on_quic_event(self, ev: qev.QuicEvent, out: list[Event]) -> None:
        if isinstance(ev, qev.StreamReset | qev.StopSendingReceived):
            self._on_reset(ev, out)
        elif isinstance(ev, qev.StreamDataReceived):
            self._on_stream_data(ev, out)

    def _on_reset(self, ev: qev.StreamReset | qev.StopSendingReceived, out: list[Event]) -> None:
        assert self.h3 is not None
        self.h3.handle_event(ev)
        stream = self._streams.get(ev.stream_id)
        if isinstance(ev, qev.StopSendingReceived) and ev.error_code == H3_NO_ERROR:
            # RFC 9114 §4.1.1: the response is complete, the peer needs no more request
            # bytes. Our sending side ends; the response (e.g. a 401) is still delivered.
            if stream is not None and not stream.send_ended:
                self.quic.reset_stream(ev.stream_id, H3_NO_ERROR)
                self._ended_sending(stream)
            return
        if stream is not None:
            if isinstance(ev, qev.StopSendingReceived) and not stream.send_ended:
                self.quic.reset_stream(ev.stream_id, ev.error_code)  # RFC 9000 §3.5
            if isinstance(ev, qev.StreamReset) and not stream.recv_ended:
                stream.recv_ended = True
            self._drop(ev.stream_id)
            out.append(StreamReset(ev.stream_id, h2_error_code(ev.error_code), remote=True))

    def _on_stream_data(self, ev: qev.StreamDataReceived, out: list[Event]) -> None:
        assert self.h3 is not None
        stream = self._streams.get(ev.stream_id)
        is_request_stream = ev.stream_id % 4 == 0
        if stream is None and is_request_stream and self.role is Role.SERVER:
            stream = self._admit_request_stream(ev.stream_id)
            if stream is None:
                return
        h3_events = self.h3.handle_event(ev)
        if stream is None:
            if not is_request_stream:
                self._credit_consumed(ev.stream_id)
            return
        stream.received += len(ev.data)
        for h in h3_events:
            if isinstance(h, HeadersReceived) and h.stream_id == stream.stream_id:
                self._on_headers(stream, h, out)
            elif isinstance(h, H3DataReceived) and h.stream_id == stream.stream_id:
                if h.data:
                    stream.delivered += len(h.data)
                    out.append(DataReceived(stream.stream_id, h.data, len(h.data)))
                if h.stream_ended:
                    self._on_fin(stream, out)
        if stream.stream_id in self._streams:
            self._credit(stream)

    def _admit_request_stream(self, stream_id: int) -> _Stream | None:
        """A new request stream from the client, or None: refused (above our GOAWAY's id, or
        over `max_streams`) with H3_REQUEST_REJECTED in both directions (RFC 9114 §4.1.1)."""
        refused_by_goaway = self._goaway_id is not None and stream_id >= self._goaway_id
        if refused_by_goaway or len(self._streams) >= self.max_streams:
            self.quic.reset_stream(stream_id, H3_REQUEST_REJECTED)
            self.quic.stop_stream(stream_id, H3_REQUEST_REJECTED)
            return None
        stream = self._streams[stream_id] = _Stream(stream_id)
        self._highest_request_id = max(self._highest_request_id, stream_id)
        return stream

    def _credit_consumed(self, stream_id: int) -> None:
        """Control / QPACK streams: the HTTP/3 layer consumed what it did not buffer."""
        assert self.h3 is not None
        hs = self.h3._stream.get(stream_id)
        qs = self.quic._streams.get(stream_id)
        if qs is not None:
            received = qs.receiver.starting_offset()
            self.quic.credit(stream_id, received - (len(hs.buffer) if hs else 0))

    def _on_headers(self, stream: _Stream, h: HeadersReceived, out: list[Event]) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in h.headers]
        if stream.got_headers:
            # Trailers on a tunnel: nothing to carry them; a FIN if they end the stream.
            if h.stream_ended:
                self._on_fin(stream, out)
            return
        stream.got_headers = True
        if self.role is Role.SERVER:
            out.append(RequestReceived(stream.stream_id, headers))
        else:
            # RFC 9114 §4.3.2 / RFC 9110 §15: "²" (str.isdigit) raised ValueError out of here.
            status = status_code(next((v for k, v in headers if k == ":status"), ""))
            out.append(ResponseReceived(stream.stream_id, status, headers))
            if status != 200 and not stream.send_ended:
                self.quic.reset_stream(stream.stream_id, H3_REQUEST_CANCELLED)
                stream.send_ended = True
        if h.stream_ended:
            self._on_fin(stream, out)

    def _on_fin(self, stream: _Stream, out: list[Event]) -> None:
        if stream.recv_ended:
            return
        stream.recv_ended = True
        out.append(StreamEnded(stream.stream_id))
        if stream.send_ended:
            self._drop(stream.stream_id)

    def _check_windows(self, out: list[Event]) -> None:
        opened = []
        for stream in self._streams.values():
            if stream.paused and self._backlog(stream.stream_id) <= PENDING_HIGH_WATER // 2:
                stream.paused = False
                opened.append(stream.stream_id)
        if opened:
            out.append(WindowOpened(tuple(opened)))
