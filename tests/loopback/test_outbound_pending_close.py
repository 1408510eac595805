"""A local client that is gone before its CONNECT is answered leaves nothing open.

The backend's accept queue is full, so node B's upstream connect waits for a SYN retransmit
(about a second) and the 200 comes late; meanwhile the local client resets its connection. Before
the fix the late 200 attached the stream to the dead connection and counted it opened: node A's
outbound gauge stayed +1, the HBONE stream stayed open on the pooled connection (against its
max streams) and node B's tunnel, upstream and per-peer tunnel count stayed open. Warm: the
CONNECT leaves at once on a pooled connection (no task, `OutboundConnection._answered`); cold: it
waits for the dial (`_hbone_pooled` in a task, the pool's `open_stream` reporting the stream as
soon as it is sent). On both the stream is reset as soon as the client goes, long before the
late answer (while the backlog stays full, no answer comes at all), and the connection is
recorded failed, never opened, with the client named as the cause. Reviewer's reproducer, no
monkeypatch (it runs on the compiled build). The drain's abort is the same loss seen from our
side (asyncio's transport does not notice the client's RST while reading is paused; uvloop's
does).

And the other way round: a peer that resets the stream in the same read as its 200 is the cause
of the failure the record names, not the client."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import cast

import pytest

from meshcore.hbone.aio import HboneProtocol
from tests.helpers import eventually, run
from tests.loopback.harness import CLIENT_IP, SERVER_IP, VIP, Backend, Mesh, running_mesh
from ztunnel.app import NodeProxy

CLIENT_GONE = "client connection closed before the tunnel opened"


def _active(proxy: NodeProxy, direction: str) -> float:
    value: float = proxy.ctx.tracker._active[direction]._value.get()
    return value


def _streams(proxy: NodeProxy) -> int:
    counts = [c["streams"] for c in proxy.ctx.pool.snapshot()]
    assert all(isinstance(n, int) for n in counts)
    return sum(cast(list[int], counts))


def _outbound(proxy: NodeProxy, counter: str) -> float:
    """istio_tcp_connections_{opened,failed} reported by the source (node A's outbound)."""
    metric = getattr(proxy.ctx.tracker.metrics, counter)
    total: float = sum(
        s.value
        for m in metric.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("reporter") == "source"
    )
    return total


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(json.loads(record.getMessage()))


@contextmanager
def _access_log() -> Iterator[list[dict[str, object]]]:
    log = logging.getLogger("ztunnel.access")
    handler, level = _Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@asynccontextmanager
async def _full_backlog(
    tmp_path: Path, warm: bool, node_b: bool = True
) -> AsyncIterator[tuple[Mesh, socket.socket]]:
    """A mesh whose backend stops accepting with its backlog full, and a client whose CONNECT
    is pending on node A (sent, not answered: node B's upstream SYN is dropped). On exit, once
    the backend accepts again: nothing left open on node A (and node B, `node_b`)."""
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
            # Fill the backlog: the next SYN is dropped and retried about 1 s later (and
            # dropped again while nothing accepts).
            filler.bind(("127.0.0.99", 0))
            filler.connect((SERVER_IP, 8080))
            client.bind((CLIENT_IP, 0))
            client.connect((VIP, 80))
            # The CONNECT is pending (cold: once the dial is done; bounded, not a fixed
            # sleep, for a loaded machine).
            await eventually(lambda: _streams(mesh.node_a) == 1, 10, "the CONNECT pending")
            assert _active(mesh.node_a, "outbound") == 0
            yield mesh, client
            acc = lp.create_task(acceptor())
            await asyncio.sleep(1.5)  # an answer the backend's accept brings has come
            await eventually(lambda: _streams(mesh.node_a) == 0, 10, "no stream left")
            assert _active(mesh.node_a, "outbound") == 0
            if node_b:
                await eventually(lambda: _active(mesh.node_b, "inbound") == 0, 10, "B's tunnel")
    finally:
        acc.cancel()
        filler.close()
        client.close()
        ls.close()
        for t in held:
            t.cancel()


@pytest.mark.parametrize("how", ["client-rst", "drain-abort"])
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_client_gone_before_the_200_leaves_nothing_open(
    tmp_path: Path, loop: str, warm: bool, how: str
) -> None:
    async def main() -> None:
        with _access_log() as records:
            async with _full_backlog(tmp_path, warm) as (mesh, client):
                opened = _outbound(mesh.node_a, "opened")
                failed = _outbound(mesh.node_a, "failed")
                if how == "client-rst":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                else:  # as node A's drain cuts the connections it kept (NodeProxy.drain)
                    (transport,) = mesh.node_a.ctx.connections
                    transport.abort()
                seen = how == "drain-abort" or loop == "uvloop"  # the loss (docstring)
                if seen:
                    # Reset at once, on the task path too: no answer can come while the
                    # backlog is full, so before the fix the cold path held the stream (and
                    # node B its tunnel slot and upstream connect) until node B's connect
                    # timed out.
                    await eventually(lambda: _streams(mesh.node_a) == 0, 2, "the CONNECT reset")
                    await eventually(
                        lambda: _outbound(mesh.node_a, "failed") == failed + 1, 2, "failed"
                    )
            if seen:  # else asyncio sees the reset once the 200 resumed reading: opened
                # Recorded failed, never opened (then closed), the client named as the cause
                # (the warm-up connection closed cleanly).
                assert _outbound(mesh.node_a, "failed") == failed + 1
                assert _outbound(mesh.node_a, "opened") == opened
                errs = [r["error"] for r in records if r["direction"] == "outbound" and r["error"]]
                assert errs == [CLIENT_GONE]

    run(main(), 30, loop=loop)


# HEADERS(:status 200, END_HEADERS; HPACK static index 8, RFC 7541 Appendix A: no dynamic
# table entry) then RST_STREAM(CONNECT_ERROR): one read (RFC 9113 §6.2, §6.4).
def _answer_then_reset(stream_id: int) -> bytes:
    headers = struct.pack(">I", 1)[1:] + bytes([0x1, 0x4]) + struct.pack(">I", stream_id)
    reset = struct.pack(">I", 4)[1:] + bytes([0x3, 0x0]) + struct.pack(">I", stream_id)
    return headers + b"\x88" + reset + struct.pack(">I", 0xA)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_peer_reset_read_with_its_200_is_the_recorded_cause(tmp_path: Path, loop: str) -> None:
    async def main() -> None:
        with _access_log() as records:
            # Node B never saw a reset (it is node A's read that says so): its tunnel waits for
            # its upstream, not checked here.
            async with _full_backlog(tmp_path, warm=True, node_b=False) as (mesh, _client):
                (conns,) = mesh.node_a.ctx.pool._conns.values()
                (proto,) = conns
                assert isinstance(proto, HboneProtocol)
                (stream_id,) = proto.streams
                opened = _outbound(mesh.node_a, "opened")
                proto.data_received(_answer_then_reset(stream_id))  # node A's read path
                await eventually(lambda: _streams(mesh.node_a) == 0, 2, "the stream gone")
                await eventually(lambda: any(r["error"] for r in records), 2, "recorded")
                assert _outbound(mesh.node_a, "opened") == opened
            (failed,) = [r for r in records if r["direction"] == "outbound" and r["error"]]
            assert failed["error"] == (
                "HBONE stream or connection reset (code 10) before the tunnel opened"
            ), failed

    run(main(), 30, loop=loop)
