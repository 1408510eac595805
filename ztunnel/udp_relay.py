"""Hand-over of the HTTP/3 UDP sockets (15008/udp) without losing a QUIC connection (issue 16).

Owns: the relay between a node proxy handing its sockets over (the predecessor) and its
successor, for the QUIC connections the predecessor still serves, and the relay's frame format.

Why a relay: the UDP socket is handed over like the TCP listeners (the same kernel socket, so no
datagram for a new connection is refused and eBPF/ports stay as they were), but unlike TCP a UDP
socket does not demultiplex per connection: whoever reads it gets every peer's datagrams. So
after READY only the successor reads it; the predecessor stops reading (it keeps the socket, to
send from the very same address/port) and names the peers it still serves; the successor
passes each datagram from one of those peers to the predecessor over this relay, and handles
everything else itself. A peer the predecessor no longer serves is named gone, and the relay
closes when the predecessor has no QUIC connection left (or exits), so the successor's list
only shrinks. A successor that dies after READY (no RELEASE on the hand-over connection: the
take-back, docs/upgrade.md) ends the relay too: the predecessor then reads its sockets again
(`Predecessor.take_back`), serving its own QUIC connections and accepting new ones. Datagrams
that queue in the socket between READY and DONE (or between the successor's death and the
take-back) wait in the kernel's receive buffer (4 MiB): nothing is read by the wrong process,
nothing is dropped by us.

Frames (one per SOCK_SEQPACKET message, a unix socketpair passed with the hand-over's
SCM_RIGHTS as role ``hbone-udp-relay``):
  kind u8 ("D" datagram successor->predecessor, "+" peer served, "-" peer gone, "K" reset
  key, all three predecessor->successor) | local address | peer address | payload (D: the
  datagram; K: the key, the peer address empty); an address is ``len u8 | IP text | port u16``.
  The local address names which UDP socket (bind capture has one per local workload address).
  "K" comes first: the successor adopts the key its predecessor's stateless reset tokens
  derive from (`meshcore.hbone.h3.reset_token`), so after a take-back the predecessor resets
  the QUIC connections the dead successor had (their peers reconnect at once instead of
  waiting out the idle timeout), and a successor resets the predecessor's once they ended.

Invariants: frames are bounded (`MAX_FRAME`); a malformed frame or a full relay drops that one
datagram (QUIC retransmits it), with a counter and a log line, never a traceback; the successor
never diverts more peers than the predecessor named (at most its connection limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshcore.errors import HandoverError

if TYPE_CHECKING:  # annotations only: aioquic is loaded by --http3 alone
    from meshcore.hbone.h3aio import Address, H3Endpoint

log = logging.getLogger("ztunnel.handover")

ROLE = "hbone-udp-relay"
MAX_FRAME = 65536 + 128
RELAY_BUFFER = 4 * 1024 * 1024
_PORT = struct.Struct("!H")
DATAGRAM, SERVED, GONE, KEY = b"D", b"+", b"-", b"K"


@dataclass(frozen=True, slots=True)
class Frame:
    kind: bytes
    local: Address
    peer: Address
    data: bytes = b""


def _addr(addr: Address) -> bytes:
    host = addr[0].encode()
    return bytes([len(host)]) + host + _PORT.pack(addr[1])


def encode(frame: Frame) -> bytes:
    return frame.kind + _addr(frame.local) + _addr(frame.peer) + frame.data


def decode(raw: bytes) -> Frame:
    """Raises HandoverError for anything that is not a well-formed frame."""
    if len(raw) > MAX_FRAME or raw[:1] not in (DATAGRAM, SERVED, GONE, KEY):
        raise HandoverError(f"relay frame of kind {raw[:1]!r}, {len(raw)} bytes")
    at = 1
    addrs: list[Address] = []
    for _ in range(2):
        if at >= len(raw) or at + 1 + raw[at] + 2 > len(raw):
            raise HandoverError("truncated relay frame")
        n = raw[at]
        try:
            host = raw[at + 1 : at + 1 + n].decode("ascii")
        except UnicodeDecodeError as err:
            raise HandoverError("relay frame address is not text") from err
        (port,) = _PORT.unpack_from(raw, at + 1 + n)
        addrs.append((host, port))
        at += 1 + n + 2
    kind = raw[:1]
    if kind == KEY:
        from meshcore.hbone.h3 import RESET_KEY_SIZE  # aioquic: a KEY frame means --http3

        if len(raw) - at != RESET_KEY_SIZE:
            raise HandoverError(f"relay key frame of {len(raw) - at} key bytes")
    if kind in (SERVED, GONE) and at != len(raw):
        raise HandoverError("trailing bytes in a relay control frame")
    return Frame(kind, addrs[0], addrs[1], raw[at:])


def pair() -> tuple[socket.socket, socket.socket]:
    """(predecessor's end, successor's end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, opt, RELAY_BUFFER)
    return a, b


