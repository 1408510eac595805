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
import statistics
import tempfile
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

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
from bench.history import Figure, append
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


CONTROLPLANE = ("127.0.8.1", 15012)
"""`--controlplane`: our control plane (plaintext xDS + CA on loopback; debug/ready on 15014)."""
NODE_TOKENS = {"node-a": "bench-node-a-token-0123456789", "node-b": "bench-node-b-token-0123456789"}


def controlplane_manifests() -> list[dict[str, Any]]:
    """MESH_CONFIG as Kubernetes objects: the client pod (127.0.0.1, sa sleep) on node-a, the
    server pod (127.0.2.10, sa echo, port 8080) on node-b, service echo VIP 127.0.3.10:80."""
    ns = "default"

    def pod(name: str, sa: str, node: str, ip: str, port: int | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"serviceAccountName": sa, "nodeName": node}
        if port is not None:
            spec["containers"] = [{"name": name, "ports": [{"containerPort": port}]}]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": spec,
            "status": {"podIP": ip},
        }

    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}},
        },
        pod("client", "sleep", "node-a", "127.0.0.1"),
        pod("server", "echo", "node-b", BACKEND[0], BACKEND[1]),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": ns},
            "spec": {
                "clusterIP": SERVICE_VIP[0],
                "selector": {"app": "server"},
                "ports": [{"port": SERVICE_VIP[1], "targetPort": BACKEND[1]}],
            },
        },
    ]


def start_controlplane(sup: Supervisor, workdir: Path, ca_dir: Path) -> dict[str, Path]:
    """Our control plane serving the bench's mesh (issue 14: the node-proxy pair fed by it,
    `--controlplane`); returns each node's credential file."""
    exe = VENV_BIN / "ambient-controlplane"
    if not exe.exists():
        raise BenchError(f"{exe} does not exist")
    if not port_free(CONTROLPLANE):
        raise BenchError(f"{CONTROLPLANE[0]}:{CONTROLPLANE[1]} is in use")
    manifests = workdir / "manifests"
    manifests.mkdir()
    (manifests / "mesh.yaml").write_text(yaml.safe_dump_all(controlplane_manifests()))
    creds = workdir / "node-credentials.yaml"
    creds.write_text(yaml.safe_dump(NODE_TOKENS))
    tokens = {}
    for node, token in NODE_TOKENS.items():
        tokens[node] = workdir / f"{node}.token"
        tokens[node].write_text(token + "\n")
    host, port = CONTROLPLANE
    argv = [
        str(exe),
        "--listen",
        f"{host}:{port}",
        "--debug-listen",
        f"{host}:15014",
        "--plaintext",
        "--manifest-dir",
        str(manifests),
        "--ca-dir",
        str(ca_dir),
        "--node-credentials",
        str(creds),
        "--log-level",
        "warning",
    ]
    proc = sup.start("controlplane", argv)
    wait_http(f"http://{host}:15014/ready", 30, proc)
    return tokens


