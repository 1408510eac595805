"""The listener hand-over protocol (`ztunnel.handover`): pure encoder/decoder, and the
successor/predecessor edges over a real unix socket pair with real SCM_RIGHTS descriptors."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshcore.errors import HandoverError
from ztunnel import handover, udp_relay
from ztunnel.handover import HEADER, MAGIC, Decoder, Kind, Message, SocketSpec, encode

SPECS = (SocketSpec("outbound", "0.0.0.0", 15001), SocketSpec("readiness", "10.0.0.1", 15021))


@pytest.mark.parametrize(
    "msg",
    [
        Message(Kind.HELLO, pid=42),
        Message(Kind.OFFER, sockets=SPECS),
        Message(Kind.READY),
        Message(Kind.DONE),
        Message(Kind.REFUSE, reason="busy"),
        Message(Kind.RELEASE),
    ],
)
def test_round_trip_byte_by_byte(msg: Message) -> None:
    decoder = Decoder()
    out: list[Message] = []
    for b in encode(msg) * 2:
        out += decoder.feed(bytes([b]))
    assert out == [msg, msg]


def raw(version: int, kind: int, body: bytes, magic: bytes = MAGIC) -> bytes:
    return HEADER.pack(magic, version, kind, len(body)) + body


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (raw(2, 1, b"{}", magic=b"HTTP"), "bad magic"),
        (raw(1, 1, b"{}"), "version 1 unsupported"),
        (raw(2, 9, b"{}"), "unknown hand-over message kind"),
        (struct.pack("!4sBBI", MAGIC, 2, 2, 1 << 30), "over"),
        (raw(2, 2, b"{not json"), "not JSON"),
        (raw(2, 2, b"[]"), "not a JSON object"),
        (raw(2, 2, b'{"sockets": [{"role": "shell", "host": "x", "port": 1}]}'), "known role"),
        (raw(2, 2, b'{"sockets": [{"role": "hbone", "host": "x", "port": 70000}]}'), "range"),
        (raw(2, 2, b'{"sockets": [' + b",".join([b"{}"] * 65) + b"]}"), "at most 64"),
    ],
)
def test_malformed_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(HandoverError, match=why):
        Decoder().feed(data)


def test_hand_over_edges_pass_the_same_kernel_sockets(tmp_path: Path) -> None:
    """obtain() gets descriptors of the very sockets the predecessor listens on (same inode);
    commit() makes the predecessor stop accepting, then DONE."""
    path = tmp_path / "h.sock"
    listener = socket.create_server(("127.0.0.1", 0))
    stopped: list[bool] = []

    async def main() -> None:
        server = handover.HandoverServer(
            path, lambda: [("outbound", listener)], lambda: stopped.append(True)
        )
        server.start()
        handed = await asyncio.get_running_loop().run_in_executor(None, handover.obtain, path)
        assert handed is not None
        ((spec, got),) = handed.sockets.items()
        assert spec == SocketSpec("outbound", "127.0.0.1", listener.getsockname()[1])
        assert os.fstat(got.fileno()).st_ino == os.fstat(listener.fileno()).st_ino
        assert stopped == []  # nothing changes before READY
        assert await handover.commit(handed)
        assert stopped == [True]
        assert server.handed_over
        got.close()

    asyncio.run(main())
    listener.close()


def test_nobody_there_means_bind_fresh(tmp_path: Path) -> None:
    assert handover.obtain(tmp_path / "absent.sock") is None


@pytest.mark.parametrize("first", [Kind.READY, Kind.OFFER, Kind.DONE])
def test_out_of_order_is_refused_and_changes_nothing(tmp_path: Path, first: Kind) -> None:
    path = tmp_path / "h.sock"
    listener = socket.create_server(("127.0.0.1", 0))
    stopped: list[bool] = []
    results: list[str] = []

    async def main() -> None:
        server = handover.HandoverServer(
            path,
            lambda: [("outbound", listener)],
            lambda: stopped.append(True),
            on_result=results.append,
        )
        server.start()
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.setblocking(False)
            await loop.sock_connect(conn, str(path))
            await loop.sock_sendall(conn, encode(Message(first)))
            (msg,) = Decoder().feed(await loop.sock_recv(conn, 4096))
            assert msg.kind is Kind.REFUSE
            assert "expected HELLO" in msg.reason
            assert await loop.sock_recv(conn, 4096) == b""
        assert stopped == []
        assert results == ["failed"]
        assert not server.handed_over
        server.close(unlink=True)
        assert not path.exists()

    asyncio.run(main())
    listener.close()


def test_a_path_longer_than_sun_path_works(tmp_path: Path) -> None:
    """Deep directories (hostPath, test dirs) exceed unix(7)'s 108-byte sun_path."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "handover.sock"
    listener = socket.create_server(("127.0.0.1", 0))

    async def main() -> None:
        server = handover.HandoverServer(path, lambda: [("hbone", listener)], lambda: None)
        server.start()
        handed = await asyncio.get_running_loop().run_in_executor(None, handover.obtain, path)
        assert handed is not None
        assert len(handed.sockets) == 1
        handed.close_unused()
        assert await handover.commit(handed)

    asyncio.run(main())
    listener.close()


# ---- HTTP/3: the UDP socket's relay (`ztunnel.udp_relay`) ---------------------------------------


