"""Zero-drop upgrade of a node-proxy pair (issue 15): listener hand-over under held traffic.

Addresses (disjoint from the other loopback modules):
  node-a 127.0.76.1, client pod 127.0.76.10 (sa sleep), service VIP 127.0.78.10:80 (node-a's
  outbound listener is bound on it), node-b 127.0.77.1, server pod 127.0.77.10 (sa echo), whose
  backend (in this test process) echoes on :8080.
1,000 tunnels are held open with hash-checked traffic flowing on every one of them; node-a and
then node-b are replaced by a second process of the same code (--handover-socket); fresh
tunnels are opened all along. The old processes run with a 2 s drain timeout and the held
tunnels outlive it by far: after a hand-over the old process serves what it has, no deadline.
A failed hand-over (the successor takes the sockets and dies before READY) loses nothing; a
successor SIGKILLed after READY gives the listeners back to the old process (take-back).
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import echo_mesh_config, spawn_ztunnel
from ztunnel import handover

NODE_A, CLIENT = "127.0.76.1", "127.0.76.10"
NODE_B, SERVER = "127.0.77.1", "127.0.77.10"
VIP = "127.0.78.10"
HELD = 1_000
CHUNK = 1024
FRESH_IN_FLIGHT = 16
"""Fresh tunnels open at once at most (`Traffic.fresh`): 50/s at 20-50 ms each is 1-3 at
once on an idle machine, so the bound holds back only a machine too loaded to keep up."""


def config() -> dict[str, Any]:
    return echo_mesh_config(CLIENT, SERVER, VIP)


def ready(ip: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{ip}:15021/healthz/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class Nodes:
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    generation: dict[str, int] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    """Extra node-proxy flags for every process (e.g. HTTP/3)."""
    first: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Each node's first process (generation 1: the one the tests replace)."""
    ip: dict[str, str] = field(default_factory=dict)
    """Each node's address, as spawned."""

    def sock(self, node: str) -> Path:
        return self.tmp / f"{node}.handover.sock"

    def ready_file(self, node: str, gen: int) -> Path:
        return self.tmp / f"{node}.{gen}.ready"

    def log(self, node: str, gen: int) -> Path:
        return self.tmp / f"{node}.{gen}.log"

    def spawn(self, node: str, ip: str, *more: str) -> subprocess.Popen[bytes]:
        gen = self.generation.get(node, 0) + 1
        self.generation[node] = gen
        extra = ["--outbound-listen", f"{VIP}:80"] if node == "node-a" else []
        flags = ["--handover-socket", str(self.sock(node))]
        flags += ["--ready-file", str(self.ready_file(node, gen)), *extra, *self.flags, *more]
        cfg = self.tmp / "mesh.yaml"
        proc = spawn_ztunnel(node, ip, *flags, mesh_config=cfg, drain=2, log=self.log(node, gen))
        self.procs.append(proc)
        self.first.setdefault(node, proc)
        self.ip[node] = ip
        return proc

    def wait_ready(self, node: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        """Ready as logged by THIS process (the readiness port is shared with the predecessor
        until the hand-over is done, so an HTTP probe cannot tell which one answered). The
        bound is for a process that never gets there: at load 14 on 2 cores a successor took
        12 s to import and 6 s more to be READY beside a busy predecessor."""
        path = self.log(node, self.generation[node])
        deadline = time.monotonic() + timeout
        while " ready: " not in path.read_text():
            assert proc.poll() is None, path.read_text()
            assert time.monotonic() < deadline, path.read_text()
            time.sleep(0.05)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    yield from _running(tmp_path)


@pytest.fixture
def h3nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Both node proxies serve and use HBONE over HTTP/3 (15008/udp)."""
    yield from _running(tmp_path, ("--http3", "--http3-peer", "*"))


def _running(tmp_path: Path, flags: tuple[str, ...] = ()) -> Iterator[Nodes]:
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(config()))
    n = Nodes(tmp_path, flags=flags)
    try:
        for node, ip in (("node-a", NODE_A), ("node-b", NODE_B)):
            n.wait_ready(node, n.spawn(node, ip))
        assert ready(NODE_A)
        assert ready(NODE_B)
        yield n
    finally:
        for p in n.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def chunk(i: int, k: int) -> bytes:
    return hashlib.shake_256(f"{i}/{k}".encode()).digest(CHUNK)


@dataclass
class Traffic:
    """Held tunnels with hash-checked rounds, and fresh short tunnels opened meanwhile."""

    lost: int = 0
    corrupted: int = 0
    rounds: int = 0
    fresh_ok: int = 0
    fresh_failed: int = 0
    opened: int = 0
    why: list[str] = field(default_factory=list)  # how each loss or failure ended, for the report
    fresh_failed_started: list[float] = field(default_factory=list)  # monotonic start times
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    all_open: asyncio.Event = field(default_factory=asyncio.Event)
    fresh_pending: set[asyncio.Task[None]] = field(default_factory=set)  # started, not ended

    async def held(self, i: int, total: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT, 0))
        except OSError:
            self.lost += 1
            return
        self.opened += 1
        if self.opened == total:
            self.all_open.set()
        k = 0
        try:
            while True:
                data = chunk(i, k)
                writer.write(data)
                got = await asyncio.wait_for(reader.readexactly(CHUNK), 30)
                if got != data:
                    self.corrupted += 1
                    return
                self.rounds += 1
                k += 1
                if self.stop.is_set():
                    break
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5 + (i % 50) / 100)
            writer.write_eof()
            if await asyncio.wait_for(reader.read(), 30) != b"":
                self.corrupted += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            self.lost += 1
            self.why.append(f"held {i} round {k}: {err!r}")
        finally:
            writer.close()

    async def fresh(self) -> None:
        """A short tunnel every 20 ms until stopped, at most `FRESH_IN_FLIGHT` at once: every
        one must succeed. The bound keeps the offered load at what the machine serves: opened
        regardless of completions, fresh tunnels on a loaded machine (HTTP/3 costs 2-3x the CPU
        of HTTP/2 per tunnel) queue without end until they time out, which says nothing about
        the hand-over. A loss (refused, reset, short, or stuck past the timeout) still fails."""
        n = 0
        pending = self.fresh_pending

        async def one(n: int) -> None:
            data = hashlib.shake_256(f"fresh/{n}".encode()).digest(8 * CHUNK)
            started = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection(VIP, 80, local_addr=(CLIENT, 0))
                writer.write(data)
                writer.write_eof()
                got = await asyncio.wait_for(reader.read(), 20)
                writer.close()
            except (OSError, TimeoutError) as err:
                self.fresh_failed += 1
                self.fresh_failed_started.append(started)
                self.why.append(f"fresh {n}: {err!r}")
                return
            if got == data:
                self.fresh_ok += 1
            else:
                self.fresh_failed += 1
                self.fresh_failed_started.append(started)
                self.why.append(f"fresh {n}: {len(got)} of {len(data)} bytes")

        while not self.stop.is_set():
            if len(pending) < FRESH_IN_FLIGHT:
                task = asyncio.create_task(one(n))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
            with suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.02)
        await asyncio.gather(*pending)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    writer.close()


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_upgrade_each_side_under_1000_held_tunnels_loses_nothing(nodes: Nodes) -> None:
    t, took = asyncio.run(upgrade_both(nodes, HELD))
    print(f"upgrade figures: {t} slowest hand-over {took:.2f}s")  # shown with pytest -s
    assert (t.lost, t.corrupted, t.opened) == (0, 0, HELD), t
    assert t.fresh_failed == 0, t
    assert t.fresh_ok > 30, t  # one every 20 ms while the loop keeps up; fewer on a loaded machine
    check_upgraded(nodes)
    assert took < 15, took


def test_upgrade_over_http3_hands_the_udp_socket_over_and_loses_nothing(h3nodes: Nodes) -> None:
    """HTTP/3 between the node proxies: node-b's 15008/udp socket is handed over with a relay;
    the held tunnels' QUIC connection stays with the old node-b (its datagrams relayed by the
    new one) until they end, fresh tunnels go over HTTP/3 to the new one, nothing falls back
    to HTTP/2."""
    held = 200
    t, took = asyncio.run(upgrade_both(h3nodes, held))
    print(f"HTTP/3 upgrade figures: {t} slowest hand-over {took:.2f}s")
    assert (t.lost, t.corrupted, t.opened) == (0, 0, held), t
    assert t.fresh_failed == 0, t
    assert t.fresh_ok > 30, t
    check_upgraded(h3nodes)
    old_b, new_b = h3nodes.log("node-b", 1).read_text(), h3nodes.log("node-b", 2).read_text()
    assert "QUIC peers stay with this process" in old_b, old_b
    assert "UDP relay closed" in new_b, new_b  # the old connections ended, then the relay
    for node in ("node-a", "node-b"):
        for gen in (1, 2):
            text = h3nodes.log(node, gen).read_text()
            assert "HTTP/2 for" not in text, text  # no fallback: UDP worked all along
            assert '"transport":"h2"' not in text, text
    assert old_b.count('"transport":"h3"') >= held  # the held tunnels stayed on the old one
    assert new_b.count('"transport":"h3"') >= 1  # fresh ones reached the new one over h3


async def upgrade_both(nodes: Nodes, n_held: int) -> tuple[Traffic, float]:
    """Hold `n_held` tunnels and open fresh ones while node-a then node-b are replaced."""
    backend = await asyncio.start_server(echo, SERVER, 8080, backlog=4096)
    t = Traffic()
    held = [asyncio.create_task(t.held(i, n_held)) for i in range(n_held)]
    await asyncio.wait_for(t.all_open.wait(), 60)
    fresh = asyncio.create_task(t.fresh())
    await asyncio.sleep(0.5)
    old_a, old_b = nodes.procs
    took = 0.0
    for node, ip in (("node-a", NODE_A), ("node-b", NODE_B)):
        start = time.monotonic()
        new = nodes.spawn(node, ip)
        await in_thread(nodes.wait_ready, node, new)
        took = max(took, time.monotonic() - start)
        # Per-process readiness: the successor's file exists, the predecessor's is gone.
        assert nodes.ready_file(node, 2).exists()
        assert not nodes.ready_file(node, 1).exists()
        await asyncio.sleep(1.0)
    # The held tunnels outlive the old processes' 2 s drain timeout by far.
    await asyncio.sleep(3.0)
    assert old_a.poll() is None, "old node-a cut its tunnels"
    assert old_b.poll() is None, "old node-b cut its tunnels"
    rounds_before_stop = t.rounds
    t.stop.set()
    await asyncio.gather(*held, fresh)
    backend.close()
    assert t.rounds > rounds_before_stop
    return t, took


def check_upgraded(nodes: Nodes) -> None:
    old_a, old_b, new_a, new_b = nodes.procs
    # Their connections ended: the old processes exit on their own, cleanly.
    assert old_a.wait(15) == 0
    assert old_b.wait(15) == 0
    assert new_a.poll() is None
    assert new_b.poll() is None
    assert ready(NODE_A)
    assert ready(NODE_B)
    for node in ("node-a", "node-b"):
        old_log = nodes.log(node, 1).read_text()
        assert "hand-over: done" in old_log, old_log
        assert "predecessor stopped accepting" in nodes.log(node, 2).read_text()


def test_upgrade_of_a_two_worker_node_proxy_loses_nothing(nodes: Nodes) -> None:
    """node-b runs two workers (sharing the listeners): after the hand-over both old workers
    serve their tunnels past the drain timeout, none is cut; the successor has two workers."""

    async def main() -> Traffic:
        backend = await asyncio.start_server(echo, SERVER, 8080, backlog=4096)
        t = Traffic()
        # Replace the single-worker node-b by a two-worker one first (a hand-over too).
        two = nodes.spawn("node-b", NODE_B, "--workers", "2")
        await in_thread(nodes.wait_ready, "node-b", two)
        held = [asyncio.create_task(t.held(i, 300)) for i in range(300)]
        await asyncio.wait_for(t.all_open.wait(), 30)
        fresh = asyncio.create_task(t.fresh())
        new = nodes.spawn("node-b", NODE_B, "--workers", "2")
        await in_thread(nodes.wait_ready, "node-b", new)
        await asyncio.sleep(4.0)  # past the 2 s drain timeout of the old workers
        assert two.poll() is None
        t.stop.set()
        await asyncio.gather(*held, fresh)
        backend.close()
        return t

    t = asyncio.run(main())
    assert (t.lost, t.corrupted, t.opened) == (0, 0, 300), t
    assert t.fresh_failed == 0, t
    assert t.fresh_ok > 30, t
    assert nodes.procs[2].wait(15) == 0


def test_failed_hand_over_loses_nothing(nodes: Nodes) -> None:
    """A successor that takes the sockets and dies before READY (a stand-in, and a real
    process that fails at start), and a peer that speaks garbage, change nothing: the running
    node proxy never stopped accepting; a real successor can still take over afterwards."""

    failed_counter = ""

    async def main() -> Traffic:
        backend = await asyncio.start_server(echo, SERVER, 8080, backlog=4096)
        t = Traffic()
        held = [asyncio.create_task(t.held(i, 200)) for i in range(200)]
        await asyncio.wait_for(t.all_open.wait(), 30)
        fresh = asyncio.create_task(t.fresh())
        await asyncio.sleep(0.3)
        # Dies mid-hand-over: HELLO, OFFER received with every fd, then gone without READY.
        handed = await in_thread(handover.obtain, nodes.sock("node-a"))
        assert handed is not None
        assert {s.role for s in handed.sockets} == {
            "outbound",
            "plaintext",
            "hbone",
            "admin",
            "metrics",
            "readiness",
        }
        handed.close_unused()
        handed.conn.close()
        # A peer speaking another protocol gets REFUSE and nothing else.
        with socket.socket(socket.AF_UNIX) as bad:
            bad.settimeout(5)
            bad.connect(str(nodes.sock("node-a")))
            bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
            msgs = handover.Decoder().feed(bad.recv(4096))
            assert msgs[0].kind is handover.Kind.REFUSE, msgs
            assert bad.recv(4096) == b""
        # A real successor process that dies after it received the sockets (its CA directory
        # is a file: it fails while loading certificates, before READY).
        (nodes.tmp / "not-a-dir").write_text("")
        broken = nodes.spawn("node-a", NODE_A, "--ca-dir", str(nodes.tmp / "not-a-dir"))
        assert await in_thread(broken.wait, 20) == 1
        assert "received" in nodes.log("node-a", 2).read_text()
        await asyncio.sleep(1.0)
        assert ready(NODE_A)
        nonlocal failed_counter
        with urllib.request.urlopen(f"http://{NODE_A}:15020/metrics", timeout=5) as r:
            failed_counter = next(
                line for line in r.read().decode().splitlines() if "handovers_total{" in line
            )
        # A real successor now takes over: the failed attempts left the old one intact.
        new = nodes.spawn("node-a", NODE_A)
        await in_thread(nodes.wait_ready, "node-a", new)
        await asyncio.sleep(0.5)
        t.stop.set()
        await asyncio.gather(*held, fresh)
        backend.close()
        return t

    t = asyncio.run(main())
    assert (t.lost, t.corrupted, t.opened) == (0, 0, 200), t
    assert t.fresh_failed == 0, t
    assert t.fresh_ok > 30, t
    log = nodes.log("node-a", 1).read_text()
    assert log.count("hand-over failed, keep serving") == 3, log
    assert failed_counter == 'ztunnel_handovers_total{result="failed"} 3.0', failed_counter
    assert nodes.procs[0].wait(15) == 0


def test_successor_killed_after_ready_gives_the_listeners_back(nodes: Nodes) -> None:
    """A successor that took over (READY, DONE, ready) and is then SIGKILLed: the old process
    sees the hand-over connection end without RELEASE, accepts again on its copies of the same
    kernel sockets, turns ready and re-binds the hand-over path; its held tunnels never
    noticed, every fresh tunnel started after the kill succeeds, and a third process later
    takes over from it. Fresh tunnels in flight inside the killed process die with it (as in
    any crash): they are counted apart, and only those may fail."""
    t, figures = kill_successor_after_ready(nodes, "node-a", NODE_A, 300)
    print(f"take-back figures: {t} {figures}")  # shown with pytest -s
    check_taken_back(nodes, "node-a", t, figures, 300)
    assert t.fresh_failed <= 10, t.why


def test_successor_killed_after_ready_over_http3_gives_the_udp_socket_back(
    h3nodes: Nodes,
) -> None:
    """HTTP/3: node-b's successor (which reads the handed-over 15008/udp socket and relays the
    old process's QUIC peers to it) is SIGKILLed after READY. The old node-b reads its UDP
    socket again (the relay is gone): the held tunnels' QUIC connection, which it kept, goes
    on; it accepts new QUIC connections again; nothing falls back to HTTP/2."""
    t, figures = kill_successor_after_ready(h3nodes, "node-b", NODE_B, 200)
    print(f"HTTP/3 take-back figures: {t} {figures}")  # shown with pytest -s
    check_taken_back(h3nodes, "node-b", t, figures, 200)
    old_b = h3nodes.log("node-b", 1).read_text()
    assert "QUIC peers stay with this process" in old_b, old_b
    assert "UDP sockets taken back" in old_b, old_b
    for node in ("node-a", "node-b"):
        for gen in range(1, h3nodes.generation[node] + 1):
            text = h3nodes.log(node, gen).read_text()
            assert "HTTP/2 for" not in text, text  # no fallback: UDP worked all along
            assert '"transport":"h2"' not in text, text
    # Fresh tunnels reached the old node-b over HTTP/3 again after the take-back.
    after = old_b[old_b.index("UDP sockets taken back") :]
    assert after.count('"transport":"h3"') >= 10, after


def kill_successor_after_ready(
    nodes: Nodes, node: str, ip: str, n_held: int
) -> tuple[Traffic, dict[str, object]]:
    """Hold `n_held` tunnels and open fresh ones; `node` is replaced by a successor, which is
    SIGKILLed 1 s after it turned ready; then a third process takes over from the old one."""
    figures: dict[str, object] = {}

    async def main() -> Traffic:
        backend = await asyncio.start_server(echo, SERVER, 8080, backlog=4096)
        t = Traffic()
        held = [asyncio.create_task(t.held(i, n_held)) for i in range(n_held)]
        await asyncio.wait_for(t.all_open.wait(), 30)
        fresh = asyncio.create_task(t.fresh())
        await asyncio.sleep(0.3)
        old = nodes.first[node]
        successor = nodes.spawn(node, ip)
        await in_thread(nodes.wait_ready, node, successor)
        assert not nodes.ready_file(node, 1).exists()
        await asyncio.sleep(1.0)  # fresh tunnels go through the successor
        ok_before = t.fresh_ok
        figures["fresh in flight at kill"] = len(t.fresh_pending)
        killed = time.monotonic()
        successor.kill()
        await in_thread(successor.wait)
        old_log = nodes.log(node, 1)
        while "took the listeners back" not in old_log.read_text():
            assert time.monotonic() - killed < 10, old_log.read_text()
            await asyncio.sleep(0.01)
        figures["take-back s"] = round(time.monotonic() - killed, 3)
        assert old.poll() is None
        assert nodes.ready_file(node, 1).exists()
        assert ready(ip)
        await asyncio.sleep(1.5)  # fresh tunnels through the old process again
        with urllib.request.urlopen(f"http://{ip}:15020/metrics", timeout=5) as r:
            figures["counters"] = sorted(
                line for line in r.read().decode().splitlines() if "handovers_total{" in line
            )
        # A third process takes over from the old one, which then drains as usual. It has the
        # killed one's ready file (a container restarted in its pod: the emptyDir keeps it),
        # which must be gone until the third is ready (the pod's exec readiness probe).
        stale = nodes.ready_file(node, 2)
        assert stale.exists()
        third = nodes.spawn(node, ip, "--ready-file", str(stale))
        # Watched from a thread: this loop is busy with the traffic.
        gone_before_ready = await in_thread(_gone_before_ready, stale, nodes.log(node, 3))
        await in_thread(nodes.wait_ready, node, third)
        assert gone_before_ready, "the stale ready file stayed until the third was ready"
        assert stale.exists()
        await asyncio.sleep(0.5)
        figures["fresh ok before kill"] = ok_before
        t.stop.set()
        await asyncio.gather(*held, fresh)
        backend.close()
        figures["killed"] = killed
        return t

    t = asyncio.run(main())
    return t, figures


def check_taken_back(
    nodes: Nodes, node: str, t: Traffic, figures: dict[str, object], n_held: int
) -> None:
    killed = figures.pop("killed")
    assert isinstance(killed, float)
    assert (t.lost, t.corrupted, t.opened) == (0, 0, n_held), t
    after_kill = [s for s in t.fresh_failed_started if s >= killed]
    assert after_kill == [], t.why
    # At most those in flight at the kill (established through the killed process).
    assert t.fresh_failed <= int(str(figures["fresh in flight at kill"])), (t.why, figures)
    assert t.fresh_ok > 60, t
    assert figures["counters"] == [
        'ztunnel_handovers_total{result="done"} 1.0',
        'ztunnel_handovers_total{result="taken_back"} 1.0',
    ], figures
    log = nodes.log(node, 1).read_text()
    assert "successor died (no RELEASE)" in log, log
    assert log.count("hand-over: done") == 2, log
    assert "predecessor stopped accepting" in nodes.log(node, 3).read_text()
    old, third = nodes.first[node], nodes.procs[-1]
    assert old.wait(15) == 0  # its held tunnels ended: it exits on its own
    assert third.poll() is None
    assert ready(nodes.ip[node])


def _gone_before_ready(path: Path, log: Path, timeout: float = 30) -> bool:
    """Whether ``path`` was missing at some moment before ``log`` said ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready_logged = log.exists() and " ready: " in log.read_text()
        if not path.exists():
            return not ready_logged
        if ready_logged:
            return False
        time.sleep(0.002)
    return False


