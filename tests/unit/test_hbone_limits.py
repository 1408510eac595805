"""The HBONE protocol core's bounds against hostile peers (issue 9), sans-I/O: frames in, events
and frames out, time passed in. The same attacks against a real process: tests/loopback/
test_h2_robustness.py."""

from __future__ import annotations

import random

import pytest

from meshcore.errors import H2ProtocolError
from meshcore.hbone.budget import BUDGET_WINDOW, RESET_BUDGET, RateBudget
from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.control import PING_INTERVAL, SERVER_MAX_STREAMS, SETTINGS_TIMEOUT
from meshcore.hbone.events import ConnectionTerminated, Event, RequestReceived, RequestRefused
from meshcore.hbone.frames import (
    CLIENT_PREFACE,
    ErrorCode,
    Flag,
    FrameType,
    encode_rst_stream,
    encode_settings,
    encode_settings_ack,
    frame_header,
)
from meshcore.hbone.headers import encode
from meshcore.hbone.streams import Role


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), ftype, flags, sid) + payload


def connect(sid: int, authority: str = "10.0.0.1:80") -> bytes:
    block = encode([(":method", "CONNECT"), (":authority", authority)])
    return frame(FrameType.HEADERS, Flag.END_HEADERS, sid, block)


def server(*, acked: bool = True) -> HboneConnection:
    conn = HboneConnection(Role.SERVER)
    conn.initiate(0.0)
    hello = CLIENT_PREFACE + encode_settings({})
    if acked:
        hello += encode_settings_ack()
    conn.receive_data(hello, 0.0)
    conn.data_to_send()
    return conn


def goaway(events: list[Event]) -> int | None:
    ends = [e for e in events if isinstance(e, ConnectionTerminated) and not e.remote]
    return ends[-1].error_code if ends else None


@pytest.mark.parametrize(
    ("events", "window", "limit", "ok"),
    [
        ([(0.0, 10)], 10.0, 10, True),
        ([(0.0, 11)], 10.0, 10, False),
        ([(0.0, 10), (10.0, 1)], 10.0, 10, False),  # the previous window still weighs fully
        ([(0.0, 10), (15.0, 5)], 10.0, 10, True),  # half of it: 5 + 5
        ([(0.0, 10), (15.0, 6)], 10.0, 10, False),
        ([(0.0, 10), (25.0, 10)], 10.0, 10, True),  # two windows later: forgotten
    ],
)
def test_rate_budget(events: list[tuple[float, int]], window: float, limit: int, ok: bool) -> None:
    budget = RateBudget(limit, window)
    results = [budget.spend(now, cost) for now, cost in events]
    assert results[-1] is ok
    assert all(results[:-1])


def test_rapid_reset_spends_the_budget_then_goaway() -> None:
    conn = server()
    burst = b"".join(
        connect(s) + encode_rst_stream(s, 8) for s in range(1, 2 * RESET_BUDGET + 4, 2)
    )
    events = conn.receive_data(burst, 1.0)
    assert goaway(events) == ErrorCode.ENHANCE_YOUR_CALM
    assert len([e for e in events if isinstance(e, RequestReceived)]) == RESET_BUDGET + 1


def test_resets_after_an_answer_are_free() -> None:
    """Tunnels the client closes with RST after 200 (a TCP reset) are normal traffic."""
    conn = server()
    for s in range(1, 4 * RESET_BUDGET, 2):
        conn.receive_data(connect(s), 1.0)
        conn.respond(s, 200)
        events = conn.receive_data(encode_rst_stream(s, ErrorCode.CONNECT_ERROR), 1.0)
        assert goaway(events) is None


def test_budget_recovers_after_the_window() -> None:
    conn = server()
    sid = 1
    for now in (0.0, 2 * BUDGET_WINDOW + 1, 4 * BUDGET_WINDOW + 2):
        for _ in range(RESET_BUDGET):
            events = conn.receive_data(connect(sid) + encode_rst_stream(sid, 8), now)
            assert goaway(events) is None
            sid += 2


