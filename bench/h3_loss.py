"""16 tunnels sharing one node-to-node connection under packet loss: HBONE over HTTP/2 vs HTTP/3.

Run as root (it makes its own network namespace and nftables rules):

    unshare -n .venv/bin/python bench/h3_loss.py [--loss 1] [--tunnels 16] [--mib 2] [--reps 3]

Method: the in-process two-node mesh of tests/loopback/harness.py (both node proxies, client and
backend in one event loop, real sockets on 127.0.0.0/8), one pooled HBONE connection carrying
`--tunnels` concurrent TCP tunnels, each downloading `--mib` MiB from the backend (hash-checked).
Loss is kernel-level: an nftables rule drops `--loss` percent of the packets to or from port
15008 (TCP and UDP alike, both directions of the node-to-node leg only) with `numgen random`.
The kernel has no sch_netem (`tc qdisc add ... netem` fails: "Specified qdisc kind is unknown"),
so there is no added delay or reordering: loopback RTT stays ~0.1 ms unless `--rate-mbit` puts
a token-bucket bottleneck (tbf, 20 ms queue) on lo, whose queue then sets the RTT (every
loopback leg - client, tunnel, backend - shares it). Reported per transport and
loss rate: aggregate goodput, and the worst "stall" of a tunnel (longest gap between two reads
on the client) - head-of-line blocking shows as stalls shared by all tunnels at once.

`--mode hol` measures where head-of-line blocking shows, per message rather than in aggregate:
tunnel A downloads `--mib` x 8 MiB (bulk) while the other `--tunnels` - 1 tunnels of the SAME
connection each send 64-byte messages one at a time and wait for the echo; reported are the
p50 / p99 / max round-trip times of those small messages (and the count above 50 ms). Over
HTTP/2, a lost segment of A's data holds every later byte of the TCP stream, B's included, until
it is repaired; over HTTP/3 only the stream whose packet was lost waits.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.loopback.harness import (
    CLIENT_IP,
    VIP,
    payload_for,
    running_mesh,
    start_backend,
    stream_exchange,
)

MSG = 64


async def _backend_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """seed+size header; size 0 = echo 64-byte messages until EOF, else send the payload."""
    head = await reader.readexactly(8)
    seed, size = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
    if size:
        await stream_exchange(reader, writer, payload_for(seed, size))
    else:
        while msg := await reader.read(MSG):
            writer.write(msg)
            await writer.drain()
    writer.close()


async def pinger(stop: asyncio.Event) -> list[float]:
    """One tunnel sending 64-byte messages one at a time; the round-trip time of each."""
    reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
    writer.write((0).to_bytes(8, "big"))
    rtts = []
    while not stop.is_set():
        start = time.perf_counter()
        writer.write(bytes(MSG))
        await reader.readexactly(MSG)
        rtts.append(time.perf_counter() - start)
        await asyncio.sleep(0.002)
    writer.close()
    return rtts


async def hol_run(transport: str, tunnels: int, size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        backend = await start_backend(_backend_handler)
        async with running_mesh(Path(tmp), transport=transport, backend=backend) as mesh:
            await tunnel(999, 1000)  # the pooled connection exists before the clock starts
            stop = asyncio.Event()
            pings = [asyncio.ensure_future(pinger(stop)) for _ in range(tunnels - 1)]
            await asyncio.sleep(0.2)
            start = time.perf_counter()
            _, stall = await tunnel(1, size)
            wall = time.perf_counter() - start
            stop.set()
            rtts = sorted(x for p in await asyncio.gather(*pings) for x in p)
            assert mesh.node_a.ctx.pool.connections_opened == 1
            assert [c["transport"] for c in mesh.node_a.ctx.pool.snapshot()] == [transport]
    return {
        "bulk_mib_s": size / wall / 2**20,
        "bulk_worst_stall_ms": stall * 1000,
        "msgs": len(rtts),
        "p50_ms": rtts[len(rtts) // 2] * 1000,
        "p99_ms": rtts[int(len(rtts) * 0.99)] * 1000,
        "max_ms": rtts[-1] * 1000,
        "over_50ms": sum(1 for x in rtts if x > 0.05),
    }


def shape(rate_mbit: float) -> None:
    """Optional bottleneck on lo: a token bucket (tbf, which this kernel has) whose queue gives
    the connection a real RTT once it is full (up to `latency`), so a loss costs round trips."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, capture_output=True)
    if rate_mbit > 0:
        # A 1500-byte MTU (as between real nodes): tbf drops any packet larger than its bucket,
        # and loopback's 64 KiB segments would be.
        subprocess.run(["ip", "link", "set", "lo", "mtu", "1500"], check=True)
        subprocess.run(
            [
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "tbf",
                "rate",
                f"{rate_mbit}mbit",
                "burst",
                "32kb",
                "latency",
                "20ms",
            ],
            check=True,
        )


