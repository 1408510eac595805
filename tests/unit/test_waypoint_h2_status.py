"""The waypoint's HTTP/2 upstream session (`waypoint.http2`) refuses a response whose :status
is not three ASCII digits (RFC 9110 §15) as a protocol error (502, UPE): the h2 package lets
any text through, and ":status: ²" (a str.isdigit() digit int() refuses) was a 500 with a
traceback."""

from __future__ import annotations

import asyncio

import pytest

from meshcore.hbone.frames import Flag, FrameType, encode_settings, frame_header
from meshcore.hbone.headers import encode
from meshcore.identity import SpiffeId
from waypoint.body import EmptyBody, ReplayBody
from waypoint.errors import UpstreamProtocolError
from waypoint.http2 import _ClientSession
from waypoint.tunnel import TunnelIO
from waypoint.upstream import EndpointKey

PEER = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="b")
REQUEST = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "a")]


async def answer(status: str) -> int | Exception:
    """The status the session reads from a response with `status`, or what it raised."""
    io = TunnelIO()
    session = _ClientSession(EndpointKey("10.0.0.1", 80, PEER), io)
    session.start()
    session.task = asyncio.get_running_loop().create_task(session.run())
    request = asyncio.get_running_loop().create_task(
        session.request(REQUEST, ReplayBody(EmptyBody(), 0), False)
    )
    await asyncio.sleep(0.01)  # the request's HEADERS went out on stream 1
    block = encode([(":status", status)])
    io.tunnel_data(
        encode_settings({})
        + frame_header(len(block), FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, 1)
        + block
    )
    try:
        resp = await asyncio.wait_for(request, 5)
    except UpstreamProtocolError as err:
        return err
    finally:
        io.tunnel_eof()
        session.task.cancel()
    return resp.status


@pytest.mark.parametrize("status", ["\xb2\xb2\xb2", "2000", "20", "abc", ""])
def test_a_status_not_three_ascii_digits_is_a_protocol_error(status: str) -> None:
    got = asyncio.run(answer(status))
    assert isinstance(got, UpstreamProtocolError), got


def test_a_three_digit_status_is_read() -> None:
    assert asyncio.run(answer("204")) == 204
