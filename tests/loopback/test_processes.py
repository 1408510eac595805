"""Two `ztunnel` console-script processes carrying traffic over HBONE on loopback.

Addresses are disjoint from the in-process harness (127.0.2x) and the bench:
  node-a 127.0.31.1, client pod 127.0.31.10 (sa sleep)
  node-b 127.0.32.1, server pod 127.0.32.10 (sa echo), backend (in this test) on :8080
  service echo VIP 127.0.33.10:80 -> 8080 (node-a's process listens on it: --outbound-listen)
Both processes sign with one CA directory (created under a file lock by whichever starts first).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import echo_handler, echo_mesh_config, eventually, spawn_ztunnel, stop_processes

NODE_A, CLIENT = "127.0.31.1", "127.0.31.10"
NODE_B, SERVER = "127.0.32.1", "127.0.32.10"
SVC_VIP = "127.0.33.10"
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
ECHO = "spiffe://cluster.local/ns/default/sa/echo"
DRAIN = 3.0


def config() -> dict[str, Any]:
    return echo_mesh_config(CLIENT, SERVER, SVC_VIP)


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def reloads(node_ip: str, result: str, want: int) -> bool:
    """Whether the node proxy's `ztunnel_config_reloads_total{result}` reached `want`."""
    status, body = await http_get(node_ip, 15020, "/stats/prometheus")
    prefix = f'ztunnel_config_reloads_total{{result="{result}"}} '
    line = next((x for x in body.decode().splitlines() if x.startswith(prefix)), None)
    return status == 200 and line is not None and float(line.rsplit(" ", 1)[1]) >= want


