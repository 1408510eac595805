"""A cancelled `HbonePool.open_stream` leaves no CONNECT open.

waypoint/tcp.py and waypoint/upstream.py bound `open_stream` with `asyncio.timeout(connect
timeout)`. Before the fix the timeout cancelled the stream's response future and nothing else:
the CONNECT stayed in the connection's streams (against its max streams, for good: the late 200
found the future done and nobody to attach or reset it) and node B kept its tunnel, upstream
connect and per-peer slot. Now the stream is reset (RST_STREAM CONNECT_ERROR) as the call ends,
and a late 200 and DATA for it are dropped without a connection error. Reviewer's reproducer
(the backend's accept queue full, so node B's answer is late), no monkeypatch: it runs on the
compiled build too."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest

from meshcore.hbone.aio import HboneProtocol
from tests.helpers import eventually, run
from tests.loopback.harness import SERVER_IP
from tests.loopback.test_outbound_pending_close import _active, _full_backlog
from ztunnel.app import NodeProxy


class Sink:
    write_paused = False

    def __init__(self) -> None:
        self.seen: list[object] = []

    def tunnel_data(self, data: bytes) -> None:
        self.seen.append(data)

    def tunnel_eof(self) -> None:
        self.seen.append("eof")

    def tunnel_reset(self, code: int, remote: bool) -> None:
        self.seen.append(("reset", code))

    def tunnel_pause_source(self) -> None: ...

    def tunnel_resume_source(self) -> None: ...


def _server_streams(proxy: NodeProxy) -> int:
    return sum(len(p.streams) for p in proxy.ctx.hbone_servers)


# HEADERS(:status 200; HPACK static index 8, RFC 7541 Appendix A) then DATA("late"): a late
# answer for a stream we reset, which we must ignore (RFC 9113 §5.1, "closed").
def _late_answer(stream_id: int) -> bytes:
    headers = struct.pack(">I", 1)[1:] + bytes([0x1, 0x4]) + struct.pack(">I", stream_id) + b"\x88"
    data = struct.pack(">I", 4)[1:] + bytes([0x0, 0x0]) + struct.pack(">I", stream_id) + b"late"
    return headers + data


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_timed_out_open_stream_is_reset(tmp_path: Path, loop: str) -> None:
    async def main() -> None:
        # On exit, once the backend accepts again: no stream left on node A, node B's inbound
        # gauge back to 0 (before the fix the timed-out stream stayed open on node A for good).
        async with _full_backlog(tmp_path, warm=True) as (mesh, client):
            pool = mesh.node_a.ctx.pool
            (key,) = pool._conns.keys()
            ((proto,),) = pool._conns.values()
            assert isinstance(proto, HboneProtocol)
            (pending_id,) = proto.streams  # the client's CONNECT, pending too
            before_b = _server_streams(mesh.node_b)  # the client's
            sink = Sink()
            started: list[int] = []
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await pool.open_stream(
                        key,
                        f"{SERVER_IP}:8080",
                        [],
                        sink,
                        on_started=lambda s: started.append(s.stream_id),
                    )
            (ours,) = started
            # Reset at once, long before any answer could come (the backlog is still full).
            assert list(proto.streams) == [pending_id]
            await eventually(
                lambda: _server_streams(mesh.node_b) == before_b, 2, "node B's stream reset"
            )
            # A late 200 and DATA for it: dropped, no connection error, counters unchanged.
            proto.data_received(_late_answer(ours))
            await asyncio.sleep(0.05)
            assert list(proto.streams) == [pending_id]
            assert not proto.closed
            assert not proto.conn.goaway_sent
            assert sink.seen == []
            assert _active(mesh.node_a, "outbound") == 0
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        assert _server_streams(mesh.node_b) == 0
        assert _active(mesh.node_b, "inbound") == 0

    run(main(), 40, loop=loop)
