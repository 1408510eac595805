"""The inbound CONNECT without a task per stream (`ztunnel.proxy.inbound.InboundTunnel`, issue 14).

An HBONE listener runs in this process (real TLS, real sockets, on both event loops), so the
test reads what a stream holds while it waits: its connect slots (`ConnectSlots`), the peer's
tunnel count (`PeerTable`), the connecting sockets (this process's descriptors). A hostile peer
opens streams toward an upstream whose connects hang (a full accept queue drops the SYNs), so
some streams sit in connect(2) and the rest wait for a slot; then it resets them all, or drops
the connection. Nothing may stay behind, and the next tunnel must be served.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import selectors
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from meshcore import sockets
from meshcore.ca import MeshCA
from meshcore.certs import CertificateManager, LocalCAProvider, WorkloadCertificate
from meshcore.hbone.pool import HbonePool
from meshcore.identity import SpiffeId
from meshcore.proto.yamlform import parse_mesh_config
from meshcore.sockets import make_listener
from meshcore.state import MeshState
from tests.helpers import echo_mesh_config, eventually, loopback_block, run
from tests.loopback.robustness import Raw, connect_block, headers_frame, rst
from ztunnel.metrics import ConnectionTracker, ProxyMetrics
from ztunnel.proxy.context import ProxyContext, ProxySettings
from ztunnel.proxy.inbound import HboneListener

BLOCK = loopback_block()
SERVER, CLIENT, PEER = BLOCK.ip(10), BLOCK.ip(20), BLOCK.ip(30)
PORT = 8080
AUTHORITY = f"{SERVER}:{PORT}"
SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
PROCESS_SLOTS = 2  # upstream connects in flight in the "process"
STREAMS = 20  # per attack: PROCESS_SLOTS in connect(2), the rest waiting for a slot

LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])


def _mesh() -> MeshState:
    config = echo_mesh_config([CLIENT, PEER], SERVER, BLOCK.ip(40))
    return MeshState.from_config(parse_mesh_config(config))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def hanging_upstream() -> Iterator[None]:
    """SERVER:PORT listening with a full accept queue: further connects stay in progress."""
    lsn = socket.socket()
    fillers: list[socket.socket] = []
    try:
        lsn.bind((SERVER, PORT))
        lsn.listen(0)
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            fillers.append(s)
            assert len(fillers) < 16, "the accept queue never filled"
            if s.connect_ex((SERVER, PORT)) == errno.EINPROGRESS:
                try:
                    s.getpeername()
                except OSError:
                    break  # this SYN was dropped: the queue is full
        yield
    finally:
        for s in fillers:
            s.close()
        lsn.close()


async def _node(ca: MeshCA, connect_timeout: float = 30.0) -> tuple[ProxyContext, HboneListener]:
    metrics = ProxyMetrics()
    settings = ProxySettings(
        node="node-b",
        node_ip=SERVER,
        max_pending_connects=PROCESS_SLOTS,
        connect_timeout=connect_timeout,
    )
    ctx = ProxyContext(
        settings=settings,
        state=_mesh(),
        certs=CertificateManager(LocalCAProvider(ca)),
        metrics=metrics,
        tracker=ConnectionTracker(metrics),
        pool=HbonePool(None, trust_domain="cluster.local"),  # type: ignore[arg-type]
    )
    listener = HboneListener(ctx, make_listener(SERVER, 15008))
    listener.start()
    return ctx, listener


async def _echo_upstream() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
        writer.close()

    return await asyncio.start_server(echo, SERVER, PORT)


async def _served(cert: WorkloadCertificate) -> None:
    """A new connection from the same peer gets a tunnel: 200 and the bytes echoed."""
    raw = await Raw.open_to((SERVER, 15008), cert, source=PEER)
    try:
        await raw.send(headers_frame(1, connect_block(AUTHORITY)))
        await eventually(lambda: raw.seen.statuses.get(1), what="an answer to the CONNECT")
        assert raw.seen.statuses[1] == "200"
    finally:
        raw.abort()


def _assert_no_connect_left(loop: asyncio.AbstractEventLoop) -> None:
    """The connects the streams started are forgotten: none left in the loop's connect
    deadline sweep (`meshcore.sockets`), and (asyncio's loop, which can be asked) no writer
    callback left registered for a connecting socket."""
    timers = sockets._timers.get(id(loop))
    assert timers is None or len(timers.sweep) == 0
    selector = getattr(loop, "_selector", None)
    if selector is not None:
        writers = [k for k in selector.get_map().values() if k.events & selectors.EVENT_WRITE]
        assert writers == []


async def _attack(how: str) -> None:
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    loop.set_exception_handler(lambda _, c: errors.append(str(c.get("exception") or c)))
    ca = MeshCA.create_root(trust_domain="cluster.local")
    cert = await LocalCAProvider(ca).fetch(SLEEP)
    ctx, listener = await _node(ca)
    try:
        with hanging_upstream():
            raw = await Raw.open_to((SERVER, 15008), cert, source=PEER)
            await raw.send(b"")
            await asyncio.sleep(0.2)  # the handshake's descriptors settle
            base = _fds()
            sids = range(1, 2 * STREAMS, 2)
            await raw.send(b"".join(headers_frame(s, connect_block(AUTHORITY)) for s in sids))
            slots = ctx.upstream_slots
            await eventually(lambda: slots.waiting == STREAMS - PROCESS_SLOTS, what="queued")
            assert slots.held == PROCESS_SLOTS
            assert listener.peers.tunnels(PEER) == STREAMS
            assert _fds() == base + PROCESS_SLOTS  # the sockets in connect(2)
            assert not raw.seen.statuses  # nothing answered: all still connecting or waiting
            # The queued ones go first: their places in the queue must go with them.
            await raw.send(b"".join(rst(s) for s in sids[PROCESS_SLOTS:]))
            await eventually(lambda: slots.waiting == 0, what="queue emptied")
            assert slots.held == PROCESS_SLOTS
            await eventually(lambda: listener.peers.tunnels(PEER) == PROCESS_SLOTS)
            assert _fds() == base + PROCESS_SLOTS
            # Then the ones in connect(2).
            if how == "reset":
                await raw.send(b"".join(rst(s) for s in sids[:PROCESS_SLOTS]))
            else:
                raw.abort()
            await eventually(lambda: slots.held == 0 and slots.waiting == 0, what="slots freed")
            await eventually(lambda: listener.peers.tunnels(PEER) == 0, what="tunnels closed")
            await eventually(lambda: _fds() <= base, what="connecting sockets closed")
            _assert_no_connect_left(loop)
            assert not raw.seen.statuses  # a reset stream is never answered
            if how == "reset":
                raw.abort()
        server = await _echo_upstream()
        try:
            await _served(cert)
        finally:
            server.close()
        assert errors == []
    finally:
        listener.close()


@LOOPS
@pytest.mark.parametrize("how", ["reset", "connection lost"])
def test_streams_gone_while_connecting_or_queued_leave_nothing(loop: str, how: str) -> None:
    run(_attack(how), 30, loop=loop)


async def _refused_when_connect_fails() -> None:
    """No listener upstream: connect(2) fails at once; 503, slots and tunnel count returned."""
    ca = MeshCA.create_root(trust_domain="cluster.local")
    cert = await LocalCAProvider(ca).fetch(SLEEP)
    ctx, listener = await _node(ca)
    try:
        raw = await Raw.open_to((SERVER, 15008), cert, source=PEER)
        sids = range(1, 2 * STREAMS, 2)
        await raw.send(b"".join(headers_frame(s, connect_block(AUTHORITY)) for s in sids))
        await eventually(lambda: len(raw.seen.statuses) == STREAMS, what="every stream answered")
        assert set(raw.seen.statuses.values()) == {"503"}
        assert ctx.upstream_slots.held == 0
        assert ctx.upstream_slots.waiting == 0
        assert listener.peers.tunnels(PEER) == 0
        raw.abort()
    finally:
        listener.close()


@LOOPS
def test_a_failed_connect_answers_503_and_returns_its_slots(loop: str) -> None:
    run(_refused_when_connect_fails(), 30, loop=loop)


async def _timed_out() -> float:
    """Connects that hang past the connect timeout: 503 (the loop's shared connect deadline,
    `meshcore.sockets.PendingConnect`), then the queued ones get their turn and time out too."""
    ca = MeshCA.create_root(trust_domain="cluster.local")
    cert = await LocalCAProvider(ca).fetch(SLEEP)
    ctx, listener = await _node(ca, connect_timeout=0.3)
    try:
        with hanging_upstream():
            raw = await Raw.open_to((SERVER, 15008), cert, source=PEER)
            start = asyncio.get_running_loop().time()
            sids = range(1, 2 * 4, 2)  # 4 streams: 2 connect, 2 wait, then connect
            await raw.send(b"".join(headers_frame(s, connect_block(AUTHORITY)) for s in sids))
            await eventually(lambda: len(raw.seen.statuses) == 4, what="every stream answered")
            took = asyncio.get_running_loop().time() - start
            assert set(raw.seen.statuses.values()) == {"503"}
            assert ctx.upstream_slots.held == 0
            assert listener.peers.tunnels(PEER) == 0
            raw.abort()
        return took
    finally:
        listener.close()


@LOOPS
def test_a_hanging_connect_times_out_with_503(loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """The access log says why: "timeout" (a TimeoutError's str() is empty, and an exception
    object is truthy, so `err or 'timeout'` logged "upstream ...: " with no reason)."""
    with caplog.at_level(logging.INFO, logger="ztunnel.access"):
        took = run(_timed_out(), 30, loop=loop)
    # Two rounds of 0.3 s (+ the sweep's 50 ms granularity); the upper bound only catches a
    # connect that never timed out (the machine may be loaded).
    assert 0.6 <= took < 10.0, took
    errors = [json.loads(r.getMessage())["error"] for r in caplog.records]
    assert errors == [f"upstream {AUTHORITY}: timeout"] * 4


async def _reset_while_wrapping(logged: list[logging.LogRecord]) -> None:
    """The stream is reset after its connect completed, while the loop makes the upstream's
    transport (`InboundTunnel._wrap`): the transport, once made, is closed unanswered and
    the peer's tunnel count returned (not a 200 on a reset stream, an upstream kept open)."""
    loop = asyncio.get_running_loop()
    ca = MeshCA.create_root(trust_domain="cluster.local")
    cert = await LocalCAProvider(ca).fetch(SLEEP)
    ctx, listener = await _node(ca)
    server = await _echo_upstream()
    raw = await Raw.open_to((SERVER, 15008), cert, source=PEER)
    made = loop.create_connection
    wrapping = asyncio.Event()

    async def slow_create_connection(*args: Any, **kwargs: Any) -> Any:
        wrapping.set()
        await raw.send(rst(1))  # the reset arrives while the transport is being made
        await asyncio.sleep(0.1)
        return await made(*args, **kwargs)

    loop.create_connection = slow_create_connection  # type: ignore[method-assign]
    try:
        await raw.send(headers_frame(1, connect_block(AUTHORITY)))
        await asyncio.wait_for(wrapping.wait(), 5)
        await asyncio.sleep(0.3)
        await eventually(lambda: listener.peers.tunnels(PEER) == 0, what="tunnel count returned")
        assert ctx.upstream_slots.held == 0
        assert not raw.seen.statuses  # a reset stream is never answered
        assert not logged  # never opened: no access-log line, not in the gauge
        assert ctx.metrics.active.labels("inbound")._value.get() == 0
        loop.create_connection = made  # type: ignore[method-assign]
        await _served(cert)
    finally:
        loop.create_connection = made  # type: ignore[method-assign]
        raw.abort()
        server.close()
        listener.close()


def test_a_stream_reset_while_its_transport_is_made_is_not_opened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio's loop only: its `create_connection` can be replaced on the instance."""
    with caplog.at_level(logging.INFO, logger="ztunnel.access"):
        run(_reset_while_wrapping(caplog.records), 30, loop="asyncio")


async def _step_raises() -> None:
    ca = MeshCA.create_root(trust_domain="cluster.local")
    cert = await LocalCAProvider(ca).fetch(SLEEP)
    ctx, listener = await _node(ca)
    upstream = await _echo_upstream()
    try:
        raw = await Raw.open_to((SERVER, 15008), cert, source=PEER)
        await raw.send(headers_frame(1, connect_block(AUTHORITY)))
        await eventually(lambda: raw.seen.statuses.get(1), what="an answer to the CONNECT")
        assert raw.seen.statuses[1] == "503"
        assert listener.peers.tunnels(PEER) == 0
        assert ctx.upstream_slots.held == 0
        raw.abort()
    finally:
        upstream.close()
        listener.close()


@LOOPS
def test_a_step_that_raises_answers_503_and_leaves_nothing(
    loop: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A step raising what no step expects (a bug; here the source binding after the peer's
    tunnel was counted) is one log line and a 503, the tunnel count and slots returned: not
    asyncio's "Exception in callback" traceback with the stream left unanswered (fails without
    `InboundTunnel._step`'s guard: no answer, the peer's tunnel still counted)."""

    def boom(self: ProxyContext, src_ip: str) -> tuple[str | None, bool]:
        raise RuntimeError("boom")

    monkeypatch.setattr(ProxyContext, "source_binding", boom)
    with caplog.at_level(logging.ERROR):
        run(_step_raises(), 30, loop=loop)
    messages = [r.getMessage() for r in caplog.records]
    assert any("internal error: RuntimeError('boom')" in m for m in messages), messages
    assert not any("Exception in callback" in m for m in messages), messages
