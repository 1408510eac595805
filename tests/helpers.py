"""Helpers every test directory shares: `run` (a coroutine under a timeout), `eventually`
(poll a condition), `Sink` (collects what an HBONE tunnel delivers), `echo_handler` (an echo
backend), `spawn` (a process logging to a file) and `spawn_ztunnel` (a static-mode `ztunnel`
console-script process), `stop_processes` (SIGTERM, then SIGKILL after a grace period),
`blackholed` (an address whose TCP connects hang) and `loopback_block` (disjoint 127.0.0.0/8
address blocks).

Address blocks: `loopback_block()` hands out a fresh /24 under 127.200.0.0/16 per call, so two
test modules that each take one can never collide (they used to be kept apart by docstrings).
Fixed 127.0.x.0/24 blocks (outside that range) stay where the addresses are part of what is
tested: a module or shared mesh fixture (`loopback/harness.py`, `cpfixtures.py`,
`robustness.py`, `test_waypoint_harness.py`) writes them into mesh configs, manifests and
certificates, and the tests assert them in metrics, access logs, config dumps and docstrings.
Each such block belongs to one module and the modules that import it (checked by
`tests/unit/test_layout.py`). Unit tests use 127.x only as values (no socket). Every pytest run
has its own network namespace (`/work/bin/isotest`, CI jobs), so separate runs never collide.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_NEXT_BLOCK = itertools.count(1)
ALLOCATOR_RANGE = ipaddress.IPv4Network("127.200.0.0/16")


def run(coro: Coroutine[Any, Any, T], timeout: float = 45, loop: str = "asyncio") -> T:
    """Run `coro` in a fresh event loop (asyncio's, or ``loop="uvloop"``: the one the proxies
    run on); fail (TimeoutError) after `timeout` seconds (below the usual 60 s pytest timeout,
    so a hang reports where it waited)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(asyncio.wait_for(coro, timeout))
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 10.0,
    what: str = "",
    interval: float = 0.02,
) -> float:
    """Poll a (sync or async) predicate until it is true; return the seconds it took.
    Raises AssertionError naming `what` when it is not true within `timeout`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start >= timeout:
            raise AssertionError(f"not within {timeout}s: {what or 'condition'}")
        await asyncio.sleep(interval)


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An `asyncio.start_server` callback echoing everything back, then a FIN."""
    with suppress(ConnectionError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
    writer.close()


BIN = Path(sys.executable).parent
"""Where the package's console scripts (`ztunnel`, `ambient-controlplane`...) are installed."""


def spawn(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """`argv` as a process: stdin closed, stdout and stderr appended to `log`, Python unbuffered
    (so a failing test's log shows everything up to the failure)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def static_args(node: str, ip: str, mesh_config: Path, drain: float = 5.0) -> list[str]:
    """A static-mode node proxy's flags: `node` at `ip`, config from `mesh_config`, the CA
    directory ``ca`` beside it, bind capture, a `drain`-second drain timeout."""
    d = mesh_config.parent
    argv = ["--node", node, "--node-ip", ip, "--mesh-config", str(mesh_config)]
    return [*argv, "--ca-dir", str(d / "ca"), "--capture", "bind", "--drain-timeout", f"{drain:g}"]


def one_workload_mesh(path: Path, pod: str, node: str) -> Path:
    """Write (to `path`) a static mesh config of one HBONE workload `web` at `pod` on `node`."""
    workload = {
        "uid": "w1",
        "name": "web",
        "namespace": "default",
        "serviceAccount": "web",
        "addresses": [pod],
        "node": node,
        "tunnelProtocol": "HBONE",
    }
    path.write_text(yaml.safe_dump({"workloads": [workload], "services": [], "policies": []}))
    return path


def spawn_ztunnel(
    node: str, ip: str, *extra: str, mesh_config: Path, drain: float = 5.0, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """A node proxy process in static mode: the `ztunnel` console script for `node` at `ip`,
    config from `mesh_config`, bind capture, a `drain`-second drain timeout, then `extra`
    flags. Beside the config: the CA directory ``ca`` its certificates are signed with (shared
    by the processes of one test; created under a file lock by the first) and, unless `log`
    names another file, its log ``<node>.log``."""
    exe = BIN / "ztunnel"
    assert exe.exists(), f"console script not installed at {exe}"
    argv = [str(exe), *static_args(node, ip, mesh_config, drain), *extra]
    return spawn(argv, log or mesh_config.parent / f"{node}.log")


def stop_processes(*procs: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM to every process, then wait for each; one still running after `timeout` seconds
    is killed."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def blackholed(addr: tuple[str, int]) -> Iterator[None]:
    """While open, a TCP connect to `addr` hangs (SYNs unanswered): a listener that never
    accepts, its accept queue (backlog 0: one connection) already full, so Linux drops further
    SYNs (no RST, unlike a closed port) and the client retransmits until its own timeout."""
    listener = socket.socket()
    try:
        listener.bind(addr)
        listener.listen(0)
        filler = socket.create_connection(addr, timeout=5)
    except BaseException:
        listener.close()
        raise
    try:
        yield
    finally:
        filler.close()
        listener.close()


class Sink:
    """A `meshcore.hbone.aio.TunnelSink` that collects what a tunnel delivers: `data`, then
    `eof` set at the end (`reset_code` set too when the tunnel was reset)."""

    write_paused = False

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.reset_code: int | None = None

    def tunnel_data(self, data: bytes) -> None:
        self.data += data

    def tunnel_eof(self) -> None:
        self.eof.set()

    def tunnel_reset(self, code: int, remote: bool) -> None:
        self.reset_code = code
        self.eof.set()

    def tunnel_pause_source(self) -> None:
        pass

    def tunnel_resume_source(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class LoopbackBlock:
    """One /24 of loopback addresses owned by one test module."""

    network: ipaddress.IPv4Network

    def ip(self, host: int) -> str:
        """The address of host number `host` (1..254) in this block."""
        if not 0 < host < 255:
            raise ValueError(f"host must be 1..254, got {host}")
        return str(self.network.network_address + host)


def loopback_block() -> LoopbackBlock:
    """A /24 no other caller in this process gets."""
    n = next(_NEXT_BLOCK)
    if n > 255:
        raise RuntimeError("loopback allocator exhausted (256 blocks)")
    base = int(ALLOCATOR_RANGE.network_address) + (n << 8)
    return LoopbackBlock(ipaddress.IPv4Network((base, 24)))


def echo_mesh_config(
    client: str | list[str],
    server: str,
    vip: str,
    *,
    target_port: int = 8080,
    policies: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The static mesh config of the process tests: a `sleep` client (at `client`, one address
    or several) on node-a, an `echo` server on node-b behind service `echo` (vip:80 ->
    target_port), HBONE both sides, `policies` (none by default)."""
    port = {"servicePort": 80, "targetPort": target_port}
    return {
        "workloads": [
            {
                "uid": "c1",
                "name": "sleep",
                "namespace": "default",
                "serviceAccount": "sleep",
                "addresses": [client] if isinstance(client, str) else client,
                "node": "node-a",
                "tunnelProtocol": "HBONE",
            },
            {
                "uid": "s1",
                "name": "echo",
                "namespace": "default",
                "serviceAccount": "echo",
                "addresses": [server],
                "node": "node-b",
                "tunnelProtocol": "HBONE",
                "services": {"default/echo.default.svc.cluster.local": {"ports": [port]}},
            },
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "default",
                "hostname": "echo.default.svc.cluster.local",
                "addresses": [{"address": vip}],
                "ports": [port],
            },
        ],
        "policies": policies or [],
    }


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at `cuts` (each taken modulo its length + 1, repeats merged): the fuzz
    tests' arbitrary splits of one input into reads."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for c in points:
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    return pieces
