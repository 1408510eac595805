"""The upstream response head as `waypoint.upstream` reads it off the tunnel: 1xx heads
before the final response (RFC 9110 §15.2), a 101 nobody asked for, a bad head."""

from __future__ import annotations

import pytest

from meshcore.identity import SpiffeId
from waypoint.errors import UpstreamProtocolError
from waypoint.tunnel import TunnelIO
from waypoint.upstream import EndpointKey, H1Conn, _poll_head

PEER = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="b")


def conn_with(*chunks: bytes) -> H1Conn:
    io = TunnelIO()
    conn = H1Conn(EndpointKey("10.0.0.1", 80, PEER), io)
    conn.parser.expect_response_to("GET")
    for chunk in chunks:
        io.tunnel_data(chunk)
    return conn


@pytest.mark.parametrize(
    "informational",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
    ],
)
def test_1xx_heads_before_the_final_response_are_skipped(informational: bytes) -> None:
    final = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    conn = conn_with(informational + final)
    head = _poll_head(conn)
    assert head is not None
    assert (head.status, head.content_length) == (200, 2)
    # The same bytes in two pieces: None until the final head is there.
    conn = conn_with(informational)
    assert _poll_head(conn) is None
    conn.io.tunnel_data(final)
    head = _poll_head(conn)
    assert head is not None
    assert head.status == 200


def test_101_to_a_plain_request_and_a_bad_head_are_protocol_errors() -> None:
    with pytest.raises(UpstreamProtocolError, match="101"):
        _poll_head(conn_with(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"))
    with pytest.raises(UpstreamProtocolError):
        _poll_head(conn_with(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"))