def test_udp_relay_roles_pass_the_offer_and_nothing_else_may_be_unnamed() -> None:
    relay = SocketSpec("hbone-udp-relay", "", 0)
    offer = Message(Kind.OFFER, sockets=(SocketSpec("hbone-udp", "10.0.0.1", 15008), relay))
    assert Decoder().feed(encode(offer)) == [offer]
    unnamed_listener = Message(Kind.OFFER, sockets=(SocketSpec("hbone", "", 0),))
    with pytest.raises(HandoverError, match="out of range"):
        Decoder().feed(encode(unnamed_listener))
    a, b = udp_relay.pair()
    try:
        assert handover.spec_of("hbone-udp-relay", a) == relay
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "frame",
    [
        udp_relay.Frame(
            udp_relay.DATAGRAM, ("10.0.0.1", 15008), ("10.0.0.2", 40001), b"\x00" * 1350
        ),
        udp_relay.Frame(udp_relay.SERVED, ("fd00::1", 15008), ("fd00::2", 1)),
        udp_relay.Frame(udp_relay.GONE, ("127.0.0.1", 15008), ("127.0.0.2", 65535)),
        udp_relay.Frame(udp_relay.KEY, ("10.0.0.1", 15008), ("", 0), bytes(range(32))),
    ],
)
def test_udp_relay_frames_round_trip(frame: udp_relay.Frame) -> None:
    assert udp_relay.decode(udp_relay.encode(frame)) == frame


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"X\x01a\x00\x01\x01b\x00\x01",  # unknown kind
        b"D\x09127.0.0.1",  # truncated address
        b"+\x011\x00\x01\x012\x00\x02extra",  # a control frame carries no payload
        b"D\x01\xff\x00\x01\x012\x00\x02",  # address not text
        b"D" + bytes(udp_relay.MAX_FRAME),  # over the bound
        b"K\x011\x00\x01\x00\x00\x00" + bytes(31),  # a reset key is 32 bytes
    ],
)
def test_udp_relay_malformed_frames_are_refused(data: bytes) -> None:
    with pytest.raises(HandoverError):
        udp_relay.decode(data)


@dataclass
class Offering:
    """A running process's side of a hand-over with take-back: it offers `listener` at
    `path`; `events` records what its callbacks were told."""

    path: Path
    listener: socket.socket
    events: list[str] = field(default_factory=list)

    def start(self) -> handover.HandoverServer:
        """The hand-over server, accepting successors (call in the event loop)."""
        server = handover.HandoverServer(
            self.path,
            lambda: [("outbound", self.listener)],
            lambda: self.events.append("stopped"),
            on_result=self.events.append,
            take_back=handover.TakeBack(
                lambda: self.events.append("died"), lambda: self.events.append("released")
            ),
        )
        server.start()
        return server


@pytest.fixture
def offering(tmp_path: Path) -> Iterator[Offering]:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield Offering(tmp_path / "h.sock", listener)
    finally:
        listener.close()


async def until(cond: object) -> None:
    assert callable(cond)
    async with asyncio.timeout(5):
        while not cond():
            await asyncio.sleep(0.01)


def test_successor_dying_after_ready_gives_the_sockets_back(offering: Offering) -> None:
    """Version 2: the hand-over connection outlives DONE; its EOF without RELEASE (the
    successor died) calls successor_died, after which the server serves the next successor."""
    path, events = offering.path, offering.events

    async def main() -> None:
        server = offering.start()
        loop = asyncio.get_running_loop()
        handed = await loop.run_in_executor(None, handover.obtain, path)
        assert handed is not None
        handed.close_unused()
        conn = await handover.commit(handed)
        assert conn is not None
        await asyncio.sleep(0.05)
        assert events == ["stopped", "done"]  # nothing more while the successor lives
        conn.close()  # the successor dies: EOF without RELEASE
        await until(lambda: "died" in events)
        assert events == ["stopped", "done", "taken_back", "died"]
        assert not server.handed_over
        server.start()  # what the node proxy does once it accepts again
        again = await loop.run_in_executor(None, handover.obtain, path)
        assert again is not None  # a restarted successor takes over from us again
        again.close_unused()
        second = await handover.commit(again)
        assert second is not None
        handover.release(second)
        await until(lambda: "released" in events)
        assert events[-3:] == ["stopped", "done", "released"]
        server.close(unlink=False)

    asyncio.run(main())


def test_release_means_no_take_back(offering: Offering) -> None:
    path, events = offering.path, offering.events

    async def main() -> None:
        server = offering.start()
        handed = await asyncio.get_running_loop().run_in_executor(None, handover.obtain, path)
        assert handed is not None
        handed.close_unused()
        conn = await handover.commit(handed)
        assert conn is not None
        handover.release(conn)
        await until(lambda: "released" in events)
        await asyncio.sleep(0.05)
        assert events == ["stopped", "done", "released"]
        assert server.handed_over

    asyncio.run(main())


def test_a_version_1_successor_is_refused(offering: Offering) -> None:
    """A peer of another protocol version gets REFUSE; the running process keeps serving."""
    path, events = offering.path, offering.events

    async def main() -> None:
        server = offering.start()
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.setblocking(False)
            await loop.sock_connect(conn, str(path))
            await loop.sock_sendall(conn, raw(1, Kind.HELLO, b'{"pid": 1, "versions": [1]}'))
            (msg,) = Decoder().feed(await loop.sock_recv(conn, 4096))
            assert msg.kind is Kind.REFUSE
            assert "version 1 unsupported" in msg.reason
        await until(lambda: events == ["failed"])
        server.close(unlink=True)

    asyncio.run(main())
