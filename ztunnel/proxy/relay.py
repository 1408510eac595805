"""Byte relay between a local TCP socket and a tunnel stream (or another TCP socket).

Owns: the `TcpSide` protocol that splices a TCP transport to a `TunnelStream`, with the mapping
of TCP events to tunnel events that RFC 9113 §8.5 prescribes for CONNECT:
  TCP FIN  <-> END_STREAM (half-close, both directions independently)
  TCP RST  <-> RST_STREAM(CONNECT_ERROR)
and flow control both ways: a TCP socket that can't keep up pauses crediting the tunnel (the peer
stops at its window); a tunnel that can't take more pauses reading the TCP socket.

Reads land in ONE buffer shared by every `TcpSide` of the process (`asyncio.BufferedProtocol`:
the loop is single-threaded, and a read is written on or copied before the next one), with room
for an HTTP/2 frame header in front: a large read leaves as a DATA frame straight from it
(`TunnelStream.write_in_place`), without the two copies of a `bytes` per read and a joined frame.

Invariants: every byte read from one side is written to the other in order or the connection is
reset; counters `sent`/`received` are exact; `on_done` is called exactly once; nothing refers to
the shared read buffer once `buffer_updated` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, cast

from mypy_extensions import mypyc_attr

from meshcore.hbone.aio import TunnelSink, TunnelStream, copied_payload
from meshcore.hbone.frames import FRAME_HEADER, ErrorCode
from meshcore.identity import SpiffeId


def _abort_with_rst(transport: asyncio.Transport) -> None:
    """Close with a TCP RST (SO_LINGER 0), mirroring a reset received from the tunnel."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


READ_SIZE = 256 * 1024  # per read, as uvloop's own read buffer for plain protocols


@mypyc_attr(allow_interpreted_subclasses=True)  # the listeners' protocols (inbound, outbound)
class TcpSide(asyncio.BufferedProtocol):
    """One local TCP connection spliced to a tunnel stream.

    Created either around an accepted socket (outbound/inbound listeners) or by
    `loop.create_connection` toward an upstream (inbound). `stream` may be attached later: bytes
    read before that are held (bounded by pausing reads)."""

    def __init__(self, on_done: Callable[[TcpSide, str | None], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.stream: TunnelStream | None = None
        self.write_paused = False
        self.sent = 0  # bytes written to the TCP socket (from the tunnel)
        self.received = 0  # bytes read from the TCP socket (into the tunnel)
        self._unacked = 0
        self._held: list[bytes] = []
        self._eof_held = False
        self._tcp_eof = False
        self._tunnel_eof = False
        self._finished = False
        self._on_done = on_done

    async def start(self) -> None:
        """The connection's work once its transport exists, when it needs a task
        (`ztunnel.proxy.accept.TcpListener` runs what `begin` returns in one)."""

    def begin(self) -> Coroutine[Any, Any, None] | None:
        """The connection's work once its transport exists, started in this call: None when
        it needs no task (it ran, or goes on in callbacks; issue 14), else the coroutine to run
        in one (by default `start`)."""
        return self.start()

    # ---- TCP side (asyncio.Protocol) ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, don't assert.
        self.transport = cast(asyncio.Transport, transport)
        if self.stream is None:
            self.transport.pause_reading()  # nothing to send into yet

    _frame: ClassVar[memoryview] = memoryview(bytearray(FRAME_HEADER + READ_SIZE))
    """The shared read buffer: FRAME_HEADER octets of room, then the bytes read."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frame[FRAME_HEADER:]

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.stream is not None:
            self.stream.write_in_place(self._frame[: FRAME_HEADER + nbytes])
        else:
            self._held.append(bytes(self._frame[FRAME_HEADER : FRAME_HEADER + nbytes]))

    def eof_received(self) -> bool:
        self._tcp_eof = True
        if self.stream is not None:
            self.stream.write_eof()
        else:
            self._eof_held = True
        self._maybe_done()
        return True  # keep our write side open: the tunnel may still send (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._finished:
            return
        if self.stream is not None and not (self._tcp_eof and self._tunnel_eof):
            # Closed or reset before both directions finished: tell the peer (RFC 9113 §8.5).
            self.stream.reset(ErrorCode.CONNECT_ERROR)
        self._finish(str(exc) if exc else None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._unacked and self.stream is not None:
            unacked, self._unacked = self._unacked, 0
            self.stream.acknowledge(unacked)

    # ---- tunnel side (TunnelSink) ------------------------------------------------------------

    def attach(self, stream: TunnelStream) -> None:
        self.stream = stream
        stream.attach(self)
        held, self._held = self._held, []
        for chunk in held:
            stream.write(chunk)
        if self._eof_held:
            stream.write_eof()
        if self.transport is not None and not self._tcp_eof:
            self.transport.resume_reading()

    def tunnel_data(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(data)
        self.sent += len(data)
        if self.write_paused:
            self._unacked += len(data)

    def tunnel_eof(self) -> None:
        self._tunnel_eof = True
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        self._maybe_done()

    def tunnel_reset(self, code: int, remote: bool) -> None:
        if self.transport is not None and not self._finished:
            self._finish(f"reset {'by peer' if remote else 'by us for a peer error'} (code {code})")
            _abort_with_rst(self.transport)

    def tunnel_pause_source(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def tunnel_resume_source(self) -> None:
        # Not before `attach`: until then nothing drains what is read (`_held`).
        if self.transport is not None and self.stream is not None and not self._tcp_eof:
            self.transport.resume_reading()

    # ---- completion --------------------------------------------------------------------------

    def _maybe_done(self) -> None:
        if self._tcp_eof and self._tunnel_eof and self.transport is not None:
            self.transport.close()  # both directions finished cleanly
            self._finish(None)

    def _finish(self, error: str | None) -> None:
        if not self._finished:
            self._finished = True
            # Drop the links that would make this connection a reference cycle (our bound
            # `on_done`, stream <-> sink): reference counting frees it at once, not the cyclic
            # GC in a pass over every young object (bench/README.md, issue 14).
            on_done, self._on_done = self._on_done, None
            self.stream = None
            if on_done is not None:
                on_done(self, error)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class PlainStream:
    """`TunnelStream` over another local TCP connection: passthrough splices TCP to TCP with the
    same code path (and the same FIN/RST and backpressure mapping) as a tunnel."""

    def __init__(self, target: TcpSide) -> None:
        self.peer_identity: SpiffeId | None = None
        self.target = target
        self.source: TcpSide | None = None

    def attach(self, sink: TunnelSink) -> None:
        assert isinstance(sink, TcpSide)
        self.source = sink

    def write(self, data: bytes) -> None:
        self.target.tunnel_data(data)
        if self.target.write_paused and self.source is not None:
            self.source.tunnel_pause_source()

    def write_in_place(self, frame: memoryview) -> None:
        # A copy: the target's transport keeps what the socket does not take at once.
        self.write(copied_payload(frame))

    def write_eof(self) -> None:
        self.target.tunnel_eof()

    def reset(self, code: int = ErrorCode.CONNECT_ERROR) -> None:
        self.target.tunnel_reset(code, True)  # by its peer: this side

    def acknowledge(self, length: int) -> None:
        if self.source is not None:
            self.source.tunnel_resume_source()


def splice(a: TcpSide, b: TcpSide) -> None:
    """Connect two local TCP connections to each other."""
    a.attach(PlainStream(b))
    b.attach(PlainStream(a))
