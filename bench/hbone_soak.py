"""HBONE soak: N concurrent hash-checked tunnels, Envoy vs our node proxy, in the same run.

Owns the soak benchmark (issue 9): an echo backend and a load client, each in its own process (a
10,000-tunnel run needs 10,000 descriptors per side), and three paths over the same backend:

  envoy   client -> Envoy A (tcp_proxy, HBONE client) -> Envoy B (HBONE server) -> backend
  ours    client -> our ztunnel node-a (VIP) -> our ztunnel node-b -> backend
  mixed   client -> Envoy A (HBONE client) -> our ztunnel node-b -> backend

Every tunnel is established end to end before any payload moves (each client waits for the
backend's greeting, and all of them wait for each other), then each sends its own bytes,
half-closes, and must get exactly those bytes back. A tunnel is lost if it fails anywhere,
corrupted if it returns other bytes. The RSS of each proxy process tree is sampled every 0.5 s;
the peak per side is reported. Processes and addresses come from `hbone_bench.py` (the Envoy
configuration, certificates, supervisor); the Envoy server runs with Envoy's default stream limit
unless `--envoy-max-streams` is given.

    .venv/bin/python -m bench.hbone_soak --tunnels 10000 --paths envoy,ours,mixed
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import bench.harness as hb
from bench import envoy_configs

# The load processes are this module too (`python -m bench.hbone_soak backend|client`), started
# from the run's scratch directory: the repository root is their import path.
CHILD_ENV = {**os.environ, "PYTHONPATH": str(hb.ROOT)}
GREETING = b"ready\n"
SIZE = 4096


# ---- the two load processes (run as `hbone_soak.py backend|client ...`) ----


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def backend(host: str, port: int) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            writer.write(GREETING)
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
        writer.close()

    server = await asyncio.start_server(echo, host, port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


async def client(host: str, port: int, n: int, timeout: float) -> dict[str, Any]:
    """N tunnels at once; returns lost/corrupted counts and timings."""
    established = 0
    everyone = asyncio.Event()
    lost = corrupted = 0
    start = time.monotonic()
    ready_at = 0.0

    async def one(i: int) -> None:
        nonlocal established, lost, corrupted, ready_at
        data = hashlib.shake_256(i.to_bytes(4, "big")).digest(SIZE)
        writer = None
        counted = False
        try:
            reader, writer = await asyncio.open_connection(host, port)
            if await asyncio.wait_for(reader.readexactly(len(GREETING)), timeout) != GREETING:
                raise ConnectionError("no greeting")
            established += 1
            counted = True
            if established == n:
                ready_at = time.monotonic() - start
                everyone.set()
            with suppress(TimeoutError):
                await asyncio.wait_for(everyone.wait(), timeout)
            writer.write(data)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), timeout)
            if got != data:
                corrupted += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            lost += 1
            if not counted:
                established += 0
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    return {
        "tunnels": n,
        "lost": lost,
        "corrupted": corrupted,
        "all_established_s": round(ready_at, 2) if ready_at else None,
        "total_s": round(time.monotonic() - start, 2),
    }


# ---- orchestration ----


class RssSampler:
    def __init__(self, procs: dict[str, hb.Proc]) -> None:
        self.procs = procs
        self.peak = dict.fromkeys(procs, 0.0)
        self.base = {name: hb.tree_rss_mib(p.pid)[0] for name, p in procs.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                with suppress(OSError, ValueError):
                    self.peak[name] = max(self.peak[name], hb.tree_rss_mib(proc.pid)[0])
            self._stop.wait(0.5)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def start_envoy_client(
    sup: hb.Supervisor, work: Path, certs: hb.CertFiles, hbone: tuple[str, int]
) -> hb.Proc:
    """Envoy as the HBONE client side ("a"), tunnelling to `hbone`."""
    cfg = envoy_configs.envoy_client_config(certs)
    cluster = cfg["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"] = {"address": hbone[0], "port_value": hbone[1]}
    return _run_envoy(sup, work, "a", cfg)


def start_envoy_server(
    sup: hb.Supervisor, work: Path, certs: hb.CertFiles, max_streams: int | None
) -> hb.Proc:
    """Envoy as the HBONE server side ("b"); `max_streams` None: Envoy's default (2^31 - 1)."""
    cfg = envoy_configs.envoy_server_config(certs)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    opts = hcm["typed_config"]["http2_protocol_options"]
    if max_streams is None:
        opts.pop("max_concurrent_streams", None)  # Envoy's default: 2^31 - 1
    else:
        opts["max_concurrent_streams"] = max_streams
    return _run_envoy(sup, work, "b", cfg)


