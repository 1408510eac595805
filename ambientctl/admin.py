"""Reading node proxies' admin endpoints and the control plane's debug endpoints.

Owns the I/O of the read commands (`ztunnel-config`, `proxy-status`): where a node proxy's
admin endpoint is (an address, a saved dump file, or a lab node, whose netns we enter), the
HTTP GET, and the errors an operator sees when it fails (what was tried and what to try next).

Invariant: every failure is a `CtlError` naming the target; nothing here retries or waits.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambientctl.errors import CtlError

ADMIN_PORT = 15000
DEBUG_ADDRESS = "127.0.0.1:15014"


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One node proxy to read: `address` (host:port of its admin endpoint), `file` (a saved
    /config_dump), or `netns` + `address` (a lab node: the GET runs inside its netns)."""

    label: str
    address: str = ""
    file: Path | None = None
    netns: str = ""


def _get(url: str, *, netns: str = "", timeout: float = 5.0) -> tuple[int, str]:
    if netns:
        from ambientctl.lab import system

        return system.http_get(netns, url, timeout=timeout)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode(errors="replace")


def get_json(url: str, *, what: str, hint: str, netns: str = "") -> Any:
    try:
        status, body = _get(url, netns=netns)
    except (OSError, urllib.error.URLError) as err:
        reason = getattr(err, "reason", err)
        raise CtlError(f"cannot reach {what} at {url}: {reason}\n  {hint}") from None
    if status != 200:
        raise CtlError(f"{what} at {url} answered HTTP {status}: {body.strip()[:200]}")
    try:
        return json.loads(body)
    except ValueError as err:
        raise CtlError(f"{what} at {url} did not answer JSON: {err}") from None


ZTUNNEL_HINT = (
    "is the node proxy running? Its admin endpoint listens on localhost:15000 of its node (or "
    "on --node-ip). In a cluster: kubectl -n istio-system port-forward <ztunnel pod> "
    "15000:15000, then --address 127.0.0.1:15000. In the lab: --lab NAME [--node NODE]."
)
CONTROLPLANE_HINT = (
    "is the control plane running? Its debug endpoint listens on 127.0.0.1:15014. In a "
    "cluster: kubectl -n istio-system port-forward deploy/ambient-controlplane 15014."
)


def config_dump(target: Target) -> dict[str, Any]:
    """The node proxy's /config_dump (workloads, services, policies, certificates,
    connections, node)."""
    if target.file is not None:
        try:
            data = json.loads(target.file.read_text())
        except (OSError, ValueError) as err:
            raise CtlError(f"cannot read config dump {target.file}: {err}") from None
    else:
        data = get_json(
            f"http://{target.address}/config_dump",
            what=f"node proxy {target.label}",
            hint=ZTUNNEL_HINT,
            netns=target.netns,
        )
    if not isinstance(data, dict) or "workloads" not in data:
        raise CtlError(f"{target.label}: not a node proxy config dump (no 'workloads')")
    return data


def lab_targets(lab_name: str, node: str | None) -> list[Target]:
    """Node proxies of a running lab (admin on localhost inside the node's netns)."""
    from ambientctl.lab.lab import Lab

    lab = Lab(lab_name)
    state = lab.load()
    nodes = [n for n in state.nodes if node in (None, n.plan.name)]
    if not nodes:
        known = ", ".join(n.plan.name for n in state.nodes)
        raise CtlError(f"no node {node!r} in lab {lab_name} (nodes: {known})")
    return [
        Target(label=n.plan.name, address=f"127.0.0.1:{ADMIN_PORT}", netns=n.plan.netns)
        for n in nodes
    ]


def lab_controlplane(lab_name: str) -> tuple[str, str]:
    """(debug base URL, netns) of a lab's control plane."""
    from ambientctl.lab import lab as labmod
    from ambientctl.lab import topology

    labmod.Lab(lab_name).load()  # a clear error if there is no such lab
    return labmod.CONTROLPLANE_DEBUG, topology.underlay_netns(lab_name)


def targets_from_args(
    addresses: list[str], files: list[Path], lab: str | None, node: str | None
) -> list[Target]:
    out = [Target(label=a, address=a) for a in addresses]
    out += [Target(label=str(f), file=f) for f in files]
    if lab:
        out += lab_targets(lab, node)
    if not out:
        out = [Target(label=f"127.0.0.1:{ADMIN_PORT}", address=f"127.0.0.1:{ADMIN_PORT}")]
    return out
