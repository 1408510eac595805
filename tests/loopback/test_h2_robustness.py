"""The node proxy's HBONE port (15008) under hostile HTTP/2 peers (issue 9).

Every attack comes from a peer with a valid mesh certificate, over a real TLS connection to a real
`ztunnel` process (see `robustness.py`). Each test asserts the connection-level reaction (the
GOAWAY code, or the stream's answer), that a well-behaved client is served DURING the attack
(hash-checked tunnels on its own connection), and that the process's descriptors and RSS are back
near where they were afterwards (read from /proc).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import suppress
from typing import Any, TypeVar

import pytest

from meshcore.hbone.frames import ErrorCode, Flag, FrameType
from meshcore.hbone.headers import encode as encode_headers
from tests import helpers
from tests.helpers import eventually, loopback_block
from tests.loopback.robustness import (
    AUTHORITY,
    Backend,
    NodeB,
    Raw,
    Seen,
    connect_block,
    fd_count,
    frame,
    headers_frame,
    legit_tunnel,
    rss_mib,
    rst,
    start_echo_backend,
    start_node_b,
)

T = TypeVar("T")
PEERS = loopback_block()  # attackers' source addresses
RSS_SLACK_MIB = 25.0  # after an attack; the flood-twice test below is much tighter


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeB]:
    yield from start_node_b(tmp_path_factory.mktemp("robustness"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`tests.helpers.run` with the attacks' longer budget."""
    return helpers.run(coro, 90)


async def under_attack(
    node: NodeB, attack: Callable[[], Awaitable[Seen]], legit: int = 3
) -> tuple[Seen, Backend]:
    """Run `attack` while a well-behaved client opens `legit` tunnels one after another; then
    check descriptors and RSS came back. Returns what the attacker saw and the backend."""
    backend = await start_echo_backend()
    await legit_tunnel(node.cert)  # warm: certificates issued
    base_fds, base_rss = fd_count(node.pid), rss_mib(node.pid)
    backend.accepted = 0
    try:

        async def served() -> None:
            for _ in range(legit):
                await legit_tunnel(node.cert)

        seen, _ = await asyncio.gather(attack(), served())
        await eventually(lambda: fd_count(node.pid) <= base_fds + 2)
        assert node.ready(), "readiness must keep answering"
        assert "Traceback" not in node.log.read_text()  # an error code, a log line, a counter
        assert rss_mib(node.pid) < base_rss + RSS_SLACK_MIB
    finally:
        assert backend.server is not None
        backend.server.close()
    return seen, backend


def errors(node: NodeB, code: ErrorCode) -> float:
    return node.counter("ztunnel_hbone_connection_errors_total", code=code.name)


# ---- rapid reset and MadeYouReset --------------------------------------------------------------


def test_rapid_reset_is_cut_off_and_opens_no_upstream(node: NodeB) -> None:
    """CVE-2023-44487: HEADERS + RST_STREAM pairs. No upstream connect for a stream that is
    already gone; past the reset budget, GOAWAY(ENHANCE_YOUR_CALM) and close."""
    before = errors(node, ErrorCode.ENHANCE_YOUR_CALM)

    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        burst = b"".join(headers_frame(s, connect_block()) + rst(s) for s in range(1, 10_001, 2))
        await raw.send(burst)
        return await raw.read_until_closed(10)

    async def main() -> tuple[Seen, Backend]:
        return await under_attack(node, attack)

    seen, backend = run(main())
    assert seen.goaway == ErrorCode.ENHANCE_YOUR_CALM
    assert seen.closed
    # The legit client's 3 tunnels reach the backend; the reset streams (almost) never do.
    assert backend.accepted <= 3 + 5, backend.accepted
    assert errors(node, ErrorCode.ENHANCE_YOUR_CALM) == before + 1
    assert "closed with GOAWAY(ENHANCE_YOUR_CALM)" in node.log.read_text()


def test_made_you_reset_is_cut_off(node: NodeB) -> None:
    """HEADERS then a frame the server must answer with RST_STREAM (WINDOW_UPDATE of 0 on the
    stream, RFC 9113 §6.9): server-side resets spend the same budget as the client's."""

    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        zero_wu = b"\x00\x00\x00\x00"
        burst = b"".join(
            headers_frame(s, connect_block()) + frame(FrameType.WINDOW_UPDATE, 0, s, zero_wu)
            for s in range(1, 4001, 2)
        )
        await raw.send(burst)
        return await raw.read_until_closed(10)

    seen, backend = run(under_attack(node, attack))
    assert seen.goaway == ErrorCode.ENHANCE_YOUR_CALM
    assert seen.closed
    assert seen.resets
    assert set(seen.resets.values()) == {ErrorCode.PROTOCOL_ERROR}
    assert backend.accepted <= 3 + 5, backend.accepted


