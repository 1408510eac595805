"""Request/response plumbing shared by the HTTP/1.1 and HTTP/2 edges.

Owns: the protocol-neutral `Request`, the `BodySource` and `Downstream` interfaces the edges
implement, `DecoratedDownstream` (a `Downstream` adding fields to whatever response head goes
out: CORS, x-ratelimit-*), and `ReplayBody`, which lets retries and mirrors resend a request
body.

Invariants:
- `ReplayBody` keeps at most `limit` bytes. Past that it drops what it kept and is no longer
  replayable (retries and mirrors stop), but the body keeps streaming: memory stays bounded
  whatever the body size.
- Only one pass reads the source at a time (tries are sequential); a pass started later first
  replays what was kept, then continues from the source.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
        self, status: int, headers: Sequence[tuple[str, str]], *, content_length: int | None,
        end: bool = False,
    ) -> None: ...  # fmt: skip

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
        self, status: int, headers: Sequence[tuple[str, str]], *, content_length: int | None,
        end: bool = False,
    ) -> None:  # fmt: skip
        kept = [(k, v) for k, v in headers if k not in self.replace]
        await self.inner.send_head(status, kept + self.extra, content_length=content_length,
                                   end=end)  # fmt: skip

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
        ct = next((v for k, v in self.headers if k == "content-type"), "")
        return ct.startswith("application/grpc")


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
        self.finished = asyncio.Event()

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
                self.finished.set()
                return
            self.total += len(data)
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
                self.finished.set()
                return True
            read += len(data)
            self.total += len(data)
            if read > limit:
                return False
        return True
