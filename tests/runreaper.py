"""What a stopped test run left behind, reaped by the next run (tests/conftest.py).

A pytest run killed mid-way (SIGKILL, a stopped session, a timeout) runs no fixture
teardown: the Kubernetes control planes it started (etcd, kube-apiserver, ... from
``~/.cache/ambient-mesh/kube/<version>/bin``, each in its own session: `ambientctl.lab.system
.spawn`), lab kubelets, node proxies and the labs' named network namespaces (``k8lab-*``) stay.

Owns: the run's token, its record of the named netns it creates, and the reaping of the
leftovers of runs that are gone.

- A run is named by its token ``<pid>.<start time>`` (the pytest process's pid and its start
  time in clock ticks since boot, /proc/<pid>/stat field 22: a pid reused by a later process
  is not the same run). The token is put in the environment (`ENV`) at the start of the run,
  so every process the run starts inherits it, whatever session, process group or netns it
  moves to (containers the lab kubelet starts get their pod's environment instead: they are
  found through their netns).
- The run records each named netns it creates (`record_netns`, wrapping
  `ambientctl.lab.system.netns_add` for the session) in ``<runs dir>/<token>.netns`` before
  it exists; a lab's underlay netns ``<lab>-underlay`` records the prefix ``<lab>-`` too (the
  lab kubelet, another process, names its pods' netns ``<lab>-<namespace>-<pod>``).

Invariants: only what belongs to a run whose pytest process no longer exists is touched: a
process carrying a live run's token, and a netns (or prefix) a live run recorded too (fixed
lab names are reused by every run), are left alone; helpers run concurrent test runs in
other network namespaces of the same machine. A process without a token is killed only
when it is inside a netns of a dead run. Reaping never raises: what cannot be removed is
reported and left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

ENV = "AMBIENT_MESH_TEST_RUN"
RUNS_DIR = Path(tempfile.gettempdir()) / "ambient-mesh-test-runs"
NETNS_DIR = Path("/run/netns")
UNDERLAY_SUFFIX = "-underlay"  # ambientctl.lab.topology.underlay_netns


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses: count from the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def token_of(pid: int) -> str:
    return f"{pid}.{start_time(pid)}"


def alive(token: str) -> bool:
    """Whether the run named `token` is still running (same pid, same start time)."""
    pid, _, started = token.partition(".")
    return pid.isdigit() and str(start_time(int(pid))) == started


def _environ_token(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = ENV.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode("ascii", "replace")
    return None


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def record_netns(runs_dir: Path, token: str, name: str) -> None:
    """Note that run `token` creates the named netns `name` (before it exists)."""
    runs_dir.mkdir(parents=True, exist_ok=True, mode=0o1777)
    lines = [name]
    if name.endswith(UNDERLAY_SUFFIX):
        lines.append(name.removesuffix("underlay") + "*")  # the lab's prefix
    with (runs_dir / f"{token}.netns").open("a") as f:
        f.write("".join(f"{line}\n" for line in lines))


def _recorded(path: Path) -> set[str]:
    try:
        return {line for line in path.read_text().splitlines() if line}
    except OSError:
        return set()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def _netns_pids(name: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(x) for x in result.stdout.split() if x.isdigit()]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _ancestors(pid: int) -> set[int]:
    out: set[int] = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def reap(
    runs_dir: Path = RUNS_DIR,
    *,
    netns_dir: Path = NETNS_DIR,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Kill the processes and delete the netns of every run that is gone; returns what was
    reaped (one line each). Netns are reaped by root only (a run record stays until then)."""
    done: list[str] = []
    mine = _ancestors(os.getpid())  # never this process or what started it
    live_pids: set[int] = set()
    for pid in _pids():
        token = _environ_token(pid)
        if token is None or pid in mine:
            continue
        if alive(token):
            live_pids.add(pid)
        else:
            _kill(pid)
            done.append(f"process {pid} of gone run {token}")
    files = sorted(runs_dir.glob("*.netns")) if runs_dir.is_dir() else []
    live: set[str] = set()
    dead: dict[Path, set[str]] = {}
    for path in files:
        if alive(path.name.removesuffix(".netns")):
            live |= _recorded(path)
        else:
            dead[path] = _recorded(path)
    names = sorted(p.name for p in netns_dir.iterdir()) if netns_dir.is_dir() else []
    for path, patterns in dead.items() if os.geteuid() == 0 else ():
        kept = False
        for name in names:
            if not _matches(name, patterns) or _matches(name, live):
                continue
            inside = _netns_pids(name)
            if any(pid in live_pids for pid in inside):
                log(f"runreaper: netns {name} of gone run {path.stem} holds a live run's process")
                kept = True
                continue
            for pid in inside:
                _kill(pid)
            result = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if result.returncode == 0:
                done.append(f"netns {name} of gone run {path.stem} ({len(inside)} processes)")
            else:
                log(f"runreaper: netns {name} not deleted: {result.stderr.strip()}")
                kept = True
        if not kept:
            path.unlink(missing_ok=True)
    for line in done:
        log(f"runreaper: {line}")
    return done