def test_stream_limit_enforced_once_settings_acknowledged() -> None:
    early = server(acked=False)
    events = early.receive_data(b"".join(connect(s) for s in range(1, 2 * 300, 2)), 0.5)
    assert len([e for e in events if isinstance(e, RequestReceived)]) == 300
    late = server()
    events = late.receive_data(b"".join(connect(s) for s in range(1, 2 * 300, 2)), 0.5)
    refused = [e for e in events if isinstance(e, RequestRefused)]
    assert len(refused) == 300 - SERVER_MAX_STREAMS
    assert {e.error_code for e in refused} == {ErrorCode.REFUSED_STREAM}


@pytest.mark.parametrize(
    ("authority", "method", "status"),
    [
        ("10.0.0.1:80", "GET", 400),
        ("10.0.0.1", "CONNECT", 400),
        ("10.0.0.1:0", "CONNECT", 400),
        (":80", "CONNECT", 400),
        ("[fd00::1]:8080", "CONNECT", 0),
    ],
)
def test_connect_validation_in_the_core(authority: str, method: str, status: int) -> None:
    conn = server()
    block = encode([(":method", method), (":authority", authority)])
    events = conn.receive_data(frame(FrameType.HEADERS, Flag.END_HEADERS, 1, block), 1.0)
    refused = [e for e in events if isinstance(e, RequestRefused)]
    if status:
        assert refused
        assert refused[0].status == status
    else:
        (req,) = [e for e in events if isinstance(e, RequestReceived)]
        assert req.authority == authority


def test_header_block_bounds() -> None:
    conn = server()
    events = conn.receive_data(
        frame(FrameType.HEADERS, 0, 1, encode([(":method", "CONNECT")]))
        + frame(FrameType.CONTINUATION, 0, 1) * 5,
        1.0,
    )
    assert goaway(events) == ErrorCode.PROTOCOL_ERROR  # empty CONTINUATIONs past the allowance
    conn = server()
    events = conn.receive_data(
        frame(FrameType.HEADERS, 0, 1, b"") + frame(FrameType.CONTINUATION, 0, 1, b"\x82") * 17,
        1.0,
    )
    assert goaway(events) == ErrorCode.ENHANCE_YOUR_CALM  # frame count


def test_stream_ids_must_increase() -> None:
    conn = server()
    events = conn.receive_data(connect(5) + connect(3), 1.0)
    assert goaway(events) == ErrorCode.PROTOCOL_ERROR
    conn = server()  # late HEADERS for a stream WE reset are ignored (RFC 9113 §5.1)
    conn.receive_data(connect(1), 1.0)
    conn.reset_stream(1)
    assert goaway(conn.receive_data(connect(1), 1.0)) is None


def test_timers_and_injected_ping_payload() -> None:
    conn = HboneConnection(Role.CLIENT, rng=random.Random(7))
    conn.initiate(100.0)
    assert conn.get_timer() == 100.0 + min(SETTINGS_TIMEOUT, PING_INTERVAL)
    assert not conn.handle_timer(100.0 + SETTINGS_TIMEOUT)  # our SETTINGS never acknowledged
    assert b"SETTINGS not acknowledged" in conn.data_to_send()
    conn = HboneConnection(Role.CLIENT, rng=random.Random(7))
    conn.initiate(0.0)
    conn.receive_data(encode_settings({}) + encode_settings_ack(), 1.0)
    assert conn.get_timer() == 1.0 + PING_INTERVAL
    conn.data_to_send()
    assert conn.handle_timer(1.0 + PING_INTERVAL)
    expected = random.Random(7).getrandbits(64).to_bytes(8, "big")
    assert conn.data_to_send() == frame(FrameType.PING, 0, 0, expected)


