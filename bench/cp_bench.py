"""Control-plane benchmark: full-state time, change fan-out latency, memory.

    .venv/bin/python bench/cp_bench.py                 # 1,000 and 10,000 workloads
    .venv/bin/python bench/cp_bench.py --sizes 1000 --changes 50 --clients 50

For each size N the control plane runs in its own process (so its RSS is its own), serving
plaintext gRPC on 127.0.59.1 (loopback only). Its store is filled directly with N pods in N/100
namespaces (one Service per 10 pods, spread over 50 nodes, all ambient, plus one
AuthorizationPolicy per namespace); the manifest/Kubernetes parsing cost is not part of the
figures. Then, in this process:
- 50 delta-xDS clients (meshcore.xds.XdsClient, decode+validate every resource, no MeshState
  rebuild) connect and sync;
- full state: one more client that builds the full MeshState like a node proxy, timed from
  connect to synced (both type URLs applied);
- fan-out: `--changes` times, the control plane changes one pod's labels (t0 = just before the
  store update, wall clock) and every client records when the response carrying that workload
  arrived; the change latency is the slowest client's; we report p50/p99/max over the changes;
- RSS of the control-plane process (VmRSS, and VmHWM = peak) after everything synced.
Targets (issue 4): full state at 10k < 2 s; change to 50 proxies p99 < 100 ms; RSS < 500 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.app import ControlPlane, ControlPlaneSettings
from controlplane.objects import parse_object
from meshcore.ca import MeshCA
from meshcore.proto import discovery_pb2 as dpb
from meshcore.xds import ControlPlaneEndpoint, XdsClient

HOST = "127.0.59.1"
NODES = 50
PER_NS = 100


def pod_doc(i: int, version: int = 0) -> dict[str, Any]:
    ns = f"ns-{i // PER_NS}"
    return {
        "kind": "Pod",
        "metadata": {
            "name": f"pod-{i}",
            "namespace": ns,
            "labels": {"app": f"svc-{i // 10}", "version": f"v{version}"},
        },
        "spec": {"nodeName": f"node-{i % NODES}", "serviceAccountName": f"sa-{i % 7}"},
        "status": {"podIP": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"},
    }


def objects(n: int) -> list[Any]:
    docs: list[dict[str, Any]] = []
    for k in range((n + PER_NS - 1) // PER_NS):
        ns = f"ns-{k}"
        docs.append(
            {"kind": "Namespace",
             "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}}}
        )  # fmt: skip
        docs.append(
            {"kind": "AuthorizationPolicy", "metadata": {"name": "allow-ns", "namespace": ns},
             "spec": {"rules": [{"from": [{"source": {"namespaces": [ns]}}]}]}}
        )  # fmt: skip
    for s in range((n + 9) // 10):
        j = s * 10
        docs.append(
            {"kind": "Service", "metadata": {"name": f"svc-{s}", "namespace": f"ns-{j // PER_NS}"},
             "spec": {"clusterIP": f"10.200.{(s >> 8) & 255}.{s & 255}",
                      "selector": {"app": f"svc-{s}"}, "ports": [{"port": 80, "targetPort": 8080}]}}
        )  # fmt: skip
    docs.extend(pod_doc(i) for i in range(n))
    return [parse_object(d) for d in docs]


def rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


# ------------------------------------------------------------------- control-plane process


async def serve(n: int, port: int, workdir: Path) -> None:
    settings = ControlPlaneSettings(
        listen=f"{HOST}:{port}",
        debug_listen=None,
        plaintext=True,
        sync_timeout=1,
        insecure_no_node_auth=True,  # the benchmark's clients send no credential; loopback
    )
    cp = ControlPlane(settings, ca=MeshCA.create_root())
    t = time.perf_counter()
    cp.store.apply("bench", objects(n))
    await cp.start()
    setup = time.perf_counter() - t
    print(json.dumps({"ready": cp.port, "setup_s": setup, "records": len(cp.translator.records())}),
          flush=True)  # fmt: skip
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    version = 0
    while line := await reader.readline():
        cmd = line.decode().split()
        if cmd[0] == "change":
            version += 1
            i = int(cmd[1])
            t0 = time.time()
            cp.store.apply("bench", [parse_object(pod_doc(i, version))])
            print(json.dumps({"t0": t0}), flush=True)
        elif cmd[0] == "quit":
            break
    await cp.stop()


# ------------------------------------------------------------------- driver


async def run_size(n: int, clients: int, changes: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", str(n), "--port", "0",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        hello = json.loads(await asyncio.wait_for(proc.stdout.readline(), 300))
        port = hello["ready"]
        ep = ControlPlaneEndpoint(address=f"{HOST}:{port}")
        received: dict[int, dict[str, float]] = {}
        expected: dict[str, int] = {}

        def hook(idx: int) -> Any:
            def on_response(resp: dpb.DeltaDiscoveryResponse) -> None:
                if len(resp.resources) > 20:
                    return
                now = time.time()
                for r in resp.resources:
                    k = expected.get(r.name)
                    if k is not None:
                        received.setdefault(k, {})[str(idx)] = now

            return on_response

        fleet = []
        t = time.perf_counter()
        for idx in range(clients):
            c = XdsClient(ep, node=f"node-{idx % NODES}", build_state=False)
            c.on_response = hook(idx)
            fleet.append((c, asyncio.create_task(c.run())))
        await asyncio.wait_for(asyncio.gather(*(c.synced.wait() for c, _ in fleet)), 600)
        fleet_sync = time.perf_counter() - t
        # A new node proxy's full state (decode, validate, build MeshState).
        full: list[float] = []
        for _ in range(3):
            newcomer = XdsClient(ep, node="node-0")
            t = time.perf_counter()
            task = asyncio.create_task(newcomer.run())
            await asyncio.wait_for(newcomer.synced.wait(), 120)
            full.append(time.perf_counter() - t)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        workloads = len(newcomer.state.workloads)
        rss, hwm = rss_kib(proc.pid)
        # Change fan-out.
        lat: list[float] = []
        for k in range(changes):
            i = (k * 37) % n
            name = f"Kubernetes//Pod/ns-{i // PER_NS}/pod-{i}"
            expected.clear()
            expected[name] = k
            proc.stdin.write(f"change {i}\n".encode())
            await proc.stdin.drain()
            t0 = json.loads(await proc.stdout.readline())["t0"]
            deadline = time.monotonic() + 10
            while len(received.get(k, {})) < clients and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            got = received.get(k, {})
            assert len(got) == clients, f"change {k}: only {len(got)}/{clients} clients got it"
            lat.append(max(got.values()) - t0)
            await asyncio.sleep(0.02)
        rss2, hwm2 = rss_kib(proc.pid)
        for _c, task in fleet:
            task.cancel()
        await asyncio.gather(*(task for _, task in fleet), return_exceptions=True)
        lat.sort()
        return {
            "workloads": n,
            "records": hello["records"],
            "workloads_received": workloads,
            "clients": clients,
            "cp_setup_s": round(hello["setup_s"], 3),
            "fleet_sync_s": round(fleet_sync, 3),
            "full_state_s": [round(x, 3) for x in full],
            "change_p50_ms": round(statistics.median(lat) * 1000, 1),
            "change_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1),
            "change_max_ms": round(lat[-1] * 1000, 1),
            "changes": changes,
            "cp_rss_mib": round(max(rss, rss2) / 1024, 1),
            "cp_peak_rss_mib": round(max(hwm, hwm2) / 1024, 1),
        }
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.write(b"quit\n")
            await proc.stdin.drain()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def verdict(ok: bool) -> str:
    return "OK " if ok else "MISS"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--changes", type=int, default=100)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.port, Path(".")))
        return 0
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = asyncio.run(run_size(n, args.clients, args.changes))
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\nmachine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"{'workloads':>9} {'full state (new proxy)':>24} {'change->50 p50/p99/max ms':>27} "
          f"{'CP RSS (peak) MiB':>19}")  # fmt: skip
    for r in results:
        best = min(r["full_state_s"])
        print(
            f"{r['workloads']:>9} {best:>14.3f} s {verdict(best < 2.0) if r['workloads'] >= 10000 else '   ':>6}"  # noqa: E501
            f" {r['change_p50_ms']:>8}/{r['change_p99_ms']}/{r['change_max_ms']}"
            f" {verdict(r['change_p99_ms'] < 100)}"
            f" {r['cp_rss_mib']:>8} ({r['cp_peak_rss_mib']})"
            f" {verdict(r['cp_peak_rss_mib'] < 500)}"
        )
    print("targets: full state at 10k < 2 s; change to all 50 proxies p99 < 100 ms; RSS < 500 MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