def nft(loss_percent: float) -> None:
    subprocess.run(["nft", "flush", "ruleset"], check=True)
    if loss_percent <= 0:
        return
    # numgen random mod 10000 < N: N/100 percent.
    n = round(loss_percent * 100)
    rules = f"""
table inet loss {{
  chain out {{
    type filter hook output priority 0; policy accept;
    meta l4proto {{ tcp, udp }} th dport 15008 numgen random mod 10000 < {n} counter drop
    meta l4proto {{ tcp, udp }} th sport 15008 numgen random mod 10000 < {n} counter drop
  }}
}}
"""
    subprocess.run(["nft", "-f", "-"], input=rules.encode(), check=True)


async def tunnel(seed: int, size: int) -> tuple[float, float]:
    """One tunnel: ask the backend for `size` bytes; returns (seconds, longest read gap)."""
    reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT_IP, 0))
    writer.write(seed.to_bytes(4, "big") + size.to_bytes(4, "big"))
    writer.write_eof()
    start = time.perf_counter()
    last: float | None = None
    gap = 0.0
    digest = hashlib.sha256()
    got = 0
    while chunk := await reader.read(1 << 20):
        now = time.perf_counter()
        if last is not None:  # gaps once data flows (not the time to the first byte)
            gap = max(gap, now - last)
        last = now
        digest.update(chunk)
        got += len(chunk)
    writer.close()
    assert got == size, (got, size)
    assert last is not None
    assert digest.hexdigest() == hashlib.sha256(payload_for(seed, size)).hexdigest()
    return last - start, gap


async def one_run(transport: str, tunnels: int, size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with running_mesh(Path(tmp), transport=transport) as mesh:
            await tunnel(999, 1000)  # the pooled connection exists before the clock starts
            start = time.perf_counter()
            results = await asyncio.gather(*(tunnel(s, size) for s in range(tunnels)))
            wall = time.perf_counter() - start
            assert mesh.node_a.ctx.pool.connections_opened == 1
            assert [c["transport"] for c in mesh.node_a.ctx.pool.snapshot()] == [transport]
    return {
        "goodput_mib_s": tunnels * size / wall / 2**20,
        "wall_s": wall,
        "worst_stall_ms": max(g for _, g in results) * 1000,
        "median_stall_ms": statistics.median(g for _, g in results) * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", type=float, default=1.0, help="percent of packets dropped")
    ap.add_argument("--tunnels", type=int, default=16)
    ap.add_argument("--mib", type=float, default=2.0, help="MiB per tunnel")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="tbf bottleneck on lo (0: none)")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--mode", choices=("throughput", "hol"), default="throughput")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (nftables in a private network namespace: unshare -n)", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    shape(args.rate_mbit)
    size = int(args.mib * 2**20)
    raw: dict[str, list[dict[str, float]]] = {}
    if args.mode == "hol":
        return hol(args, size * 8, raw)
    for rep in range(args.reps):
        for loss in (0.0, args.loss):
            for transport in ("h2", "h3"):
                nft(loss)
                r = asyncio.run(one_run(transport, args.tunnels, size))
                raw.setdefault(f"{transport} loss={loss:g}%", []).append(r)
                print(f"rep {rep + 1} {transport} loss {loss:g}%: {json.dumps(r)}", flush=True)
    nft(0)
    print()
    print("| transport | loss | goodput MiB/s | worst tunnel stall ms | median stall ms |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in raw.items():
        transport, loss = name.split(" loss=")
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {transport} | {loss} | {med['goodput_mib_s']:.1f} | "
            f"{med['worst_stall_ms']:.0f} | {med['median_stall_ms']:.0f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


def hol(args: argparse.Namespace, size: int, raw: dict[str, list[dict[str, float]]]) -> int:
    for rep in range(args.reps):
        for loss in (0.0, args.loss):
            for transport in ("h2", "h3"):
                nft(loss)
                r = asyncio.run(hol_run(transport, args.tunnels, size))
                raw.setdefault(f"{transport} loss={loss:g}%", []).append(r)
                print(f"rep {rep + 1} {transport} loss {loss:g}%: {json.dumps(r)}", flush=True)
    nft(0)
    print()
    print("| transport | loss | bulk MiB/s | small-msg p50 ms | p99 ms | max ms | >50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in raw.items():
        transport, loss = name.split(" loss=")
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {transport} | {loss} | {med['bulk_mib_s']:.1f} | {med['p50_ms']:.1f} | "
            f"{med['p99_ms']:.1f} | {med['max_ms']:.0f} | {med['over_50ms']:.0f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
