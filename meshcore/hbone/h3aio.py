"""asyncio edge of HBONE over HTTP/3: moves datagrams between UDP sockets and `H3HboneConnection`.

Owns: `H3Protocol` (one QUIC connection, either role, with its timer), `H3Stream` (the
`TunnelStream` the proxies use; a subclass of `HboneStream` so the proxies and the pool need not
know the transport), the client dial `connect_h3` (one connected UDP socket per QUIC connection,
from the source IP the pool key names) and the server endpoint `H3Endpoint` (one UDP socket per
listening address, connections keyed by the peer's address).

Invariants:
- Every batch of events from the core is followed by exactly one flush of its datagrams and a
  re-armed timer (aioquic's get_timer()/handle_timer(now)).
- `ready` resolves only after the peer passed `meshcore.tls.verify_peer_chain`; no stream is
  opened or served before (the core does not even create its HTTP/3 layer before).
- Connection migration is ignored: a connection only takes datagrams from the address it began
  with. The server endpoint creates state only for a client Initial of >= 1200 bytes
  (`initial_dcid`), bounded in total, per peer IP (handshakes in progress and connections), and
  drops everything else silently (no Version Negotiation, no Retry: nothing that could amplify
  is sent to an unverified source), except a short-header packet for a connection it has no
  state for: that gets a Stateless Reset (RFC 9000 §10.3, `meshcore.hbone.h3.stateless_reset`:
  smaller than the packet, at most `RESETS_PER_SECOND`), so a peer of a crashed process whose
  socket we took back learns at once that its connection is gone. Handshakes not verified
  within `handshake_timeout` are dropped and reported.
- A client receiving a Stateless Reset its peer issued ends the connection at once, silently;
  its CONNECTs still without a response are refused unprocessed (`StreamRefused`: the pool
  sends them again on a new connection; the peer lost all state of this one).
- Received data is credited back to the peer only once the sink accepted it without pausing,
  as in `meshcore.hbone.aio`.
- Socket hand-over (`ztunnel.udp_relay`): an endpoint may stop reading its socket and still
  send on it (`pause_reading`), be fed relayed datagrams (`receive`), and divert the datagrams
  of named peers elsewhere (`diverted`/`divert_to`); it reports each peer it stops serving.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence

from meshcore.certs import WorkloadCertificate, utcnow
from meshcore.errors import HboneError, PeerVerificationError, StreamRefused
from meshcore.hbone.aio import (
    HboneSettings,
    HboneStream,
    PoolKey,
    TunnelSink,
    copied_payload,
    on_response,
    on_stream_data,
    on_stream_ended,
    on_window_opened,
)
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
from meshcore.hbone.h3 import (
    H3_NO_ERROR,
    MAX_RESET,
    RESET_KEY_SIZE,
    H3HboneConnection,
    H3Settings,
    PeerRefused,
    PeerVerified,
    client_hello_server_name,
    initial_dcid,
    stateless_reset,
)
from meshcore.hbone.peers import PeerTable
from meshcore.hbone.streams import Role
from meshcore.identity import SpiffeId
from meshcore.sockets import udp_socket

log = logging.getLogger("meshcore.hbone.h3")

Address = tuple[str, int]


class H3Stream(HboneStream):
    """One CONNECT stream on an `H3Protocol`."""

    __slots__ = ("_h3",)
    transport = "h3"

    def __init__(self, proto: H3Protocol, stream_id: int) -> None:
        # Not calling HboneStream.__init__: it binds an HTTP/2 protocol; the state is the same.
        self._h3 = proto
        self._start(stream_id, proto.peer_identity)

    def attach(self, sink: TunnelSink) -> None:
        self.sink = sink
        early, self._early = self._early, []
        for chunk in early:
            if chunk is None:
                sink.tunnel_eof()
            else:
                sink.tunnel_data(chunk)
                self._h3.conn.acknowledge_received_data(self.stream_id, len(chunk))
        self._h3.schedule_flush()

    def respond(self, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._h3.conn.respond(self.stream_id, status, headers)
        if status != 200:
            self._h3.forget(self.stream_id)
        self._h3.schedule_flush()

    def write(self, data: bytes) -> None:
        if not self._h3.conn.send_data(self.stream_id, data) and self.sink is not None:
            self.sink.tunnel_pause_source()
        self._h3.schedule_flush()

    def write_in_place(self, frame: memoryview) -> None:
        self.write(copied_payload(frame))  # QUIC frames its own: the payload is copied

    def write_eof(self) -> None:
        self._h3.conn.end_stream(self.stream_id)
        if not self._h3.conn.is_open(self.stream_id):
            self._h3.forget(self.stream_id)
        self._h3.schedule_flush()

    def reset(self, code: int = ErrorCode.CONNECT_ERROR) -> None:
        if not self.closed:
            self._gone()
            self._h3.conn.reset_stream(self.stream_id, code)
            self._h3.forget(self.stream_id)
            self._h3.schedule_flush()

    def acknowledge(self, length: int) -> None:
        self._h3.conn.acknowledge_received_data(self.stream_id, length)
        self._h3.schedule_flush()


RequestHandler = Callable[[H3Stream], None]


class H3Protocol:
    """One QUIC connection speaking HBONE. Create with `connect_h3()` or `H3Endpoint`."""

    def __init__(
        self,
        conn: H3HboneConnection,
        *,
        peer_addr: Address,
        send: Callable[[list[bytes], Address], None],
        on_request: RequestHandler | None = None,
        on_close: Callable[[H3Protocol], None] | None = None,
    ) -> None:
        """`conn`: the protocol core, built by the caller for its role (`connect_h3`,
        `H3Endpoint`); `send` puts datagrams on the wire toward `peer_addr`."""
        self._loop = asyncio.get_running_loop()
        self.conn = conn
        self.role = conn.role
        self.server_name: str | None = None
        """Client: the SNI sent. Server: the SNI the client sent (set by `H3Endpoint`)."""
        self.peer_addr = peer_addr
        self._send = send
        self.on_request = on_request
        self.on_close = on_close
        self.peer_identity: SpiffeId | None = None
        self.streams: dict[int, H3Stream] = {}
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed = False
        self.idle_since = self._loop.time()
        self.transport = None  # no TLS transport: the pool/proxies check this for HTTP/2 only
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_pending = False
        self._graceful_close = False
        self._stateless_reset = False

    # ---- I/O -------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address, *, flush: bool = True) -> None:
        """Feed one datagram; with flush=False the caller flushes once after a batch."""
        if self.closed or addr[:2] != self.peer_addr:
            return  # migration ignored (see module docstring)
        if self.conn.quic.is_stateless_reset(data):
            log.info("HTTP/3 connection to %s ended by a stateless reset", self.peer_addr[0])
            self._stateless_reset = True
            self._lost(ConnectionResetError("HTTP/3 stateless reset: the peer has no state"))
            return
        self._dispatch(self.conn.receive_datagram(data, addr, self._loop.time()))
        if flush:
            self.flush()

    def flush(self) -> None:
        self._flush_pending = False
        if self.closed:
            return
        out = self.conn.datagrams_to_send(self._loop.time())
        if out:
            # One connection, one path (migration ignored): every datagram goes to the peer.
            self._send([data for data, _ in out], self.peer_addr)
        if self.conn.terminated:
            self._lost(ConnectionResetError("HTTP/3 connection closed"))
            return
        self._arm_timer()

    def schedule_flush(self) -> None:
        """Coalesce the writes of many streams in one loop iteration into one flush."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def _arm_timer(self) -> None:
        at = self.conn.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self.closed:
            return
        self._dispatch(self.conn.handle_timer(self._loop.time()))
        self.flush()

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Graceful: no new streams; the QUIC connection closes once the last stream ended."""
        self.conn.close()
        self.flush()

    def abort(self) -> None:
        if not self.closed:
            self.conn.quic.close(error_code=H3_NO_ERROR, reason_phrase="aborted")
            out = self.conn.datagrams_to_send(self._loop.time())
            if out:
                self._send([data for data, _ in out], self.peer_addr)
            self._lost(ConnectionResetError("HTTP/3 connection aborted"))

    def _lost(self, exc: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.ready.done():
            self.ready.set_exception(self.conn.refused or exc)
            # Whoever awaits `ready` gets this; a handshake nobody awaits any more (the
            # server's timed-out `_verify`) was reported there, not by asyncio at GC.
            self.ready.exception()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._gone()
            if stream.response is not None and not stream.response.done():
                # A graceful close (H3_NO_ERROR) comes only once the peer has no stream open:
                # one still waiting for its response was never processed (RFC 9114 §5.2).
                stream.response.set_exception(
                    StreamRefused("HTTP/3 connection closed before the peer saw this stream")
                    if self._graceful_close or self._stateless_reset
                    else ConnectionResetError("HTTP/3 connection lost")
                )
            elif stream.sink is not None:
                stream.sink.tunnel_reset(ErrorCode.CONNECT_ERROR, True)
        if self.on_close is not None:
            self.on_close(self)

    def forget(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream._gone()
        if not self.streams:
            self.idle_since = self._loop.time()

    # ---- events ----------------------------------------------------------------------------

    def _dispatch(self, events: list[Event]) -> None:
        conn = self.conn
        for ev in events:
            if type(ev) is DataReceived:
                on_stream_data(self.streams, conn, ev)
            elif type(ev) is StreamEnded:
                on_stream_ended(self.streams, ev)
            elif type(ev) is PeerVerified:
                self.peer_identity = ev.identity
                if not self.ready.done():
                    self.ready.set_result(None)
            elif type(ev) is PeerRefused:
                if not self.ready.done():
                    self.ready.set_exception(ev.error)
            elif type(ev) is RequestReceived:
                self._on_request(ev)
            elif type(ev) is ResponseReceived:
                on_response(self.streams, self.forget, ev)
            elif type(ev) is StreamReset:
                self._on_reset(ev)
            elif type(ev) is WindowOpened:
                on_window_opened(self.streams, ev)
            elif type(ev) is ConnectionTerminated:
                # `flush` sees conn.terminated and tears down.
                self._graceful_close = ev.error_code == H3_NO_ERROR
        for sid in [s for s in self.streams if not conn.is_open(s)]:
            self.forget(sid)

    def _on_reset(self, ev: StreamReset) -> None:
        stream = self.streams.pop(ev.stream_id, None)
        if stream is None:
            return
        stream._gone()
        if stream.response is not None and not stream.response.done():
            # Not established yet: the opener gets the error (and may retry a refused stream
            # elsewhere); the sink has seen nothing of it.
            stream.response.set_exception(
                StreamRefused(f"CONNECT {stream.authority}")
                if ev.error_code == ErrorCode.REFUSED_STREAM  # H3_REQUEST_REJECTED
                else ConnectionResetError(
                    f"stream reset {'by peer' if ev.remote else 'by us for a peer error'} "
                    f"({ev.error_code})"
                )
            )
        elif stream.sink is not None:
            stream.sink.tunnel_reset(ev.error_code, ev.remote)
        self.forget(ev.stream_id)

    def _on_request(self, ev: RequestReceived) -> None:
        stream = H3Stream(self, ev.stream_id)
        stream.headers = ev.headers
        self.streams[ev.stream_id] = stream
        method = next((v for k, v in ev.headers if k == ":method"), "")
        stream.authority = next((v for k, v in ev.headers if k == ":authority"), "")
        if method != "CONNECT" or any(
            k in (":path", ":scheme", ":protocol") for k, _ in ev.headers
        ):
            stream.respond(400)  # RFC 9114 §4.4 / HBONE: only plain CONNECT is accepted
            return
        if self.on_request is None:
            stream.respond(503)
            return
        self.on_request(stream)

    # ---- client ----------------------------------------------------------------------------

    def start_stream(
        self, authority: str, headers: Sequence[tuple[str, str]], sink: TunnelSink
    ) -> H3Stream:
        """Send CONNECT now; its status arrives in the stream's `response` future (as
        `HboneProtocol.start_stream`). Raises StreamRefused (nothing was sent: the pool may
        retry on another connection)."""
        if self.closed or not self.conn.can_open_stream(self.conn.max_streams):
            # Nothing was sent on this connection: the pool may retry on another.
            raise StreamRefused("HTTP/3 connection closed before the CONNECT was sent")
        sid = self.conn.open_connect(authority, headers)
        stream = H3Stream(self, sid)
        stream.authority = authority
        stream.response = self._loop.create_future()
        stream.sink = sink
        self.streams[sid] = stream
        self.flush()
        return stream

    async def open_stream(
        self, authority: str, headers: Sequence[tuple[str, str]], sink: TunnelSink
    ) -> H3Stream:
        """Send CONNECT and wait for the response. Raises HboneError for a non-200 status."""
        stream = self.start_stream(authority, headers, sink)
        assert stream.response is not None
        status = await stream.response
        if status != 200:
            raise HboneError.for_status(status, f"CONNECT {authority} refused with {status}")
        return stream


READ_BATCH = 64  # datagrams read per readiness callback before one flush
RESETS_PER_SECOND = 100  # Stateless Resets an endpoint sends at most (RFC 9000 §10.3.3)
UDP_SEGMENT = 103  # linux/udp.h: UDP generic segmentation offload (Linux 4.18+)
GSO_MAX_SEGMENTS = 48  # <= UDP_MAX_SEGMENTS (64) and <= 64 KiB of 1350-byte datagrams
_gso = {"ok": True}  # cleared for good the first time the kernel refuses UDP_SEGMENT


def send_datagrams(sock: socket.socket, datagrams: list[bytes], addr: Address | None) -> None:
    """Send `datagrams` (to `addr`, or on a connected socket). Runs of equal-sized datagrams (the
    last of a run may be shorter) go out in one sendmsg with UDP_SEGMENT: the kernel cuts them
    into datagrams (GSO), one system call instead of one per datagram. Errors drop what is left
    of the batch: QUIC repairs a loss like any other (full buffer, ICMP error)."""
    i, n = 0, len(datagrams)
    while i < n:
        size = len(datagrams[i])
        j = i + 1
        if _gso["ok"]:
            limit = min(GSO_MAX_SEGMENTS, 65000 // max(size, 1))
            while j < n and j - i < limit and len(datagrams[j - 1]) == size:
                if len(datagrams[j]) > size:
                    break
                j += 1
        try:
            if j - i == 1:
                if addr is None:
                    sock.send(datagrams[i])
                else:
                    sock.sendto(datagrams[i], addr)
            else:
                cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
                sock.sendmsg([b"".join(datagrams[i:j])], cmsg, 0, *([addr] if addr else []))
        except BlockingIOError:
            return
        except OSError as err:
            if j - i > 1 and err.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT):
                _gso["ok"] = False  # no GSO here: one datagram per call from now on
                continue
            return
        i = j


class _UdpClient:
    """Client side: the connected UDP socket of one `H3Protocol`. Reads are drained in batches
    (asyncio's datagram transport reads one datagram per loop iteration, and answering each one
    separately costs a packet build per datagram); one flush follows each batch."""

    def __init__(self, sock: socket.socket, peer: Address) -> None:
        self.sock = sock
        self.peer = peer
        self.proto: H3Protocol | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        proto = self.proto
        for _ in range(READ_BATCH):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                # ICMP port unreachable on a connected socket: nobody listens on UDP there.
                if proto is not None and not proto.ready.done():
                    proto.abort()
                return
            if proto is not None:
                proto.datagram_received(data, self.peer, flush=False)
        if proto is not None:
            proto.flush()

    def send(self, datagrams: list[bytes], _addr: Address) -> None:
        send_datagrams(self.sock, datagrams, None)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def connect_h3(
    key: PoolKey,
    cert: WorkloadCertificate,
    settings: HboneSettings,
    *,
    timeout: float = 10.0,
    on_close: Callable[[H3Protocol], None] | None = None,
) -> H3Protocol:
    """Open an HBONE-over-HTTP/3 connection to `key.h3_address` (else `key.address`) presenting
    `cert` and verify the server is one of `key.expected`; `key.server_name` (SNI,
    `meshcore.hbone.h3.server_name_for`) names the destination workload when the server is a
    node proxy's shared socket. Raises PeerVerificationError, TimeoutError or OSError."""
    loop = asyncio.get_running_loop()
    host, port = key.h3_address or key.address
    # A node's shared socket answers to our address: a transparent source (a pod IP) would
    # route the replies to the pod, not here.
    shared = key.h3_address is not None
    sock = udp_socket(host, transparent=key.transparent and not shared)
    try:
        if key.source_ip is not None and not shared:
            sock.bind((key.source_ip, 0))
        sock.connect((host, port))
        udp = _UdpClient(sock, (host, port))
    except BaseException:
        sock.close()
        raise

    def closed(proto: H3Protocol) -> None:
        udp.close()
        if on_close is not None:
            on_close(proto)

    core = H3Settings(
        role=Role.CLIENT,
        trust_domain=settings.trust_domain,
        expected=key.expected,
        server_name=key.server_name,
    )
    proto = H3Protocol(
        H3HboneConnection(cert, core, wall_clock=utcnow()),
        peer_addr=(host, port),
        send=udp.send,
        on_close=closed,
    )
    proto.server_name = key.server_name
    udp.proto = proto
    proto.conn.connect((host, port), loop.time())
    proto.flush()
    try:
        await asyncio.wait_for(asyncio.shield(proto.ready), timeout)
    except BaseException:
        proto.abort()
        if proto.ready.done() and not proto.ready.cancelled():
            proto.ready.exception()  # retrieved: we raise it (or the timeout) ourselves
        raise
    return proto


