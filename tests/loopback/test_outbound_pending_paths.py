"""The pending CONNECT's less common paths (see test_outbound_pending_close for the setting: the
backend's accept queue full, so node B's answer is late).

- The client goes during the dial, before its CONNECT is sent: the pool's `on_started`
  (`OutboundConnection._started`) resets the stream as it is sent, recorded failed with the
  client named as the cause.
- The first CONNECT is refused unprocessed (REFUSED_STREAM) and retried by the pool: the retried
  stream (not the refused id) is the one reset at once when the client goes.
- The client goes in the same loop iteration as a REFUSED_STREAM on the taskless path: no retry,
  and the record names the client, not the refusal.
- The client goes during the on-demand lookup: no dial nor CONNECT made for it at all.

The first two patch the pool's and the protocol's classes, which a compiled class does not
allow: with the compiled build they run in a pure-Python subprocess (`in_pure_python`), so they
run (not skip) on every build. Reviewer's reproducers; each fails with its path's code removed."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshcore import native
from meshcore.hbone import pool as poolmod
from meshcore.hbone.aio import HboneProtocol, HboneStream, PoolKey, TunnelSink
from meshcore.hbone.events import StreamReset
from meshcore.hbone.frames import ErrorCode
from tests.helpers import eventually, run
from tests.loopback.harness import CLIENT_IP, VIP, Backend, running_mesh
from tests.loopback.test_outbound_pending_close import (
    CLIENT_GONE,
    _access_log,
    _full_backlog,
    _outbound,
    _streams,
)
from ztunnel.proxy.context import ProxyContext


def in_pure_python(request: pytest.FixtureRequest) -> bool:
    """With the compiled build selected: run this test in a pure-Python subprocess (it patches
    classes), assert it passed, and return True (the caller returns); else False."""
    if native.select() != "compiled":
        return False
    env = {**os.environ, native.PURE_ENV: "1"}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid]
    done = subprocess.run(
        argv, env=env, cwd=native.ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout, done.stdout[-2000:]
    return True


def _rst(client: socket.socket) -> None:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def test_client_gone_during_the_dial_is_reset_as_its_connect_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if in_pure_python(request):
        return
    gate = asyncio.Event()
    sent: list[int] = []
    orig_start = HboneProtocol.start_stream
    orig_connection = poolmod.HbonePool._connection

    def counting_start(
        self: HboneProtocol, authority: str, headers: Sequence[tuple[str, str]], sink: TunnelSink
    ) -> HboneStream:
        stream = orig_start(self, authority, headers, sink)
        sent.append(stream.stream_id)
        return stream

    async def gated_connection(self: poolmod.HbonePool, key: PoolKey) -> object:
        await gate.wait()  # the dial (or the wait for a connection) held
        return await orig_connection(self, key)

    monkeypatch.setattr(HboneProtocol, "start_stream", counting_start)

    async def main() -> None:
        gate.set()
        with _access_log() as records:
            async with _full_backlog(tmp_path, warm=False) as (mesh, client):
                # The first client's CONNECT is pending. A second client takes the task path
                # (no pooled stream started at once) and waits on the held connection.
                gate.clear()
                pool_cls = type(mesh.node_a.ctx.pool)
                monkeypatch.setattr(pool_cls, "start_stream", lambda *a, **k: None)
                monkeypatch.setattr(pool_cls, "_connection", gated_connection)
                failed = _outbound(mesh.node_a, "failed")
                opened = _outbound(mesh.node_a, "opened")
                c2 = socket.socket()
                c2.bind((CLIENT_IP, 0))
                c2.setblocking(False)
                await asyncio.get_running_loop().sock_connect(c2, (VIP, 80))
                await asyncio.sleep(0.3)
                n_sent = len(sent)
                _rst(c2)
                await asyncio.sleep(0.3)  # node A has seen the client go
                gate.set()  # the CONNECT is sent after the client went ...
                await eventually(lambda: len(sent) == n_sent + 1, 5, "CONNECT sent after dial")
                # ... and reset at once (else it waits, like the first, for node B's answer)
                await eventually(lambda: _streams(mesh.node_a) == 1, 2, "second reset at once")
                await eventually(
                    lambda: _outbound(mesh.node_a, "failed") == failed + 1, 2, "recorded failed"
                )
                assert _outbound(mesh.node_a, "opened") == opened
                _rst(client)
            errs = [r["error"] for r in records if r["direction"] == "outbound" and r["error"]]
            assert CLIENT_GONE in errs, errs

    run(main(), 40, loop="uvloop")


def test_retried_stream_is_the_one_reset_when_the_client_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if in_pure_python(request):
        return
    orig_start = HboneProtocol.start_stream
    orig_reset = HboneStream.reset
    started: list[int] = []
    resets: list[int] = []

    def spy_reset(self: HboneStream, code: int = ErrorCode.CONNECT_ERROR) -> None:
        if not self.closed:  # a reset that sends RST_STREAM (else a no-op)
            resets.append(self.stream_id)
        orig_reset(self, code)

    def refusing_start(
        self: HboneProtocol, authority: str, headers: Sequence[tuple[str, str]], sink: TunnelSink
    ) -> HboneStream:
        stream = orig_start(self, authority, headers, sink)
        started.append(stream.stream_id)
        if len(started) == 1:  # the first CONNECT: refused unprocessed (RFC 9113 §8.7)

            def refuse() -> None:
                self.conn.reset_stream(stream.stream_id, ErrorCode.REFUSED_STREAM)
                self._on_reset(StreamReset(stream.stream_id, ErrorCode.REFUSED_STREAM, False))

            asyncio.get_running_loop().call_soon(refuse)
        return stream

    monkeypatch.setattr(HboneProtocol, "start_stream", refusing_start)
    monkeypatch.setattr(HboneStream, "reset", spy_reset)

    async def main() -> None:
        with _access_log() as records:
            async with _full_backlog(tmp_path, warm=False) as (mesh, client):
                await eventually(lambda: len(started) == 2, 5, "retried")
                failed = _outbound(mesh.node_a, "failed")
                opened = _outbound(mesh.node_a, "opened")
                before = len(resets)
                _rst(client)
                await eventually(lambda: _streams(mesh.node_a) == 0, 2, "reset at once")
                await eventually(
                    lambda: _outbound(mesh.node_a, "failed") == failed + 1, 2, "recorded failed"
                )
                assert _outbound(mesh.node_a, "opened") == opened
                assert resets[before:] == [started[1]], (resets, started)
            errs = [r["error"] for r in records if r["direction"] == "outbound" and r["error"]]
            assert errs == [CLIENT_GONE], errs

    run(main(), 40, loop="uvloop")


def _refused(stream_id: int) -> bytes:
    """RST_STREAM(REFUSED_STREAM) (RFC 9113 §6.4)."""
    code = struct.pack(">I", ErrorCode.REFUSED_STREAM)
    return struct.pack(">I", 4)[1:] + bytes([0x3, 0x0]) + struct.pack(">I", stream_id) + code


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_client_gone_with_a_refusal_is_recorded_as_the_client_gone(
    tmp_path: Path, loop: str
) -> None:
    async def main() -> None:
        with _access_log() as records:
            # The refusal is node A's read only: node B's tunnel waits for its upstream (not
            # checked here).
            async with _full_backlog(tmp_path, warm=True, node_b=False) as (mesh, _client):
                ((proto,),) = mesh.node_a.ctx.pool._conns.values()
                assert isinstance(proto, HboneProtocol)
                (stream_id,) = proto.streams
                retried = mesh.node_a.ctx.pool.streams_retried
                failed = _outbound(mesh.node_a, "failed")
                (transport,) = mesh.node_a.ctx.connections
                transport.abort()  # the client's loss, seen on the next loop iteration ...
                proto.data_received(_refused(stream_id))  # ... with the refusal (node A's read)
                await eventually(
                    lambda: _outbound(mesh.node_a, "failed") == failed + 1, 2, "recorded failed"
                )
                assert mesh.node_a.ctx.pool.streams_retried == retried  # no one to retry for
                assert _streams(mesh.node_a) == 0
            errs = [r["error"] for r in records if r["direction"] == "outbound" and r["error"]]
            assert errs == [CLIENT_GONE], errs

    run(main(), 30, loop=loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_client_gone_during_the_on_demand_lookup_sends_nothing(
    tmp_path: Path, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup answered after the client went: recorded failed (the client named), and no
    dial nor CONNECT made for it (before, one was sent, then reset). `ProxyContext` is not a
    compiled class: this runs on both builds."""
    gate = asyncio.Event()
    asked: list[str] = []

    async def held_lookup(self: ProxyContext, ip: str) -> bool:
        asked.append(ip)
        await gate.wait()
        return True

    monkeypatch.setattr(ProxyContext, "ensure_address", held_lookup)

    async def demand(_name: str, _timeout: float) -> bool:
        return True

    async def main() -> None:
        with _access_log() as records:
            async with running_mesh(tmp_path, backend=Backend()) as mesh:
                ctx = mesh.node_a.ctx
                ctx.demand = demand  # on-demand xDS: `start` waits for the lookup
                failed = _outbound(mesh.node_a, "failed")
                client = socket.socket()
                client.bind((CLIENT_IP, 0))
                client.setblocking(False)
                await asyncio.get_running_loop().sock_connect(client, (VIP, 80))
                await eventually(lambda: asked == [VIP], 5, "the lookup asked")
                if loop == "uvloop":
                    _rst(client)
                else:  # asyncio's transport does not see the RST while reading is paused
                    (transport,) = ctx.connections
                    transport.abort()  # as node A's drain cuts it
                await eventually(lambda: not ctx.connections, 2, "node A saw the client go")
                gate.set()
                await eventually(
                    lambda: _outbound(mesh.node_a, "failed") == failed + 1, 2, "recorded failed"
                )
                await asyncio.sleep(0.2)
                assert ctx.pool.connections_opened == 0  # no dial, no CONNECT
                assert ctx.pool.snapshot() == []
                client.close()
            errs = [r["error"] for r in records if r["direction"] == "outbound" and r["error"]]
            assert errs == [CLIENT_GONE], errs

    run(main(), 30, loop=loop)
