"""`meshcore.sockets.TcpSocket` and `accept` (issue 14, per new connection): the sockets the
node proxy accepts and opens answer `family` and `type` as `socket.socket` does, and neither
accepting nor handing them to uvloop converts an integer through the enum machinery
(`socket.socket`'s properties: ~1.7 us per read, several reads per connection)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvloop

from meshcore.sockets import TcpSocket, accept, connect_tcp, make_listener

ADDR = ("127.0.25.1", 9100)


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        (socket.AF_INET, socket.SOCK_STREAM),
        (socket.AF_INET6, socket.SOCK_STREAM),
        (socket.AF_INET, socket.SOCK_DGRAM),
        (socket.AF_UNIX, socket.SOCK_STREAM),
        (socket.AF_UNIX, socket.SOCK_SEQPACKET),
    ],
)
def test_family_and_type_are_what_socket_socket_answers(family: int, kind: int) -> None:
    with socket.socket(family, kind) as plain, TcpSocket(family, kind) as fast:
        fast.setblocking(False)  # the kernel's SOCK_NONBLOCK flag is not part of `type`
        assert fast.family is plain.family
        assert fast.type is plain.type
        assert isinstance(fast.family, socket.AddressFamily)
        assert isinstance(fast.type, socket.SocketKind)


def test_accept_returns_the_connection_as_socket_accept_does() -> None:
    listener = make_listener(*ADDR)
    try:
        with socket.create_connection(ADDR) as client:
            conn = accept(listener)
            with conn:
                assert isinstance(conn, TcpSocket)
                assert conn.getpeername() == client.getsockname()
                assert conn.getsockname() == ADDR
                assert conn.gettimeout() is None  # as socket.accept leaves it (no default)
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
        with pytest.raises(BlockingIOError):  # non-blocking listener, nobody waiting
            accept(listener)
    finally:
        listener.close()


def test_the_per_connection_sockets_skip_the_enum_conversions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Accept a connection and wrap it with uvloop (node A's path), and open one with
    `connect_tcp` and wrap it (node B's): with `socket`'s enum conversion made to fail, both
    still work. Fails on `socket.socket.accept` and plain sockets, whose `family`/`type` go
    through `socket._intenum_converter` on every read."""
    listener = make_listener(*ADDR)

    def banned(value: Any, enum_klass: Any) -> Any:
        raise AssertionError(f"enum conversion of {value} to {enum_klass.__name__}")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[socket.socket] = loop.create_future()
        loop.add_reader(listener.fileno(), lambda: accepted.set_result(accept(listener)))
        try:
            outgoing = await connect_tcp(*ADDR, timeout=2.0)
            client_tr, _ = await loop.create_connection(asyncio.Protocol, sock=outgoing)
            conn = await accepted
            server_tr, _ = await loop.connect_accepted_socket(asyncio.Protocol, conn)
            server_tr.close()
            client_tr.close()
        finally:
            loop.remove_reader(listener.fileno())

    monkeypatch.setattr(socket, "_intenum_converter", banned)
    try:
        uvloop.run(main())
    finally:
        listener.close()


def test_a_name_is_resolved_for_both_families_and_each_address_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name whose first address refuses (here: nothing listens there) is reached on the next
    one; the resolver is asked for every family (AF_UNSPEC: the chart's control-plane address
    is a DNS name, perhaps IPv6 only or first)."""
    listener = make_listener("127.0.25.2", 0)
    port = listener.getsockname()[1]
    asked: list[int] = []

    async def resolve(host: str, port: int, *, family: int = 0, **kw: Any) -> list[Any]:
        asked.append(family)
        stream = socket.SOCK_STREAM
        return [
            (socket.AF_INET, stream, 6, "", ("127.0.25.3", port)),  # refused
            (socket.AF_INET, stream, 6, "", ("127.0.25.3", port)),  # a duplicate: tried once
            (socket.AF_INET, stream, 6, "", ("127.0.25.2", port)),
        ]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", resolve)
        sock = await connect_tcp("cp.example", port, timeout=5)
        try:
            assert sock.getpeername() == ("127.0.25.2", port)
        finally:
            sock.close()

    try:
        asyncio.run(main())
    finally:
        listener.close()
    assert asked == [socket.AF_UNSPEC]


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_the_per_connection_sockets_get_tcp_nodelay_on_both_loops(kind: str) -> None:
    """The sockets the proxies accept (`accept`) and open (`connect_tcp`, `start_connect`) get
    TCP_NODELAY from the transport that wraps them, on either loop (ZTUNNEL_UVLOOP=0 too).
    asyncio sets it only on a socket whose `proto` is IPPROTO_TCP (`_set_nodelay`): fails with
    sockets made with protocol 0 (Nagle on every dial and accepted connection)."""
    listener = make_listener(*ADDR)

    def nodelay(transport: asyncio.BaseTransport) -> int:
        sock = transport.get_extra_info("socket")
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[socket.socket] = loop.create_future()
        loop.add_reader(listener.fileno(), lambda: accepted.set_result(accept(listener)))
        try:
            outgoing = await connect_tcp(*ADDR, timeout=2.0)
            assert outgoing.proto == socket.IPPROTO_TCP
            client_tr, _ = await loop.create_connection(asyncio.Protocol, sock=outgoing)
            conn = await accepted
            assert conn.proto == socket.IPPROTO_TCP
            server_tr, _ = await loop.connect_accepted_socket(asyncio.Protocol, conn)
            try:
                assert nodelay(client_tr) == 1
                assert nodelay(server_tr) == 1
            finally:
                server_tr.close()
                client_tr.close()
        finally:
            loop.remove_reader(listener.fileno())

    try:
        if kind == "uvloop":
            uvloop.run(main())
        else:
            asyncio.run(main())
    finally:
        listener.close()