# ---- header blocks -------------------------------------------------------------------------------


def test_continuation_flood_is_cut_off(node: NodeB) -> None:
    """CVE-2024-27316: tiny CONTINUATION frames without END_HEADERS, never ending. Bounded by
    a frame count while the block accumulates (the size bound alone lets 64 Ki frames in)."""
    size = 1

    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        await raw.send(headers_frame(1, connect_block(), end_headers=False))
        chunk = frame(FrameType.CONTINUATION, 0, 1, b"\x00" * size)
        for _ in range(200):
            if not await raw.send(chunk * 500):
                break
        return await raw.read_until_closed(10)

    seen, _ = run(under_attack(node, attack))
    assert seen.goaway == ErrorCode.ENHANCE_YOUR_CALM
    assert seen.closed
    assert seen.goaway_debug == b"too many CONTINUATION frames"


def test_empty_continuation_flood_is_a_protocol_error(node: NodeB) -> None:
    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        empty = frame(FrameType.CONTINUATION, 0, 1)
        await raw.send(headers_frame(1, connect_block(), end_headers=False) + empty * 100_000)
        return await raw.read_until_closed(10)

    seen, _ = run(under_attack(node, attack))
    assert seen.goaway == ErrorCode.PROTOCOL_ERROR
    assert seen.closed


def test_header_list_over_the_advertised_limit_gets_431_and_no_upstream(node: NodeB) -> None:
    """SETTINGS_MAX_HEADER_LIST_SIZE is 65,536: an 80 KiB list is answered 431 (RFC 6585) and
    the connection stays usable; a 1,000 KiB block is a connection error."""

    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        big = connect_block(extra=[("x-big", "a" * 80 * 1024)])
        await raw.send(headers_frame(1, big) + headers_frame(3, connect_block()))
        await asyncio.sleep(1.0)
        huge = connect_block(extra=[("x-huge", "a" * 1000 * 1024)])
        await raw.send(headers_frame(5, huge))
        return await raw.read_until_closed(10)

    seen, backend = run(under_attack(node, attack))
    assert seen.statuses.get(1) == "431"
    assert seen.statuses.get(3) == "200"  # same connection, next stream: served
    assert 5 not in seen.statuses
    assert seen.goaway == ErrorCode.ENHANCE_YOUR_CALM
    assert seen.closed
    assert backend.accepted == 3 + 1  # legit tunnels + stream 3; none for 1 and 5
    refused = node.counter("ztunnel_hbone_streams_refused_total", reason="header_list_too_large")
    assert refused >= 1


def test_hpack_bomb(node: NodeB) -> None:
    """A 4,000-octet field put in the dynamic table once, then referenced by one-octet indexes:
    20 references decode past the limit (431, HPACK state kept: the next stream is served),
    1,000 of them (4 MB from 1 KB) stop the decoder itself (GOAWAY COMPRESSION_ERROR)."""
    value = b"v" * 4000
    # RFC 7541 §6.2.1 literal with incremental indexing, new name; then §6.1 index 62.
    insert = b"\x40" + bytes([5]) + b"x-bmb" + b"\x7f\xa1\x1e" + value

    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        await raw.send(headers_frame(1, connect_block() + insert))
        await raw.send(headers_frame(3, connect_block() + b"\xbe" * 20))
        await raw.send(headers_frame(5, connect_block()))
        await asyncio.sleep(1.0)
        await raw.send(headers_frame(7, connect_block() + b"\xbe" * 1000))
        return await raw.read_until_closed(10)

    seen, _ = run(under_attack(node, attack))
    assert seen.statuses.get(1) == "200"
    assert seen.statuses.get(3) == "431"
    assert seen.statuses.get(5) == "200"
    assert seen.goaway == ErrorCode.COMPRESSION_ERROR
    assert seen.closed


