"""The bulk data path's copies (issue 14, bench/README.md "Bulk and memory, session 5"): the
protocol core parses frames straight out of the edge's reused read buffer and copies each DATA
payload out once; large DATA payloads leave as views of themselves, not joined with the frame
headers around them; the TLS objects call OpenSSL without the stdlib's Python wrappers."""

from __future__ import annotations

import asyncio
import os
import ssl
from datetime import timedelta
from typing import cast

import pytest

from meshcore.ca import MeshCA
from meshcore.certs import WorkloadCertificate
from meshcore.hbone.aio import HboneProtocol, HboneSettings, HboneStream
from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.events import DataReceived, Event, RequestReceived, StreamEnded
from meshcore.hbone.frames import FRAME_HEADER, Setting, encode_settings
from meshcore.hbone.output import BIG_PAYLOAD, TLS_RECORD
from meshcore.hbone.streams import Role
from meshcore.tls import DirectSSLObject, client_context, server_context
from tests.unit.certfixtures import real_now, sid
from tests.unit.test_hbone_connection import pair, pump


def _open(client: HboneConnection, server: HboneConnection) -> int:
    stream_id = client.open_connect("10.0.0.1:80")
    pump(client, server)
    server.respond(stream_id, 200)
    pump(client, server)
    return stream_id


@pytest.mark.parametrize("read_size", [777, 9, 65_536])
def test_payloads_are_copied_out_of_a_reused_read_buffer(read_size: int) -> None:
    """The edge hands the core a view of ONE buffer it reuses for every read: what the core
    keeps (payloads in events, the start of a frame cut by the read) must be its own copy."""
    client, server = pair()
    first = _open(client, server)
    blob = os.urandom(150_000)
    client.send_data(first, blob[:100_000])
    second = client.open_connect("10.0.0.2:80")  # a HEADERS frame cut across reads
    client.send_data(first, blob[100_000:], end_stream=True)
    wire = client.data_to_send()
    buffer = bytearray(read_size)
    events: list[Event] = []
    for i in range(0, len(wire), read_size):
        chunk = wire[i : i + read_size]
        buffer[: len(chunk)] = chunk
        events += server.receive_data(memoryview(buffer)[: len(chunk)])
        buffer[:] = b"\xa5" * read_size  # the next read overwrites the buffer
    payloads = [e.data for e in events if isinstance(e, DataReceived)]
    assert all(type(p) is bytes for p in payloads)
    assert b"".join(payloads) == blob
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [second]
    assert any(isinstance(e, StreamEnded) and e.stream_id == first for e in events)


def test_large_payloads_leave_as_views_after_whole_records() -> None:
    client, server = pair()
    first = _open(client, server)
    second = _open(client, server)
    big = os.urandom(200_000)
    client.send_data(second, b"small")  # queued before: joined with the start of `big`
    client.send_data(first, big)
    client.send_data(second, b"after")
    parts = client.data_to_send_parts()
    assert len(parts) == 3
    head, view, tail = parts
    assert len(head) % TLS_RECORD == 0  # whole records: no short record before the view
    assert isinstance(view, memoryview)
    assert view.obj is big  # the payload is not copied
    received = server.receive_data(b"".join(parts))
    data: dict[int, bytes] = {}
    for e in received:
        if isinstance(e, DataReceived):
            data[e.stream_id] = data.get(e.stream_id, b"") + e.data
    assert data == {first: big, second: b"smallafter"}
    assert len(tail) < BIG_PAYLOAD


def test_a_frame_header_alone_is_topped_up_to_a_whole_record() -> None:
    client, server = pair()
    stream_id = _open(client, server)
    client.data_to_send()
    big = os.urandom(BIG_PAYLOAD)
    client.send_data(stream_id, big)
    head, view = client.data_to_send_parts()
    assert len(head) == TLS_RECORD
    assert isinstance(view, memoryview)
    assert view.obj is big
    assert client.data_to_send_parts() == []
    events = server.receive_data(bytes(head) + bytes(view))
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == big


@pytest.fixture(scope="module")
def certs() -> tuple[WorkloadCertificate, WorkloadCertificate]:
    ca = MeshCA.create_root(now=real_now() - timedelta(days=1))
    now = real_now()
    return ca.issue(sid("apps", "alice"), now=now), ca.issue(sid("apps", "bob"), now=now)


