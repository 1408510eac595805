"""Lab topology: names and addresses, decided before anything is created (pure).

Layout for a lab named L with nodes n_1..n_k (k <= 200):
- underlay: netns ``L-underlay`` holding bridge ``br0``; node i's uplink is ``eth0`` in netns
  ``L-<node>`` with 172.30.0.(10+i)/24, its peer ``up<i>`` is a port of br0.
- pods of node i: subnet 10.240.i.0/24 (host-local), bridge ``cni0`` (10.240.i.1) in the node
  netns, made by the containernetworking bridge plugin; a pod's netns is ``L-<ns>-<name>``.
- node i routes 10.240.j.0/24 via 172.30.0.(10+j) for every other node j.
State lives in /run/ambient-lab/L/ (`StatePaths`).

Invariant: every name and address is a function of (lab name, node order, pod key), so `down`
can always recompute what `up` created, even from a partial state file.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

STATE_ROOT = Path("/run/ambient-lab")
UNDERLAY_NET = ipaddress.IPv4Network("172.30.0.0/24")
POD_SUPERNET = ipaddress.IPv4Network("10.240.0.0/16")
CNI_NETWORK = "ambient-lab"
UPLINK = "eth0"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?$")


def valid_lab_name(name: str) -> bool:
    return bool(_NAME.match(name))


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePlan:
    name: str
    index: int
    """1-based position of the node."""
    netns: str
    ip: str
    """Underlay address (the node IP)."""
    pod_subnet: str
    gateway: str
    underlay_port: str
    """The node's veth peer in the underlay netns (a br0 port)."""


def node_plan(lab: str, node: str, index: int) -> NodePlan:
    subnet = ipaddress.IPv4Network(f"10.240.{index}.0/24")
    return NodePlan(
        name=node,
        index=index,
        netns=f"{lab}-{node}",
        ip=str(UNDERLAY_NET.network_address + 10 + index),
        pod_subnet=str(subnet),
        gateway=str(subnet.network_address + 1),
        underlay_port=f"up{index}",
    )


def nodes_plan(lab: str, nodes: tuple[str, ...]) -> tuple[NodePlan, ...]:
    return tuple(node_plan(lab, n, i + 1) for i, n in enumerate(nodes))


def underlay_netns(lab: str) -> str:
    return f"{lab}-underlay"


def pod_netns(lab: str, namespace: str, name: str) -> str:
    return f"{lab}-{namespace}-{name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatePaths:
    root: Path

    @classmethod
    def of(cls, lab: str, state_root: Path = STATE_ROOT) -> StatePaths:
        return cls(root=state_root / lab)

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def labels(self) -> Path:
        return self.root / "labels.json"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def bpffs(self) -> Path:
        return self.root / "bpf"

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    def agent_socket(self, node: str) -> Path:
        return self.node_dir(node) / "agent.sock"

    def mesh_config(self, node: str) -> Path:
        return self.node_dir(node) / "mesh.yaml"

    def conflist(self, node: str) -> Path:
        return self.node_dir(node) / f"{CNI_NETWORK}.conflist"

    def bpf_dir(self, node: str) -> Path:
        return self.bpffs / node


PRIMARY_PLUGINS = ("ptp", "bridge")


def conflist(
    node: NodePlan,
    *,
    ipam_dir: Path,
    agent_socket: Path | None,
    primary: str = "ptp",
    cni_version: str = "1.0.0",
) -> dict[str, object]:
    """The node's CNI chain: the primary plugin (ptp or bridge) with host-local IPAM, then
    ambient-cni (unless capture is off). ptp gives each pod a routed veth; bridge makes the
    veth a port of ``cni0``."""
    ipam = {
        "type": "host-local",
        "ranges": [[{"subnet": node.pod_subnet, "gateway": node.gateway}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(ipam_dir),
    }
    first: dict[str, object] = {"type": primary, "ipMasq": False, "ipam": ipam}
    if primary == "bridge":
        first.update({"bridge": "cni0", "isGateway": True})
    plugins: list[dict[str, object]] = [first]
    if agent_socket is not None:
        plugins.append({"type": "ambient-cni", "agentSocket": str(agent_socket)})
    return {"cniVersion": cni_version, "name": CNI_NETWORK, "plugins": plugins}
