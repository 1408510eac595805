"""Waypoint benchmark (one run, loopback): our waypoint vs the L4-only path vs direct vs Envoy
configured as a waypoint for the same routing (HBONE in, weighted routes, HBONE out).

Paths (all through the same real processes; wrk/loadgen connect from 127.0.0.1, the client
workload on node A):

  direct     wrk -> nginx v1 127.0.92.11:8080
  l4         wrk -> VIP 127.0.93.11:80 -> ztunnel A -> HBONE -> ztunnel B -> nginx (v1|v2)
  waypoint   wrk -> VIP 127.0.93.10:80 -> ztunnel A -> HBONE -> OUR waypoint 127.0.94.10
             (VirtualService 90/10 v1/v2) -> HBONE (waypoint identity) -> ztunnel B -> nginx
  envoy      wrk -> VIP 127.0.93.12:80 -> ztunnel A -> HBONE -> Envoy 127.0.94.20 (terminates
             CONNECT into an internal listener, HTTP route with weighted clusters 90/10, each
             cluster an internal listener tunnelling over HBONE with mTLS) -> ztunnel B -> nginx

Figures: rps (wrk, keep-alive, --conns connections), latency p50/p99 at a fixed --rate with
`bench/loadgen.py fixed` (open loop), added latency over the L4 path, waypoint CPU per 1000 rps
(process CPU over the fixed-rate run), waypoint RSS. Every process runs in its own group and
is killed at the end (`bench.harness.Supervisor`).

Every path is measured --reps times, repetitions interleaved (rep 1: every path, rep 2: ...),
and each figure is the median over repetitions (latency per percentile). The issue-14 targets
are printed with PASS/FAIL and the same-run Envoy figure (rps >= 1.0x Envoy, vCPU per 1000 rps
<= 1.0x, added p99 over L4 <= Envoy's), with the 1-minute load average (the 2 vCPUs are shared:
compare ratios, not absolute figures); the figures are appended to bench/history.csv.

Usage: .venv/bin/python -m bench.waypoint_bench [--reps 3] [--duration 10] [--rate 1000]
       [--conns 32] [--paths direct,l4,waypoint,envoy] [--no-history]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.envoy_configs import envoy_binary
from bench.harness import (
    PY,
    BenchError,
    Proc,
    Settings,
    Supervisor,
    loadgen,
    log,
    tree_cpu_seconds,
    tree_rss_mib,
    wait_tcp,
    wrk,
)
from bench.history import Figure, append
from bench.waypoint_envoy import envoy_certs, envoy_waypoint_config

HERE = Path(__file__).resolve().parent
V1, V2 = "127.0.92.11", "127.0.92.12"
VIP_WP, VIP_L4, VIP_ENVOY = "127.0.93.10", "127.0.93.11", "127.0.93.12"
WP_IP, ENVOY_IP = "127.0.94.10", "127.0.94.20"
NODE_A, NODE_B = "127.0.91.1", "127.0.92.1"
VENV_BIN = HERE.parent / ".venv" / "bin"


@dataclass(frozen=True, slots=True, kw_only=True)
class Wl:
    """A workload of the bench mesh: `services` maps a service name to the port it serves."""

    uid: str
    ip: str
    sa: str
    node: str
    version: str = ""
    services: Mapping[str, int] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        """The workload in the static mesh config format."""
        return {
            "uid": self.uid,
            "name": self.uid,
            "namespace": "default",
            "serviceAccount": self.sa,
            "addresses": [self.ip],
            "node": self.node,
            "tunnelProtocol": "HBONE",
            "canonicalName": self.sa,
            "canonicalRevision": self.version,
            "services": {
                f"default/{s}.default.svc.cluster.local": {
                    "ports": [{"servicePort": p, "targetPort": 8080 if p == 80 else p}]
                }
                for s, p in self.services.items()
            },
        }


def svc(name: str, vip: str, port: int, target: int, waypoint: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "namespace": "default",
        "hostname": f"{name}.default.svc.cluster.local",
        "addresses": [{"address": vip}],
        "ports": [{"servicePort": port, "targetPort": target}],
    }
    if waypoint:
        out["waypoint"] = {"hostname": f"default/{waypoint}.default.svc.cluster.local"}
    return out


def mesh_config() -> dict[str, Any]:
    backs = {"reviews": 80, "reviews-l4": 80, "reviews-envoy": 80}
    return {
        "workloads": [
            Wl(uid="client", ip="127.0.0.1", sa="sleep", node="node-a").doc(),
            Wl(
                uid="reviews-v1", ip=V1, sa="reviews", node="node-b", version="v1", services=backs
            ).doc(),
            Wl(
                uid="reviews-v2", ip=V2, sa="reviews", node="node-b", version="v2", services=backs
            ).doc(),
            Wl(
                uid="waypoint", ip=WP_IP, sa="waypoint", node="node-w", services={"waypoint": 15008}
            ).doc(),
            Wl(
                uid="waypoint-envoy",
                ip=ENVOY_IP,
                sa="waypoint-envoy",
                node="node-w",
                services={"waypoint-envoy": 15008},
            ).doc(),
        ],
        "services": [
            svc("reviews", VIP_WP, 80, 8080, "waypoint"),
            svc("reviews-l4", VIP_L4, 80, 8080, None),
            svc("reviews-envoy", VIP_ENVOY, 80, 8080, "waypoint-envoy"),
            svc("waypoint", "127.0.93.20", 15008, 15008, None),
            svc("waypoint-envoy", "127.0.93.21", 15008, 15008, None),
        ],
    }


L7 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def nginx_conf(work: Path) -> Path:
    www = work / "www"
    www.mkdir()
    (www / "1k").write_bytes(b"x" * 1024)
    for p in (work, www):
        p.chmod(0o755)
    (www / "1k").chmod(0o644)
    tmp = work / "nginx-tmp"
    tmp.mkdir()
    servers = "\n".join(
        f"  server {{ listen {ip}:8080 backlog=4096; root {www}; location / {{ }} }}"
        for ip in (V1, V2)
    )
    conf = f"""daemon off;
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off; tcp_nodelay on; keepalive_timeout 120s; keepalive_requests 10000000;
  client_body_temp_path {tmp}/b; proxy_temp_path {tmp}/p; fastcgi_temp_path {tmp}/f;
  uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s; default_type application/octet-stream;
{servers}
}}
"""
    path = work / "nginx.conf"
    path.write_text(conf)
    return path


# ---------------------------------------------------------------------------- the run


def smoke(addr: tuple[str, int], tries: int = 50) -> None:
    last: Exception | None = None
    for _ in range(tries):
        try:
            with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/1k", timeout=2) as r:
                if r.status == 200 and len(r.read()) == 1024:
                    return
        except Exception as err:  # retried until the deadline
            last = err
        time.sleep(0.2)
    raise BenchError(f"{addr}: no 200 with 1024 bytes: {last}")


def split_check(name: str) -> dict[str, int]:
    """Requests per version as the proxy counted them (proof the weighted route ran)."""
    import re

    out: dict[str, int] = {}
    try:
        if name == "envoy":
            url = f"http://{ENVOY_IP}:15000/stats?filter=cluster.v[12].upstream_rq_total"
            with urllib.request.urlopen(url, timeout=2) as r:
                for line in r.read().decode().splitlines():
                    key, _, value = line.partition(": ")
                    out[key.split(".")[1]] = int(value)
        elif name == "waypoint":
            with urllib.request.urlopen(f"http://{WP_IP}:15020/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("istio_requests_total{"):
                        m = re.search(r'destination_version="([^"]+)"', line)
                        if m:
                            key = m.group(1)
                            out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    except OSError as err:
        log(f"split check for {name} failed: {err}")
    return out


def measure(
    name: str, addr: tuple[str, int], proxy: Proc | None, s: Settings, rate: float
) -> dict[str, Any]:
    log(f"{name}: rps")
    wcpu0 = tree_cpu_seconds(proxy.pid) if proxy else 0.0
    rps, errors, _ = wrk(addr, s, s.wrk_conns, close=False)
    # CPU per request while saturated (proxy CPU-s / requests in the wrk run): depends far
    # less on the shared machine's load than rps does (bench/README.md, issue 14).
    wrk_cpu = tree_cpu_seconds(proxy.pid) - wcpu0 if proxy else 0.0
    log(f"{name}: {rps:.0f} rps ({errors} errors); latency at {rate:g} rps")
    cpu0 = tree_cpu_seconds(proxy.pid) if proxy else 0.0
    t0 = time.monotonic()
    lat = loadgen(
        [
            "fixed",
            addr[0],
            str(addr[1]),
            "--rate",
            str(rate),
            "--duration",
            str(s.duration),
            "--warmup",
            str(s.warmup),
        ],
        timeout=s.duration + s.warmup + 30,
    )
    wall = time.monotonic() - t0
    out: dict[str, Any] = {"rps": rps, "rps_errors": errors, "latency": lat}
    if proxy is not None:
        out["proxy_cpu_us_per_request"] = wrk_cpu / max(rps * s.duration, 1) * 1e6
        cpu = tree_cpu_seconds(proxy.pid) - cpu0
        achieved = max(lat.get("completed", 0), 1) / wall
        out["proxy_vcpu_per_krps"] = cpu / wall / (achieved / 1000.0)
        out["proxy_rss_mib"] = tree_rss_mib(proxy.pid)[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--paths", default="direct,l4,waypoint,envoy")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (interleaved), medians")
    ap.add_argument("--no-history", action="store_true", help="do not append bench/history.csv")
    ap.add_argument("--profile", type=Path, help="run our waypoint under cProfile into FILE")
    ap.add_argument("--out", type=Path, default=HERE / ".work" / "waypoint-results.json")
    args = ap.parse_args(argv)
    s = Settings(
        reps=1,
        duration=args.duration,
        bulk_duration=1,
        warmup=1.0,
        wrk_threads=2,
        wrk_conns=args.conns,
        cps_conns=16,
        fixed_rate=args.rate,
        ztunnel_workers=1,
    )
    paths = args.paths.split(",")
    work = Path(tempfile.mkdtemp(prefix="waypoint-bench-"))
    sup = Supervisor(work)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, Any] = {"settings": settings, "paths": {}}
    try:
        ca = work / "ca"
        mesh = work / "mesh.yaml"
        mesh.write_text(yaml.safe_dump(mesh_config()))
        (work / "l7.yaml").write_text(L7)
        sup.start("nginx", ["/usr/sbin/nginx", "-c", str(nginx_conf(work))])
        zt = str(VENV_BIN / "ztunnel")
        common = [
            "--mesh-config",
            str(mesh),
            "--ca-dir",
            str(ca),
            "--capture",
            "bind",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        from meshcore.ca import MeshCA

        MeshCA.load_or_create(ca, trust_domain="cluster.local")  # created once, shared
        sup.start(
            "ztunnel-a",
            [
                zt,
                "--node",
                "node-a",
                "--node-ip",
                NODE_A,
                *common,
                *(x for v in (VIP_WP, VIP_L4, VIP_ENVOY) for x in ("--outbound-listen", f"{v}:80")),
            ],
        )
        sup.start("ztunnel-b", [zt, "--node", "node-b", "--node-ip", NODE_B, *common])
        prof = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
        wp = sup.start(
            "waypoint",
            [
                PY,
                *prof,
                "-m",
                "waypoint.app",
                "--name",
                "waypoint",
                "--workload-uid",
                "waypoint",
                "--mesh-config",
                str(mesh),
                "--config",
                str(work / "l7.yaml"),
                "--ca-dir",
                str(ca),
                "--listen",
                f"{WP_IP}:15008",
                "--admin",
                f"{WP_IP}:15020",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
        )
        envoy: Proc | None = None
        if "envoy" in paths:
            try:
                cfg = work / "envoy-waypoint.json"
                envoy_cfg = envoy_waypoint_config(
                    envoy_certs(work, ca), listen_ip=ENVOY_IP, endpoints={"v1": V1, "v2": V2}
                )
                cfg.write_text(json.dumps(envoy_cfg))
                argv = [envoy_binary(), "-c", str(cfg), "--concurrency", "1", "-l", "warning"]
                envoy = sup.start("envoy-waypoint", argv)
            except BenchError as err:
                log(f"envoy path skipped: {err}")
                paths.remove("envoy")
        for addr in ((V1, 8080), (WP_IP, 15008), (NODE_B, 15021), (NODE_A, 15021)):
            wait_tcp(addr, 15)
        targets = {
            "direct": ((V1, 8080), None),
            "l4": ((VIP_L4, 80), None),
            "waypoint": ((VIP_WP, 80), wp),
            "envoy": ((VIP_ENVOY, 80), envoy),
        }
        reps: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        failed: set[str] = set()
        for name in paths:
            addr, proxy = targets[name]
            try:
                smoke(addr)
                wrk(addr, Settings(**(vars(s) | {"duration": 1.0})), s.wrk_conns, close=False)
            except BenchError as err:
                log(f"{name} failed: {err}")
                if proxy is not None:
                    log(proxy.log_tail())
                results["paths"][name] = {"error": str(err)}
                failed.add(name)
        # Repetitions interleaved (rep 1: every path, rep 2: ...) so that the shared machine's
        # drift affects every path alike; each figure is the median over repetitions.
        for rep in range(args.reps):
            for name in (n for n in paths if n not in failed):
                addr, proxy = targets[name]
                log(f"rep {rep + 1}/{args.reps}")
                try:
                    reps[name].append(measure(name, addr, proxy, s, args.rate))
                except BenchError as err:
                    log(f"{name} failed: {err}")
                    results["paths"][name] = {"error": str(err)}
                    failed.add(name)
        for name in paths:
            if name not in failed and reps[name]:
                results["paths"][name] = medians(reps[name])
                results["paths"][name]["split"] = split_check(name)
    finally:
        sup.stop_all()
    return report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the table and the targets, write the JSON, append the history; 1 if a target
    was missed."""
    load = os.getloadavg()[0]
    table = summarize(results["paths"])
    verdicts = targets_met(results["paths"])
    results["table"] = table
    results["targets"] = verdicts
    results["load_average_1m"] = load
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{args.reps} repetition(s), medians; load average {load:.1f} (1 min) at the end")
    print("\n".join(table))
    for name, r in results["paths"].items():
        if r.get("split"):
            print(f"{name}: requests per version {r['split']}")
    print()
    for what, figure, ok in verdicts:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {figure}")
    if not args.no_history and "waypoint" in results["paths"]:
        append("waypoint", history_figures(results["paths"], args.reps))
    return 0 if all(ok for _, _, ok in verdicts) else 1


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over repetitions (latency per percentile); the runs kept."""
    out: dict[str, Any] = {"reps": runs}
    for key in (
        "rps",
        "rps_errors",
        "proxy_vcpu_per_krps",
        "proxy_rss_mib",
        "proxy_cpu_us_per_request",
    ):
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            out[key] = statistics.median(values)
    lat: dict[str, float] = {}
    for q in ("p50_ms", "p90_ms", "p99_ms"):
        values = [r["latency"][q] for r in runs if r.get("latency", {}).get(q) is not None]
        if values:
            lat[q] = statistics.median(values)
    out["latency"] = lat
    return out


def _added_p99(paths: dict[str, dict[str, Any]], name: str) -> float | None:
    p99, base = _lat(paths.get(name, {}), "p99"), _lat(paths.get("l4", {}), "p99")
    return None if p99 is None or base is None else p99 - base


def targets_met(paths: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """Issue 14's waypoint targets against Envoy as a waypoint in the same run: (what,
    figures, met)."""
    ours, envoy = paths.get("waypoint", {}), paths.get("envoy", {})
    out: list[tuple[str, str, bool]] = []
    a, b = ours.get("rps"), envoy.get("rps")
    if a and b:
        out.append(
            ("rps >= 1.0x Envoy waypoint", f"{a:.0f} vs Envoy {b:.0f} = {a / b:.2f}x", a / b >= 1.0)
        )
    a, b = ours.get("proxy_vcpu_per_krps"), envoy.get("proxy_vcpu_per_krps")
    if a and b:
        out.append(
            (
                "vCPU per 1000 rps <= 1.0x Envoy waypoint",
                f"{a:.3f} vs Envoy {b:.3f} = {a / b:.2f}x",
                a / b <= 1.0,
            )
        )
    a, b = _added_p99(paths, "waypoint"), _added_p99(paths, "envoy")
    if a is not None and b is not None:
        out.append(
            ("added p99 over L4 <= Envoy waypoint's", f"{a:+.3f} ms vs Envoy {b:+.3f} ms", a <= b)
        )
    if not out:
        out.append(("targets (need the waypoint and envoy paths)", "not measured", False))
    return out


def history_figures(paths: dict[str, dict[str, Any]], reps: int) -> list[Figure]:
    ours, envoy = paths.get("waypoint", {}), paths.get("envoy", {})
    note = f"{reps} reps, medians; 1 KiB keep-alive, weighted routes"
    figs: list[Figure] = []
    for key, figure, unit, better in (
        ("rps", "waypoint_rps", "req/s", "higher"),
        ("proxy_vcpu_per_krps", "waypoint_vcpu_per_1000_rps", "vCPU", "lower"),
        ("proxy_cpu_us_per_request", "waypoint_cpu_us_per_request", "us", "lower"),
    ):
        if isinstance(ours.get(key), int | float):
            figs.append(
                Figure(
                    figure=figure,
                    value=round(ours[key], 3),
                    unit=unit,
                    better=better,
                    envoy=envoy.get(key),
                    note=note,
                )
            )
    for q in ("p50", "p99"):
        p, base = _lat(ours, q), _lat(paths.get("l4", {}), q)
        e = _lat(envoy, q)
        if p is not None and base is not None:
            figs.append(
                Figure(
                    figure=f"waypoint_added_{q}_ms",
                    value=round(p - base, 3),
                    unit="ms",
                    better="lower",
                    envoy=None if e is None else round(e - base, 3),
                    note=note + " (over L4; ratio meaningless when Envoy's is <= 0)",
                )
            )
    return figs


def _lat(r: dict[str, Any], q: str) -> float | None:
    lat = r.get("latency") or {}
    v = lat.get(f"{q}_ms")
    return float(v) if v is not None else None


def summarize(paths: dict[str, dict[str, Any]]) -> list[str]:
    def cell(name: str, key: str, fmt: str = "{:.0f}") -> str:
        r = paths.get(name, {})
        v = r.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    lines = [
        "| metric | direct | L4 only (ztunnel pair) | our waypoint | Envoy waypoint |",
        "|---|---:|---:|---:|---:|",
    ]
    lines.append(
        "| rps (1 KiB, keep-alive) | "
        + " | ".join(cell(n, "rps") for n in ("direct", "l4", "waypoint", "envoy"))
        + " |"
    )

    def lat(name: str) -> str:
        p50, p99 = _lat(paths.get(name, {}), "p50"), _lat(paths.get(name, {}), "p99")
        return f"{p50:.3f} / {p99:.3f}" if p50 is not None and p99 is not None else "-"

    lines.append(
        "| latency p50 / p99 at fixed rate (ms) | "
        + " | ".join(lat(n) for n in ("direct", "l4", "waypoint", "envoy"))
        + " |"
    )
    base50, base99 = _lat(paths.get("l4", {}), "p50"), _lat(paths.get("l4", {}), "p99")

    def added(name: str) -> str:
        p50, p99 = _lat(paths.get(name, {}), "p50"), _lat(paths.get(name, {}), "p99")
        if None in (p50, p99, base50, base99):
            return "-"
        assert p50 is not None
        assert p99 is not None
        assert base50 is not None
        assert base99 is not None
        return f"{p50 - base50:+.3f} / {p99 - base99:+.3f}"

    lines.append(
        "| added over L4, p50 / p99 (ms) | | | " + added("waypoint") + " | " + added("envoy") + " |"
    )
    cpu = [cell(n, "proxy_vcpu_per_krps", "{:.3f}") for n in ("waypoint", "envoy")]
    lines.append(f"| proxy vCPU per 1000 rps | | | {cpu[0]} | {cpu[1]} |")
    per = [cell(n, "proxy_cpu_us_per_request", "{:.0f}") for n in ("waypoint", "envoy")]
    lines.append(f"| proxy CPU per request while saturated (us) | | | {per[0]} | {per[1]} |")
    lines.append(
        "| proxy RSS (MiB) | | | "
        + cell("waypoint", "proxy_rss_mib", "{:.1f}")
        + " | "
        + cell("envoy", "proxy_rss_mib", "{:.1f}")
        + " |"
    )
    return lines


if __name__ == "__main__":
    sys.exit(main())
