"""The upstream response head as `waypoint.upstream` reads it off the tunnel (for plain requests
and for `waypoint.upgrade`'s handshakes): 1xx heads before the final response (RFC 9110 §15.2)
and their cap, a 101 nobody asked for, a bad head."""

from __future__ import annotations

import asyncio

import pytest

from meshcore.identity import SpiffeId
from waypoint.body import EmptyBody, ReplayBody, Request
from waypoint.errors import UpstreamProtocolError, UpstreamReset
from waypoint.protocol import http1
from waypoint.protocol.cluster import EndpointStats
from waypoint.tunnel import TunnelIO
from waypoint.upgrade import UpgradeUpstreams, _Response
from waypoint.upstream import EndpointKey, H1Conn, UpstreamRequest, poll_head

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
    head = poll_head(conn)
    assert head is not None
    assert (head.status, head.content_length) == (200, 2)
    # The same bytes in two pieces: None until the final head is there.
    conn = conn_with(informational)
    assert poll_head(conn) is None
    conn.io.tunnel_data(final)
    head = poll_head(conn)
    assert head is not None
    assert head.status == 200


def test_101_to_a_plain_request_and_a_bad_head_are_protocol_errors() -> None:
    with pytest.raises(UpstreamProtocolError, match="101"):
        poll_head(conn_with(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"))
    with pytest.raises(UpstreamProtocolError):
        poll_head(conn_with(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"))
    # RFC 9112 §4: exactly three digits (502 UPE to the client, like any bad head).
    with pytest.raises(UpstreamProtocolError, match="malformed status line"):
        poll_head(conn_with(b"HTTP/1.1 0000200 OK\r\ncontent-length: 0\r\n\r\n"))


def test_interim_heads_are_capped_per_response() -> None:
    """A hostile upstream answering with 1xx heads forever: past MAX_INTERIM_HEADS the
    response is refused (UpstreamProtocolError: 502 to the client, flag UPE in the access log
    and the request counter); as many as the cap are still skipped."""
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    head = poll_head(conn_with(cont * http1.MAX_INTERIM_HEADS + final))
    assert head is not None
    assert head.status == 200
    with pytest.raises(UpstreamProtocolError, match="interim"):
        poll_head(conn_with(cont * (http1.MAX_INTERIM_HEADS + 1) + final))
    # The count is per response: a keep-alive connection's next response starts again.
    conn = conn_with((cont * http1.MAX_INTERIM_HEADS + final) * 2)
    for _ in range(2):
        head = poll_head(conn)
        assert head is not None
        assert head.status == 200
        assert conn.parser.next_event() == http1.EndOfMessage()


def test_an_upgrade_reads_its_head_through_the_same_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`waypoint.upgrade` skips 1xx heads with `poll_head` (one parser, the same cap): 103
    then 101 upgrades, with the bytes after the 101 kept for the relay; 1xx past the cap is a
    protocol error and the stream is reset."""

    async def send(wire: bytes) -> tuple[_Response | None, TunnelIO, Exception | None]:
        io = TunnelIO()
        io.tunnel_data(wire)
        ups = UpgradeUpstreams(None, None)  # type: ignore[arg-type]

        async def fake_open(ep: EndpointStats, timeout: float) -> TunnelIO:
            return io

        monkeypatch.setattr(ups, "_open", fake_open)
        req = Request(
            protocol="http/1.1",
            method="GET",
            target="/ws",
            authority="a",
            scheme="http",
            headers=[],
            body=EmptyBody(),
            has_body=False,
            content_length=None,
        )
        up = UpstreamRequest(req, "/ws", "a", [], ReplayBody(EmptyBody(), 1024))
        ep = EndpointStats(uid="u", ip="10.0.0.1", port=80, identity=PEER)
        try:
            resp = await ups.send(up, ep, 1.0)
        except (UpstreamProtocolError, UpstreamReset) as err:
            return None, io, err
        resp.finish()
        return resp, io, None

    early = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    resp, _, err = asyncio.run(send(early * 2 + switch + b"\x81\x00"))
    assert err is None
    assert resp is not None
    assert resp.status == 101
    assert resp._leftover == b"\x81\x00"
    resp, io, err = asyncio.run(send(early * (http1.MAX_INTERIM_HEADS + 1) + switch))
    assert isinstance(err, UpstreamProtocolError)
    assert "interim" in str(err)
    assert io.was_reset
    # The upstream closing before any head: a reset, as before.
    resp, io, err = asyncio.run(send(b""))
    assert isinstance(err, UpstreamReset)


def test_the_upstream_closing_before_the_head_is_a_reset() -> None:
    """UpstreamReset (503 UR, and the retry of a request that met a stale idle connection),
    never another exception: compiled, this raised TypeError (tests/unit/test_native.py)."""
    with pytest.raises(UpstreamReset):
        poll_head(conn_with(b""))
    with pytest.raises(UpstreamProtocolError):
        poll_head(conn_with(b"HTTP/1.1 200 OK\r\ncontent-", b""))
