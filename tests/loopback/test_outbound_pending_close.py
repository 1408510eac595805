"""A local client that is gone before its CONNECT is answered leaves nothing open.

The backend's accept queue is full, so node B's upstream connect waits for a SYN retransmit
(about a second) and the 200 comes late; meanwhile the local client resets its connection. Before
the fix the late 200 attached the stream to the dead connection and counted it opened: node A's
outbound gauge stayed +1, the HBONE stream stayed open on the pooled connection (against its
max streams) and node B's tunnel, upstream and per-peer tunnel count stayed open. Warm: the
CONNECT leaves at once on a pooled connection (no task, `OutboundConnection._answered`); cold: it
waits for the dial (`_hbone_pooled` in a task). Reviewer's reproducer, no monkeypatch (it runs on
the compiled build). The drain's abort is the same loss seen from our side (asyncio's transport
does not notice the client's RST while reading is paused; uvloop's does)."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import cast

import pytest

from tests.helpers import eventually, run
from tests.loopback.harness import CLIENT_IP, SERVER_IP, VIP, Backend, running_mesh
from ztunnel.app import NodeProxy


def _active(proxy: NodeProxy, direction: str) -> float:
    value: float = proxy.ctx.tracker._active[direction]._value.get()
    return value


def _streams(proxy: NodeProxy) -> int:
    counts = [c["streams"] for c in proxy.ctx.pool.snapshot()]
    assert all(isinstance(n, int) for n in counts)
    return sum(cast(list[int], counts))


@pytest.mark.parametrize("how", ["client-rst", "drain-abort"])
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_client_gone_before_the_200_leaves_nothing_open(
    tmp_path: Path, loop: str, warm: bool, how: str
) -> None:
    async def main() -> None:
        lp = asyncio.get_running_loop()
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((SERVER_IP, 8080))
        ls.listen(0)
        ls.setblocking(False)
        held: list[asyncio.Task[None]] = []

        async def serve(c: socket.socket) -> None:
            try:
                while data := await lp.sock_recv(c, 65536):
                    await lp.sock_sendall(c, data)
            except OSError:
                pass
            c.close()

        async def acceptor() -> None:
            while True:
                c, _ = await lp.sock_accept(ls)
                c.setblocking(False)
                held.append(lp.create_task(serve(c)))

        acc = lp.create_task(acceptor())
        filler = socket.socket()
        client = socket.socket()
        try:
            async with running_mesh(tmp_path, backend=Backend()) as mesh:
                if warm:
                    r, w = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
                    w.write(b"x")
                    assert await r.readexactly(1) == b"x"
                    w.close()
                    await asyncio.sleep(0.3)
                    assert _streams(mesh.node_a) == 0
                acc.cancel()
                # Fill the backlog: the next SYN is dropped and retried about 1 s later.
                filler.bind(("127.0.0.99", 0))
                filler.connect((SERVER_IP, 8080))
                client.bind((CLIENT_IP, 0))
                client.connect((VIP, 80))
                # The CONNECT is pending (cold: once the dial is done; bounded, not a fixed
                # sleep, for a loaded machine; the backlog stays full until the acceptor runs).
                await eventually(lambda: _streams(mesh.node_a) == 1, 10, "the CONNECT pending")
                assert _active(mesh.node_a, "outbound") == 0
                if how == "client-rst":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                else:  # as node A's drain cuts the connections it kept (NodeProxy.drain)
                    (transport,) = mesh.node_a.ctx.connections
                    transport.abort()
                await asyncio.sleep(0.1)
                acc = lp.create_task(acceptor())
                await asyncio.sleep(3.0)  # the late 200 (or node B's reset) has come
                await eventually(lambda: _streams(mesh.node_a) == 0, 10, "no stream left")
                assert _active(mesh.node_a, "outbound") == 0
                await eventually(lambda: _active(mesh.node_b, "inbound") == 0, 10, "B's tunnel")
        finally:
            acc.cancel()
            filler.close()
            client.close()
            ls.close()
            for t in held:
                t.cancel()

    run(main(), 30, loop=loop)