def start_ztunnel_pair(
    sup: Supervisor,
    workdir: Path,
    config_from: Path | Mapping[str, Path],
    workers: int,
    *,
    http3: bool = False,
) -> PathRuntime:
    """`config_from`: the CA directory (static mode: MESH_CONFIG, certificates signed by that
    CA) or each node's credential file (fed by the control plane, `start_controlplane`)."""
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
        if isinstance(config_from, Path):
            feed = ["--mesh-config", str(mesh), "--ca-dir", str(config_from)]
        else:
            xds = f"{CONTROLPLANE[0]}:{CONTROLPLANE[1]}"
            feed = ["--xds-address", xds, "--node-credential-file", str(config_from[node])]
        argv = [
            str(VENV_BIN / "ztunnel"),
            *feed,
            "--node",
            node,
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
    quick = args.quick  # smoke run: one short repetition
    s = Settings(
        reps=1 if quick else 3,
        duration=3.0 if quick else 10.0,
        bulk_duration=2.0 if quick else 5.0,
        warmup=0.5 if quick else 1.0,
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


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings, list[str]]:
    """The flags, the run's settings and the paths asked for (usage error for an unknown one)."""
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
    ap.add_argument("--no-history", action="store_true", help="do not append bench/history.csv")
    ap.add_argument(
        "--controlplane",
        action="store_true",
        help="feed the node-proxy pair (HTTP/2) from our control plane (xDS + CA), not statically",
    )
    args = ap.parse_args(argv)
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in wanted:
        if p not in PATHS:
            ap.error(f"unknown path {p!r}")
    return args, settings_from(args), wanted


@dataclass
class Run:
    """What one run set up and measured (filled in as it goes)."""

    runtimes: dict[str, PathRuntime] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """Path -> why it could not be set up."""
    raw: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    """Path -> metric -> one figure per repetition that did not fail."""
    certs_source: str | None = None
    controlplane: bool = False
    """--controlplane: the node-proxy pair (HTTP/2) is fed by our control plane."""


def start_paths(sup: Supervisor, workdir: Path, wanted: list[str], s: Settings, run: Run) -> None:
    """Start the backend and every wanted path (in PATHS order); a path that cannot be set up
    is skipped with its reason."""
    backend = start_backend(sup, workdir)
    log(f"backend nginx ready on {BACKEND[0]}:{BACKEND[1]} (pid {backend.pid})")
    ca_dir = workdir / "ca"
    ca_dir.mkdir()

    def envoy() -> PathRuntime:
        certs = make_certs(workdir, ca_dir)
        run.certs_source = certs.source
        log(f"certificates from {certs.source}")
        return start_envoy_pair(sup, workdir, certs)

    starters: dict[str, Callable[[], PathRuntime]] = {
        "direct": lambda: PathRuntime("direct", BACKEND, [], 0),
        "envoy": envoy,
        "ztunnel": lambda: start_ztunnel_pair(
            sup,
            workdir,
            start_controlplane(sup, workdir, ca_dir) if run.controlplane else ca_dir,
            s.ztunnel_workers,
        ),
        "ztunnel-h3": lambda: start_ztunnel_pair(
            sup, workdir, ca_dir, s.ztunnel_workers, http3=True
        ),
    }
    for p in PATHS:
        if p not in wanted:
            continue
        try:
            run.runtimes[p] = starters[p]()
        except BenchError as exc:
            run.skipped[p] = str(exc)
            log(f"SKIP {LABEL[p]}: {exc}")
        else:
            if p != "direct":
                log(f"{LABEL[p]} ready")


def measure(run: Run, s: Settings) -> None:
    """Warm every path up, then the repetitions, the paths interleaved within each metric."""
    order = [p for p in PATHS if p in run.runtimes]
    for p in order:  # idle: every path started, nothing carried yet but the smoke GET
        run.runtimes[p].sample_idle_rss()
    # Warm-up: a short keep-alive run through each path (connection pools, JIT-free caches).
    for p in order:
        wrk(run.runtimes[p].addr, Settings(**{**s.__dict__, "duration": 1.0}), 8, close=False)
    for rep in range(s.reps):
        for metric, fn in MEASUREMENTS:
            for p in order:
                try:
                    r = fn(run.runtimes[p], s)
                except BenchError as exc:
                    log(f"rep {rep + 1} {metric} {p}: FAILED: {exc}")
                    r = {"failed": str(exc)}
                else:
                    log(f"rep {rep + 1}/{s.reps} {metric:8s} {p:8s} {_brief(metric, r)}")
                run.raw.setdefault(p, {}).setdefault(metric, [])
                if "failed" not in r:
                    run.raw[p][metric].append(r)


def print_report(
    rows: list[dict[str, Any]], run: Run, s: Settings, per_op: dict[Any, float]
) -> None:
    """The table, the skipped paths, the run's settings and the CPU per operation."""
    print()
    print(render_table(rows))
    for p, why in run.skipped.items():
        print(f"\nSKIPPED {LABEL[p]}: {why}")
    print(
        f"\n{s.reps} rep(s), medians; {s.duration:g}s per run; wrk -t{s.wrk_threads} "
        f"-c{s.wrk_conns} (rps) / -c{s.cps_conns} + 'Connection: close' (new conns); "
        f"latency: open-loop {s.fixed_rate:g} rps; bulk {s.bulk_duration:g}s on 1 connection; "
        f"envoy --concurrency {ENVOY_CONCURRENCY}; ztunnel workers {_workers(run)}; "
        f"load average at the end {os.getloadavg()[0]:.1f}."
    )
    for label, key in (("request (keep-alive rps run)", "rps"), ("new connection", "cps")):
        z, e = per_op.get(("ztunnel", key)), per_op.get(("envoy", key))
        if z is not None and e is not None:
            ratio = z / e
            print(f"CPU per {label}, both proxies: ours {z:.1f} us, envoy {e:.1f} us", end="")
            print(f" ({ratio:.2f}x)")
    z, e = per_op.get(("ztunnel", "rps-rest")), per_op.get(("envoy", "rps-rest"))
    if z is not None and e is not None:
        zi, ei = per_op[("ztunnel", "rps-idle")], per_op[("envoy", "rps-idle")]
        parts = {
            p: " (wrk {:.1f}, nginx {:.1f})".format(
                per_op[(p, "rps-loadgen")], per_op[(p, "rps-backend")]
            )
            for p in ("ztunnel", "envoy")
        }
        print(
            f"rest of the machine per request (wrk, nginx, kernel outside the proxies): ours "
            f"{z:.1f} us{parts['ztunnel']}, envoy {e:.1f} us{parts['envoy']}; machine idle "
            f"{zi:.0%} / {ei:.0%}"
        )


def record_history(
    rows: list[dict[str, Any]], run: Run, s: Settings, per_op: dict[Any, float]
) -> None:
    """Append the node-proxy pair's figures, with the same run's Envoy figures, to history."""
    note = f"{s.reps} rep(s) x {s.duration:g}s, ztunnel workers {_workers(run)}"
    if run.controlplane:
        note += ", control-plane mode"
    figures = history_figures(rows, note)
    for name, key in (("cpu_us_per_request", "rps"), ("cpu_us_per_connection", "cps")):
        if (z := per_op.get(("ztunnel", key))) is not None:
            e = per_op.get(("envoy", key))
            envoy = None if e is None else round(e, 1)
            figures.append(
                Figure(
                    figure=name,
                    value=round(z, 1),
                    unit="us",
                    better="lower",
                    envoy=envoy,
                    note=note,
                )
            )
    append("hbone", figures)


def _workers(run: Run) -> int | str:
    zt = run.runtimes.get("ztunnel")
    return zt.workers if zt is not None else "-"


def main(argv: list[str] | None = None) -> int:
    args, s, wanted = parse_args(argv)
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
    run = Run(controlplane=args.controlplane)
    started = datetime.now(UTC)
    try:
        with guarded(limit):
            log(f"work dir {workdir}; time limit {limit:.0f}s; settings {s}")
            start_paths(sup, workdir, wanted, s, run)
            measure(run, s)
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

    summary = summarize(run.raw, run.runtimes)
    rows = build_table(summary, s.fixed_rate)
    per_op = cpu_per_op(run.raw, s.duration)
    print_report(rows, run, s, per_op)
    if not args.no_history and "ztunnel" in run.runtimes:
        record_history(rows, run, s, per_op)
    doc = {
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "machine": machine_info(),
        "settings": {**s.__dict__, "ztunnel_workers_used": _workers(run)},
        "certificates": run.certs_source,
        "skipped": run.skipped,
        "summary": summary,
        "table": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "raw": run.raw,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str))
    print(f"results: {args.json}")
    return 0


