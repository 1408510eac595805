"""The benchmark harness shared by bench/hbone_bench.py and bench/waypoint_bench.py.

Owns: where things live (paths, addresses), the process supervisor (every process in its own
group, killed at the end), /proc CPU and RSS accounting, the run's certificates, readiness and
smoke checks, and the load generators (wrk, `bench/loadgen.py`) with their measurements.

Invariant: a process started through `Supervisor` never outlives the run (`stop_all`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
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

PATHS = ("direct", "envoy", "ztunnel", "ztunnel-h3")
LABEL = {
    "direct": "direct",
    "envoy": "envoy pair",
    "ztunnel": "node-proxy pair",
    "ztunnel-h3": "node-proxy pair over HTTP/3",
}
# The HTTP/3 pair: same mesh, its own server workload address (nginx listens there too), VIP
# and node addresses, so both pairs run side by side.
H3_PAIR: dict[str, Any] = {
    "server": "127.0.2.11",
    "vip": ("127.0.3.11", 80),
    "node_ip": {"node-a": "127.0.6.1", "node-b": "127.0.7.1"},
}


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


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot (/proc/stat's ``cpu`` line;
    idle = idle + iowait, busy = the rest but guest time, already in user/nice)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLK_TCK, idle / CLK_TCK


def comm_cpu_seconds(comm: str) -> float:
    """utime+stime of every live process named `comm` (the bench's nginx, say)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")] == comm:
            fields = text[text.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def children_cpu_seconds() -> float:
    """utime+stime of this process's children that have ended (wrk, the loadgen)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


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
    idle_rss: dict[str, tuple[float, int, float]] = field(default_factory=dict)
    """Each proxy tree's (RSS, processes, PSS) once ready, before any load."""

    def sample_rss(self) -> None:
        for p in self.proxies:
            self.rss_samples.setdefault(p.name, []).append(tree_rss_mib(p.pid))

    def sample_idle_rss(self) -> None:
        self.idle_rss = {p.name: tree_rss_mib(p.pid) for p in self.proxies}

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
    """Run fn, charging the proxies' CPU (and the machine's) over its wall time; sample RSS
    after."""
    load0, backend0 = children_cpu_seconds(), comm_cpu_seconds("nginx")
    cpu0, (busy0, idle0), t0 = rt.cpu(), machine_cpu_seconds(), time.monotonic()
    result = fn()
    cpu1, (busy1, idle1), wall = rt.cpu(), machine_cpu_seconds(), time.monotonic() - t0
    result["proxy_cpu_s"] = {k: cpu1[k] - cpu0[k] for k in cpu1}
    # The whole machine over the same wall time: what the proxies leave to the load generator,
    # the server and the kernel, and whether the run was CPU-bound (idle share near 0).
    result["machine_busy_s"] = busy1 - busy0
    result["loadgen_cpu_s"] = children_cpu_seconds() - load0
    result["backend_cpu_s"] = comm_cpu_seconds("nginx") - backend0
    result["machine_idle_share"] = (idle1 - idle0) / max(busy1 - busy0 + idle1 - idle0, 1e-9)
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


Results = dict[str, list[Any]]


def run_ab(
    args: argparse.Namespace,
    prefix: str,
    run: Callable[[argparse.Namespace, Supervisor, Path], Results],
    report: Callable[[Results], None],
) -> int:
    """The A/B benches' main (`bench.bulk_ab`, `bench.conn_ab`, `bench.hop_probe`): `run` in a
    fresh work dir under `WORK_ROOT` with a `Supervisor` that stops everything it started, then
    `report` and, with `--json`, every round's figures. Exit status 1 when a run aborts."""
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK_ROOT))
    workdir.chmod(0o755)
    sup = Supervisor(workdir)
    try:
        results = run(args, sup, workdir)
    except BenchError as exc:
        log(f"ABORTED: {exc}")
        return 1
    finally:
        sup.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if results:
        report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0