def test_stop_after_a_take_back_waits_for_the_restarted_successor(nodes: Nodes) -> None:
    """The cluster's order when the new node proxy crashes during an upgrade: the old process
    takes the listeners back, then gets SIGTERM (the kubelet deletes the old pod after the
    surge) while the kubelet restarts the crashed container. The old process holds the only
    copies of the listeners: it keeps serving and offering them (up to its --drain-timeout)
    until the restarted process takes them over, then drains without deadline. Nothing is
    refused meanwhile, no held tunnel is cut at the drain timeout."""
    figures: dict[str, float] = {}

    async def main() -> Traffic:
        backend = await asyncio.start_server(echo, SERVER, 8080, backlog=4096)
        old = nodes.spawn("node-a", NODE_A, "--drain-timeout", "8")  # generation 2
        await in_thread(nodes.wait_ready, "node-a", old)
        t = Traffic()
        held = [asyncio.create_task(t.held(i, 200)) for i in range(200)]
        await asyncio.wait_for(t.all_open.wait(), 30)
        fresh = asyncio.create_task(t.fresh())
        successor = nodes.spawn("node-a", NODE_A)
        await in_thread(nodes.wait_ready, "node-a", successor)
        figures["killed"] = time.monotonic()
        successor.kill()
        await in_thread(successor.wait)
        old_log = nodes.log("node-a", 2)
        while "took the listeners back" not in old_log.read_text():
            assert time.monotonic() - figures["killed"] < 10, old_log.read_text()
            await asyncio.sleep(0.01)
        old.send_signal(signal.SIGTERM)
        termed = time.monotonic()
        while "stop requested after a take-back" not in old_log.read_text():
            assert time.monotonic() - termed < 8, old_log.read_text()
            await asyncio.sleep(0.01)
        restarted = nodes.spawn("node-a", NODE_A)
        await in_thread(nodes.wait_ready, "node-a", restarted)
        figures["restart took over after SIGTERM s"] = round(time.monotonic() - termed, 2)
        # Past the old process's 8 s drain timeout: its held tunnels go on.
        await asyncio.sleep(max(0.5, termed + 9 - time.monotonic()))
        assert old.poll() is None
        t.stop.set()
        await asyncio.gather(*held, fresh)
        backend.close()
        return t

    t = asyncio.run(main())
    print(f"stop after take-back: {t} {figures}")  # shown with pytest -s
    assert figures["restart took over after SIGTERM s"] < 8
    assert (t.lost, t.corrupted, t.opened) == (0, 0, 200), t.why
    assert [s for s in t.fresh_failed_started if s >= figures["killed"]] == [], t.why
    restarted_log = nodes.log("node-a", 4).read_text()
    assert "predecessor stopped accepting" in restarted_log, restarted_log
    assert nodes.log("node-a", 2).read_text().count("hand-over: done") == 2
    assert nodes.procs[2].wait(15) == 0  # the old process exits once its tunnels ended
    assert nodes.procs[-1].poll() is None
    assert ready(NODE_A)


def test_sigterm_without_successor_still_releases_the_path(nodes: Nodes) -> None:
    """A plain stop (no hand-over) removes the hand-over path, so the next start binds fresh."""
    a = nodes.procs[0]
    a.send_signal(signal.SIGTERM)
    assert a.wait(15) == 0
    assert not nodes.sock("node-a").exists()
    new = nodes.spawn("node-a", NODE_A)
    nodes.wait_ready("node-a", new)
    assert "binding fresh" in nodes.log("node-a", 2).read_text()