HISTORY_FIGURES = {
    "small-request rps (1 KB, keep-alive)": ("small_request_rps", "req/s", "higher"),
    "new connections/s (conn+GET+close)": ("new_connections_per_s", "conn/s", "higher"),
    "added latency p50 vs direct (ms)": ("added_latency_p50_ms", "ms", "lower"),
    "added latency p99 vs direct (ms)": ("added_latency_p99_ms", "ms", "lower"),
    "bulk throughput, 1 conn (Gb/s)": ("bulk_gbps", "Gb/s", "higher"),
    "CPU per Gb/s, both proxies (CPU-s/Gbit)": ("cpu_per_gbps", "vCPU", "lower"),
    "CPU per 1000 rps, busiest proxy (vCPU)": ("cpu_per_1000_rps", "vCPU", "lower"),
    "RSS per worker, largest proxy (MiB)": ("rss_per_worker_mib", "MiB", "lower"),
    "idle RSS per worker, largest proxy (MiB)": ("idle_rss_per_worker_mib", "MiB", "lower"),
    "PSS per worker, largest proxy (MiB)": ("pss_per_worker_mib", "MiB", "lower"),
}
"""Table row -> (history figure name, unit, better): the names bench/history.csv already uses."""


def history_figures(rows: list[dict[str, Any]], note: str) -> list[Figure]:
    """The node-proxy pair's figures of one run, each with the same-run Envoy figure."""
    out = []
    for r in rows:
        spec = HISTORY_FIGURES.get(r["metric"])
        if spec is None or r["ztunnel"] is None:
            continue
        name, unit, better = spec
        verdict = {True: "PASS", False: "FAIL", None: ""}[r["pass"]]
        out.append(
            Figure(
                figure=name,
                value=round(float(r["ztunnel"]), 4),
                unit=unit,
                better=better,
                envoy=None if r["envoy"] is None else round(float(r["envoy"]), 4),
                note=f"{note}; {verdict}" if verdict else note,
            )
        )
    return out


