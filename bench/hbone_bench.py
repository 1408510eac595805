"""HBONE benchmark: direct vs an Envoy HBONE pair vs our node-proxy (ztunnel) pair, on loopback.
The node-proxy pair runs twice: HBONE over HTTP/2 ("ztunnel") and over HTTP/3 ("ztunnel-h3",
its own addresses, see `bench.harness.H3_PAIR`), in the same run.

Owns the benchmark run: setting up the three paths (the shared nginx backend, the Envoy pair, our
node-proxy pair), the interleaved repetitions and bench/.work/results.json. Its parts:
`bench.harness` (processes, /proc accounting, certificates, load generators and measurements),
`bench.envoy_configs` (nginx, Envoy and mesh configurations), `bench.report` (medians and the
table). Run as `python -m bench.hbone_bench` (bench/run). See bench/README.md for the method.

Invariants:
- Every process it starts runs in its own process group and is killed (TERM, then KILL) when the
  run ends, normally, on error, on Ctrl-C/SIGTERM or when the overall time limit expires; the run's
  scratch directory is removed (only results.json stays).
- All three paths hit the same backend (nginx on 127.0.2.10:8080) with the same requests; paths are
  measured interleaved (rep 1: direct, envoy, ours; rep 2: ...), medians are reported.
- A path that cannot be set up (e.g. the ztunnel command does not exist yet) is skipped with a
  message, never faked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import tempfile
import types
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.envoy_configs import (
    MESH_CONFIG,
    envoy_binary,
    envoy_client_config,
    envoy_server_config,
    nginx_conf,
)
from bench.harness import (
    BACKEND,
    ENVOY_A_LISTEN,
    ENVOY_ADMIN,
    ENVOY_B_HBONE,
    ENVOY_CONCURRENCY,
    H3_PAIR,
    LABEL,
    MEASUREMENTS,
    NODE_IP,
    PATHS,
    RESULTS,
    SERVICE_VIP,
    VENV_BIN,
    WORK_ROOT,
    BenchError,
    CertFiles,
    PathRuntime,
    Proc,
    Settings,
    Supervisor,
    Timeout,
    log,
    make_certs,
    port_free,
    run_cmd,
    smoke_get,
    wait_http,
    wait_tcp,
    wrk,
)
from bench.report import build_table, render_table, summarize

# ---------------------------------------------------------------------------------------------
# Set-up of the three paths


def start_backend(sup: Supervisor, workdir: Path) -> Proc:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise BenchError("nginx not installed (run ./scripts/setup --bench)")
    if not port_free(BACKEND):
        raise BenchError(f"{BACKEND[0]}:{BACKEND[1]} is in use")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = nginx_conf(workdir)
    proc = sup.start(
        "nginx", [nginx, "-p", f"{workdir}/", "-e", f"{workdir}/nginx-error.log", "-c", str(conf)]
    )
    wait_tcp(BACKEND, 10, proc)
    smoke_get(BACKEND)
    return proc


def start_envoy_pair(sup: Supervisor, workdir: Path, certs: CertFiles) -> PathRuntime:
    binary = envoy_binary()
    for addr in (ENVOY_A_LISTEN, ENVOY_B_HBONE, *ENVOY_ADMIN.values()):
        if not port_free(addr):
            raise BenchError(f"{addr[0]}:{addr[1]} is in use")
    procs = []
    for which, cfg, base_id in (
        ("b", envoy_server_config(certs), 7301),
        ("a", envoy_client_config(certs), 7302),
    ):
        path = workdir / f"envoy-{which}.json"
        path.write_text(json.dumps(cfg, indent=1))
        proc = sup.start(
            f"envoy-{which}",
            [
                binary,
                "-c",
                str(path),
                "--concurrency",
                str(ENVOY_CONCURRENCY),
                "--base-id",
                str(base_id),
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
        )
        host, port = ENVOY_ADMIN[which]
        wait_http(f"http://{host}:{port}/ready", 30, proc)
        procs.append(proc)
    procs.reverse()  # report A first
    smoke_get(ENVOY_A_LISTEN)
    return PathRuntime("envoy", ENVOY_A_LISTEN, procs, ENVOY_CONCURRENCY)


def ztunnel_available() -> str | None:
    """None if the ztunnel command can run, else why not."""
    exe = VENV_BIN / "ztunnel"
    if not exe.exists():
        return f"{exe} does not exist"
    try:
        spec = importlib.util.find_spec("ztunnel.app")
    except ImportError as exc:
        return f"ztunnel.app cannot be imported: {exc}"
    if spec is None:
        return "ztunnel/app.py does not exist yet"
    return None


def ztunnel_flags() -> set[str]:
    """The long options the installed ztunnel command accepts (from its --help)."""
    out = run_cmd([str(VENV_BIN / "ztunnel"), "--help"], timeout=30)
    return set(re.findall(r"--[a-z][a-z0-9-]*", out))


def start_ztunnel_pair(
    sup: Supervisor, workdir: Path, ca_dir: Path, workers: int, *, http3: bool = False
) -> PathRuntime:
    if (why := ztunnel_available()) is not None:
        raise BenchError(why)
    vip: tuple[str, int] = SERVICE_VIP
    server: str = BACKEND[0]
    node_ip: dict[str, str] = NODE_IP
    config = MESH_CONFIG
    name = "ztunnel"
    if http3:
        vip, server, node_ip = H3_PAIR["vip"], H3_PAIR["server"], H3_PAIR["node_ip"]
        config = MESH_CONFIG.replace(BACKEND[0], server).replace(SERVICE_VIP[0], vip[0])
        name = "ztunnel-h3"
    for addr in (vip, (server, 15008)):
        if not port_free(addr):
            raise BenchError(f"{addr[0]}:{addr[1]} is in use")
    mesh = workdir / f"mesh-{name}.yaml"
    mesh.write_text(config)
    flags = ztunnel_flags()
    extra: list[str] = []
    if http3:
        if "--http3" not in flags:
            raise BenchError("ztunnel has no --http3 flag")
        extra += ["--http3", "--http3-peer", "*"]
    if "--workers" in flags:
        extra += ["--workers", str(workers)]
    else:
        log("ztunnel has no --workers flag yet: running it single-worker")
        workers = 1
    if "--no-access-log" in flags:
        # The Envoy pair logs nothing per connection; compare like with like.
        extra.append("--no-access-log")
    procs = []
    for node in ("node-b", "node-a"):
        argv = [
            str(VENV_BIN / "ztunnel"),
            "--mesh-config",
            str(mesh),
            "--node",
            node,
            "--ca-dir",
            str(ca_dir),
            "--capture",
            "bind",
            "--node-ip",
            node_ip[node],
            *extra,
        ]
        if node == "node-a":
            argv += ["--outbound-listen", f"{vip[0]}:{vip[1]}"]
            if http3:
                # The client workload (127.0.0.1) is node A's in both pairs: node A's own
                # (unused) inbound HBONE listener on it needs another port than the first pair's.
                argv += ["--hbone-port", "15018"]
        proc = sup.start(f"{name}-{node}", argv)
        wait_http(f"http://{node_ip[node]}:15021/healthz/ready", 30, proc)
        procs.append(proc)
    procs.reverse()  # report node A first
    smoke_get(vip)
    return PathRuntime(name, vip, procs, workers)


# ---------------------------------------------------------------------------------------------
# Main


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(
            reps=1,
            duration=3.0,
            bulk_duration=2.0,
            warmup=0.5,
            wrk_threads=2,
            wrk_conns=32,
            cps_conns=16,
            fixed_rate=1000.0,
            ztunnel_workers=args.workers,
        )
    else:
        s = Settings(
            reps=3,
            duration=10.0,
            bulk_duration=5.0,
            warmup=1.0,
            wrk_threads=2,
            wrk_conns=32,
            cps_conns=16,
            fixed_rate=1000.0,
            ztunnel_workers=args.workers,
        )
    if args.reps is not None:
        s.reps = args.reps
    if args.duration is not None:
        s.duration = args.duration
    return s


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        out = run_cmd([envoy_binary(), "--version"], timeout=10)
        info["envoy_version"] = out.strip().splitlines()[-1]
    return info


@contextlib.contextmanager
def guarded(time_limit: float) -> Iterator[None]:
    """Turn SIGTERM/SIGINT/SIGALRM into exceptions so the finally-blocks always tear down."""

    def on_signal(signum: int, _frame: types.FrameType | None) -> None:
        if signum == signal.SIGALRM:
            raise Timeout(f"time limit of {time_limit:.0f}s exceeded")
        raise KeyboardInterrupt(f"signal {signum}")

    old = {
        sig: signal.signal(sig, on_signal)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
    }
    signal.alarm(int(time_limit))
    try:
        yield
    finally:
        signal.alarm(0)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="HBONE benchmark: direct vs Envoy pair vs ours.")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 rep, short runs (~1 min)")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (default 3)")
    ap.add_argument("--duration", type=float, help="seconds per load run (default 10)")
    ap.add_argument(
        "--paths", default=",".join(PATHS), help="comma list of direct,envoy,ztunnel,ztunnel-h3"
    )
    ap.add_argument(
        "--workers", type=int, default=1, help="ztunnel --workers (default 1, its own default)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (debugging)")
    ap.add_argument("--time-limit", type=float, help="overall limit in seconds")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = ap.parse_args(argv)
    s = settings_from(args)
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in wanted:
        if p not in PATHS:
            ap.error(f"unknown path {p!r}")
    if shutil.which("wrk") is None:
        log("wrk not installed (run ./scripts/setup --bench)")
        return 2
    per_rep = len(wanted) * (2 * s.duration + s.duration + s.warmup + s.bulk_duration + 4)
    limit = args.time_limit or (120 + s.reps * per_rep * 1.5)

    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    # Never leave a previous run's results looking like this run's (this one may be aborted).
    args.json.unlink(missing_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=WORK_ROOT))
    workdir.chmod(0o755)
    sup = Supervisor(workdir)
    runtimes: dict[str, PathRuntime] = {}
    skipped: dict[str, str] = {}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    started = datetime.now(UTC)
    certs_source: str | None = None
    try:
        with guarded(limit):
            log(f"work dir {workdir}; time limit {limit:.0f}s; settings {s}")
            backend = start_backend(sup, workdir)
            log(f"backend nginx ready on {BACKEND[0]}:{BACKEND[1]} (pid {backend.pid})")
            ca_dir = workdir / "ca"
            ca_dir.mkdir()
            runtimes, skipped, certs_source = _start_paths(sup, workdir, ca_dir, wanted, s)
            raw = _measure(runtimes, s)
    except KeyboardInterrupt:
        log("interrupted; tearing down")
        return 130
    except (Timeout, BenchError) as exc:
        log(f"ABORTED: {exc}")
        return 1
    finally:
        sup.stop_all()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    zt = runtimes.get("ztunnel")
    zt_workers = zt.workers if zt is not None else "-"
    summary = summarize(raw, runtimes)
    rows = build_table(summary, s.fixed_rate)
    print()
    print(render_table(rows))
    for p, why in skipped.items():
        print(f"\nSKIPPED {LABEL[p]}: {why}")
    print(
        f"\n{s.reps} rep(s), medians; {s.duration:g}s per run; wrk -t{s.wrk_threads} "
        f"-c{s.wrk_conns} (rps) / -c{s.cps_conns} + 'Connection: close' (new conns); "
        f"latency: open-loop {s.fixed_rate:g} rps; bulk {s.bulk_duration:g}s on 1 connection; "
        f"envoy --concurrency {ENVOY_CONCURRENCY}; ztunnel workers {zt_workers}."
    )
    doc = {
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "machine": machine_info(),
        "settings": {**s.__dict__, "ztunnel_workers_used": zt_workers},
        "certificates": certs_source,
        "skipped": skipped,
        "summary": summary,
        "table": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "raw": raw,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str))
    print(f"results: {args.json}")
    return 0


def _start_paths(
    sup: Supervisor, workdir: Path, ca_dir: Path, wanted: list[str], s: Settings
) -> tuple[dict[str, PathRuntime], dict[str, str], str | None]:
    """(runtimes of the `wanted` paths that started, path -> why it was skipped, where the
    Envoy pair's certificates came from)."""
    runtimes: dict[str, PathRuntime] = {}
    skipped: dict[str, str] = {}
    certs_source = None
    if "direct" in wanted:
        runtimes["direct"] = PathRuntime("direct", BACKEND, [], 0)
    if "envoy" in wanted:
        try:
            certs = make_certs(workdir, ca_dir)
            certs_source = certs.source
            log(f"certificates from {certs.source}")
            runtimes["envoy"] = start_envoy_pair(sup, workdir, certs)
            log("envoy pair ready")
        except BenchError as exc:
            skipped["envoy"] = str(exc)
            log(f"SKIP envoy pair: {exc}")
    if "ztunnel" in wanted:
        try:
            runtimes["ztunnel"] = start_ztunnel_pair(sup, workdir, ca_dir, s.ztunnel_workers)
            log("node-proxy pair ready")
        except BenchError as exc:
            skipped["ztunnel"] = str(exc)
            log(f"SKIP node-proxy pair: {exc}")
    if "ztunnel-h3" in wanted:
        try:
            runtimes["ztunnel-h3"] = start_ztunnel_pair(
                sup, workdir, ca_dir, s.ztunnel_workers, http3=True
            )
            log("node-proxy pair over HTTP/3 ready")
        except BenchError as exc:
            skipped["ztunnel-h3"] = str(exc)
            log(f"SKIP node-proxy pair over HTTP/3: {exc}")
    return runtimes, skipped, certs_source


def _measure(
    runtimes: dict[str, PathRuntime], s: Settings
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """path -> metric -> the successful repetitions' results (failures are logged)."""
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    order = [p for p in PATHS if p in runtimes]
    # Warm-up: a short keep-alive run through each path (connection pools, JIT-free caches).
    for p in order:
        wrk(runtimes[p].addr, Settings(**{**s.__dict__, "duration": 1.0}), 8, close=False)
    for rep in range(s.reps):
        for metric, fn in MEASUREMENTS:
            for p in order:
                rt = runtimes[p]
                try:
                    r = fn(rt, s)
                except BenchError as exc:
                    log(f"rep {rep + 1} {metric} {p}: FAILED: {exc}")
                    r = {"failed": str(exc)}
                else:
                    log(f"rep {rep + 1}/{s.reps} {metric:8s} {p:8s} {_brief(metric, r)}")
                raw.setdefault(p, {}).setdefault(metric, [])
                if "failed" not in r:
                    raw[p][metric].append(r)
    return raw


def _brief(metric: str, r: dict[str, Any]) -> str:
    cpu = " ".join(f"{k}={v:.2f}s" for k, v in r.get("proxy_cpu_s", {}).items())
    if metric == "rps":
        text = f"{r['rps']:.0f} req/s"
    elif metric == "cps":
        text = f"{r['cps']:.0f} conn/s"
    elif metric == "latency":
        text = (
            f"p50 {r['p50_ms']:.3f} p90 {r['p90_ms']:.3f} p99 {r['p99_ms']:.3f} ms "
            f"@ {r['achieved_rate']:.0f}/s"
        )
    else:
        text = f"{r['gbps']:.2f} Gb/s"
    err = f" errors={r['errors']}" if r.get("errors") else ""
    return f"{text}{err}" + (f" cpu {cpu}" if cpu else "")


if __name__ == "__main__":
    raise SystemExit(main())