# ---- control-frame floods, slowloris, stream ids --------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_frame_flood_is_cut_off(node: NodeB, kind: str) -> None:
    """CVE-2019-9512/9515: each PING/SETTINGS forces a reply frame; a flood is cut off."""
    one = (
        frame(FrameType.PING, 0, 0, b"12345678")
        if kind == "ping"
        else frame(FrameType.SETTINGS, 0, 0, b"")
    )

    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        await raw.send(one * 20_000)
        return await raw.read_until_closed(10)

    seen, _ = run(under_attack(node, attack))
    assert seen.goaway == ErrorCode.ENHANCE_YOUR_CALM
    assert seen.closed


def test_slowloris_is_timed_out(node: NodeB) -> None:
    """A peer that never acknowledges our SETTINGS, and one that starts a header block and
    never finishes it, are closed (SETTINGS_TIMEOUT, RFC 9113 §6.5.3; ENHANCE_YOUR_CALM)."""

    async def attack() -> Seen:
        silent = await Raw.open(node.cert, settings_ack=False)
        stalled = await Raw.open(node.cert)
        await stalled.send(headers_frame(1, connect_block(), end_headers=False))
        await silent.send(b"\x00\x00")  # and a partial frame header
        seen_silent, seen_stalled = await asyncio.gather(
            silent.read_until_closed(15), stalled.read_until_closed(15)
        )
        assert seen_silent.goaway == ErrorCode.SETTINGS_TIMEOUT
        assert seen_silent.closed
        return seen_stalled

    seen, _ = run(under_attack(node, attack, legit=1))
    assert seen.goaway == ErrorCode.ENHANCE_YOUR_CALM
    assert seen.closed


@pytest.mark.parametrize("case", ["lower", "reused"])
def test_stream_id_rules(node: NodeB, case: str) -> None:
    """RFC 9113 §5.1.1: a new stream's id must exceed every earlier one: PROTOCOL_ERROR."""

    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        if case == "lower":
            await raw.send(headers_frame(5, connect_block()))
            await asyncio.sleep(0.5)
            await raw.send(headers_frame(3, connect_block()))
        else:
            await raw.send(headers_frame(1, connect_block()))
            await asyncio.sleep(0.5)
            fin = frame(FrameType.DATA, Flag.END_STREAM, 1)
            await raw.send(fin)
            await asyncio.sleep(0.5)
            await raw.send(headers_frame(1, connect_block()))
        return await raw.read_until_closed(10)

    seen, _ = run(under_attack(node, attack))
    assert seen.goaway == ErrorCode.PROTOCOL_ERROR
    assert seen.closed


def test_refused_stream_leaves_an_access_log_line_and_a_counter(node: NodeB) -> None:
    """A request the HTTP/2 layer answers itself (here: not CONNECT) is logged and counted."""
    before = node.counter("ztunnel_hbone_streams_refused_total", reason="not_connect")

    async def attack() -> Seen:
        raw = await Raw.open(node.cert)
        get = encode_headers(
            [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", AUTHORITY)]
        )
        await raw.send(headers_frame(1, get))
        await asyncio.sleep(0.5)
        raw.abort()
        return raw.seen

    run(under_attack(node, attack, legit=1))
    assert node.counter("ztunnel_hbone_streams_refused_total", reason="not_connect") == before + 1
    assert "stream 1 refused: method 'GET': only CONNECT (400)" in node.log.read_text()


# ---- memory that returns ------------------------------------------------------------------------


def test_memory_returns_after_aborted_continuation_floods(node: NodeB) -> None:
    """Connections cut in the middle of a big CONTINUATION frame, twice: RSS comes back within
    a few MiB of where it started each time (the aborted connections' buffers are freed)."""
    conns = 60

    async def flood() -> float:
        raws = [await Raw.open(node.cert) for _ in range(conns)]
        head = headers_frame(1, connect_block(), end_headers=False)
        # A CONTINUATION frame announcing 1 MiB, of which 900 KiB arrive before the cut.
        partial = (1 << 20).to_bytes(3, "big") + bytes([FrameType.CONTINUATION, 0, 0, 0, 0, 1])
        await asyncio.gather(*(r.send(head + partial + b"\x00" * 900 * 1024) for r in raws))
        await asyncio.sleep(1.0)
        peak = rss_mib(node.pid)
        for r in raws:
            r.abort()
        return peak

    async def main() -> list[tuple[float, float, float]]:
        rounds = []
        for _ in range(2):
            base = rss_mib(node.pid)
            peak = await flood()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 8  # the node proxy trims the heap every 5 s
            while rss_mib(node.pid) > base + 4 and loop.time() < deadline:
                await asyncio.sleep(0.2)
            rounds.append((base, peak, rss_mib(node.pid)))
        return rounds

    rounds = run(main())
    for base, peak, after in rounds:
        assert peak > base + 20, rounds  # the flood really held memory while it lasted
        assert after <= base + 4, rounds
    assert rounds[1][2] <= rounds[0][0] + 6, rounds


def test_accept_pauses_when_descriptors_run_short(node: NodeB) -> None:
    """With few descriptors left, the HBONE listener stops accepting (the kernel's backlog holds
    new connections) instead of looping on EMFILE; readiness keeps answering; once descriptors
    are free again, accepting resumes and tunnels are served."""
    import resource
    import socket

    from tests.loopback.robustness import HBONE

    soft, hard = resource.prlimit(node.pid, resource.RLIMIT_NOFILE)
    before = node.counter("ztunnel_accept_paused_total")

    async def main() -> None:
        backend = await start_echo_backend()
        socks: list[socket.socket] = []
        try:
            await legit_tunnel(node.cert)
            # 256 descriptors are kept in reserve: leave the process ~40 more than that.
            resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (fd_count(node.pid) + 300, hard))
            for _ in range(150):  # plain TCP: completes in the kernel, never sends a ClientHello
                s = socket.socket()
                s.setblocking(False)
                with suppress(BlockingIOError):
                    s.connect(HBONE)
                socks.append(s)
            await eventually(lambda: node.counter("ztunnel_accept_paused_total") > before)
            assert node.ready(), "readiness must keep answering"
            for s in socks:
                s.close()
            socks.clear()
            resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (soft, hard))
            await asyncio.sleep(0.3)
            await legit_tunnel(node.cert)
            assert "Too many open files" not in node.log.read_text()
        finally:
            for s in socks:
                s.close()
            resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert backend.server is not None
            backend.server.close()

    run(main())