def cpu_per_op(
    raw: dict[str, dict[str, list[dict[str, Any]]]], duration: float
) -> dict[Any, float]:
    """(path, "rps"|"cps") -> median CPU microseconds of both proxies per request / per new
    connection: much less load-dependent than the rates themselves (bench/README.md);
    (path, "rps-rest") -> the rest of the machine's CPU per request in the same runs (load
    generator, server, kernel work outside the proxies; "rps-loadgen" and "rps-backend": wrk's
    and nginx's own part of it), (path, "rps-idle") -> the machine's
    idle share: together they say why an rps ratio differs from the CPU-per-request ratio."""
    out: dict[Any, float] = {}
    for path, by_metric in raw.items():
        for key in ("rps", "cps"):
            runs = [r for r in by_metric.get(key, []) if r.get(key) and r.get("proxy_cpu_s")]
            if not runs:
                continue
            ops = [r[key] * duration for r in runs]
            proxies = [sum(r["proxy_cpu_s"].values()) for r in runs]
            out[(path, key)] = statistics.median(
                c / n * 1e6 for c, n in zip(proxies, ops, strict=True)
            )
            if key == "rps" and all("machine_busy_s" in r for r in runs):
                rest = [
                    (r["machine_busy_s"] - c) / n * 1e6
                    for r, c, n in zip(runs, proxies, ops, strict=True)
                ]
                out[(path, "rps-rest")] = statistics.median(rest)
                for part in ("loadgen", "backend"):
                    vals = [
                        r.get(f"{part}_cpu_s", 0.0) / n * 1e6
                        for r, n in zip(runs, ops, strict=True)
                    ]
                    out[(path, f"rps-{part}")] = statistics.median(vals)
                out[(path, "rps-idle")] = statistics.median(r["machine_idle_share"] for r in runs)
    return out


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
    idle = f" idle {r['machine_idle_share']:.0%}" if "machine_idle_share" in r else ""
    return f"{text}{err}" + (f" cpu {cpu}" if cpu else "") + idle


if __name__ == "__main__":
    raise SystemExit(main())
