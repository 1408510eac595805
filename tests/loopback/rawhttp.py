"""Raw HTTP helpers for the request-hygiene tests (helpers only, no tests here).

- `RawApp`: an application server that records exactly what it received (method, target, every
  field line in order, body, trailers), parsing as little as possible so that nothing it
  receives is hidden by a parser's own normalisation; it answers ``200 ok``.
- `send_h1`: write raw bytes on a TCP connection and read one response (status + body).
- `send_h2`: one HTTP/2 request with prior knowledge whose header block is sent exactly as given
  (the h2 library with its outbound validation off), so malformed requests can be expressed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    """Lower-cased names, values as sent (latin-1), in order."""
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


def _fields(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        name, _, value = line.partition(b":")
        out.append((name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")))
    return out


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _text(headers: Any) -> list[tuple[str, str]]:
    return [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in headers or []]


class RawApp:
    """HTTP/1.1 keep-alive server, or HTTP/2 with prior knowledge (h2 without inbound
    validation, so what arrives is recorded as it arrived), recording each request."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._conn, host, port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readuntil(b"\r\n\r\n")
            if first == H2_PREFACE[:18]:
                first += await reader.readexactly(len(H2_PREFACE) - 18)
                await self._h2(first, reader, writer)
            else:
                await self._h1(first, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def _h2(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False, header_encoding=None, validate_inbound_headers=False
            )
        )
        conn.initiate_connection()
        streams: dict[int, Received] = {}
        data = first
        while data:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    hs = _text(ev.headers)
                    pseudo = {k: v for k, v in hs if k.startswith(":")}
                    streams[ev.stream_id] = Received(
                        method=pseudo.get(":method", ""),
                        target=pseudo.get(":path", ""),
                        headers=[("host", pseudo.get(":authority", ""))]
                        + [(k, v) for k, v in hs if not k.startswith(":")],
                    )
                elif isinstance(ev, h2.events.DataReceived):
                    streams[ev.stream_id].body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    streams[ev.stream_id].trailers = _text(ev.headers)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.received.append(streams.pop(ev.stream_id))
                    conn.send_headers(
                        ev.stream_id, [(b":status", b"200"), (b"content-length", b"2")]
                    )
                    conn.send_data(ev.stream_id, b"ok", end_stream=True)
            writer.write(conn.data_to_send())
            data = await reader.read(65536)

    async def _h1(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            lines = head[:-4].split(b"\r\n")
            method, target, _version = lines[0].decode("latin-1").split(" ", 2)
            rec = Received(method=method, target=target, headers=_fields(lines[1:]))
            te = ",".join(rec.values("transfer-encoding")).lower()
            if "chunked" in te:
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        break
                    rec.body += (await reader.readexactly(size + 2))[:-2]
                while (line := (await reader.readuntil(b"\r\n"))[:-2]) != b"":
                    rec.trailers.extend(_fields([line]))
            elif cl := rec.values("content-length"):
                rec.body = await reader.readexactly(int(cl[0]))
            self.received.append(rec)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")


TIMEOUT = 10.0
"""Seconds `send_h1` and `send_h2` wait for an answer."""


async def send_h1(
    addr: tuple[str, int], raw: bytes, *, local: str | None = None, eof: bool = False
) -> int:
    """The response status to `raw`, or 0 when the connection closed without one (within
    `TIMEOUT`). `eof`: half-close after `raw` (a request cut short is then complete as far as it
    goes)."""
    reader, writer = await asyncio.open_connection(*addr, local_addr=(local, 0) if local else None)
    try:
        writer.write(raw)
        await writer.drain()
        if eof:
            writer.write_eof()
        async with asyncio.timeout(TIMEOUT):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return 0
            status = int(head.split(b" ", 2)[1])
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                        await reader.readexactly(int(line.split(b":")[1]))
            return status
    finally:
        writer.close()


@dataclass
class H2Outcome:
    status: int = 0
    reset: int | None = None
    """RST_STREAM code, or the GOAWAY code when the whole connection was closed."""


async def send_h2(
    addr: tuple[str, int],
    headers: list[tuple[bytes, bytes]],
    *,
    body: bytes = b"",
    trailers: list[tuple[bytes, bytes]] | None = None,
    local: str | None = None,
) -> H2Outcome:
    """Send one request over a new HTTP/2 connection and wait (up to `TIMEOUT`) for its
    response status or reset."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    reader, writer = await asyncio.open_connection(*addr, local_addr=(local, 0) if local else None)
    out = H2Outcome()
    try:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers, end_stream=not body and not trailers)
        if body:
            conn.send_data(sid, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(sid, trailers, end_stream=True)
        writer.write(conn.data_to_send())
        async with asyncio.timeout(TIMEOUT):
            while True:
                data = await reader.read(65536)
                if not data:
                    return out
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        out.status = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                        return out
                    elif (
                        isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid
                    ) or isinstance(ev, h2.events.ConnectionTerminated):
                        out.reset = int(ev.error_code) if ev.error_code is not None else 0
                        return out
                writer.write(conn.data_to_send())
    finally:
        writer.close()
