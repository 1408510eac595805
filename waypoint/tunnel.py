"""Async byte-stream view of one HBONE tunnel stream (either direction).

Owns: `TunnelIO`, a `TunnelSink` that queues what the tunnel delivers and gives it out with
`read()`, and writes with `write()` + `drain()` (waiting while the HTTP/2 send window is
exhausted); and `Tunnel`, the facts about the HBONE tunnel a request arrived in (peer identity
and address, the addressed service or workload) that the handler decides with.

Invariants:
- Flow control credit is given only for bytes the application has taken with `read()`
  (`write_paused` is always True, so the HBONE protocol never credits on delivery). Per-stream
  memory is therefore bounded by the peer's view of our stream window (4 MiB), whatever the
  body size and however slow the consumer.
- `read()` returns b"" exactly once the peer ended the stream and everything before was read;
  a reset raises ConnectionResetError (also for every later read). `take()` is `read()` without
  the wait (None: nothing yet; then await `readable()`), for the per-request loops that parse
  as they read: no coroutine per read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from meshcore.hbone.aio import TunnelStream
from meshcore.hbone.frames import ErrorCode
from meshcore.identity import SpiffeId
from meshcore.model import Service, Workload


class TunnelIO:
    write_paused = True  # TunnelSink: never credit on delivery; `read()` credits

    def __init__(self) -> None:
        self.stream: TunnelStream | None = None
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._reset: int | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The reading loop, taken once: `asyncio.get_running_loop` costs a getpid() call."""
        self._writable = asyncio.Event()
        self._writable.set()
        self.sent_eof = False
        self.bytes_in = 0
        self.bytes_out = 0

    def bind(self, stream: TunnelStream) -> None:
        """Server side: attach to an accepted stream (delivers data that arrived early)."""
        self.stream = stream
        stream.attach(self)

    # ---- TunnelSink ----------------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def tunnel_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def tunnel_eof(self) -> None:
        self._eof = True
        self._wake()

    def tunnel_reset(self, code: int, remote: bool) -> None:
        self._reset = code
        self._writable.set()
        self._wake()

    def tunnel_pause_source(self) -> None:
        self._writable.clear()

    def tunnel_resume_source(self) -> None:
        self._writable.set()

    # ---- application side ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Reset, or ended by the peer with nothing left to read."""
        return self._reset is not None or (self._eof and not self._chunks)

    @property
    def was_reset(self) -> bool:
        return self._reset is not None

    async def read(self) -> bytes:
        while True:
            chunk = self.take()
            if chunk is not None:
                return chunk
            await self.readable()

    def take(self) -> bytes | None:
        """The next chunk (credited to the peer), b"" at the end, or None when nothing has
        arrived yet (await `readable()`); a reset raises ConnectionResetError."""
        if not self._chunks:
            if self._reset is not None:
                raise ConnectionResetError(f"tunnel reset (code {self._reset})")
            if self._eof:
                return b""
            return None
        chunk = self._chunks.popleft()
        self.bytes_in += len(chunk)
        if self.stream is not None:
            self.stream.acknowledge(len(chunk))
        return chunk

    def readable(self) -> asyncio.Future[None]:
        """Done when data, the end or a reset arrives (one reader at a time)."""
        w = self._waiter
        if w is None or w.done():
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            w = self._waiter = loop.create_future()
        return w

    def write(self, data: bytes) -> None:
        if self._reset is not None:
            raise ConnectionResetError(f"tunnel reset (code {self._reset})")
        if data and self.stream is not None:
            self.bytes_out += len(data)
            self.stream.write(data)

    async def drain(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()
        if self._reset is not None:
            raise ConnectionResetError(f"tunnel reset (code {self._reset})")

    def write_eof(self) -> None:
        if not self.sent_eof and self._reset is None and self.stream is not None:
            self.sent_eof = True
            self.stream.write_eof()

    def reset(self) -> None:
        if self._reset is None:
            self._reset = ErrorCode.CANCEL
            if self.stream is not None:
                self.stream.reset(ErrorCode.CANCEL)
            self._writable.set()
            self._wake()

    def close(self) -> None:
        """Finish our side: END_STREAM if both sides are done, else RST (we won't read)."""
        if self._reset is not None:
            return
        if self._eof and not self._chunks:
            self.write_eof()
        else:
            self.reset()


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Tunnel:
    """Facts about the HBONE tunnel a request arrived in."""

    peer_identity: SpiffeId | None
    peer_ip: str
    target_ip: str
    target_port: int
    service: Service | None
    workload: Workload | None
    """The addressed workload when the tunnel targets a workload (not a service)."""
    peer_cert_hash: str = ""
    """SHA-256 (hex) of the peer's verified certificate (DER), for X-Forwarded-Client-Cert."""

    @property
    def peer_uri(self) -> str:
        """The verified peer's SPIFFE URI (``spiffe://td/ns/x/sa/y``), "" without one: how
        the access log, the metrics' principal labels and XFCC's ``URI`` name the peer (the
        one formatting; the handler keeps it per peer in `waypoint.derived.Peer`)."""
        return str(self.peer_identity) if self.peer_identity is not None else ""
