"""Sans-I/O HBONE connection tests: in-memory pairs, and interop with the `h2` library."""

from __future__ import annotations

import os

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from meshcore.hbone.flow import CONNECTION_WINDOW, STREAM_WINDOW
from meshcore.hbone.frames import ErrorCode, FrameType, frame_header
from meshcore.hbone.streams import Role


def pump(a: HboneConnection, b: HboneConnection) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until quiet; returns events seen by a and by b."""
    ev_a: list[Event] = []
    ev_b: list[Event] = []
    for _ in range(100):
        ab = a.data_to_send()
        if ab:
            ev_b += b.receive_data(ab)
        ba = b.data_to_send()
        if ba:
            ev_a += a.receive_data(ba)
        if not ab and not ba:
            return ev_a, ev_b
    raise AssertionError("no quiescence")


def pair() -> tuple[HboneConnection, HboneConnection]:
    client = HboneConnection(Role.CLIENT)
    server = HboneConnection(Role.SERVER)
    client.initiate()
    server.initiate()
    pump(client, server)
    assert client.ready
    assert server.ready
    return client, server


def test_connect_roundtrip_and_half_close() -> None:
    client, server = pair()
    sid = client.open_connect("10.0.0.1:8080", [("forwarded", 'for="10.0.0.2:1234"')])
    _, ev = pump(client, server)
    (req,) = [e for e in ev if isinstance(e, RequestReceived)]
    assert req.stream_id == sid
    assert (":method", "CONNECT") in req.headers
    assert (":authority", "10.0.0.1:8080") in req.headers
    assert ("forwarded", 'for="10.0.0.2:1234"') in req.headers
    server.respond(sid, 200)
    client.send_data(sid, b"hello")
    client.end_stream(sid)
    ev_c, ev_s = pump(client, server)
    assert any(isinstance(e, ResponseReceived) and e.status == 200 for e in ev_c)
    data = b"".join(e.data for e in ev_s if isinstance(e, DataReceived))
    assert data == b"hello"
    assert any(isinstance(e, StreamEnded) and e.stream_id == sid for e in ev_s)
    # The server may still send after the client's half-close (TCP half-close semantics).
    server.send_data(sid, b"bye", end_stream=True)
    ev_c, _ = pump(client, server)
    assert b"".join(e.data for e in ev_c if isinstance(e, DataReceived)) == b"bye"
    assert any(isinstance(e, StreamEnded) for e in ev_c)
    assert client.open_streams == 0
    assert server.open_streams == 0


def test_error_status_ends_stream() -> None:
    client, server = pair()
    sid = client.open_connect("10.0.0.1:80")
    pump(client, server)
    server.respond(sid, 401)
    ev_c, _ = pump(client, server)
    assert [e.status for e in ev_c if isinstance(e, ResponseReceived)] == [401]
    assert any(isinstance(e, StreamEnded) for e in ev_c)


def test_flow_control_blocks_and_resumes() -> None:
    client, server = pair()
    sid = client.open_connect("10.0.0.1:80")
    pump(client, server)
    server.respond(sid, 200)
    pump(client, server)
    blob = os.urandom(STREAM_WINDOW + 1000)
    client.send_data(sid, blob)
    _, ev_s = pump(client, server)
    got = b"".join(e.data for e in ev_s if isinstance(e, DataReceived))
    # Only a window's worth arrives until the receiver credits consumption back.
    assert len(got) == STREAM_WINDOW
    assert client.pending_bytes(sid) == 1000
    server.acknowledge_received_data(sid, len(got))
    ev_c, ev_s = pump(client, server)
    assert any(isinstance(e, WindowOpened) for e in ev_c) or client.pending_bytes(sid) == 0
    got += b"".join(e.data for e in ev_s if isinstance(e, DataReceived))
    assert got == blob


def test_data_split_across_reads_is_streamed() -> None:
    client, server = pair()
    sid = client.open_connect("10.0.0.1:80")
    pump(client, server)
    server.respond(sid, 200)
    pump(client, server)
    blob = os.urandom(200_000)
    client.send_data(sid, blob)
    wire = client.data_to_send()
    received = b""
    for i in range(0, len(wire), 777):  # odd-sized reads cut frame headers and payloads
        for e in server.receive_data(wire[i : i + 777]):
            if isinstance(e, DataReceived):
                received += e.data
    assert received == blob


def test_reset_propagates() -> None:
    client, server = pair()
    sid = client.open_connect("10.0.0.1:80")
    pump(client, server)
    server.respond(sid, 200)
    pump(client, server)
    client.reset_stream(sid, ErrorCode.CONNECT_ERROR)
    _, ev_s = pump(client, server)
    (rst,) = [e for e in ev_s if isinstance(e, StreamReset)]
    assert rst.error_code == ErrorCode.CONNECT_ERROR
    assert rst.remote


def test_bad_preface_is_connection_error() -> None:
    server = HboneConnection(Role.SERVER)
    server.initiate()
    ev = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(ev[-1], ConnectionTerminated)
    assert ev[-1].error_code == ErrorCode.PROTOCOL_ERROR
    assert FrameType.GOAWAY in frame_types(server.data_to_send())


def frame_types(wire: bytes) -> list[int]:
    types, pos = [], 0
    while pos + 9 <= len(wire):
        length = int.from_bytes(wire[pos : pos + 3], "big")
        types.append(wire[pos + 3])
        pos += 9 + length
    return types


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (frame_header(4, FrameType.WINDOW_UPDATE, 0, 0) + (0).to_bytes(4, "big"), 0x1),
        (frame_header(7, FrameType.SETTINGS, 0, 0) + b"\0" * 7, 0x6),
        (frame_header(8, FrameType.PING, 0, 1) + b"\0" * 8, 0x1),
        (frame_header(3, FrameType.RST_STREAM, 0, 1) + b"\0" * 3, 0x6),
        (frame_header(4, FrameType.DATA, 0, 0) + b"abcd", 0x1),
        (frame_header(2**20 + 1, FrameType.DATA, 0, 1), 0x6),
        (frame_header(6, FrameType.SETTINGS, 0, 0) + b"\x00\x05\x00\x00\x00\x01", 0x1),
    ],
    ids=[
        "zero-window-update",
        "settings-len",
        "ping-on-stream",
        "rst-len",
        "data-stream0",
        "oversize",
        "max-frame-range",
    ],
)
def test_malformed_frames_get_precise_error_codes(frame: bytes, code: int) -> None:
    _client, server = pair()
    ev = server.receive_data(frame)
    assert isinstance(ev[-1], ConnectionTerminated)
    assert ev[-1].error_code == code


def test_window_overflow_is_flow_control_error() -> None:
    client, server = pair()
    # The peer sends more DATA than the connection window allows on a fresh stream.
    sid = client.open_connect("1.2.3.4:5")
    pump(client, server)
    big = frame_header(2**20, FrameType.DATA, 0, sid) + b"\0" * 2**20
    events: list[Event] = []
    for _ in range(CONNECTION_WINDOW // 2**20 + 1):
        events += server.receive_data(big)
    assert any(
        isinstance(e, ConnectionTerminated) and e.error_code == ErrorCode.FLOW_CONTROL_ERROR
        for e in events
    ) or any(
        isinstance(e, StreamReset) and e.error_code == ErrorCode.FLOW_CONTROL_ERROR for e in events
    )


# ---- interop with the h2 library (an independent, widely used implementation) ----


def test_h2_client_against_our_server() -> None:
    server = HboneConnection(Role.SERVER)
    server.initiate()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    sid = peer.get_next_available_stream_id()
    peer.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.1.1.1:443")])
    events = server.receive_data(peer.data_to_send())
    (req,) = [e for e in events if isinstance(e, RequestReceived)]
    server.respond(req.stream_id, 200)
    peer_events = peer.receive_data(server.data_to_send())
    (resp,) = [e for e in peer_events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp.headers)[b":status"] == b"200"
    blob = os.urandom(300_000)
    peer.send_data(sid, blob[:16384])  # h2 respects our default frame size until it saw SETTINGS
    events = server.receive_data(peer.data_to_send())
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == blob[:16384]
    server.send_data(sid, blob, end_stream=True)
    peer_events = peer.receive_data(server.data_to_send())
    got = b"".join(e.data for e in peer_events if isinstance(e, h2.events.DataReceived))
    assert got == blob[: len(got)]
    assert len(got) > 0
    # A GET is well-formed HTTP/2 but not CONNECT: the protocol core answers 400 itself.
    sid2 = peer.get_next_available_stream_id()
    peer.send_headers(
        sid2,
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")],
        end_stream=True,
    )
    events = server.receive_data(peer.data_to_send())
    assert not [e for e in events if isinstance(e, RequestReceived)]
    (refused,) = [e for e in events if isinstance(e, RequestRefused)]
    assert refused.status == 400
    assert (":method", "GET") in refused.headers
    peer_events = peer.receive_data(server.data_to_send())
    (resp2,) = [e for e in peer_events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp2.headers)[b":status"] == b"400"


def test_our_client_against_h2_server() -> None:
    client = HboneConnection(Role.CLIENT)
    client.initiate()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    peer.receive_data(client.data_to_send())
    client.receive_data(peer.data_to_send())
    peer.receive_data(client.data_to_send())
    sid = client.open_connect("10.2.2.2:80", [("baggage", "k8s.namespace.name=default")])
    peer_events = peer.receive_data(client.data_to_send())
    (req,) = [e for e in peer_events if isinstance(e, h2.events.RequestReceived)]
    headers = dict(req.headers)
    assert headers[b":method"] == b"CONNECT"
    assert b":path" not in headers
    peer.send_headers(sid, [(":status", "200")])
    peer.send_data(sid, b"pong", end_stream=True)
    events = client.receive_data(peer.data_to_send())
    assert [e.status for e in events if isinstance(e, ResponseReceived)] == [200]
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"pong"
    client.send_data(sid, b"x" * 100_000, end_stream=True)
    got = b""
    ended = False
    for _ in range(10):  # h2's default 64 KiB window: credit back until everything arrived
        for e in peer.receive_data(client.data_to_send()):
            if isinstance(e, h2.events.DataReceived):
                got += e.data
                peer.acknowledge_received_data(e.flow_controlled_length, sid)
            ended = ended or isinstance(e, h2.events.StreamEnded)
        client.receive_data(peer.data_to_send())
    assert got == b"x" * 100_000
    assert ended
    with pytest.raises(h2.exceptions.StreamClosedError):
        peer.send_data(sid, b"late")  # h2 agrees the stream is fully closed


def test_keepalive_ping_and_dead_peer_detection() -> None:
    """Istio's keepalive: PING after 10 s of quiet; no answer within 20 s -> the peer is dead."""
    client, _server = pair()
    client.receive_data(b"", now=0.0)
    assert client.handle_timer(5.0)
    assert client.data_to_send() == b""  # quiet < 10 s: no PING
    assert client.handle_timer(10.0)
    assert frame_types(client.data_to_send()) == [FrameType.PING]
    assert client.handle_timer(29.0)  # still within the 20 s answer timeout
    assert not client.handle_timer(30.5)  # no PING ACK for > 20 s: dead

    client2, server2 = pair()
    client2.receive_data(b"", now=0.0)
    client2.handle_timer(10.0)
    acks = server2.receive_data(client2.data_to_send(), now=10.0)
    assert acks == []  # the server answers a PING with a PING ACK (no event for it)
    events = client2.receive_data(server2.data_to_send(), now=10.1)
    assert any(type(e).__name__ == "PingAcked" for e in events)
    assert client2.handle_timer(35.0)  # answered: alive, and a new PING may go out