def test_streams_sent_before_our_settings_arrive_are_served(node: NodeB) -> None:
    """What Envoy does as an HBONE client: it puts every pending tunnel on a new connection at
    once, before our SETTINGS (MAX_CONCURRENT_STREAMS 200) reach it, and does not retry a
    REFUSED_STREAM. RFC 9113 §6.5.3: the limit binds the peer once it acknowledged it, so all
    1,000 are served (bench/hbone_soak.py runs the real Envoy at 5,000 and 10,000)."""
    streams = range(1, 2000, 2)

    async def attack() -> Seen:
        raw = await Raw.open(node.cert, settings_ack=False)
        await raw.send(b"".join(headers_frame(s, connect_block()) for s in streams))
        await raw.send(frame(FrameType.SETTINGS, Flag.ACK, 0))
        await eventually(lambda: len(raw.seen.statuses) + len(raw.seen.resets) >= len(streams), 30)
        raw.abort()
        return raw.seen

    seen, backend = run(under_attack(node, attack, legit=1))
    assert not seen.resets
    assert set(seen.statuses) == set(streams)
    assert set(seen.statuses.values()) == {"200"}
    assert backend.accepted == len(streams) + 1


def test_plain_listeners_pause_accepting_when_descriptors_run_short(node: NodeB) -> None:
    """The outbound (15001) and plaintext inbound (15006) listeners behave like the HBONE one:
    with descriptors short they leave connections in the kernel's backlog (`ss` Recv-Q of the
    listener) instead of asyncio's accept-until-EMFILE; readiness keeps answering from the
    reserve; once descriptors are back, the queued connections are accepted."""
    import resource
    import socket
    import subprocess

    from tests.loopback.robustness import NODE

    soft, hard = resource.prlimit(node.pid, resource.RLIMIT_NOFILE)
    listeners = [(NODE, 15001), (NODE, 15006)]

    def queued() -> dict[int, int]:
        out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
        ports = {f"{h}:{p}": p for h, p in listeners}
        return {ports[f[3]]: int(f[1]) for f in map(str.split, out.splitlines()) if f[3] in ports}

    socks: list[socket.socket] = []
    try:
        # Inside the 256-descriptor reserve, and fewer free than the connections we open.
        resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (fd_count(node.pid) + 30, hard))
        for addr in listeners:
            for _ in range(40):  # plain TCP: the kernel completes the handshake
                s = socket.socket()
                s.setblocking(False)
                with suppress(BlockingIOError):
                    s.connect(addr)
                socks.append(s)
        run(eventually(lambda: "plaintext accept paused" in node.log.read_text()))
        run(eventually(lambda: "outbound accept paused" in node.log.read_text()))
        # At most the one accept already waiting when the limit dropped went through.
        assert all(n >= 39 for n in queued().values()), queued()
        assert node.ready(), "readiness must keep answering"
        resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (soft, hard))
        run(eventually(lambda: queued() == {15001: 0, 15006: 0}))
        text = node.log.read_text()
        assert "Too many open files" not in text
        assert "out of system resource" not in text
    finally:
        for s in socks:
            s.close()
        resource.prlimit(node.pid, resource.RLIMIT_NOFILE, (soft, hard))


