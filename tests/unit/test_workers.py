"""`ztunnel.workers`: the first worker's listeners handed to an extra worker over a SEQPACKET
pair. Real sockets and fds; a malformed or cut-short offer is a HandoverError and every fd
received is closed (none leaks into the worker)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from meshcore.errors import HandoverError
from ztunnel import handover, workers


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def listening(n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        socks.append(s)
    return socks


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_listeners_arrive_in_order_across_packets(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """More sockets than one packet carries (`handover.MAX_SOCKETS`): chunked, order kept,
    each the same kernel socket (same bound address)."""
    ours, theirs = pair
    socks = listening(handover.MAX_SOCKETS + 3)
    roles = ["outbound", "plaintext"] + ["hbone"] * (len(socks) - 2)
    try:
        workers.offer_listeners(ours, list(zip(roles, socks, strict=True)))
        got = workers.receive_listeners(theirs)
        assert [role for role, _ in got] == roles
        assert [s.getsockname() for _, s in got] == [s.getsockname() for s in socks]
        assert all(not s.getblocking() for _, s in got)
        for _, s in got:
            s.close()
    finally:
        for s in socks:
            s.close()


def send(conn: socket.socket, msg: handover.Message, socks: list[socket.socket]) -> None:
    socket.send_fds(conn, [handover.encode(msg)], [s.fileno() for s in socks])


def test_cut_short_offer_closes_what_it_received(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    socks = listening(2)
    specs = tuple(handover.spec_of("hbone", s) for s in socks)
    before = open_fds()
    send(ours, handover.Message(handover.Kind.OFFER, sockets=specs), socks)
    ours.close()  # the first worker died before DONE
    with pytest.raises(HandoverError, match="closed before"):
        workers.receive_listeners(theirs)
    assert open_fds() == before - 2  # both ends closed, the two received fds too
    for s in socks:
        s.close()


@pytest.mark.parametrize(
    "packet",
    [
        b"not a hand-over message at all",
        handover.encode(handover.Message(handover.Kind.HELLO, pid=1)),
        handover.encode(handover.Message(handover.Kind.DONE))
        + handover.encode(handover.Message(handover.Kind.DONE)),  # two messages in one packet
    ],
)
def test_malformed_offer_is_refused(
    pair: tuple[socket.socket, socket.socket], packet: bytes
) -> None:
    ours, theirs = pair
    ours.send(packet)
    with pytest.raises(HandoverError):
        workers.receive_listeners(theirs)


def test_fd_count_not_matching_the_offer_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    socks = listening(2)
    one = (handover.spec_of("hbone", socks[0]),)
    before = open_fds()
    send(ours, handover.Message(handover.Kind.OFFER, sockets=one), socks)  # 1 named, 2 sent
    with pytest.raises(HandoverError, match="expected OFFER with 1 fds"):
        workers.receive_listeners(theirs)
    assert open_fds() == before - 1
    for s in socks:
        s.close()


def test_offer_to_a_worker_that_is_gone_is_a_handover_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.close()
    socks = listening(1)
    with pytest.raises(HandoverError, match="exited before taking"):
        workers.offer_listeners(ours, [("outbound", socks[0])])
    assert ours.fileno() == -1  # closed
    socks[0].close()
