"""The per-DATA-frame path (issue 14, bench/README.md "Session 7: DATA-frame path"): a small
write built in the read buffer (`HboneStream.write_in_place`, one copy of header and payload)
leaves exactly as the general path (`write` of a copied payload) would, whatever the peer did to
the windows or the stream; and the frame header parsed with one `struct` call reads every
field as RFC 9113 §4.1 lays it out, cut at any octet by the reads.

Run on the compiled build and in pure Python (`tests/unit/test_native.py`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import cast

import pytest

from meshcore.hbone.aio import HboneProtocol, HboneSettings, HboneStream, copied_payload
from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.control import MAX_FRAME
from meshcore.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    StreamEnded,
    StreamReset,
)
from meshcore.hbone.frames import (
    FRAME_HEADER,
    ErrorCode,
    Flag,
    FrameType,
    Setting,
    encode_settings,
    encode_window_update,
    frame_header,
)
from meshcore.hbone.streams import Role
from tests.unit.test_hbone_connection import pump


class _Transport:
    def __init__(self) -> None:
        self.wire = b""

    def write(self, data: bytes | memoryview) -> None:
        self.wire += bytes(data)

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        self.wire += b"".join(parts)

    def is_closing(self) -> bool:
        return False


def _edge(peer_settings: dict[int, int]) -> tuple[HboneProtocol, HboneConnection, int]:
    """A client edge with one open stream to a server core that sent `peer_settings`."""
    proto = HboneProtocol(Role.CLIENT, HboneSettings(trust_domain="cluster.local"))
    server = HboneConnection(Role.SERVER)
    proto.conn.initiate(0.0)
    server.initiate()
    pump(proto.conn, server)
    if peer_settings:
        proto.conn.receive_data(encode_settings(peer_settings))
        pump(proto.conn, server)
    stream_id = proto.conn.open_connect("10.0.0.1:80")
    pump(proto.conn, server)
    server.respond(stream_id, 200)
    pump(proto.conn, server)
    proto.streams[stream_id] = HboneStream(proto, stream_id)
    proto.transport = cast(asyncio.Transport, _Transport())
    return proto, server, stream_id


def _window_state(proto: HboneProtocol, stream_id: int) -> tuple[int, ...]:
    conn = proto.conn
    return (
        conn.conn_send_window,
        conn.pending_bytes(stream_id),
        int(conn.is_open(stream_id)),
        int(conn.pending_blocked),
    )


Setup = Callable[[HboneProtocol, int], None]


def _nothing(proto: HboneProtocol, stream_id: int) -> None:
    pass


def _queued(proto: HboneProtocol, stream_id: int) -> None:
    proto.conn.send_data(stream_id, b"q" * 200_000)  # over the 64 KiB default window


def _ended(proto: HboneProtocol, stream_id: int) -> None:
    proto.conn.end_stream(stream_id)


def _reset(proto: HboneProtocol, stream_id: int) -> None:
    proto.streams[stream_id].reset(ErrorCode.CANCEL)


def _conn_window_spent(proto: HboneProtocol, stream_id: int) -> None:
    proto.conn.conn_send_window = 100  # as if other streams had spent the rest


CASES: dict[str, tuple[dict[int, int], Setup, int]] = {
    "fits": ({}, _nothing, 1000),
    "empty": ({}, _nothing, 0),
    "stream window shut (peer INITIAL_WINDOW_SIZE 0)": (
        {Setting.INITIAL_WINDOW_SIZE: 0},
        _nothing,
        1000,
    ),
    "stream window overrun by the write": ({Setting.INITIAL_WINDOW_SIZE: 500}, _nothing, 1000),
    "connection window nearly spent": ({}, _conn_window_spent, 1000),
    "data already queued on the stream": ({}, _queued, 1000),
    "stream ended by us": ({}, _ended, 1000),
    "stream reset": ({}, _reset, 1000),
    "over the peer's MAX_FRAME_SIZE": ({}, _nothing, 20_000),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_small_write_in_place_leaves_as_the_general_write_would(case: str) -> None:
    settings, setup, size = CASES[case]
    payload = os.urandom(size)

    async def run(in_place: bool) -> tuple[bytes, tuple[int, ...], list[Event]]:
        proto, server, stream_id = _edge(settings)
        setup(proto, stream_id)
        proto.flush()
        transport = cast(_Transport, proto.transport)
        buffer = bytearray(FRAME_HEADER + size)
        buffer[FRAME_HEADER:] = payload
        frame = memoryview(buffer)
        stream = proto.streams.get(stream_id) or HboneStream(proto, stream_id)
        if in_place:
            stream.write_in_place(frame)
        else:
            stream.write(copied_payload(frame))
        buffer[:] = b"\xa5" * len(buffer)  # the next read reuses the buffer
        await asyncio.sleep(0)  # the coalesced flush
        proto.flush()
        events = server.receive_data(transport.wire)
        return transport.wire, _window_state(proto, stream_id), events

    async def main() -> None:
        wire_a, state_a, events_a = await run(in_place=True)
        wire_b, state_b, events_b = await run(in_place=False)
        assert state_a == state_b
        assert wire_a == wire_b
        assert events_a == events_b

    asyncio.run(main())


def _client_and_server() -> tuple[HboneConnection, HboneConnection, int]:
    client = HboneConnection(Role.CLIENT)
    server = HboneConnection(Role.SERVER)
    client.initiate()
    server.initiate()
    pump(client, server)
    stream_id = client.open_connect("10.0.0.1:80")
    pump(client, server)
    server.respond(stream_id, 200)
    pump(client, server)
    return client, server, stream_id


def _collect(events: list[Event]) -> tuple[bytes, list[tuple[str, int]]]:
    data = b"".join(e.data for e in events if isinstance(e, DataReceived))
    rest = [(type(e).__name__, getattr(e, "stream_id", -1)) for e in events]
    rest = [r for r in rest if r[0] != "DataReceived"]
    return data, rest


@pytest.mark.parametrize("step", [1, 4, 9, 10, 17, 1024])
def test_frame_headers_cut_at_any_octet_parse_as_rfc_9113_lays_them_out(step: int) -> None:
    """§4.1: 24-bit length, type, flags, reserved bit (ignored) + 31-bit stream id; §4.1 unknown
    types ignored; §6.1 padding stripped and counted. Fed whole and cut every `step` octets."""
    body = os.urandom(3000)

    def wire(stream_id: int) -> bytes:
        reserved = stream_id | 0x8000_0000
        padded = bytes([7]) + body[:100] + b"\0" * 7
        return b"".join(
            [
                frame_header(1000, FrameType.DATA, 0, 0)[:5] + reserved.to_bytes(4, "big"),
                body[:1000],
                frame_header(5, 0xFA, 0xFF, stream_id) + b"hello",  # unknown type: ignored
                frame_header(len(padded), FrameType.DATA, Flag.PADDED, stream_id) + padded,
                encode_window_update(stream_id | 0x8000_0000, 10)[:9] + (10).to_bytes(4, "big"),
                frame_header(2000, FrameType.DATA, Flag.END_STREAM, stream_id),
                body[1000:],
            ]
        )

    _, whole_server, sid = _client_and_server()
    whole = whole_server.receive_data(wire(sid))
    _, cut_server, sid2 = _client_and_server()
    assert sid2 == sid
    data = wire(sid)
    cut: list[Event] = []
    for i in range(0, len(data), step):
        cut += cut_server.receive_data(memoryview(bytearray(data[i : i + step])))
    assert not any(isinstance(e, (ConnectionTerminated, StreamReset)) for e in whole + cut)
    assert (
        _collect(whole)
        == _collect(cut)
        == (body[:1000] + body[:100] + body[1000:], [("StreamEnded", sid)])
    )
    assert any(isinstance(e, StreamEnded) for e in cut)


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2**24 - 1])
def test_a_frame_over_max_frame_size_is_a_frame_size_error_before_its_payload(
    length: int,
) -> None:
    """§4.2: the 24-bit length is read as such (the type octet is not part of it) and checked
    from the header alone, cut anywhere."""
    for step in (1, 5, 9):
        _, server, sid = _client_and_server()
        data = frame_header(length, FrameType.DATA, 0, sid)
        events: list[Event] = []
        for i in range(0, len(data), step):
            events += server.receive_data(data[i : i + step])
        assert isinstance(events[-1], ConnectionTerminated)
        assert events[-1].error_code == ErrorCode.FRAME_SIZE_ERROR
