"""Request/response plumbing shared by the HTTP/1.1 and HTTP/2 edges.

Owns: the protocol-neutral `Request`, the `BodySource` and `Downstream` interfaces the edges
implement, `DecoratedDownstream` (a `Downstream` adding fields to whatever response head goes
out: CORS, x-ratelimit-*), `ReplayBody`, which lets retries resend a request body, and
`MirrorTap`, a mirror's streaming copy of it.

Invariants:
- A `MirrorTap` gets every chunk the primary reads from the source, as it reads it (a streaming
  tee: mirrors of any body size), and holds at most its `limit` bytes not yet sent by the
  mirror, all taps together at most their `MirrorBudget`: past either, the tap is dropped (its
  `on_drop` cancels the mirror, whose stream is reset; a reader gets `ConnectionAbortedError`),
  so a slow mirror never slows the primary and never grows memory. Feeding never awaits.
- `ReplayBody` keeps at most `limit` bytes. Past that it drops what it kept and is no longer
  replayable (retries and mirrors stop), but the body keeps streaming: memory stays bounded
  whatever the body size.
- Only one pass reads the source at a time (tries are sequential); a pass started later first
  replays what was kept, then continues from the source.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshcore.grpcwire import is_grpc_content_type

HeaderList = list[tuple[str, str]]


class BodySource(Protocol):
    """A request or response body being received."""

    trailers: tuple[tuple[str, str], ...]

    async def read(self) -> bytes:
        """The next chunk, b"" at the end (then `trailers` are final)."""
        ...


class EmptyBody:
    trailers: tuple[tuple[str, str], ...] = ()

    async def read(self) -> bytes:
        return b""


class Downstream(Protocol):
    """Where the response to one request goes."""

    head_sent: bool

    async def send_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        content_length: int | None,
        end: bool = False,
    ) -> None: ...

    async def send_data(self, data: bytes) -> None: ...

    async def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> None: ...

    async def send_continue(self) -> None:
        """Expect: 100-continue was stripped; tell the client to send its body."""

    def reset(self) -> None: ...


class DecoratedDownstream:
    """Delegates to `inner`, adding `extra` to the response head; the response's own fields
    named in `replace` are dropped first (the waypoint's values win)."""

    def __init__(
        self, inner: Downstream, extra: Sequence[tuple[str, str]], replace: frozenset[str]
    ) -> None:
        self.inner = inner
        self.extra = list(extra)
        self.replace = replace

    @property
    def head_sent(self) -> bool:
        return self.inner.head_sent

    @head_sent.setter
    def head_sent(self, value: bool) -> None:
        self.inner.head_sent = value

    async def send_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        content_length: int | None,
        end: bool = False,
    ) -> None:
        kept = [(k, v) for k, v in headers if k not in self.replace]
        await self.inner.send_head(
            status, kept + self.extra, content_length=content_length, end=end
        )

    async def send_data(self, data: bytes) -> None:
        await self.inner.send_data(data)

    async def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> None:
        await self.inner.send_end(trailers)

    async def send_continue(self) -> None:
        await self.inner.send_continue()

    def reset(self) -> None:
        self.inner.reset()


@dataclass(slots=True)
class Request:
    """One request as received, in protocol-neutral form."""

    protocol: str
    """``http/1.1`` or ``h2``."""
    method: str
    target: str
    """Path and query (origin form)."""
    authority: str
    scheme: str
    headers: HeaderList
    """Lower-case names; no pseudo-headers, no hop-by-hop fields, no host."""
    body: BodySource
    has_body: bool
    content_length: int | None
    expect_continue: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def grpc(self) -> bool:
        """A gRPC request by its (first) content-type, the gRPC spec's rule
        (`meshcore.grpcwire.is_grpc_content_type`): gRPC-Web and ``application/grpcx`` are not."""
        for k, v in self.headers:  # a loop: no generator per request
            if k == "content-type":
                return is_grpc_content_type(v)
        return False


class MirrorBudget:
    """Bytes all the mirror taps of a waypoint may hold together."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class MirrorTap:
    """A `BodySource` for a mirror: the chunks the primary read, bounded (module docstring)."""

    def __init__(self, limit: int, budget: MirrorBudget) -> None:
        self.limit = limit
        self.budget = budget
        self.on_drop: Callable[[], None] | None = None
        """Called once when the copy is dropped (the handler cancels the mirror: its stream
        may be blocked on the shadow's flow control, never reading the tap again)."""
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.dropped = False
        self.done = False
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._ready = asyncio.Event()

    def feed(self, data: bytes) -> None:
        if self.dropped or self.done:
            return
        n = len(data)
        if self._size + n > self.limit or self.budget.used + n > self.budget.limit:
            self.drop()
            return
        self._chunks.append(data)
        self._size += n
        self.budget.used += n
        self._ready.set()

    def end(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers
        self.done = True
        self._ready.set()

    def drop(self) -> None:
        """Give up the copy (too slow, or the primary stopped reading the body)."""
        if not self.done and not self.dropped:
            self.dropped = True
            if self.on_drop is not None:
                self.on_drop()
        self._chunks.clear()
        self.budget.used -= self._size
        self._size = 0
        self._ready.set()

    async def read(self) -> bytes:
        while True:
            if self.dropped:
                raise ConnectionAbortedError("mirror dropped: it fell behind the request")
            if self._chunks:
                data = self._chunks.popleft()
                self._size -= len(data)
                self.budget.used -= len(data)
                return data
            if self.done:
                return b""
            self._ready.clear()
            await self._ready.wait()


class ReplayBody:
    def __init__(self, source: BodySource, limit: int) -> None:
        self.source = source
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.total = 0
        self.overflow = False
        self.done = False
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.taps: list[MirrorTap] = []

    def tap(self, limit: int, budget: MirrorBudget) -> MirrorTap | None:
        """A streaming copy for a mirror; None once the primary has read part of the body
        (the copy would be incomplete)."""
        if self.total or self.done:
            return None
        t = MirrorTap(limit, budget)
        self.taps.append(t)
        return t

    def close_taps(self) -> None:
        """The request is over: a copy the primary did not finish reading is dropped."""
        for t in self.taps:
            t.drop()
        self.taps = []

    @property
    def replayable(self) -> bool:
        return not self.overflow

    @property
    def kept(self) -> bytes | None:
        """The whole body once complete and within the limit (for mirrors), else None."""
        return b"".join(self.chunks) if self.done and not self.overflow else None

    async def iterate(self) -> AsyncIterator[bytes]:
        i = 0
        while True:
            if not self.overflow and i < len(self.chunks):
                yield self.chunks[i]
                i += 1
                continue
            if self.done:
                return
            data = await self.source.read()
            if not data:
                self.done = True
                self.trailers = self.source.trailers
                for t in self.taps:
                    t.end(self.trailers)
                return
            self.total += len(data)
            for t in self.taps:
                t.feed(data)
            if not self.overflow:
                self.size += len(data)
                if self.size > self.limit:
                    self.overflow = True
                    self.chunks = []
                else:
                    self.chunks.append(data)
                    i += 1
            yield data

    async def drain(self, limit: int) -> bool:
        """Read and drop the rest of the body (up to `limit` bytes); True if it ended."""
        read = 0
        while not self.done:
            data = await self.source.read()
            if not data:
                self.done = True
                return True
            read += len(data)
            self.total += len(data)
            if read > limit:
                return False
        return True
