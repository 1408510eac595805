"""The lab's I/O edge: ip/nsenter commands, process start/stop, and the CNI chain runner.

Owns every side effect of the lab except file layout: network namespaces and links (iproute2),
processes (started in their own session, stopped by pid with a bounded wait), and the exec of a
CNI conflist exactly as a runtime does it (no cnitool exists): each plugin found by ``type`` in
CNI_PATH, exec'd with CNI_COMMAND/CONTAINERID/NETNS/IFNAME/ARGS/PATH and its config on stdin,
carrying ``name``, ``cniVersion`` and ``prevResult`` (spec 1.0.0 "Section 3: Execution of
Network Configurations"); DEL runs the plugins in reverse order.

Invariant: helpers that remove things are idempotent (absent is success), so teardown can run
after any partial failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambientctl.errors import LabCommandError


def run(argv: Sequence[str], *, check: bool = True, input: bytes | None = None) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=60)
    if check and proc.returncode != 0:
        raise LabCommandError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode().strip()}"
        )
    return proc.stdout.decode()


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_add(name: str) -> None:
    if not netns_exists(name):
        run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_del(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "del", name], check=False)


def ip(netns: str, *args: str, check: bool = True) -> str:
    return run(["ip", "-n", netns, *args], check=check)


def nsenter(netns: str, argv: Sequence[str]) -> list[str]:
    """argv run in a named netns WITHOUT `ip netns exec` (which remounts /sys and hides bpffs)."""
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


def sysctl(netns: str, key: str, value: str) -> None:
    run(nsenter(netns, ["sysctl", "-q", "-w", f"{key}={value}"]))


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mount_bpffs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not is_mounted(path):
        run(["mount", "-t", "bpf", "bpf", str(path)])


def umount(path: Path) -> None:
    if path.exists() and is_mounted(path):
        run(["umount", str(path)], check=False)


def http_get(netns: str, url: str, *, timeout: float = 5.0) -> tuple[int, str]:
    """GET `url` from inside a named netns (only this thread enters it, see ebpf.netns)."""
    from ebpf.netns import entered

    with entered(netns):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode(errors="replace")


def http_ok(netns: str, url: str) -> bool:
    try:
        return http_get(netns, url, timeout=1.0)[0] == 200
    except OSError:
        return False


# -- processes ---------------------------------------------------------------------------------


def spawn(
    argv: Sequence[str], *, log: Path, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> int:
    """Start a long-running process in its own session (outlives the CLI); returns its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    return proc.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def stop(pid: int, *, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Signal the process group we started (pid == pgid), wait, then SIGKILL; idempotent."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_for(predicate: Any, *, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise LabCommandError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- CNI ---------------------------------------------------------------------------------------


def find_plugin(plugin_type: str, cni_path: Sequence[Path]) -> Path:
    for directory in cni_path:
        candidate = directory / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise LabCommandError(f"CNI plugin {plugin_type!r} not found in {':'.join(map(str, cni_path))}")


class CniFailure(LabCommandError):
    """A plugin of the chain failed; `error` is its spec error object."""

    def __init__(self, plugin: str, error: Mapping[str, Any]) -> None:
        super().__init__(f"CNI plugin {plugin}: {error.get('msg')} (code {error.get('code')})")
        self.plugin = plugin
        self.error = dict(error)


@dataclass(frozen=True, slots=True, kw_only=True)
class CniAttachment:
    """One container's network attachment as a CNI runtime passes it to every plugin of the
    chain (CNI spec "Parameters": CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH),
    and the network namespace the plugins run in (the node's; None: this one)."""

    container_id: str
    netns_path: str
    ifname: str = "eth0"
    cni_args: str = ""
    cni_path: Sequence[Path]
    run_in: str | None = None
    wrap: Sequence[str] = ()
    """A command the plugins run under (e.g. a lab node's filesystem view,
    `ambientctl.lab.container`)."""


def exec_plugin(
    conflist: Mapping[str, Any],
    plugin: Mapping[str, Any],
    command: str,
    att: CniAttachment,
    prev_result: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    config = dict(plugin)
    config["name"] = conflist["name"]
    config["cniVersion"] = conflist["cniVersion"]
    if prev_result is not None:
        config["prevResult"] = prev_result
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": att.container_id,
        "CNI_NETNS": att.netns_path,
        "CNI_IFNAME": att.ifname,
        "CNI_ARGS": att.cni_args,
        "CNI_PATH": ":".join(map(str, att.cni_path)),
    }
    binary = str(find_plugin(str(plugin["type"]), att.cni_path))
    argv = [*att.wrap, binary]  # wrap: e.g. a lab node's filesystem view (ambientctl.lab.container)
    argv = nsenter(att.run_in, argv) if att.run_in else argv
    proc = subprocess.run(
        argv, input=json.dumps(config).encode(), env=env, capture_output=True, timeout=60
    )
    out = proc.stdout.decode().strip()
    if proc.returncode != 0:
        try:
            error = json.loads(out)
        except ValueError:
            error = {"code": -1, "msg": out or proc.stderr.decode().strip()}
        raise CniFailure(str(plugin["type"]), error)
    return json.loads(out) if out else None


def cni_chain(
    command: str,
    conflist: Mapping[str, Any],
    att: CniAttachment,
    prev_result: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """ADD: each plugin in order, threading prevResult; DEL: reverse order with the last result
    (0.4.0+); CHECK: in order with the cached result. Returns the final ADD result."""
    plugins = list(conflist["plugins"])
    if command == "DEL":
        plugins.reverse()
    result: Mapping[str, Any] | None = prev_result if command != "ADD" else None
    for plugin in plugins:
        out = exec_plugin(conflist, plugin, command, att, result)
        if command == "ADD":
            result = out
    return dict(result) if (command == "ADD" and result is not None) else None