def _local(endpoint: H3Endpoint) -> Address:
    assert endpoint.sock is not None
    host, port = endpoint.sock.getsockname()[:2]
    return str(host), int(port)


class Predecessor:
    """The handing-over side: stop reading, name our peers, serve what the successor relays."""

    def __init__(self, sock: socket.socket, endpoints: list[H3Endpoint]) -> None:
        self.sock = sock
        self.endpoints = {_local(e): e for e in endpoints}
        self.relayed = 0
        self.bad = 0
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def start(self) -> None:
        """At READY, before DONE: synchronous, so the successor holds our peer list when it
        learns it may read the socket."""
        self.sock.settimeout(5.0)
        named = 0
        try:
            for local, endpoint in self.endpoints.items():
                endpoint.pause_reading()
                endpoint.on_peer_gone = lambda peer, local=local: self._gone(local, peer)
                self.sock.send(encode(Frame(KEY, local, ("", 0), endpoint.reset_key)))
                for peer in endpoint.served_peers():
                    self.sock.send(encode(Frame(SERVED, local, peer)))
                    named += 1
        except OSError as err:
            log.warning("hand-over: UDP relay to the successor failed: %s", err)
        log.info("hand-over: %d QUIC peers stay with this process, relayed by the successor", named)
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._readable)
        self._maybe_close()

    def _readable(self) -> None:
        for _ in range(64):
            try:
                raw = self.sock.recv(MAX_FRAME)
            except BlockingIOError:
                break
            except OSError:
                raw = b""
            if not raw:
                self.close()  # the successor is gone: nothing will reach us any more
                return
            try:
                frame = decode(raw)
            except HandoverError as err:
                self.bad += 1
                log.warning("hand-over: bad relay frame dropped: %s", err)
                continue
            endpoint = self.endpoints.get(frame.local)
            if frame.kind == DATAGRAM and endpoint is not None:
                self.relayed += 1
                endpoint.receive(frame.data, frame.peer)

    def _gone(self, local: Address, peer: Address) -> None:
        if not self._closed:
            with contextlib.suppress(OSError):
                self.sock.send(encode(Frame(GONE, local, peer)))
        self._maybe_close()

    def _maybe_close(self) -> None:
        if not any(e.served_peers() for e in self.endpoints.values()):
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def take_back(self) -> None:
        """The successor died after READY: the relay is closed and we read our sockets again
        (the same kernel sockets: what queued while nobody read them is read now)."""
        self.close()
        for endpoint in self.endpoints.values():
            endpoint.on_peer_gone = None
            endpoint.resume_reading()
        log.info("hand-over: UDP sockets taken back, %d datagrams were relayed", self.relayed)


class Successor:
    """The taking-over side: divert the predecessor's peers to it until it names them gone."""

    def __init__(self, sock: socket.socket, endpoints: list[H3Endpoint]) -> None:
        self.sock = sock
        self.endpoints = {_local(e): e for e in endpoints}
        self.dropped = 0
        self._closed = False

    def start(self) -> None:
        """After DONE: the predecessor's peer list is queued on the relay; take it, then read
        the UDP sockets ourselves."""
        self.sock.setblocking(False)
        for local, endpoint in self.endpoints.items():
            endpoint.divert_to = self._make_divert(local)
        self._readable()
        if not self._closed:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _make_divert(self, local: Address) -> Callable[[bytes, Address], None]:
        def divert(data: bytes, peer: Address) -> None:
            try:
                self.sock.send(encode(Frame(DATAGRAM, local, peer, data)))
            except OSError:  # relay full or gone: one datagram lost, QUIC repairs it
                self.dropped += 1

        return divert

    def _readable(self) -> None:
        while True:
            try:
                raw = self.sock.recv(MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:
                raw = b""
            if not raw:
                self.close()
                return
            try:
                frame = decode(raw)
            except HandoverError as err:
                log.warning("hand-over: bad relay frame dropped: %s", err)
                continue
            endpoint = self.endpoints.get(frame.local)
            if endpoint is None:
                continue
            if frame.kind == KEY:
                endpoint.reset_key = frame.data
            elif frame.kind == SERVED and len(endpoint.diverted) < endpoint.max_connections:
                endpoint.diverted.add(frame.peer)
            elif frame.kind == GONE:
                endpoint.diverted.discard(frame.peer)

    def close(self) -> None:
        """The predecessor serves no QUIC connection any more (or exited): stop diverting."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        for endpoint in self.endpoints.values():
            endpoint.diverted.clear()
            endpoint.divert_to = None
        log.info("hand-over: the predecessor's QUIC connections ended; UDP relay closed")