@pytest.mark.parametrize("call", ["send_data", "end_stream", "send_data_in_place"])
def test_a_server_sends_no_data_before_its_response(call: str) -> None:
    """RFC 9113 §8.1: a response's HEADERS come first. A server calling send_data/end_stream
    before respond is misuse of the core: H2UsageError(INTERNAL_ERROR) (not the peer's
    H2ProtocolError), nothing queued (before: a DATA frame went out ahead of the HEADERS, a
    malformed response for the peer). After respond, the same calls work."""
    from meshcore.errors import H2UsageError
    from meshcore.hbone.frames import FRAME_HEADER

    client, server = pair()
    sid = client.open_connect("10.0.0.1:80")
    pump(client, server)
    server.data_to_send()
    frame = memoryview(bytearray(FRAME_HEADER) + b"early")

    def early() -> None:
        if call == "send_data":
            server.send_data(sid, b"early")
        elif call == "end_stream":
            server.end_stream(sid)
        elif not server.send_data_in_place(sid, frame):
            server.send_data(sid, bytes(frame[FRAME_HEADER:]))  # its documented fallback

    with pytest.raises(H2UsageError) as err:
        early()
    assert err.value.code == ErrorCode.INTERNAL_ERROR
    with pytest.raises(H2UsageError):
        server.open_connect("10.0.0.2:80")  # a server opens no stream: ours too
    assert server.data_to_send() == b""
    server.respond(sid, 200)
    server.send_data(sid, b"late", end_stream=True)
    ev_c, _ = pump(client, server)
    assert [type(e) for e in ev_c] == [ResponseReceived, DataReceived, StreamEnded]