def test_tls_objects_call_openssl_directly(
    certs: tuple[WorkloadCertificate, WorkloadCertificate],
) -> None:
    """What uvloop's TLS layer calls per record (`read`, `pending`, `write`) is OpenSSL's C
    method itself, and a real mTLS exchange over memory BIOs (as that layer runs it) works."""
    alice, bob = certs
    bios = [ssl.MemoryBIO() for _ in range(4)]  # client in/out, server in/out
    client = client_context(bob).wrap_bio(bios[0], bios[1], server_hostname=None)
    server = server_context(alice).wrap_bio(bios[2], bios[3], server_side=True)
    for obj in (client, server):
        assert isinstance(obj, DirectSSLObject)
        for name in ("read", "write", "pending"):
            assert type(getattr(obj, name)).__name__ == "builtin_function_or_method", name
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj in (("c", client), ("s", server)):
            if not done[key]:
                try:
                    obj.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    assert all(done.values())
    assert client.version() == "TLSv1.3"
    blob = os.urandom(100_000)
    assert client.write(blob) == len(blob)
    bios[2].write(bios[1].read())
    buffer = bytearray(len(blob))
    got = 0
    while got < len(blob):
        # With a buffer, read returns the count (typeshed says bytes).
        got += cast(int, server.read(len(blob) - got, memoryview(buffer)[got:]))
    assert bytes(buffer) == blob
    assert server.pending() == 0


def test_a_write_cut_into_the_peers_small_frames_is_not_copied_per_frame() -> None:
    """A peer with the default MAX_FRAME_SIZE (16 KiB, Envoy's): a 256 KiB write leaves as 16
    frames whose payloads are views of it (slicing bytes copied the rest of it per frame)."""
    client, server = pair()
    stream_id = _open(client, server)
    client.receive_data(encode_settings({Setting.MAX_FRAME_SIZE: 16_384}))
    client.data_to_send()  # the SETTINGS ACK
    blob = os.urandom(256 * 1024)
    client.send_data(stream_id, blob)
    payloads = [item for item in client._out if len(item) > 9]
    assert len(payloads) == 16
    assert all(isinstance(p, memoryview) and p.obj is blob for p in payloads)
    events = server.receive_data(client.data_to_send())
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == blob


class _Transport:
    """Records what a flush writes: the objects, and their bytes at the time of the call (as
    the TLS layer encrypts them during the call)."""

    def __init__(self) -> None:
        self.objects: list[object] = []
        self.wire = b""

    def write(self, data: bytes | memoryview) -> None:
        self.writelines([data])

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        self.objects += parts
        self.wire += b"".join(parts)


def test_a_large_read_leaves_as_a_frame_built_in_the_read_buffer() -> None:
    async def main() -> None:
        proto = HboneProtocol(Role.CLIENT, HboneSettings(trust_domain="cluster.local"))
        server = HboneConnection(Role.SERVER)
        proto.conn.initiate(0.0)
        server.initiate()
        pump(proto.conn, server)
        stream_id = _open(proto.conn, server)
        stream = HboneStream(proto, stream_id)
        proto.streams[stream_id] = stream
        transport = _Transport()
        proto.transport = cast(asyncio.Transport, transport)
        big, small = os.urandom(BIG_PAYLOAD + 1000), os.urandom(1000)
        read_buffer = bytearray(FRAME_HEADER + len(big))
        for payload in (big, small):
            read_buffer[FRAME_HEADER : FRAME_HEADER + len(payload)] = payload
            stream.write_in_place(memoryview(read_buffer)[: FRAME_HEADER + len(payload)])
            read_buffer[:] = b"\xa5" * len(read_buffer)  # the next read
        # The large one left during the call, from the buffer itself; the small one was copied
        # and waits for the loop iteration's coalesced flush.
        assert any(isinstance(o, memoryview) and o.obj is read_buffer for o in transport.objects)
        proto.flush()
        events = server.receive_data(transport.wire)
        assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == big + small

    asyncio.run(main())


def test_consecutive_frames_of_a_stream_in_one_read_are_one_event() -> None:
    """The edge writes the local socket once per event: DATA frames of one stream that arrive
    in one read (nothing between them) are delivered, and credited, as one."""
    client, server = pair()
    first = _open(client, server)
    second = _open(client, server)
    pieces = [os.urandom(10_000) for _ in range(5)]
    for piece in pieces[:3]:
        client.send_data(first, piece)
    client.send_data(second, pieces[3])
    client.send_data(first, pieces[4], end_stream=True)
    events = server.receive_data(client.data_to_send())
    data = [(e.stream_id, e.data, e.flow_length) for e in events if isinstance(e, DataReceived)]
    assert data == [
        (first, b"".join(pieces[:3]), 30_000),
        (second, pieces[3], 10_000),
        (first, pieces[4], 10_000),
    ]
    assert isinstance(events[-1], StreamEnded)
