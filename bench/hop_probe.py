"""Where the added latency at 1000 rps goes, hop by hop: the Envoy pair and our node-proxy pair
carrying the bench's open-loop 1000 rps `GET /1k` (issue 14, "Latency at 1000 rps" in
bench/README.md).

Owns these measurements of the same traffic, run per path in turn, rounds interleaved (direct,
the Envoy pair, then the node-proxy pair of each source tree, each started fresh); every path
gets one fixed-rate run (the loadgen's p50/p99, the proxies' CPU per request) plus:
- **per hop** (`--hops`): a packet tap on `lo` (AF_PACKET, kernel timestamps, only the outgoing
  copy of each packet: a cBPF filter drops the rest in the kernel) timestamps the six data
  segments of each request: client -> A, A -> B, B -> backend, backend -> B, B -> A, A ->
  client. The time between a segment a proxy received and the one it sent is that proxy's
  latency for that step (wake-up, reads, processing, writes until the kernel has the bytes).
  Requests whose segments interleave with another request's are left out.
- **syscalls per request** (`--syscalls`): `perf stat` of the syscall tracepoints and context
  switches of each proxy over one more load run, divided by the requests completed. An
  `epoll_wait` is one event-loop iteration that polled; a context switch of an idle proxy is
  one wake-up. With `--rps` also over a `wrk -c32` keep-alive run.
- **per turn** (`--trace`): `perf record` of each proxy's raw syscall enters and exits over one
  more run; `wake_stats` times each turn of a thread (from an epoll wait that slept to the next
  one that sleeps): wake-up to the first write, end of the first read to it, the write, the
  tail after the last write, polls and syscalls per turn; turns that began by reading the HBONE
  (TLS) connection apart from those that began on a plain socket.
- **rps** (`--rps`): `wrk -c32` keep-alive requests/s and the proxies' CPU per request, so a
  change that helps latency is seen not to cost CPU under load.

Each tree runs from its own directory through `PYTHONPATH` (`--tree main=/tmp/ab-main`: a `git
archive` of main with its compiled build copied in; "." = this checkout). Run it in a network
namespace of its own (fixed addresses; the tap needs root):

    unshare -n bash -c 'ip link set lo up; exec .venv/bin/python -m bench.hop_probe \
        --tree main=/tmp/ab-main --tree branch=. --rounds 3 --hops'

A tree may carry environment variables for its node proxies: `--tree lead=.:VAR=VALUE`.

Invariant: every process it starts is stopped when it ends (the bench's `Supervisor`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import (
    BACKEND,
    SERVICE_VIP,
    PathRuntime,
    Results,
    Settings,
    Supervisor,
    loadgen,
    log,
    make_certs,
    run_ab,
    wrk,
)
from bench.hbone_bench import start_backend, start_envoy_pair, start_ztunnel_pair

ENVOY_A = ("127.0.1.1", 8080)
ENVOY_B = ("127.0.1.2", 15008)
OURS_B = (BACKEND[0], 15008)
HOPS = ("c>A", "A>B", "B>n", "n>B", "B>A", "A>c")
"""The six data segments of one request, in order."""
HOP_STEPS = {
    "A req": (0, 1),
    "B req": (1, 2),
    "backend": (2, 3),
    "B resp": (3, 4),
    "A resp": (4, 5),
    "c>A..A>c": (0, 5),
}
"""Per step, the segments (indices into HOPS) it lies between."""

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4
SKF_AD_PKTTYPE = -0x1000 + 4


def _tap() -> tuple[socket.socket, ctypes.Array[ctypes.c_char]]:
    """Raw socket on lo seeing each packet once (the outgoing copy), timestamped by the kernel."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind(("lo", 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    # ld pkttype; jeq OUTGOING ? accept : drop
    prog = [(0x20, 0, 0, SKF_AD_PKTTYPE & 0xFFFFFFFF), (0x15, 0, 1, PACKET_OUTGOING)]
    prog += [(0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    sock.settimeout(0.2)
    return sock, buf  # the kernel copied the program; keep it anyway until the socket closes


class Tap(threading.Thread):
    """Records (time ns, src, sport, dst, dport) of every TCP segment with payload on lo."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock, self._prog = _tap()
        self.stop = threading.Event()
        self.records: list[tuple[int, str, int, str, int]] = []

    def run(self) -> None:
        cmsg_space = socket.CMSG_SPACE(16)
        while not self.stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(128, cmsg_space)
            except TimeoutError:
                continue
            ip = data[14:]
            if len(ip) < 40 or ip[9] != 6:
                continue
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack_from("!H", ip, 2)[0]
            tcp = ip[ihl:]
            doff = (tcp[12] >> 4) * 4
            if total - ihl - doff <= 0:
                continue
            ts = 0
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", payload[:16])
                    ts = sec * 1_000_000_000 + nsec
            sport, dport = struct.unpack_from("!HH", tcp, 0)
            src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
            self.records.append((ts, src, sport, dst, dport))


def classify(path: str, src: str, sport: int, dst: str, dport: int) -> str | None:
    front = ENVOY_A if path == "envoy" else SERVICE_VIP
    hbone = ENVOY_B if path == "envoy" else OURS_B
    if (dst, dport) == front:
        return "c>A"
    if (src, sport) == front:
        return "A>c"
    if (dst, dport) == hbone:
        return "A>B"
    if (src, sport) == hbone:
        return "B>A"
    if (dst, dport) == BACKEND:
        return "B>n"
    if (src, sport) == BACKEND:
        return "n>B"
    return None


def chains(path: str, records: Sequence[tuple[int, str, int, str, int]]) -> list[list[int]]:
    """Per request, the six segments' times, for requests nothing interleaved with."""
    out: list[list[int]] = []
    cur: list[int] = []
    dirty = False
    for ts, src, sport, dst, dport in sorted(records):
        hop = classify(path, src, sport, dst, dport)
        if hop is None:
            continue
        if hop == "c>A":
            if cur and not dirty and len(cur) == len(HOPS):
                out.append(cur)
            cur, dirty = [ts], bool(cur) and len(cur) != len(HOPS)
            continue
        if not cur or len(cur) >= len(HOPS) or HOPS[len(cur)] != hop:
            dirty = True  # another request's segment, a keepalive, a window update...
            continue
        cur.append(ts)
    if cur and not dirty and len(cur) == len(HOPS):
        out.append(cur)
    return out


def hop_report(path: str, records: Sequence[tuple[int, str, int, str, int]]) -> dict[str, Any]:
    done = chains(path, records)
    res: dict[str, Any] = {"requests": len(done)}
    for name, (i, j) in HOP_STEPS.items():
        vals = sorted((c[j] - c[i]) / 1000.0 for c in done)
        if vals:
            res[name] = {
                "p10_us": round(vals[len(vals) // 10], 1),
                "p50_us": round(statistics.median(vals), 1),
                "p90_us": round(vals[int(len(vals) * 0.9)], 1),
                "mean_us": round(statistics.fmean(vals), 1),
            }
    return res


def fixed_args(addr: tuple[str, int], rate: float, duration: float) -> list[str]:
    return ["fixed", addr[0], str(addr[1]), "--rate", f"{rate:g}", "--duration", f"{duration:g}"]


SYSCALLS = (
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "io_uring_enter",
    "ioctl",
    "getpid",
    "futex",
)
"""The syscalls counted one by one (all of them are counted together as well)."""
PERF_EVENTS = (
    "raw_syscalls:sys_enter",
    "context-switches",
    *(f"syscalls:sys_enter_{name}" for name in SYSCALLS),
)


def syscall_counts(
    pids: dict[str, int], addr: tuple[str, int], rate: float, dur: float, *, rps: bool = False
) -> Any:
    """Per completed request of one fixed-rate run (`rps`: one `wrk -c32` run), each proxy's
    syscalls (tracepoint counts, `perf stat`: no ptrace stop, so the run itself is hardly slowed
    down) and context switches (a blocking epoll_wait that slept is one: the wake-ups)."""
    outs: dict[str, Path] = {}
    procs = []
    for name, pid in pids.items():
        out = Path(tempfile.mkstemp(prefix=f"perf-{name}-", suffix=".csv")[1])
        outs[name] = out
        argv = ["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(PERF_EVENTS)]
        procs.append(subprocess.Popen([*argv, "-p", str(pid)], stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    try:
        if rps:
            rate, _, _ = wrk(addr, Settings(1, dur, 1, 1, 2, 32, 16, rate, 1), 32, close=False)
            r = {"completed": rate * dur, "p50_ms": 0.0, "connections": 32}
        else:
            r = loadgen(fixed_args(addr, rate, dur), timeout=dur + 40)
    finally:
        for p in procs:
            p.send_signal(2)
        for p in procs:
            p.wait(timeout=10)
    n = max(r["completed"], 1)  # warm-up included: perf saw it too
    res: dict[str, Any] = {"requests": n, "p50_ms": r["p50_ms"], "pool": r["connections"]}
    for name, out in outs.items():
        counts: dict[str, float] = {}
        for line in out.read_text().splitlines():
            cells = line.split(",")
            if len(cells) > 3 and cells[0].strip().isdigit():
                event = cells[2].removeprefix("syscalls:sys_enter_")
                event = {"raw_syscalls:sys_enter": "all syscalls"}.get(event, event)
                if int(cells[0]):
                    counts[event] = round(int(cells[0]) / n, 2)
        res[name] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        out.unlink()
    return res


EPOLL_NRS = {232, 281, 441}  # epoll_wait, epoll_pwait, epoll_pwait2 (x86_64)
WRITE_NRS = {1, 20, 44, 46}  # write, writev, sendto, sendmsg
TRACE_LINE = re.compile(
    r"^\s*(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)(?: \(([0-9a-f]+))?"
)


SLEPT_US = 30.0
"""An epoll wait that lasted longer than this slept: it ends one turn and starts the next."""


READ_NRS = {0, 19, 45, 47}  # read, readv, recvfrom, recvmsg


def wake_stats(text: str) -> dict[str, Any]:
    """From `perf script` of raw syscall enters/exits, per turn of a thread (from the end of an
    epoll wait that slept to the start of the next one that sleeps; an epoll wait that returns
    at once, an event-loop iteration that did not sleep, stays inside the turn): the time from
    the wake-up to the first write-type syscall, from the end of the first read to it (the
    processing between), the write itself (on loopback the kernel delivers to the receiver
    inside it), from the end of the last write to the next sleep (the tail, which delays a
    receiver woken onto this CPU), the polls and syscalls per turn. p10 / p50 over the turns."""
    per_tid: dict[int, list[tuple[float, str, int, int]]] = {}
    reads: dict[int, int] = {}
    for line in text.splitlines():
        m = TRACE_LINE.match(line)
        if m:
            nr = int(m.group(4))
            fd = int(m.group(5), 16) if m.group(5) else -1
            if m.group(3) == "enter" and nr in READ_NRS:
                reads[fd] = reads.get(fd, 0) + 1
            per_tid.setdefault(int(m.group(1)), []).append(
                (float(m.group(2)) * 1e6, m.group(3), nr, fd)
            )
    # The busiest descriptors are the HBONE (TLS) connections (Envoy: one per worker), each
    # carrying every tunnel; a client's or the backend's connection carries a few of them.
    # Turns are told apart by whether they began reading one of them or a plain socket.
    top = max(reads.values(), default=0)
    tls_fds = {fd for fd, n in reads.items() if n >= 0.3 * top}
    out: dict[str, Any] = {}
    for first in ("tls", "plain"):
        out[f"{first} turns"] = _wake_stats(per_tid, tls_fds, first == "tls")
    return out


def _wake_stats(
    per_tid: dict[int, list[tuple[float, str, int, int]]], tls_fds: set[int], tls_first: bool
) -> dict[str, Any]:
    got: dict[str, list[float]] = {
        k: [] for k in ("wake_to_write", "read_to_write", "write", "tail", "turn")
    }
    polls: list[int] = []
    calls: list[int] = []
    for evs in per_tid.values():
        woke: float | None = None
        turn: list[tuple[float, str, int, int]] = []
        npoll = 0
        poll_enter = 0.0
        for t, kind, nr, fd in evs:
            if nr in EPOLL_NRS:
                if kind == "enter":
                    poll_enter = t
                    continue
                if t - poll_enter > SLEPT_US or woke is None:
                    first_fd = next(
                        (f for _, k, n, f in turn if k == "enter" and n in READ_NRS), -2
                    )
                    wanted = (first_fd in tls_fds) == tls_first
                    if woke is not None and wanted and _turn(got, woke, poll_enter, turn):
                        polls.append(npoll)
                        calls.append(sum(1 for _, k, _, _ in turn if k == "enter"))
                    woke, turn, npoll = t, [], 1
                else:
                    npoll += 1
                continue
            if woke is not None:
                turn.append((t, kind, nr, fd))
    if not polls:
        return {"turns": 0}
    out: dict[str, Any] = {"turns": len(polls)}
    for k, vals in got.items():
        vals.sort()
        out[f"{k}_us"] = (round(vals[len(vals) // 10], 1), round(statistics.median(vals), 1))
    out["polls_per_turn"] = round(statistics.fmean(polls), 2)
    out["syscalls_per_turn"] = round(statistics.fmean(calls), 2)
    return out


def _turn(
    got: dict[str, list[float]],
    woke: float,
    slept: float,
    turn: list[tuple[float, str, int, int]],
) -> bool:
    """Add one turn's times to `got` (False: a turn without a read and a write)."""
    read_end = next((t for t, k, nr, _ in turn if k == "exit" and nr in READ_NRS), None)
    w_enter = next((t for t, k, nr, _ in turn if k == "enter" and nr in WRITE_NRS), None)
    if read_end is None or w_enter is None or w_enter < read_end:
        return False
    w_exit = next(
        (t for t, k, nr, _ in turn if k == "exit" and nr in WRITE_NRS and t > w_enter), None
    )
    last_w = max((t for t, k, nr, _ in turn if k == "exit" and nr in WRITE_NRS), default=None)
    if w_exit is None or last_w is None:
        return False
    got["wake_to_write"].append(w_enter - woke)
    got["read_to_write"].append(w_enter - read_end)
    got["write"].append(w_exit - w_enter)
    got["tail"].append(slept - last_w)
    got["turn"].append(slept - woke)
    return True


def trace_turns(pids: dict[str, int], addr: tuple[str, int], rate: float, dur: float) -> Any:
    """`perf record` of each proxy's raw syscalls over one fixed-rate run: `wake_stats`."""
    outs: dict[str, Path] = {}
    procs = []
    for name, pid in pids.items():
        out = Path(tempfile.mkstemp(prefix=f"perf-{name}-", suffix=".data")[1])
        outs[name] = out
        ev = "raw_syscalls:sys_enter,raw_syscalls:sys_exit"
        argv = ["perf", "record", "-q", "-e", ev, "-o", str(out), "-p", str(pid)]
        procs.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    try:
        loadgen(fixed_args(addr, rate, dur), timeout=dur + 40)
    finally:
        for p in procs:
            p.send_signal(2)
        for p in procs:
            p.wait(timeout=30)
    res: dict[str, Any] = {}
    for name, out in outs.items():
        text = run_perf_script(out)
        res[name] = wake_stats(text)
        out.unlink()
    return res


def run_perf_script(path: Path) -> str:
    argv = ["perf", "script", "-i", str(path), "-F", "tid,time,event,trace"]
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def start_tree(sup: Supervisor, workdir: Path, ca_dir: Path, tree: str) -> PathRuntime:
    """The node-proxy pair running the sources of `tree` ("." = this checkout), with the
    environment variables given after it (`DIR:VAR=VALUE:...`)."""
    tree, *assignments = tree.split(":")
    env = dict(a.split("=", 1) for a in assignments)
    if tree != ".":
        env["PYTHONPATH"] = str(Path(tree).resolve())
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return start_ztunnel_pair(sup, workdir, ca_dir, 1)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(rt: PathRuntime, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fixed-rate run through `rt` (with the tap if asked), then one under strace if asked."""
    loadgen(fixed_args(rt.addr, args.rate, 1.0), timeout=60)  # warm the pools
    out: dict[str, Any] = {"load": os.getloadavg()[0]}
    tap = Tap() if args.hops and kind != "direct" else None
    if tap is not None:
        tap.start()
    cpu0 = rt.cpu()
    r = loadgen(fixed_args(rt.addr, args.rate, args.duration), timeout=args.duration + 40)
    cpu = sum(rt.cpu().values()) - sum(cpu0.values())
    if tap is not None:
        tap.stop.set()
        tap.join()
        out["hops"] = hop_report(kind, tap.records)
    out.update({k: r[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "completed")})
    out["cpu_us_per_request"] = cpu / max(r["completed"], 1) * 1e6 if rt.proxies else 0.0
    if args.rps:
        cpu0 = rt.cpu()
        settings = Settings(1, args.duration, 1, 1, 2, 32, 16, args.rate, 1)
        rps, _, _ = wrk(rt.addr, settings, 32, close=False)
        out["rps"] = rps
        if rt.proxies:
            used = sum(rt.cpu().values()) - sum(cpu0.values())
            out["rps_cpu_us_per_request"] = used / (rps * args.duration) * 1e6
    if args.trace and rt.proxies:
        pids = {pr.name: pr.pid for pr in rt.proxies}
        out["turns"] = trace_turns(pids, rt.addr, args.rate, min(args.duration, 3.0))
    if args.syscalls and rt.proxies:
        pids = {pr.name: pr.pid for pr in rt.proxies}
        out["syscalls"] = syscall_counts(pids, rt.addr, args.rate, args.duration)
        if args.rps:
            out["syscalls_rps"] = syscall_counts(pids, rt.addr, 0, args.duration, rps=True)
    return out


def _brief(name: str, r: dict[str, Any]) -> str:
    hops = r.get("hops", {})
    steps = " ".join(
        f"{k.split(' (')[0]}={v['p50_us']}" for k, v in hops.items() if isinstance(v, dict)
    )
    rps = ""
    if "rps" in r:
        rps = f" rps {r['rps']:.0f} ({r.get('rps_cpu_us_per_request', 0):.1f} us/req)"
    return (
        f"{name:8s} p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms cpu/req "
        f"{r['cpu_us_per_request']:.1f} us{rps} load {r['load']:.1f} | hop p50 us: {steps}"
    )


def _med(rs: list[dict[str, Any]], key: str, fmt: str) -> str:
    vals = [r[key] for r in rs if key in r]
    return format(statistics.median(vals), fmt) if vals else "-"


def report(results: Results) -> None:
    med = statistics.median
    direct = results.get("direct")
    print(
        "| path | p50 ms | p99 ms | added p50 / p99 (ms, per-round vs direct, median) |"
        " CPU us/req | rps | CPU us/req at rps | load |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in results.items():
        add = ""
        if direct and name != "direct":
            a50 = med(r["p50_ms"] - d["p50_ms"] for r, d in zip(rs, direct, strict=False))
            a99 = med(r["p99_ms"] - d["p99_ms"] for r, d in zip(rs, direct, strict=False))
            add = f"+{a50:.3f} / +{a99:.3f}"
        loads = f"{min(r['load'] for r in rs):.1f}-{max(r['load'] for r in rs):.1f}"
        print(
            f"| {name} | {med(r['p50_ms'] for r in rs):.3f} | {med(r['p99_ms'] for r in rs):.3f} "
            f"| {add} | {med(r['cpu_us_per_request'] for r in rs):.1f} "
            f"| {_med(rs, 'rps', '.0f')} | {_med(rs, 'rps_cpu_us_per_request', '.1f')} | {loads} |"
        )
    hop_names = [k for k in HOP_STEPS]
    if any("hops" in r for rs in results.values() for r in rs):
        print("\n| path | " + " | ".join(hop_names) + " |")
        print("|---|" + "---:|" * len(hop_names))
        for name, rs in results.items():
            cells = []
            for h in hop_names:
                vals = [r["hops"][h]["p50_us"] for r in rs if h in r.get("hops", {})]
                cells.append(f"{med(vals):.1f}" if vals else "-")
            print(f"| {name} | " + " | ".join(cells) + " |")
    for name, rs in results.items():
        for r in rs:
            if "syscalls" in r:
                print(f"syscalls per request, {name}: {json.dumps(r['syscalls'])}")
            if "syscalls_rps" in r:
                print(f"syscalls per request at rps, {name}: {json.dumps(r['syscalls_rps'])}")
            if "turns" in r:
                print(f"per wake-up, {name}: {json.dumps(r['turns'])}")


def _rounds(args: argparse.Namespace, sup: Supervisor, workdir: Path) -> Results:
    """`--rounds` rounds over the direct path, Envoy's pair and each tree's pair."""
    trees = dict(t.split("=", 1) for t in args.tree)
    results: Results = {}
    start_backend(sup, workdir)
    ca_dir = workdir / "ca"
    ca_dir.mkdir()
    envoy = None
    if not args.no_envoy:
        envoy = start_envoy_pair(sup, workdir, make_certs(workdir, ca_dir))
    for rnd in range(args.rounds):
        targets: list[tuple[str, str, PathRuntime | None]] = [("direct", "direct", None)]
        if envoy is not None:
            targets.append(("envoy", "envoy", envoy))
        targets += [(name, "ztunnel", None) for name in trees]
        for name, kind, rt in targets:
            if name == "direct":
                rt = PathRuntime("direct", BACKEND, [], 0)
            elif rt is None:
                rt = start_tree(sup, workdir, ca_dir, trees[name])
            try:
                r = measure(rt, kind, args)
            finally:
                if kind == "ztunnel":
                    for p in rt.proxies:
                        sup.stop(p)
            results.setdefault(name, []).append(r)
            log(f"round {rnd + 1} " + _brief(name, r))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR (repeatable)")
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--hops", action="store_true", help="per-hop times from a packet tap on lo")
    ap.add_argument("--syscalls", action="store_true", help="syscalls per request (perf stat)")
    ap.add_argument("--rps", action="store_true", help="also wrk -c32: rps, CPU per request")
    ap.add_argument("--trace", action="store_true", help="per wake-up timings (perf record)")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    args = ap.parse_args(argv)
    if not args.tree:
        args.tree = ["branch=."]
    return run_ab(args, "hops-", _rounds, report)


if __name__ == "__main__":
    raise SystemExit(main())