HANDSHAKE_TIMEOUT = 10.0
"""Seconds a QUIC handshake may take before the peer is dropped and reported."""
MAX_CONNECTIONS = 4096
"""Connections (handshaking or established) on one endpoint, all peers together."""


class H3Endpoint:
    """Server side: one UDP socket; a QUIC connection per peer address. `start(sock)` begins
    reading (in batches, see `_UdpClient`).

    `certificate(server_name)` gives the certificate to present, chosen by the SNI of the
    client's first Initial (`client_hello_server_name`; None without one: then the listening
    address names the local workload, as for HBONE over TCP). `on_refused(peer, error)` is told
    about every peer that did not pass verification or the handshake timeout, or got no
    certificate; `on_request` gets each CONNECT.

    Per-peer-IP bounds (handshakes in progress, connections) are `peers`, the `PeerTable` an
    HBONE listener shares between its transports (a fresh one when not given); the endpoint
    bounds its connections of all peers together (`max_connections`) and the handshake time
    (`handshake_timeout`)."""

    def __init__(
        self,
        certificate: Callable[[str | None], Awaitable[WorkloadCertificate]],
        settings: HboneSettings,
        *,
        on_request: Callable[[H3Stream, Address], None],
        on_refused: Callable[[Address, PeerVerificationError], None],
        peers: PeerTable | None = None,
    ) -> None:
        self._certificate = certificate
        self.trust_domain = settings.trust_domain
        self._core = H3Settings(role=Role.SERVER, trust_domain=settings.trust_domain)
        """Shared by every connection of the endpoint."""
        self._on_request = on_request
        self._on_refused = on_refused
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self.max_connections = MAX_CONNECTIONS
        self.peers = peers if peers is not None else PeerTable()
        self.sock: socket.socket | None = None
        self.connections: dict[Address, H3Protocol] = {}
        self._pending: dict[Address, list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.dropped = 0
        self._reading = False
        # Socket hand-over (`ztunnel.udp_relay`): a successor passes the datagrams of the peers
        # in `diverted` to `divert_to` (its predecessor still serves them); a predecessor is
        # told of each peer it no longer serves through `on_peer_gone`.
        self.diverted: set[Address] = set()
        self.divert_to: Callable[[bytes, Address], None] | None = None
        self.on_peer_gone: Callable[[Address], None] | None = None
        # Stateless resets (RFC 9000 §10.3): the key our connections' tokens derive from; a
        # successor adopts its predecessor's (`ztunnel.udp_relay`), so either can reset the
        # other's connections once it has no state for them.
        self.reset_key = os.urandom(RESET_KEY_SIZE)
        self.on_reset: Callable[[], None] | None = None
        """Told of each Stateless Reset sent (the node proxy's counter)."""
        self._reset_second = (0, 0)  # (whole second, resets sent in it)

    def start(self, sock: socket.socket, *, reading: bool = True) -> None:
        self.sock = sock
        if reading:
            self.resume_reading()

    def resume_reading(self) -> None:
        if self.sock is not None and not self._reading:
            self._reading = True
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def pause_reading(self) -> None:
        """Stop reading the socket (it stays open for sending: a successor reads it now)."""
        if self.sock is not None and self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def served_peers(self) -> list[Address]:
        """Peers with a connection or a handshake in progress here."""
        return [*self.connections, *self._pending]

    def receive(self, data: bytes, addr: Address) -> None:
        """One datagram that did not come from our own read of the socket (a relay)."""
        touched: dict[Address, H3Protocol] = {}
        self._one(data, addr, touched)
        for proto in touched.values():
            proto.flush()

    def _readable(self) -> None:
        if self.sock is None:
            return
        touched: dict[Address, H3Protocol] = {}
        for _ in range(READ_BATCH):
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                break
            except OSError:
                continue  # an ICMP error queued on the socket: nothing to do for a server
            addr = addr[:2]
            if self.divert_to is not None and addr in self.diverted:
                self.divert_to(data, addr)
                continue
            self._one(data, addr, touched)
        for proto in touched.values():
            proto.flush()

    def _one(self, data: bytes, addr: Address, touched: dict[Address, H3Protocol]) -> None:
        proto = self.connections.get(addr)
        if proto is not None:
            proto.datagram_received(data, addr, flush=False)
            touched[addr] = proto
        else:
            self.datagram_received(data, addr)

    def sendto(self, datagrams: list[bytes], addr: Address) -> None:
        if self.sock is not None:
            send_datagrams(self.sock, datagrams, addr)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """A datagram from an address without a connection (yet)."""
        pending = self._pending.get(addr)
        if pending is not None:
            if len(pending) < 8:
                pending.append(data)
            return
        dcid = initial_dcid(data)
        if dcid is None:
            self.dropped += 1
            self._reset(data, addr)
            return
        if (
            self.closing
            or len(self.connections) + len(self._pending) >= self.max_connections
            or self.peers.admit(addr[0]) is not None  # counted (handshake, connection) if None
        ):
            self.dropped += 1
            return
        self._pending[addr] = [data]
        server_name = client_hello_server_name(data)
        task = asyncio.get_running_loop().create_task(self._accept(addr, dcid, server_name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reset(self, data: bytes, addr: Address) -> None:
        """A packet for a connection we have no state for: a Stateless Reset, rate-limited."""
        second = int(asyncio.get_running_loop().time())
        sent = self._reset_second[1] if self._reset_second[0] == second else 0
        if sent >= RESETS_PER_SECOND or not data or data[0] & 0x80:
            return  # over the budget, or a long header: never answered (stateless_reset)
        reset = stateless_reset(self.reset_key, data, os.urandom(MAX_RESET))
        if reset is not None:
            self._reset_second = (second, sent + 1)
            self.sendto([reset], addr)
            if self.on_reset is not None:
                self.on_reset()

    async def _accept(self, addr: Address, dcid: bytes, server_name: str | None) -> None:
        proto: H3Protocol | None = None
        try:
            proto = await self._connection(addr, dcid, server_name)
            if proto is not None:
                await self._verify(addr, proto)
        finally:
            self.peers.handshake_done(addr[0])
            if proto is None:
                self.peers.closed(addr[0])  # else the connection's close uncounts the peer
            if addr not in self.connections and self.on_peer_gone is not None:
                self.on_peer_gone(addr)

    async def _connection(
        self, addr: Address, dcid: bytes, server_name: str | None
    ) -> H3Protocol | None:
        """The server connection for a client's first Initial, fed what it sent so far; None
        (the handshake dropped) without a certificate to present or a socket."""
        try:
            cert = await self._certificate(server_name)
        except Exception as err:
            self._pending.pop(addr, None)
            self.dropped += 1
            log.warning("HTTP/3 HBONE from %s: no certificate to present: %s", addr[0], err)
            self._on_refused(addr, PeerVerificationError(f"no certificate to present: {err}"))
            return None
        if self.sock is None:
            self._pending.pop(addr, None)
            return None
        # A handshake begun before `close()` completes (then gets GOAWAY): its peer may have
        # been named to a successor as served here (`served_peers`).
        proto = H3Protocol(
            H3HboneConnection(
                cert, self._core, wall_clock=utcnow(), original_dcid=dcid, reset_key=self.reset_key
            ),
            peer_addr=addr,
            send=self.sendto,
            on_request=lambda stream: self._on_request(stream, addr),
            on_close=self._closed,
        )
        proto.server_name = server_name
        self.connections[addr] = proto
        for data in self._pending.pop(addr, []):
            proto.datagram_received(data, addr)
        return proto

    async def _verify(self, addr: Address, proto: H3Protocol) -> None:
        """Wait (bounded) for the peer to pass verification; report and drop it otherwise."""
        try:
            await asyncio.wait_for(asyncio.shield(proto.ready), self.handshake_timeout)
        except PeerVerificationError as err:
            proto.flush()  # our CONNECTION_CLOSE(CRYPTO_ERROR) leaves
            proto.abort()
            self._on_refused(addr, err)
        except (TimeoutError, ConnectionError) as err:
            proto.abort()
            self._on_refused(
                addr, PeerVerificationError(f"QUIC handshake failed: {err or 'timeout'}")
            )
            return
        if self.closing:
            proto.close()

    def _closed(self, proto: H3Protocol) -> None:
        if self.connections.get(proto.peer_addr) is proto:
            del self.connections[proto.peer_addr]
            self.peers.closed(proto.peer_addr[0])
            if self.on_peer_gone is not None:
                self.on_peer_gone(proto.peer_addr)

    def close(self) -> None:
        """Stop accepting; live connections finish their streams (see `abort_all`)."""
        self.closing = True
        for proto in list(self.connections.values()):
            proto.close()

    def abort_all(self) -> None:
        for proto in list(self.connections.values()):
            proto.abort()
        for task in self._tasks:
            task.cancel()
        if self.sock is not None:
            self.pause_reading()
            self.sock.close()
            self.sock = None
