"""Our gRPC client (`meshcore.grpcclient`) against hostile or broken servers, written with the
`h2` package (a server we steer frame by frame): a flood of empty messages, a unary call
answered twice, a GOAWAY and a RST_STREAM in the middle of a call, a keepalive never answered.
Each must end the call with a status naming the cause and leave no stream or call behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from meshcore.grpcclient import MAX_QUEUED_MESSAGES, SEND_LIMIT, GrpcConnection, connect
from meshcore.grpcwire import GrpcError, code_name, frame_message
from meshcore.hbone.frames import ErrorCode
from tests.helpers import loopback_block, run

BLOCK = loopback_block()
HOST = BLOCK.ip(1)
GRPC_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]

OnRequest = Callable[
    [h2.connection.H2Connection, int, asyncio.StreamReader, asyncio.StreamWriter],
    Awaitable[None],
]


@asynccontextmanager
async def h2_server(
    on_request: OnRequest, settings: dict[int, int] | None = None
) -> AsyncIterator[str]:
    """A plaintext HTTP/2 server calling `on_request` for each request's headers."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        c.initiate_connection()
        if settings:
            c.update_settings(settings)
        writer.write(c.data_to_send())
        try:
            while data := await reader.read(65536):
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        await on_request(c, ev.stream_id, reader, writer)
                writer.write(c.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{HOST}:{port}"
    finally:
        server.close()
        with suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()


@asynccontextmanager
async def connected(
    on_request: OnRequest, settings: dict[int, int] | None = None
) -> AsyncIterator[GrpcConnection]:
    """Our client connected to an `h2_server` running `on_request`; closed at the end."""
    async with h2_server(on_request, settings) as address:
        conn = await connect(address, tls_roots=None, server_name="", timeout=5)
        try:
            yield conn
        finally:
            conn.close()


def test_a_flood_of_empty_messages_ends_the_call() -> None:
    """Empty messages weigh nothing in payload octets; each is still an object to hold. A server
    sending them as fast as its window allows (the consumer reads none) must not make the call
    queue without bound: it ends RESOURCE_EXHAUSTED past MAX_QUEUED_MESSAGES, dropping them."""
    sent = [0]

    async def flood(
        c: h2.connection.H2Connection,
        sid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        c.send_headers(sid, GRPC_HEADERS)
        chunk = frame_message(b"") * 3000
        while sent[0] < 40_000_000:
            if c.local_flow_control_window(sid) < len(chunk):
                try:
                    async with asyncio.timeout(2):
                        data = await reader.read(65536)
                except TimeoutError:
                    return  # held by flow control
                if not data:
                    return
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.StreamReset):
                        return
                continue
            c.send_data(sid, chunk)
            sent[0] += len(chunk)
            writer.write(c.data_to_send())
            await writer.drain()

    async def main() -> None:
        async with connected(flood) as conn:
            call = conn.start("/a.B/C")
            call.send(b"", end=True)
            async with asyncio.timeout(20):
                while call.status is None:
                    await asyncio.sleep(0.05)
                    assert len(call._messages) <= MAX_QUEUED_MESSAGES
            assert code_name(call.status.code) == "RESOURCE_EXHAUSTED"
            assert "not taken yet" in call.status.message
            assert not call._messages
            assert not conn.calls
            assert conn.conn.open_streams == 0
            assert conn.alive  # the connection serves other calls

    run(main())


async def answer_twice(
    c: h2.connection.H2Connection,
    sid: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Two messages to a unary call, and no trailers."""
    c.send_headers(sid, GRPC_HEADERS)
    c.send_data(sid, frame_message(b"a") + frame_message(b"b"))


def test_a_unary_call_answered_twice_is_cancelled() -> None:
    """The call fails INTERNAL and is reset (RST_STREAM CANCEL): no call or stream is left
    (they leaked, and with them one of the server's MAX_CONCURRENT_STREAMS slots)."""

    async def main() -> None:
        async with connected(answer_twice) as conn:
            with pytest.raises(GrpcError, match="more than one response") as err:
                await conn.unary("/a.B/C", b"x", timeout=5)
            assert err.value.code_name == "INTERNAL"
            await asyncio.sleep(0.1)
            assert not conn.calls
            assert conn.conn.open_streams == 0

    run(main())


async def goaway_mid_call(
    c: h2.connection.H2Connection,
    sid: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Headers and one message on the first call; then GOAWAY ENHANCE_YOUR_CALM taking only
    that call (a second one, already sent, is refused); then the connection ends."""
    if sid == 1:
        c.send_headers(sid, GRPC_HEADERS)
        c.send_data(sid, frame_message(b"first"))
        writer.write(c.data_to_send())
        return
    c.close_connection(
        error_code=ErrorCode.ENHANCE_YOUR_CALM, additional_data=b"too_many_pings", last_stream_id=1
    )
    writer.write(c.data_to_send())
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()


def test_a_goaway_mid_call_names_its_cause() -> None:
    """The server's GOAWAY code and debug data reach the status of every call it ends: the one
    above its last stream id (refused) and the one cut off when the connection closes."""

    async def main() -> None:
        async with connected(goaway_mid_call) as conn:
            first = conn.start("/a.B/C")
            first.send(b"x", end=True)
            assert await first.recv() == b"first"
            second = conn.start("/a.B/C")
            second.send(b"y", end=True)
            with pytest.raises(GrpcError) as err:
                await second.recv()
            assert err.value.code_name == "UNAVAILABLE"  # REFUSED_STREAM: retryable
            assert "GOAWAY ENHANCE_YOUR_CALM too_many_pings" in err.value.details
            assert not conn.alive
            with pytest.raises(GrpcError) as err:
                await first.recv()
            assert err.value.code_name == "UNAVAILABLE"
            assert "lost: GOAWAY ENHANCE_YOUR_CALM too_many_pings" in err.value.details
            assert not conn.calls

    run(main())


async def reset_mid_call(
    c: h2.connection.H2Connection,
    sid: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """A message, then RST_STREAM(REFUSED_STREAM) on the first call; the next is answered."""
    c.send_headers(sid, GRPC_HEADERS)
    if sid == 1:
        c.send_data(sid, frame_message(b"part"))
        c.reset_stream(sid, error_code=ErrorCode.REFUSED_STREAM)
    else:
        c.send_data(sid, frame_message(b"ok"))
        c.send_headers(sid, [("grpc-status", "0")], end_stream=True)


def test_a_reset_mid_call_ends_that_call_only() -> None:
    async def main() -> None:
        async with connected(reset_mid_call) as conn:
            call = conn.start("/a.B/C")
            call.send(b"x", end=True)
            assert await call.recv() == b"part"
            with pytest.raises(GrpcError, match="stream reset by peer, code 7") as err:
                await call.recv()
            assert err.value.code_name == "UNAVAILABLE"
            assert await conn.unary("/a.B/C", b"y", timeout=5) == b"ok"
            assert conn.alive
            assert not conn.calls
            assert conn.conn.open_streams == 0

    run(main())


async def silent(
    c: h2.connection.H2Connection,
    sid: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Response headers, then the server stops reading (no PING is ever answered)."""
    c.send_headers(sid, GRPC_HEADERS)
    writer.write(c.data_to_send())
    await asyncio.sleep(3600)


class _Skewed:
    """The loop, its clock `offset` seconds ahead (keepalive without waiting 30 s)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.offset = 0.0

    def time(self) -> float:
        return self.loop.time() + self.offset

    def __getattr__(self, name: str) -> object:
        return getattr(self.loop, name)


def test_a_keepalive_unanswered_names_its_cause() -> None:
    async def main() -> None:
        async with connected(silent) as conn:
            call = conn.start("/a.B/C")
            call.send(b"x", end=True)
            await asyncio.sleep(0.2)
            clock = _Skewed(asyncio.get_running_loop())
            conn._loop = cast(asyncio.AbstractEventLoop, clock)
            clock.offset = 11.0
            conn._on_timer()  # quiet for 10 s: PING
            clock.offset = 32.0
            conn._on_timer()  # no answer 20 s later: the connection is dead
            with pytest.raises(GrpcError) as err:
                await call.recv()
            assert err.value.code_name == "UNAVAILABLE"
            assert "no PING answer within 20 s" in err.value.details

    run(main())


async def headers_only(
    c: h2.connection.H2Connection,
    sid: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    c.send_headers(sid, GRPC_HEADERS)


def test_a_server_that_never_opens_its_window_ends_the_call() -> None:
    """INITIAL_WINDOW_SIZE 0 and no WINDOW_UPDATE ever: our request messages cannot leave.
    Past SEND_LIMIT unsent octets the call ends RESOURCE_EXHAUSTED rather than queue more."""

    async def main() -> None:
        zero = {int(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE): 0}
        async with connected(headers_only, zero) as conn:
            await asyncio.sleep(0.2)  # the server's SETTINGS applied
            call = conn.start("/a.B/C")
            chunk = b"x" * (1024 * 1024)
            for _ in range(SEND_LIMIT // len(chunk) + 1):
                call.send(chunk)
            with pytest.raises(GrpcError, match="flow-control window") as err:
                await call.recv()
            assert err.value.code_name == "RESOURCE_EXHAUSTED"
            assert conn.conn.pending_bytes(call.stream_id) == 0
            assert not conn.calls

    run(main())
