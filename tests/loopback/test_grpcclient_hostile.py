"""Our gRPC client (`meshcore.grpcclient`) against hostile or broken servers, written with the
`h2` package (a server we steer frame by frame): a flood of empty messages, a unary call
answered twice, a GOAWAY and a RST_STREAM in the middle of a call, a keepalive never answered.
Each must end the call with a status naming the cause and leave no stream or call behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from meshcore.grpcclient import MAX_QUEUED_MESSAGES, GrpcConnection, connect
from meshcore.grpcwire import GrpcError, code_name, frame_message
from tests.helpers import loopback_block, run

BLOCK = loopback_block()
HOST = BLOCK.ip(1)
GRPC_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]

OnRequest = Callable[
    [h2.connection.H2Connection, int, asyncio.StreamReader, asyncio.StreamWriter],
    Awaitable[None],
]


@asynccontextmanager
async def h2_server(on_request: OnRequest) -> AsyncIterator[str]:
    """A plaintext HTTP/2 server calling `on_request` for each request's headers."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        c.initiate_connection()
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


async def dial(address: str) -> GrpcConnection:
    return await connect(address, tls_roots=None, server_name="", timeout=5)


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
        async with h2_server(flood) as address:
            conn = await dial(address)
            try:
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
            finally:
                conn.close()

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
        async with h2_server(answer_twice) as address:
            conn = await dial(address)
            try:
                with pytest.raises(GrpcError, match="more than one response") as err:
                    await conn.unary("/a.B/C", b"x", timeout=5)
                assert err.value.code_name == "INTERNAL"
                await asyncio.sleep(0.1)
                assert not conn.calls
                assert conn.conn.open_streams == 0
            finally:
                conn.close()

    run(main())