def _run_envoy(sup: hb.Supervisor, work: Path, which: str, cfg: dict[str, Any]) -> hb.Proc:
    # Envoy's default circuit breakers (1,024 connections / pending / requests per cluster) would
    # fail every tunnel above 1,024 by design; lift them so the proxies themselves are measured.
    limits = {
        "max_connections": 1_000_000,
        "max_pending_requests": 1_000_000,
        "max_requests": 1_000_000,
        "max_retries": 1_000_000,
    }
    for cluster in cfg["static_resources"]["clusters"]:
        cluster["circuit_breakers"] = {"thresholds": [limits]}
    path = work / f"envoy-{which}.json"
    path.write_text(json.dumps(cfg, indent=1))
    proc = sup.start(
        f"envoy-{which}",
        [
            envoy_configs.envoy_binary(),
            "-c",
            str(path),
            "--concurrency",
            str(hb.ENVOY_CONCURRENCY),
            "--base-id",
            str(7401 if which == "a" else 7402),
            "--disable-hot-restart",
            "--log-level",
            "warning",
        ],
    )
    host, port = hb.ENVOY_ADMIN[which]
    hb.wait_http(f"http://{host}:{port}/ready", 30, proc)
    return proc


def start_ztunnel(sup: hb.Supervisor, work: Path, ca_dir: Path, node: str) -> hb.Proc:
    mesh = work / "mesh.yaml"
    mesh.write_text(envoy_configs.MESH_CONFIG)
    argv = [
        str(hb.VENV_BIN / "ztunnel"),
        "--mesh-config",
        str(mesh),
        "--node",
        node,
        "--ca-dir",
        str(ca_dir),
        "--capture",
        "bind",
        "--node-ip",
        hb.NODE_IP[node],
    ]
    if node == "node-a":
        argv += ["--outbound-listen", f"{hb.SERVICE_VIP[0]}:{hb.SERVICE_VIP[1]}"]
    proc = sup.start(f"ztunnel-{node}", argv)
    hb.wait_http(f"http://{hb.NODE_IP[node]}:15021/healthz/ready", 30, proc)
    return proc


def run_path(
    path: str, work: Path, certs: hb.CertFiles, ca_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One soak of `args.tunnels` tunnels through the `path` pair (envoy, ours, mixed)."""
    sup = hb.Supervisor(work)
    try:
        be = sup.start("backend", [hb.PY, "-m", "bench.hbone_soak", "backend"], env=CHILD_ENV)
        hb.wait_tcp(hb.BACKEND, 10, be)
        procs: dict[str, hb.Proc] = {}
        if path == "envoy":
            procs["server side"] = start_envoy_server(sup, work, certs, args.envoy_max_streams)
            procs["client side"] = start_envoy_client(sup, work, certs, hb.ENVOY_B_HBONE)
            target = hb.ENVOY_A_LISTEN
        elif path == "ours":
            procs["server side"] = start_ztunnel(sup, work, ca_dir, "node-b")
            procs["client side"] = start_ztunnel(sup, work, ca_dir, "node-a")
            target = hb.SERVICE_VIP
        else:  # mixed: Envoy as the HBONE client of our node-b
            procs["server side"] = start_ztunnel(sup, work, ca_dir, "node-b")
            procs["client side"] = start_envoy_client(sup, work, certs, (hb.BACKEND[0], 15008))
            target = hb.ENVOY_A_LISTEN
        with RssSampler(procs) as rss:
            out = subprocess.run(
                [
                    hb.PY,
                    "-m",
                    "bench.hbone_soak",
                    "client",
                    "--target",
                    f"{target[0]}:{target[1]}",
                    "--tunnels",
                    str(args.tunnels),
                ],
                capture_output=True,
                text=True,
                timeout=args.timeout + 60,
                check=False,
                env=CHILD_ENV,
            )
        if out.returncode != 0:
            raise hb.BenchError(f"client failed: {out.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        result["path"] = path
        result["rss_mib"] = {
            name: {"before": round(rss.base[name], 1), "peak": round(rss.peak[name], 1)}
            for name in procs
        }
        return result
    finally:
        sup.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("backend")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--tunnels", type=int, required=True)
    c.add_argument("--timeout", type=float, default=120)
    p.add_argument("--tunnels", type=int, default=10_000)
    p.add_argument("--paths", default="envoy,ours,mixed")
    p.add_argument("--timeout", type=float, default=180)
    p.add_argument("--envoy-max-streams", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    args = p.parse_args(argv)
    _raise_nofile()
    if args.cmd == "backend":
        asyncio.run(backend(*hb.BACKEND))
        return 0
    if args.cmd == "client":
        host, _, port = args.target.rpartition(":")
        print(json.dumps(asyncio.run(client(host, int(port), args.tunnels, args.timeout))))
        return 0
    hb.WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=hb.WORK_ROOT))
    results = []
    try:
        ca_dir = work / "ca"
        certs = hb.make_certs(work, ca_dir)
        for path in args.paths.split(","):
            hb.log(f"soak {path}: {args.tunnels} tunnels")
            r = run_path(path, work, certs, ca_dir, args)
            hb.log(json.dumps(r))
            results.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
