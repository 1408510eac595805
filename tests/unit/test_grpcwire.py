"""gRPC framing of our own client (`meshcore.grpcwire`), and the HTTP/2 core's part in it
(`HboneConnection.open_request`, `TrailersReceived`): length prefixes split across DATA frames,
the Compressed-Flag, trailers-only responses, a missing grpc-status, oversized messages, resets.

The core is driven by a second `HboneConnection`-free peer: frames written with
`meshcore.hbone.frames` and the HPACK encoder, the way a gRPC server sends them.
"""

from __future__ import annotations

import pytest

from meshcore.grpcwire import (
    CANCELLED,
    INTERNAL,
    OK,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    UNKNOWN,
    GrpcError,
    MessageReader,
    ResponseReader,
    frame_message,
    grpc_timeout,
    percent_decoded,
    request_headers,
    status_of,
)
from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.events import (
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from meshcore.hbone.frames import ErrorCode, Flag, FrameType, encode_settings, frame_header
from meshcore.hbone.headers import encode
from meshcore.hbone.streams import Role

GRPC_OK_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def test_length_prefix_split_across_frames() -> None:
    """DATA boundaries have no relation to message boundaries (the spec's Data Frames)."""
    wire = frame_message(b"hello") + frame_message(b"") + frame_message(b"x" * 300)
    for cut in range(1, len(wire)):
        reader = MessageReader(max_message=1000)
        got = reader.feed(wire[:cut]) + reader.feed(wire[cut:])
        assert got == [b"hello", b"", b"x" * 300], cut
        assert not reader.partial
    reader = MessageReader(max_message=1000)
    got = [m for i in range(len(wire)) for m in reader.feed(wire[i : i + 1])]
    assert got == [b"hello", b"", b"x" * 300]


def test_compressed_flag_is_refused() -> None:
    reader = MessageReader()
    with pytest.raises(GrpcError, match="compressed") as err:
        reader.feed(b"\x01\x00\x00\x00\x01z")
    assert err.value.code == INTERNAL
    with pytest.raises(GrpcError, match="Compressed-Flag 2"):
        MessageReader().feed(b"\x02\x00\x00\x00\x00")


def test_oversized_message_refused_before_its_body_is_buffered() -> None:
    reader = MessageReader(max_message=1024)
    assert reader.feed(frame_message(b"a" * 1024)) == [b"a" * 1024]
    with pytest.raises(GrpcError, match="1025 octets is larger than the limit") as err:
        reader.feed(b"\x00" + (1025).to_bytes(4, "big"))  # the prefix alone: no body yet
    assert err.value.code == RESOURCE_EXHAUSTED
    assert err.value.code_name == "RESOURCE_EXHAUSTED"
    hostile = MessageReader()  # 64 MiB default; 4 GiB announced
    with pytest.raises(GrpcError):
        hostile.feed(b"\x00\xff\xff\xff\xff")


def test_status_from_trailers_and_message_decoding() -> None:
    assert status_of([("grpc-status", "0")]) is not None
    st = status_of([("grpc-status", "16"), ("grpc-message", "no%20token %E2%9C%93 50%")])
    assert st is not None
    assert st.code == UNAUTHENTICATED
    assert st.message == "no token \u2713 50%"  # a broken escape stays as it is
    assert status_of([("grpc-message", "x")]) is None
    for bad in ("017", "17", "-1", "x", "", "\u0661"):
        st = status_of([("grpc-status", bad)])
        assert (st.code if st else None) == UNKNOWN, bad
    assert percent_decoded("%zz%4") == "%zz%4"


def test_request_headers_and_timeout() -> None:
    block = request_headers(
        path="/a.B/C",
        authority="cp:15012",
        scheme="https",
        metadata=[("Authorization", "Bearer t")],
        timeout=10,
    )
    assert block[:5] == [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/a.B/C"),
        (":authority", "cp:15012"),
        ("te", "trailers"),
    ]
    assert ("grpc-timeout", "10000m") in block
    assert ("content-type", "application/grpc") in block
    assert block[-1] == ("authorization", "Bearer t")
    with pytest.raises(ValueError, match="reserved"):
        request_headers(path="/x", authority="a", scheme="http", metadata=[("grpc-status", "0")])
    assert grpc_timeout(0.0001) == "1m"
    assert grpc_timeout(99_999) == "99999000m"  # 8 digits at most, still milliseconds
    assert grpc_timeout(200_000) == "200000S"
    assert grpc_timeout(10**6) == "1000000S"


# ---- the HTTP/2 core carrying a call (client role), fed the server's frames


def client() -> tuple[HboneConnection, int]:
    conn = HboneConnection(Role.CLIENT)
    conn.initiate()
    conn.data_to_send()
    conn.receive_data(encode_settings({}))
    block = request_headers(path="/a.B/C", authority="cp", scheme="http")
    sid = conn.open_request(block)
    out = conn.data_to_send()
    assert b"application/grpc" in out
    assert b"trailers" in out
    return conn, sid


def headers_frame(sid: int, headers: list[tuple[str, str]], *, end: bool) -> bytes:
    block = encode(headers)
    flags = Flag.END_HEADERS | (Flag.END_STREAM if end else 0)
    return frame_header(len(block), FrameType.HEADERS, flags, sid) + block


def data_frame(sid: int, payload: bytes, *, end: bool = False) -> bytes:
    flags = Flag.END_STREAM if end else 0
    return frame_header(len(payload), FrameType.DATA, flags, sid) + payload


def code(reader: ResponseReader) -> int | None:
    return reader.status.code if reader.status is not None else None


def message(reader: ResponseReader) -> str:
    return reader.status.message if reader.status is not None else ""


def drive(reader: ResponseReader, events: list[Event]) -> list[bytes]:
    """What `meshcore.grpcclient.GrpcConnection` does with the core's events."""
    messages: list[bytes] = []
    for ev in events:
        if isinstance(ev, ResponseReceived):
            reader.headers(ev.status, ev.headers)
        elif isinstance(ev, DataReceived):
            messages += reader.data(ev.data)
        elif isinstance(ev, TrailersReceived):
            reader.trailers(ev.headers)
        elif isinstance(ev, StreamEnded):
            reader.ended()
        elif isinstance(ev, StreamReset):
            reader.reset(ev.error_code, remote=ev.remote)
    return messages


def test_response_messages_then_trailers_through_the_core() -> None:
    conn, sid = client()
    reader = ResponseReader()
    wire = frame_message(b"one") + frame_message(b"two" * 100)
    frames = headers_frame(sid, GRPC_OK_HEADERS, end=False)
    frames += data_frame(sid, wire[:3]) + data_frame(sid, wire[3:11]) + data_frame(sid, wire[11:])
    frames += headers_frame(sid, [("grpc-status", "0")], end=True)
    events = conn.receive_data(frames)
    assert [type(e) for e in events][-2:] == [TrailersReceived, StreamEnded]
    assert drive(reader, events) == [b"one", b"two" * 100]
    assert code(reader) == OK


def test_trailers_only_response() -> None:
    """An immediate error: one HEADERS block with :status, content-type and grpc-status."""
    conn, sid = client()
    reader = ResponseReader()
    only = [*GRPC_OK_HEADERS, ("grpc-status", "16"), ("grpc-message", "bad token")]
    assert drive(reader, conn.receive_data(headers_frame(sid, only, end=True))) == []
    assert reader.status is not None
    assert (reader.status.code, reader.status.message) == (UNAUTHENTICATED, "bad token")
    err = reader.status.error()
    assert str(err) == "UNAUTHENTICATED: bad token"


def test_missing_grpc_status_is_an_error() -> None:
    conn, sid = client()
    reader = ResponseReader()
    frames = headers_frame(sid, GRPC_OK_HEADERS, end=False) + data_frame(sid, frame_message(b"m"))
    frames += headers_frame(sid, [("x-other", "1")], end=True)
    assert drive(reader, conn.receive_data(frames)) == [b"m"]
    assert code(reader) == INTERNAL
    assert "without grpc-status" in message(reader)
    # Ended by END_STREAM on DATA, no trailers at all.
    conn, sid = client()
    reader = ResponseReader()
    frames = headers_frame(sid, GRPC_OK_HEADERS, end=False) + data_frame(sid, b"", end=True)
    drive(reader, conn.receive_data(frames))
    assert code(reader) == INTERNAL


def test_stream_ended_inside_a_message() -> None:
    conn, sid = client()
    reader = ResponseReader()
    frames = headers_frame(sid, GRPC_OK_HEADERS, end=False) + data_frame(sid, b"\x00\x00\x00\x00")
    frames += headers_frame(sid, [("grpc-status", "0")], end=True)
    drive(reader, conn.receive_data(frames))
    assert code(reader) == INTERNAL
    assert "inside a message" in message(reader)


def test_not_grpc_responses_get_a_synthesized_status() -> None:
    conn, sid = client()
    reader = ResponseReader()
    drive(reader, conn.receive_data(headers_frame(sid, [(":status", "503")], end=True)))
    assert code(reader) == UNAVAILABLE
    conn, sid = client()
    reader = ResponseReader()
    html = [(":status", "200"), ("content-type", "text/html"), ("grpc-status", "0")]
    drive(reader, conn.receive_data(headers_frame(sid, html, end=True)))
    assert code(reader) == UNKNOWN
    for ctype in ("application/grpc-web", "application/grpcfoo", "application/grpc-web+proto"):
        conn, sid = client()
        reader = ResponseReader()
        fake = [(":status", "200"), ("content-type", ctype), ("grpc-status", "0")]
        drive(reader, conn.receive_data(headers_frame(sid, fake, end=True)))
        assert code(reader) == UNKNOWN, ctype
    for ctype in ("application/grpc+proto", "application/grpc; charset=x", "Application/GRPC"):
        conn, sid = client()
        reader = ResponseReader()
        good = [(":status", "200"), ("content-type", ctype), ("grpc-status", "0")]
        drive(reader, conn.receive_data(headers_frame(sid, good, end=True)))
        assert code(reader) == 0, ctype
    # Trailers-only without content-type: malformed, UNKNOWN; what the server said is kept.
    conn, sid = client()
    reader = ResponseReader()
    bare = [(":status", "200"), ("grpc-status", "7"), ("grpc-message", "denied")]
    drive(reader, conn.receive_data(headers_frame(sid, bare, end=True)))
    assert reader.status is not None
    assert reader.status.code == UNKNOWN
    assert reader.status.message == "content-type '': not gRPC; it said PERMISSION_DENIED denied"


def test_metadata_values_outside_printable_ascii_are_refused_locally() -> None:
    for value in ("a\r\nx-evil: 1", "a\nb", "a\x00b", "caf\u00e9"):
        with pytest.raises(GrpcError, match="'authorization': value holds") as err:
            request_headers(
                path="/x", authority="a", scheme="http", metadata=[("authorization", value)]
            )
        assert err.value.code_name == "INTERNAL"


def test_oversized_message_through_the_core_ends_the_call() -> None:
    conn, sid = client()
    reader = ResponseReader(max_message=10)
    frames = headers_frame(sid, GRPC_OK_HEADERS, end=False) + data_frame(
        sid, frame_message(b"x" * 11)
    )
    with pytest.raises(GrpcError, match="larger than the limit"):
        drive(reader, conn.receive_data(frames))
    assert code(reader) == RESOURCE_EXHAUSTED
    assert reader.data(b"more") == []  # over: later DATA is ignored


def test_reset_and_malformed_trailers() -> None:
    conn, sid = client()
    reader = ResponseReader()
    rst = frame_header(4, FrameType.RST_STREAM, 0, sid) + int(ErrorCode.CANCEL).to_bytes(4, "big")
    drive(reader, conn.receive_data(headers_frame(sid, GRPC_OK_HEADERS, end=False) + rst))
    assert code(reader) == CANCELLED
    # Trailers with a pseudo-header are malformed (RFC 9113 §8.1): the core resets the stream.
    conn, sid = client()
    reader = ResponseReader()
    frames = headers_frame(sid, GRPC_OK_HEADERS, end=False)
    frames += headers_frame(sid, [(":status", "200"), ("grpc-status", "0")], end=True)
    events = conn.receive_data(frames)
    assert not any(isinstance(e, TrailersReceived) for e in events)
    drive(reader, events)
    assert code(reader) == INTERNAL