async def wait_ready(proc: subprocess.Popen[bytes], node_ip: str, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert proc.poll() is None, f"ztunnel on {node_ip} exited with {proc.returncode}"
        with suppress(OSError, TimeoutError, IndexError, ValueError):
            if (await http_get(node_ip, 15021, "/healthz/ready"))[0] == 200:
                return
        assert loop.time() < deadline, f"ztunnel on {node_ip} not ready after {timeout}s"
        await asyncio.sleep(0.05)


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("workers", [1, 2])
def test_two_ztunnel_processes(tmp_path: Path, workers: int, transport: str) -> None:
    """`transport` h3: HBONE over HTTP/3 between the processes; with 2 workers each of node-a's
    workers dials its own QUIC connection, and node-b's first worker serves 15008/udp."""
    h3 = ["--http3", "--http3-peer", "*"] if transport == "h3" else []
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(yaml.safe_dump(config()))

    def spawn(node: str, ip: str, *extra: str) -> subprocess.Popen[bytes]:
        flags = ("--workers", str(workers), *extra, *h3)
        return spawn_ztunnel(node, ip, *flags, mesh_config=cfg, drain=DRAIN)

    async def main() -> None:
        peers: list[str] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername")[0])
            await echo_handler(reader, writer)

        backend = await asyncio.start_server(accept, SERVER, 8080)
        procs = [
            spawn("node-a", NODE_A, "--outbound-listen", f"{SVC_VIP}:80"),
            spawn("node-b", NODE_B),
        ]
        try:
            await asyncio.gather(wait_ready(procs[0], NODE_A), wait_ready(procs[1], NODE_B))
            # --workers N: N-1 forked workers share the first one's listening sockets.
            workers_of = {p.pid: children_of(p.pid) for p in procs}
            assert all(len(c) == workers - 1 for c in workers_of.values()), workers_of

            # Bytes through: client pod -> VIP -> node-a -> HBONE -> node-b -> backend, and back.
            reader, writer = await asyncio.open_connection(SVC_VIP, 80, local_addr=(CLIENT, 0))
            data = hashlib.shake_256(b"processes").digest(1 << 20)
            writer.write(data)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            assert peers == [CLIENT]  # original source kept end to end
            # More connections, so that with several workers more than one carries traffic;
            # the metrics served by the first worker must count all of them.
            extra_conns = 11
            for i in range(extra_conns):
                r2, w2 = await asyncio.open_connection(SVC_VIP, 80, local_addr=(CLIENT, 0))
                w2.write(b"n%d" % i)
                w2.write_eof()
                assert await asyncio.wait_for(r2.read(), 10) == b"n%d" % i
                w2.close()

            status, body = await http_get(NODE_A, 15000, "/config_dump")
            assert status == 200
            dump = json.loads(body)
            assert {w["name"] for w in dump["workloads"]} == {"sleep", "echo"}
            (cert,) = dump["certificates"]  # node-a manages only its local identity
            assert cert["identity"] == SLEEP
            assert cert["state"] == "available"
            assert int(cert["serial"]) > 0
            if workers == 1:  # with several workers the pool shown is the first worker's
                assert [c["peer"] for c in dump["connections"]] == [ECHO]

            await asyncio.sleep(0.1)  # let both sides record the closed connection
            for ip, reporter in ((NODE_A, "source"), (NODE_B, "destination")):
                status, body = await http_get(ip, 15020, "/stats/prometheus")
                assert status == 200
                text = body.decode()
                opened = [
                    x
                    for x in text.splitlines()
                    if x.startswith("istio_tcp_connections_opened_total{")
                ]
                assert len(opened) == 1, text
                assert float(opened[0].rsplit(" ", 1)[1]) == 1 + extra_conns
                assert f'reporter="{reporter}"' in opened[0]
                assert f'source_principal="{SLEEP}"' in opened[0]
                assert f'destination_principal="{ECHO}"' in opened[0]
                assert f'transport="{transport}"' in opened[0]

            # SIGTERM: both drain and exit 0 well within the drain timeout.
            loop = asyncio.get_running_loop()
            started = loop.time()
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            waits = (asyncio.to_thread(p.wait) for p in procs)
            codes = await asyncio.wait_for(asyncio.gather(*waits), DRAIN + 5)
            assert codes == [0, 0]
            for pids in workers_of.values():  # no worker outlives the drain
                for pid in pids:
                    assert (
                        not Path(f"/proc/{pid}").exists()
                        or "zombie" in Path(f"/proc/{pid}/status").read_text()
                    )
            # No live connection is left, so neither process waits out its drain timeout.
            assert loop.time() - started < DRAIN, loop.time() - started
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            backend.close()
            await backend.wait_closed()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    except BaseException:
        for name in ("node-a", "node-b"):
            sys.stderr.write(f"--- {name} ---\n{(tmp_path / f'{name}.log').read_text()[-4000:]}\n")
        raise


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_static_config_and_refuses_a_bad_one(tmp_path: Path, workers: int) -> None:
    """SIGHUP re-reads --mesh-config: a DENY policy added to the file takes effect without a
    restart; a broken file is refused and the running config keeps serving."""
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(yaml.safe_dump(config()))

    def spawn(node: str, ip: str, *extra: str) -> subprocess.Popen[bytes]:
        flags = ("--workers", str(workers), *extra)
        return spawn_ztunnel(node, ip, *flags, mesh_config=cfg, drain=DRAIN)

    async def call() -> bytes:
        """The echo, or b"" when the mesh refused the connection (closed/reset by node-a; a
        reset may arrive before our FIN, hence OSError such as ENOTCONN on write_eof)."""
        reader, writer = await asyncio.open_connection(SVC_VIP, 80, local_addr=(CLIENT, 0))
        try:
            writer.write(b"ping")
            writer.write_eof()
            return await asyncio.wait_for(reader.read(), 10)
        except OSError:
            return b""
        finally:
            writer.close()

    async def main() -> None:
        backend = await asyncio.start_server(echo_handler, SERVER, 8080)
        procs = [
            spawn("node-a", NODE_A, "--outbound-listen", f"{SVC_VIP}:80"),
            spawn("node-b", NODE_B),
        ]
        try:
            await asyncio.gather(wait_ready(procs[0], NODE_A), wait_ready(procs[1], NODE_B))
            assert await call() == b"ping"
            denied = config()
            denied["policies"] = [
                {
                    "name": "deny-sleep",
                    "namespace": "default",
                    "scope": "NAMESPACE",
                    "action": "DENY",
                    "rules": [
                        {
                            "clauses": [
                                {
                                    "matches": [
                                        {"principals": [{"exact": SLEEP.removeprefix("spiffe://")}]}
                                    ]
                                }
                            ]
                        }
                    ],
                },
            ]
            cfg.write_text(yaml.safe_dump(denied))
            procs[1].send_signal(signal.SIGHUP)
            for _ in range(100):  # every worker of node-b must have reloaded
                results = {await call() for _ in range(4)}
                if results == {b""}:
                    break
                await asyncio.sleep(0.05)
            assert results == {b""}, "DENY policy not applied after SIGHUP"
            cfg.write_text("workloads: [ {uid: 1} ]\n")  # invalid: refused, old config kept
            procs[1].send_signal(signal.SIGHUP)
            # Every worker has read the bad file and refused it (the reload counter on the
            # metrics port), not "some time has passed".
            await eventually(lambda: reloads(NODE_B, "refused", workers), 10, "refused reload")
            assert procs[1].poll() is None
            assert await call() == b""  # still the DENY config
            cfg.write_text(yaml.safe_dump(config()))
            procs[1].send_signal(signal.SIGHUP)
            for _ in range(100):
                results = {await call() for _ in range(4)}
                if results == {b"ping"}:
                    break
                await asyncio.sleep(0.05)
            assert results == {b"ping"}
        finally:
            stop_processes(*procs, timeout=DRAIN + 5)
            backend.close()
            await backend.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert "config reload from" in (tmp_path / "node-b.log").read_text()
