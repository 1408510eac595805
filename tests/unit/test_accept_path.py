"""The node proxy's accept loop (`ztunnel.proxy.accept.AcceptLoop`) on real sockets: what one
accepted connection costs (issue 14: no descriptor probe per accept) and the pause when
descriptors run short (issue 9; the same against a whole process in
tests/loopback/test_h2_robustness.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket

import pytest

from ztunnel.metrics import ProxyMetrics
from ztunnel.proxy import accept
from ztunnel.proxy.accept import AcceptLoop, TcpListener
from ztunnel.proxy.relay import TcpSide


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def _accept_n(loop_obj: AcceptLoop, clients: list[socket.socket], served: list[int]) -> None:
    addr = loop_obj.sock.getsockname()
    loop_obj.start()
    for c in clients:
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(addr)
    for _ in range(200):
        if len(served) >= len(clients) or loop_obj._pause_task is not None:
            break
        await asyncio.sleep(0.01)


def test_accepting_opens_no_extra_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each accept used to open and close /dev/null to probe the descriptor table (a syscall
    pair per connection); the accepted socket's own number now tells how full the table is."""
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: str, *args: int) -> int:
        opened.append(path)
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", counting_open)
    served: list[int] = []
    conns: list[socket.socket] = []

    def on_accept(conn: socket.socket) -> None:
        served.append(conn.fileno())
        conns.append(conn)

    clients = [socket.socket() for _ in range(20)]
    loop_obj = AcceptLoop("test", _listener(), on_accept, ProxyMetrics())
    try:
        asyncio.run(_accept_n(loop_obj, clients, served))
    finally:
        loop_obj.close()
        for s in clients + conns:
            s.close()
    assert len(served) == 20
    assert os.devnull not in opened


def test_accepting_pauses_inside_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection accepted into the descriptor reserve is served, then accepting pauses:
    the others stay in the kernel's backlog, and the pause is counted."""
    served: list[int] = []
    conns: list[socket.socket] = []

    def on_accept(conn: socket.socket) -> None:
        served.append(conn.fileno())
        conns.append(conn)

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    # A reserve so large that the next descriptor is inside it.
    monkeypatch.setattr(accept, "FD_RESERVE", soft - probe + 1)
    monkeypatch.setattr(accept.fd_in_reserve, "__defaults__", (soft - probe + 1,))
    monkeypatch.setattr(accept.fds_short, "__defaults__", (soft - probe + 1,))
    metrics = ProxyMetrics()
    clients = [socket.socket() for _ in range(5)]
    loop_obj = AcceptLoop("test", _listener(), on_accept, metrics)
    try:
        asyncio.run(_accept_n(loop_obj, clients, served))
    finally:
        loop_obj.close()
        for s in clients + conns:
            s.close()
    assert len(served) == 1
    assert metrics.accept_paused._value.get() == 1


class _FailingStart(TcpSide):
    """A listener protocol whose `start` fails (e.g. its plan raised): the connection it was
    accepted for must be aborted, not left open with nobody reading it."""

    async def start(self) -> None:
        raise RuntimeError("start failed")


def test_a_connection_whose_start_fails_is_aborted() -> None:
    async def main() -> None:
        listener = TcpListener("test", _listener(), _FailingStart, ProxyMetrics())
        listener.start()
        loop = asyncio.get_running_loop()
        client = socket.socket()
        client.setblocking(False)
        try:
            await loop.sock_connect(client, listener._loop.sock.getsockname())
            # Aborted: the client sees the connection end (RST: ECONNRESET, or EOF), at once;
            # left open it would wait here until the timeout.
            try:
                data = await asyncio.wait_for(loop.sock_recv(client, 10), 5)
            except ConnectionResetError:
                data = b""
            assert data == b""
        finally:
            client.close()
            listener.close()

    asyncio.run(main())