def test_queued_bytes_are_bounded_per_connection_and_every_stream_resumes() -> None:
    """A peer with zero windows: the connection's queues stop every source once over
    CONNECTION_PENDING_HIGH_WATER (each stream is far below its own mark), and one WindowOpened
    resumes all streams when the queues drain below half (here: the heavy streams reset)."""
    from meshcore.hbone.events import WindowOpened
    from meshcore.hbone.flow import CONNECTION_PENDING_HIGH_WATER, PENDING_HIGH_WATER
    from meshcore.hbone.frames import Setting

    conn = server()
    conn.receive_data(encode_settings({Setting.INITIAL_WINDOW_SIZE: 0}), 0.0)
    sids = list(range(1, 41, 2))
    conn.receive_data(b"".join(connect(s) for s in sids), 0.0)
    for s in sids:
        conn.respond(s, 200)
    chunk = b"x" * (CONNECTION_PENDING_HIGH_WATER // 8)
    assert len(chunk) < PENDING_HIGH_WATER
    answers = [conn.send_data(s, chunk) for s in sids[:10]]
    assert answers == [True] * 7 + [False] * 3
    assert conn.pending_blocked
    assert not conn.send_data(sids[15], b"y")  # any stream: paused while blocked
    # The peer resets the streams holding the queued bytes: everything resumes.
    events = conn.receive_data(b"".join(encode_rst_stream(s, ErrorCode.CANCEL) for s in sids[:8]))
    opened = [e for e in events if isinstance(e, WindowOpened)]
    assert not conn.pending_blocked
    assert opened
    assert set(opened[0].stream_ids) == set(sids[8:])


def test_peer_table_bounds_and_keeps_the_reset_budget_of_a_returning_peer() -> None:
    """Per-peer-IP bounds of the HBONE listener: handshakes in progress, connections, tunnels;
    a peer that closes all its connections and comes back finds its reset budget spent."""
    from meshcore.hbone.peers import PeerTable

    peers = PeerTable(handshakes=2, connections=3, resets=5, tunnels=2)
    assert peers.admit("10.0.0.1") is None
    assert peers.admit("10.0.0.1") is None
    assert peers.admit("10.0.0.1") == "2 TLS handshakes in progress"
    assert peers.admit("10.0.0.2") is None  # another peer is not affected
    peers.handshake_done("10.0.0.1")
    peers.handshake_done("10.0.0.1")
    assert peers.admit("10.0.0.1") is None
    peers.handshake_done("10.0.0.1")
    assert peers.admit("10.0.0.1") == "3 connections"
    assert (peers.connections("10.0.0.1"), peers.connections("10.9.9.9")) == (3, 0)
    assert [peers.open_tunnel("10.0.0.1") for _ in range(3)] == [True, True, False]
    peers.close_tunnel("10.0.0.1")
    assert peers.open_tunnel("10.0.0.1")
    budget = peers.resets("10.0.0.1")
    assert not all(budget.spend(1.0) for _ in range(6))
    for _ in range(3):
        peers.closed("10.0.0.1")
    assert peers.connections("10.0.0.1") == 0
    assert peers.resets("10.0.0.1") is budget


def test_a_client_out_of_stream_ids_opens_no_more_streams() -> None:
    """RFC 9113 §5.1.1: stream ids are 31 bits and never reused. A pooled connection that used
    them all must say it can take no more (the pool dials a new one), not send id 2^31 + 1,
    which the peer reads as 1 (the reserved bit is ignored) and answers with a GOAWAY that
    ends every tunnel on the connection."""
    from meshcore.hbone.streams import MAX_STREAM_ID

    conn = HboneConnection(Role.CLIENT)
    conn.initiate(0.0)
    conn._next_stream_id = MAX_STREAM_ID  # as after 2^30 tunnels
    assert conn.can_open_stream()
    assert conn.open_connect("10.0.0.1:80") == MAX_STREAM_ID
    assert not conn.can_open_stream()
    with pytest.raises(H2ProtocolError):
        conn.open_connect("10.0.0.1:80")


def client() -> HboneConnection:
    conn = HboneConnection(Role.CLIENT)
    conn.initiate(0.0)
    conn.receive_data(encode_settings({}) + encode_settings_ack(), 0.0)
    conn.data_to_send()
    return conn


def status(code: str, sid: int) -> bytes:
    return frame(FrameType.HEADERS, Flag.END_HEADERS, sid, encode([(":status", code)]))


def rst_codes(out: bytes) -> list[tuple[int, int]]:
    """(stream id, error code) of the RST_STREAM frames in `out`."""
    found = []
    while out:
        length = int.from_bytes(out[:3], "big")
        ftype, sid = out[3], int.from_bytes(out[5:9], "big") & 0x7FFFFFFF
        if ftype == FrameType.RST_STREAM:
            found.append((sid, int.from_bytes(out[9:13], "big")))
        out = out[9 + length :]
    return found


def test_interim_responses_are_capped_per_stream() -> None:
    """A hostile server answering a CONNECT with 1xx header blocks forever (each one decoded,
    RFC 9113 §8.1 puts no limit on their number): past MAX_INTERIM_HEADS the stream is reset
    with ENHANCE_YOUR_CALM (§5.4.2, excessive load) and the opener told (StreamReset, not
    remote: the edge fails the CONNECT, which the proxy logs and counts); the connection and
    its other streams go on. As many as the cap, then the final response, are fine."""
    from meshcore.hbone.events import ResponseReceived, StreamReset
    from meshcore.hbone.headerblock import MAX_INTERIM_HEADS

    conn = client()
    ok, hostile = conn.open_connect("10.0.0.1:80"), conn.open_connect("10.0.0.2:80")
    conn.data_to_send()
    events = conn.receive_data(status("100", ok) * MAX_INTERIM_HEADS + status("200", ok), 1.0)
    (final,) = events
    assert isinstance(final, ResponseReceived)
    assert (final.stream_id, final.status) == (ok, 200)
    events = conn.receive_data(status("103", hostile) * MAX_INTERIM_HEADS, 1.0)
    assert events == []
    assert conn.data_to_send() == b""
    events = conn.receive_data(status("103", hostile), 1.0)
    assert events == [StreamReset(hostile, ErrorCode.ENHANCE_YOUR_CALM, False)]
    assert rst_codes(conn.data_to_send()) == [(hostile, ErrorCode.ENHANCE_YOUR_CALM)]
    assert not conn.is_open(hostile)
    assert conn.is_open(ok)
    # Its late 1xx blocks are ignored (§5.1), the connection lives.
    assert conn.receive_data(status("103", hostile) * 4 + status("200", hostile), 1.0) == []
    assert goaway(conn.receive_data(b"", 1.0)) is None


def test_the_opener_is_told_who_reset_its_connect() -> None:
    """The CONNECT's error and the tunnel's end say who reset the stream: the peer, or us for
    its error, the interim cap by name (before: 'reset by peer' for our own resets too, the
    interim cap a generic 'stream reset for a peer error (11)')."""
    import asyncio

    from meshcore.hbone.aio import HboneProtocol, HboneSettings, HboneStream
    from meshcore.hbone.events import StreamReset
    from meshcore.hbone.headerblock import MAX_INTERIM_HEADS
    from meshcore.hbone.streams import Role
    from tests.helpers import Sink

    class Told(Sink):
        def tunnel_reset(self, code: int, remote: bool) -> None:
            told.append((code, remote))

    told: list[tuple[int, bool]] = []

    async def main() -> list[str]:
        proto = HboneProtocol(Role.CLIENT, HboneSettings(trust_domain="cluster.local"))
        proto.conn.initiate(0.0)
        reasons = []
        for code, remote in [
            (ErrorCode.ENHANCE_YOUR_CALM, False),
            (ErrorCode.PROTOCOL_ERROR, False),
            (ErrorCode.CANCEL, True),
        ]:
            sid = proto.conn.open_connect("10.0.0.1:80", [])
            stream = HboneStream(proto, sid)
            stream.response = asyncio.get_running_loop().create_future()
            stream.sink = Told()
            proto.streams[sid] = stream
            proto._dispatch([StreamReset(sid, code, remote)])
            with pytest.raises(ConnectionResetError) as err:
                await stream.response
            reasons.append(str(err.value))
        return reasons

    assert asyncio.run(main()) == [
        f"stream reset by us: more than {MAX_INTERIM_HEADS} interim (1xx) responses",
        f"stream reset by us for a peer error ({ErrorCode.PROTOCOL_ERROR})",
        f"stream reset by peer ({ErrorCode.CANCEL})",
    ]
    assert told == [
        (ErrorCode.ENHANCE_YOUR_CALM, False),
        (ErrorCode.PROTOCOL_ERROR, False),
        (ErrorCode.CANCEL, True),
    ]
