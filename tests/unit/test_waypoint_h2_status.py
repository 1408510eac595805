"""The waypoint's HTTP/2 upstream session (`waypoint.http2`) refuses a response whose :status
is not three ASCII digits (RFC 9110 §15) as a protocol error (502, UPE): the h2 package lets
any text through, and ":status: ²" (a str.isdigit() digit int() refuses) was a 500 with a
traceback; and a response stream with more than MAX_INTERIM_HEADS 1xx heads, which it resets
(ENHANCE_YOUR_CALM). The upstream is raw frames on the session's tunnel, as a hostile peer
writes them."""

from __future__ import annotations

import asyncio

import pytest

from meshcore.hbone.aio import TunnelSink
from meshcore.hbone.frames import ErrorCode, Flag, FrameType, encode_settings, frame_header
from meshcore.hbone.headerblock import MAX_INTERIM_HEADS
from meshcore.hbone.headers import encode
from meshcore.identity import SpiffeId
from waypoint.body import EmptyBody, ReplayBody
from waypoint.errors import UpstreamProtocolError
from waypoint.http2 import _ClientSession
from waypoint.tunnel import TunnelIO
from waypoint.upstream import EndpointKey

PEER = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="b")
REQUEST = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "a")]


class Upstream:
    """The tunnel's far end (a `TunnelStream`): records what the session sends."""

    peer_identity: SpiffeId | None = PEER

    def __init__(self) -> None:
        self.out = bytearray()

    def attach(self, sink: TunnelSink) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out += data

    def write_in_place(self, frame: memoryview) -> None:
        self.out += frame[9:]

    def write_eof(self) -> None:
        pass

    def reset(self, code: int = ErrorCode.CONNECT_ERROR) -> None:
        pass

    def acknowledge(self, length: int) -> None:
        pass

    def resets(self) -> list[tuple[int, int]]:
        """(stream, code) of the RST_STREAM frames sent."""
        found, out = [], bytes(self.out[24:])  # after the client preface
        while out:
            length = int.from_bytes(out[:3], "big")
            if out[3] == FrameType.RST_STREAM:
                sid = int.from_bytes(out[5:9], "big") & 0x7FFFFFFF
                found.append((sid, int.from_bytes(out[9:13], "big")))
            out = out[9 + length :]
        return found


def heads(*statuses: str, end: bool = True) -> bytes:
    """HEADERS frames on stream 1, the last one ending it (`end`)."""
    out = b""
    for i, status in enumerate(statuses):
        block = encode([(":status", status)])
        last = end and i == len(statuses) - 1
        flags = Flag.END_HEADERS | (Flag.END_STREAM if last else 0)
        out += frame_header(len(block), FrameType.HEADERS, flags, 1) + block
    return out


async def answer(
    *statuses: str, upstream: Upstream | None = None, end: bool = True
) -> int | Exception:
    """The status the session reads from a response of these heads, or what it raised."""
    io = TunnelIO()
    io.bind(upstream if upstream is not None else Upstream())
    session = _ClientSession(EndpointKey("10.0.0.1", 80, PEER), io)
    session.start()
    session.task = asyncio.get_running_loop().create_task(session.run())
    request = asyncio.get_running_loop().create_task(
        session.request(REQUEST, ReplayBody(EmptyBody(), 0), False)
    )
    await asyncio.sleep(0.01)  # the request's HEADERS went out on stream 1
    io.tunnel_data(encode_settings({}) + heads(*statuses, end=end))
    try:
        resp = await asyncio.wait_for(request, 5)
    except UpstreamProtocolError as err:
        return err
    finally:
        await asyncio.sleep(0.01)
        io.tunnel_eof()
        session.task.cancel()
    return resp.status


def test_interim_heads_past_the_cap_reset_the_stream_and_are_a_protocol_error() -> None:
    """MAX_INTERIM_HEADS 1xx heads then the response: read. One more: RST_STREAM with
    ENHANCE_YOUR_CALM and UpstreamProtocolError, the handler's 502 UPE (before: the session
    decoded and waited through any number of them)."""
    fine = Upstream()
    assert asyncio.run(answer(*["100"] * MAX_INTERIM_HEADS, "200", upstream=fine)) == 200
    assert fine.resets() == []
    hostile = Upstream()
    got = asyncio.run(answer(*["103"] * (MAX_INTERIM_HEADS + 1), upstream=hostile, end=False))
    assert isinstance(got, UpstreamProtocolError), got
    assert str(got) == f"more than {MAX_INTERIM_HEADS} interim (1xx) responses"
    assert hostile.resets() == [(1, ErrorCode.ENHANCE_YOUR_CALM)]


@pytest.mark.parametrize("status", ["\xb2\xb2\xb2", "2000", "20", "abc", ""])
def test_a_status_not_three_ascii_digits_is_a_protocol_error(status: str) -> None:
    got = asyncio.run(answer(status))
    assert isinstance(got, UpstreamProtocolError), got


def test_a_three_digit_status_is_read() -> None:
    assert asyncio.run(answer("204")) == 204
