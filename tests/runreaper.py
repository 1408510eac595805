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
- The run records each named netns it creates (wrapping `ambientctl.lab.system.netns_add`
  for the session) in ``<runs dir>/<token>.netns``: its name before it exists
  (`record_netns`), then its name with the namespace's identity (`record_created`). A lab's
  underlay netns ``<lab>-underlay`` stands for the lab's other netns too (the lab kubelet,
  another process, names its pods' netns ``<lab>-<namespace>-<pod>``).

Invariants: only what belongs to a run whose pytest process no longer exists is touched: a
process carrying a live run's token, and a netns (or lab prefix) a live run recorded too, are
left alone; helpers run concurrent test runs in other network namespaces of the same machine.
Fixed lab names are reused by every run, also by runs without this mechanism: a netns is
reaped only while it is the very namespace the gone run created (same nsfs inode, made at
the same time), and a lab's other netns only while its underlay is; one created again
since, by anyone, is never touched. A run reusing an existing netns (`netns_add` keeps one)
records its name, which protects it, but not its identity: it did not create it. Not covered:
something outside test runs (`ambientctl lab`) reusing a gone run's netns as it was left. A
process without a token is killed only when it is inside such a netns. Reaping never raises:
what cannot be removed is reported and left.

The runs directory is trusted only when it is a real directory (not a symlink) owned by this
user and writable by no one else: root's is ``/run/ambient-mesh-test-runs``, another user's
``<tmp>/ambient-mesh-test-runs-<uid>``, both mode 0700, so no other user can plant a record
that makes a root run kill or delete what it names, and records are opened with
``O_NOFOLLOW`` (a planted symlink is not written through). An untrusted directory is reported
and neither read nor written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

ENV = "AMBIENT_MESH_TEST_RUN"
RUNS_DIR = (
    Path("/run/ambient-mesh-test-runs")
    if os.geteuid() == 0
    else Path(tempfile.gettempdir()) / f"ambient-mesh-test-runs-{os.geteuid()}"
)
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


def trusted(runs_dir: Path) -> bool:
    """Whether `runs_dir` is a directory (not a symlink) of this user that no one else may
    write to (module docstring)."""
    try:
        st = runs_dir.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _append(runs_dir: Path, token: str, line: str) -> None:
    runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not trusted(runs_dir):
        sys.stderr.write(f"runreaper: {runs_dir} is not this user's own directory: not used\n")
        return
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    fd = os.open(runs_dir / f"{token}.netns", flags, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")


def record_netns(runs_dir: Path, token: str, name: str) -> None:
    """Note that run `token` is about to create the named netns `name`: a live run's names
    are never reaped, whoever recorded them before."""
    _append(runs_dir, token, name)


def _identity(name: str, netns_dir: Path = NETNS_DIR) -> str | None:
    """The namespace `name` names: its nsfs inode and that inode's change time (inode numbers
    of deleted namespaces are reused; the time, set when the namespace was made, is not)."""
    try:
        st = (netns_dir / name).stat()
    except OSError:
        return None
    return f"{st.st_ino}.{st.st_ctime_ns}"


def record_created(runs_dir: Path, token: str, name: str, netns_dir: Path = NETNS_DIR) -> None:
    """Note the namespace `name` now is (`_identity`): the one run `token` created."""
    ident = _identity(name, netns_dir)
    if ident is not None:
        _append(runs_dir, token, f"{name} {ident}")


def _recorded(path: Path) -> tuple[set[str], dict[str, str]]:
    """(names, name -> identity of the namespace created) of a run's record."""
    names: set[str] = set()
    created: dict[str, str] = {}
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as f:
            lines = f.read().splitlines()
    except OSError:
        return names, created
    for line in lines:
        name, _, ident = line.partition(" ")
        if name:
            names.add(name)
        if name and ident:
            created[name] = ident
    return names, created


def _lab_of(name: str, labs: Iterable[str]) -> str | None:
    """The lab (``<lab>-`` prefix of a recorded underlay) `name` belongs to, if any."""
    for underlay in labs:
        if name.startswith(underlay.removesuffix("underlay")):
            return underlay
    return None


def _owned(name: str, created: dict[str, str], netns_dir: Path) -> bool:
    """Whether `name` is (in) a namespace the run created and that was not made again."""
    if name in created:
        return _identity(name, netns_dir) == created[name]
    lab = _lab_of(name, (n for n in created if n.endswith(UNDERLAY_SUFFIX)))
    return lab is not None and _identity(lab, netns_dir) == created[lab]


def _shielded(name: str, live: set[str]) -> bool:
    """A name a live run recorded, or in a lab a live run recorded."""
    return (
        name in live or _lab_of(name, (n for n in live if n.endswith(UNDERLAY_SUFFIX))) is not None
    )


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
    if runs_dir.exists() and not trusted(runs_dir):
        log(f"runreaper: {runs_dir} is not this user's own directory: no netns reaped")
    files = sorted(runs_dir.glob("*.netns")) if trusted(runs_dir) else []
    live: set[str] = set()
    dead: dict[Path, dict[str, str]] = {}
    for path in files:
        names_, created = _recorded(path)
        if alive(path.name.removesuffix(".netns")):
            live |= names_
        else:
            dead[path] = created
    names = sorted(p.name for p in netns_dir.iterdir()) if netns_dir.is_dir() else []
    for path, created in dead.items() if os.geteuid() == 0 else ():
        kept = False
        # Pods' netns before their lab's underlay (whose inode vouches for them).
        for name in sorted(names, key=lambda n: n.endswith(UNDERLAY_SUFFIX)):
            if not _owned(name, created, netns_dir) or _shielded(name, live):
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