def test_rapid_reset_spread_over_connections_is_bounded_per_peer(node: NodeB) -> None:
    """Budget evasion: 8 connections from one peer IP, each with 150 HEADERS + RST_STREAM
    pairs, under the per-connection budget (200 per 10 s) every time. The reset budget shared by
    the peer's connections (1,000) runs out: GOAWAY(ENHANCE_YOUR_CALM) naming the peer budget,
    and every later connection of that peer is cut at its first reset."""
    peer = PEERS.ip(1)

    async def attack() -> Seen:
        seen = []
        for c in range(8):
            raw = await Raw.open(node.cert, source=peer)
            burst = b"".join(headers_frame(s, connect_block()) + rst(s) for s in range(1, 301, 2))
            await raw.send(burst)
            seen.append(await raw.read_until_closed(1.0 if c < 7 else 5.0))
            raw.abort()
        calm = [s for s in seen if s.goaway == ErrorCode.ENHANCE_YOUR_CALM]
        assert calm, [s.goaway for s in seen]
        assert b"all connections of this peer" in calm[0].goaway_debug, calm[0]
        assert seen[-1].goaway == ErrorCode.ENHANCE_YOUR_CALM
        return calm[0]

    _, backend = run(under_attack(node, attack))
    assert backend.accepted <= 3 + 5, backend.accepted


def test_silent_handshakes_are_bounded_per_peer(node: NodeB) -> None:
    """Slow TLS: 100 TCP connections from one peer IP that never send a ClientHello. At most
    64 handshakes per peer wait (for the 10 s handshake timeout); the rest are closed at once,
    logged and counted; other peers are served meanwhile; descriptors come back."""
    import socket

    from tests.loopback.robustness import HBONE

    peer = PEERS.ip(2)
    before = node.counter("istio_tcp_connections_failed_total", response_flags="PEER_LIMIT")

    async def attack() -> Seen:
        socks = []
        for _ in range(100):
            s = socket.socket()
            s.bind((peer, 0))
            s.setblocking(False)
            with suppress(BlockingIOError):
                s.connect(HBONE)
            socks.append(s)
        await asyncio.sleep(1.5)
        closed = 0
        for s in socks:
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionError:
                closed += 1
        for s in socks:
            s.close()
        assert closed == 100 - 64, closed
        return Seen(closed=True)

    run(under_attack(node, attack))
    after = node.counter("istio_tcp_connections_failed_total", response_flags="PEER_LIMIT")
    assert after == before + 36
    assert "peer over its limit: 64 TLS handshakes in progress" in node.log.read_text()


def test_zero_window_peer_holds_bounded_memory(node: NodeB) -> None:
    """A peer that never lets us send (SETTINGS_INITIAL_WINDOW_SIZE 0) on 200 echo tunnels, each
    fed 1 MiB: what the upstreams send back must wait. Per stream it is capped (1 MiB, then the
    upstream is not read), and per connection too, so one connection cannot pin 200 MiB."""
    from meshcore.hbone.frames import Setting, encode_settings

    streams = range(1, 401, 2)
    grown: list[float] = []

    async def attack() -> Seen:
        base = rss_mib(node.pid)
        raw = await Raw.open(node.cert)
        await raw.send(encode_settings({Setting.INITIAL_WINDOW_SIZE: 0}))
        await raw.send(b"".join(headers_frame(s, connect_block()) for s in streams))
        await eventually(lambda: len(raw.seen.statuses) == len(streams))
        chunk = b"\xa5" * 16384
        for _ in range(64):
            await raw.send(b"".join(frame(FrameType.DATA, 0, s, chunk) for s in streams))
        await asyncio.sleep(2.0)
        grown.append(rss_mib(node.pid) - base)
        raw.abort()
        return raw.seen

    seen, _ = run(under_attack(node, attack))
    assert set(seen.statuses.values()) == {"200"}
    assert grown[0] < 48, grown
