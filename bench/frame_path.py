"""CPU of the HBONE edge's Python steps per DATA frame, without sockets (issue 14,
bench/README.md "Session 7: DATA-frame path").

Owns two timings, each the best of `--repeat` runs of `--frames` frames, in CPU nanoseconds per
frame:
- **receive**: one read holding one DATA frame of `--size` octets fed to
  `HboneProtocol.buffer_updated` (a view of the shared read buffer, as uvloop's TLS layer hands
  it over): frame parse, flow-control accounting, the event, the sink's `tunnel_data`, the
  credit and the flush;
- **receive_many**: the same with one DATA frame for each of `--streams` streams in every read
  (as `wrk -c32` keep-alive traffic arrives: several streams' frames per TLS read), per frame;
- **send**: one read of `--size` octets from a local socket, as `ztunnel.proxy.relay.TcpSide`
  hands it to `HboneStream.write_in_place` (room for the frame header in front), then the
  coalesced flush (`HboneProtocol.flush`) into the transport.
The loop, the transports and the sink are builtins that only keep what they are given
(`_Stubs`), so what is timed is our code and the Python objects it makes, not TLS, the kernel or
uvloop. Windows are credited back between frames as a peer would, so no frame waits for one.
Time is the thread's CPU time (`time.thread_time_ns`): on a loaded machine the wall clock also
counts the waits for a core.

Run it against each source tree through `PYTHONPATH` (a `git archive` of main with its compiled
build copied in, as the A/B sections of bench/README.md describe), interleaved:

    PYTHONPATH=/tmp/ab-main .venv/bin/python -m bench.frame_path
    .venv/bin/python -m bench.frame_path
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from types import SimpleNamespace
from typing import cast

import meshcore.hbone.aio as aio
from meshcore.hbone.aio import HboneProtocol, HboneSettings, HboneStream, TunnelSink
from meshcore.hbone.connection import HboneConnection
from meshcore.hbone.frames import FRAME_HEADER, FrameType, encode_window_update, frame_header
from meshcore.hbone.streams import Role


class _Stubs:
    """The loop, transport and sink of one edge as builtins (no interpreted frame is timed):
    `call_soon`, `write`, `writelines` and `tunnel_data` append to a `deque(maxlen=0)` (what
    they are given is dropped at once, as a real transport's write of a small chunk), `time` is
    `time.monotonic`, the transport never closes (`is_closing` is `bool`: False), the sink never
    pauses."""

    def __init__(self) -> None:
        drop: deque[object] = deque(maxlen=0)
        self.loop = SimpleNamespace(call_soon=drop.append, time=time.monotonic)
        self.transport = SimpleNamespace(write=drop.append, writelines=drop.extend, is_closing=bool)
        self.sink = SimpleNamespace(
            tunnel_data=drop.append,
            tunnel_eof=bool,
            tunnel_reset=bool,
            tunnel_pause_source=bool,
            tunnel_resume_source=bool,
            write_paused=False,
        )


def _pump(a: HboneConnection, b: HboneConnection) -> None:
    for _ in range(20):
        ab, ba = a.data_to_send(), b.data_to_send()
        if ab:
            b.receive_data(ab)
        if ba:
            a.receive_data(ba)
        if not ab and not ba:
            return


def _edge(streams: int = 1) -> tuple[HboneProtocol, list[int], _Stubs]:
    """A client edge with `streams` open streams, each with a sink, over stub I/O."""
    proto = HboneProtocol(Role.CLIENT, HboneSettings(trust_domain="cluster.local"))
    peer = HboneConnection(Role.SERVER)
    proto.conn.initiate(0.0)
    peer.initiate()
    _pump(proto.conn, peer)
    stubs = _Stubs()
    ids = []
    for i in range(streams):
        stream_id = proto.conn.open_connect(f"10.0.0.{i + 1}:80")
        _pump(proto.conn, peer)
        peer.respond(stream_id, 200)
        _pump(proto.conn, peer)
        stream = HboneStream(proto, stream_id)
        proto.streams[stream_id] = stream
        stream.attach(cast(TunnelSink, stubs.sink))
        ids.append(stream_id)
    proto._loop = cast(asyncio.AbstractEventLoop, stubs.loop)
    proto.transport = cast(asyncio.Transport, stubs.transport)
    return proto, ids, stubs


def time_receive(frames: int, size: int, streams: int = 1) -> float:
    """CPU ns per DATA frame of reads holding one frame for each of `streams` streams."""
    proto, ids, _ = _edge(streams)
    read = b"".join(frame_header(size, FrameType.DATA, 0, sid) + bytes(size) for sid in ids)
    view = HboneProtocol._read_view
    view[: len(read)] = read
    n = len(read)
    reads = max(1, frames // streams)
    start = time.thread_time_ns()
    for _ in range(reads):
        proto.buffer_updated(n)
    return (time.thread_time_ns() - start) / (reads * streams)


def time_send(frames: int, size: int) -> float:
    proto, (stream_id,), _ = _edge()
    stream = proto.streams[stream_id]
    buffer = memoryview(bytearray(FRAME_HEADER + size))
    credit = encode_window_update(0, 1 << 20) + encode_window_update(stream_id, 1 << 20)
    batch = max(1, (1 << 20) // max(size, 1))
    start = time.thread_time_ns()
    for i in range(frames):
        stream.write_in_place(buffer)
        proto.flush()  # the coalesced flush the loop runs after this iteration's reads
        if i % batch == batch - 1:
            proto.conn.receive_data(credit)  # the peer's WINDOW_UPDATEs
    return (time.thread_time_ns() - start) / frames


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--size", type=int, default=1100, help="DATA payload octets per frame")
    ap.add_argument(
        "--streams", type=int, default=32, help="streams with a frame in each read (receive_many)"
    )
    args = ap.parse_args(argv)

    async def run() -> dict[str, float]:
        rx = min(time_receive(args.frames, args.size) for _ in range(args.repeat))
        many = min(time_receive(args.frames, args.size, args.streams) for _ in range(args.repeat))
        tx = min(time_send(args.frames, args.size) for _ in range(args.repeat))
        return {
            "receive_ns": round(rx, 1),
            "receive_many_ns": round(many, 1),
            "send_ns": round(tx, 1),
        }

    result = asyncio.run(run())
    result["compiled"] = float(aio.__file__.endswith(".so"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
