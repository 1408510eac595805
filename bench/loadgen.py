"""Small load generators for the HBONE benchmark, run as separate processes by `hbone_bench.py`.

Owns two clients that print one JSON object on stdout and exit:

- ``fixed HOST PORT --rate R --duration S``: open-loop, fixed-rate HTTP/1.1 GETs of ``/1k`` over a
  pool of keep-alive connections. Requests are sent on a fixed schedule (request i is due at
  t0 + i/R) whatever the responses do; a request never waits for a busy connection (the pool grows),
  so slow responses cannot slow the sender down (no coordinated omission). Latency is timed with
  ``perf_counter_ns`` from the moment the request is written to the moment the last body byte is
  read; the lag between the due time and the write is reported separately (the event loop's timers
  have ~1 ms granularity, so sends may bunch by up to ~1 ms, which raises concurrency slightly but
  does not inflate the latency figure).
- ``bulk HOST PORT --duration S``: one keep-alive connection carrying back-to-back ``GET /bulk``
  (a 256 MiB body), pipelined two deep so the stream never idles; the body is read into a reused
  4 MiB buffer for S seconds, then the connection is closed; reports body bytes and seconds.

Invariant: both only talk to the address given (loopback in the benchmark) and stop by themselves
within their duration plus a small fixed margin.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

REQUEST_1K = b"GET /1k HTTP/1.1\r\nHost: echo\r\nUser-Agent: hbone-bench\r\n\r\n"
REQUEST_BULK = b"GET /bulk HTTP/1.1\r\nHost: echo\r\nUser-Agent: hbone-bench\r\n\r\n"


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


class _HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, on_done: _Done) -> None:
        self._on_done = on_done
        self._buf = bytearray()
        self._need = -1
        self._sent_ns = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> None:
        assert self.transport is not None
        self._sent_ns = time.perf_counter_ns()
        self._buf.clear()
        self._need = -1
        self.transport.write(REQUEST_1K)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._need < 0:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).decode("latin-1").lower()
            ok = head.startswith("http/1.1 200")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip() == "content-length":
                    length = int(value.strip())
            if not ok:
                self.errors += 1
            self._need = end + 4 + length
        if len(self._buf) >= self._need:
            done_ns = time.perf_counter_ns()
            self._need = -1
            self._on_done(self, done_ns - self._sent_ns)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Done:
    def __init__(self, record_after_ns: int) -> None:
        self.latencies: list[int] = []
        self.idle: list[_HttpConn] = []
        self.record_after_ns = record_after_ns
        self.completed = 0

    def __call__(self, conn: _HttpConn, latency_ns: int) -> None:
        self.completed += 1
        if time.perf_counter_ns() >= self.record_after_ns:
            self.latencies.append(latency_ns)
        self.idle.append(conn)


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedLoad:
    """An open-loop load: `rate` requests/s for `duration` s after `warmup` s (not recorded),
    over `conns` keep-alive connections (more are opened when all are busy)."""

    rate: float = 1000.0
    duration: float = 10.0
    warmup: float = 1.0
    conns: int = 8


async def run_fixed(host: str, port: int, load: FixedLoad) -> dict[str, object]:
    rate, duration, warmup, conns = load.rate, load.duration, load.warmup, load.conns
    loop = asyncio.get_running_loop()
    interval_ns = int(1e9 / rate)
    start_ns = time.perf_counter_ns() + 200_000_000
    done = _Done(record_after_ns=start_ns + int(warmup * 1e9))
    end_ns = start_ns + int((warmup + duration) * 1e9)
    pool: list[_HttpConn] = []

    async def open_conn() -> _HttpConn:
        _, proto = await loop.create_connection(lambda: _HttpConn(done), host, port)
        pool.append(proto)
        return proto

    for _ in range(conns):
        done.idle.append(await open_conn())

    lags: list[int] = []
    sent = 0
    grown = 0
    while True:
        due = start_ns + sent * interval_ns
        if due >= end_ns:
            break
        now = time.perf_counter_ns()
        if now < due:
            await asyncio.sleep((due - now) / 1e9)
            continue
        if done.idle:
            conn = done.idle.pop()
        else:
            grown += 1
            conn = await open_conn()
        if due >= done.record_after_ns:
            lags.append(time.perf_counter_ns() - due)
        conn.send()
        sent += 1
    # Let in-flight requests finish (bounded).
    deadline = time.perf_counter_ns() + 2_000_000_000
    while done.completed < sent and time.perf_counter_ns() < deadline:
        await asyncio.sleep(0.005)
    wall = (time.perf_counter_ns() - start_ns) / 1e9
    for c in pool:
        if c.transport is not None:
            c.transport.close()
    lat = sorted(done.latencies)
    lags.sort()
    return {
        "mode": "fixed",
        "target_rate": rate,
        "sent": sent,
        "completed": done.completed,
        "recorded": len(lat),
        "achieved_rate": len(lat) / duration if duration > 0 else 0.0,
        "errors": sum(c.errors for c in pool) + (sent - done.completed),
        "connections": len(pool),
        "pool_grown": grown,
        "wall_s": wall,
        "p50_ms": percentile(lat, 50) / 1e6,
        "p90_ms": percentile(lat, 90) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
        "p999_ms": percentile(lat, 99.9) / 1e6,
        "max_ms": (lat[-1] / 1e6) if lat else float("nan"),
        "send_lag_p50_ms": percentile(lags, 50) / 1e6,
        "send_lag_p99_ms": percentile(lags, 99) / 1e6,
    }


def run_bulk(host: str, port: int, duration: float) -> dict[str, object]:
    """Keep-alive GETs of /bulk, pipelined two deep so the stream never idles between responses."""
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    total = 0  # body bytes received
    responses = 0
    remaining = 0  # body bytes still due for the current response
    head = b""  # partial response head being accumulated
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(REQUEST_BULK * 2)
        t0 = time.perf_counter()
        stop = t0 + duration
        while time.perf_counter() < stop:
            n = sock.recv_into(view)
            if n == 0:
                raise SystemExit("bulk: connection closed by the server")
            pos = 0
            while pos < n:
                if remaining > 0:
                    take = min(remaining, n - pos)
                    remaining -= take
                    total += take
                    pos += take
                    if remaining == 0:
                        responses += 1
                        sock.sendall(REQUEST_BULK)
                    continue
                head += bytes(view[pos:n])
                pos = n
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    continue
                status = head.split(b"\r\n", 1)[0]
                if not status.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"bulk: unexpected status {status!r}")
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head[:end])
                if m is None:
                    raise SystemExit("bulk: response without content-length")
                remaining = int(m.group(1))
                rest = head[end + 4 :]
                head = b""
                take = min(remaining, len(rest))
                remaining -= take
                total += take
                if take < len(rest):  # (a whole small response would not fit here; /bulk is big)
                    head = rest[take:]
                if remaining == 0:
                    responses += 1
                    sock.sendall(REQUEST_BULK)
        seconds = time.perf_counter() - t0
    return {
        "mode": "bulk",
        "bytes": total,
        "seconds": seconds,
        "responses": responses,
        "gbps": total * 8 / seconds / 1e9 if seconds > 0 else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("fixed")
    f.add_argument("host")
    f.add_argument("port", type=int)
    f.add_argument("--rate", type=float, default=1000.0)
    f.add_argument("--duration", type=float, default=10.0)
    f.add_argument("--warmup", type=float, default=1.0)
    f.add_argument("--conns", type=int, default=8)
    b = sub.add_parser("bulk")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.mode == "fixed":
        # No cyclic-GC pauses inside the timed window (the run allocates little, nothing cyclic).
        gc.disable()
        load = FixedLoad(
            rate=args.rate, duration=args.duration, warmup=args.warmup, conns=args.conns
        )
        coro = run_fixed(args.host, args.port, load)
        try:
            import uvloop

            result = uvloop.run(coro)
        except ImportError:
            result = asyncio.run(coro)
    else:
        result = run_bulk(args.host, args.port, args.duration)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
