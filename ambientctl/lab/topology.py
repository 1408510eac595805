"""Lab topology: names and addresses, decided before anything is created (pure).

Layout for a lab named L with nodes n_1..n_k (k <= 200):
- underlay: netns ``L-underlay`` holding bridge ``br0``; node i's uplink is ``eth0`` in netns
  ``L-<node>`` with 172.30.0.(10+i)/24, its peer ``up<i>`` is a port of br0.
- control plane: ``ambient-controlplane`` in the underlay netns, on br0's address 172.30.0.2
  (xDS + CA 15012, TLS; debug 15014), reachable from every node netns over its uplink.
- pods of node i: subnet 10.240.i.0/24 (host-local); the primary CNI plugin is
  `DEFAULT_PRIMARY_PLUGIN` (``bridge``: veth ports of ``cni0``, gateway 10.240.i.1 on it, as
  issue 3 asks) or ``ptp`` (a routed veth per pod); a pod's netns is ``L-<ns>-<name>``.
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
CONTROLPLANE_IP = str(UNDERLAY_NET.network_address + 2)
"""The control plane's address on the underlay bridge (nodes start at .11)."""
CONTROLPLANE_PORT = 15012
CONTROLPLANE_DEBUG_PORT = 15014
TRUST_DOMAIN = "cluster.local"
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
    def lab_namespaces(self) -> Path:
        """Namespace objects `lab label` creates for namespaces no manifest declares."""
        return self.manifests / "lab-namespaces.yaml"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def controlplane(self) -> Path:
        return self.root / "controlplane"

    @property
    def node_credentials(self) -> Path:
        """The control plane's ``{node: token}`` file (controlplane/auth.py)."""
        return self.controlplane / "node-credentials.yaml"

    @property
    def roots(self) -> Path:
        """The mesh CA roots: what node proxies verify the control plane's TLS with."""
        return self.controlplane / "roots.pem"

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

    def node_token(self, node: str) -> Path:
        """The node proxy's control-plane credential (first line: the token)."""
        return self.node_dir(node) / "token"

    def conflist(self, node: str) -> Path:
        return self.node_dir(node) / f"{CNI_NETWORK}.conflist"

    def bpf_dir(self, node: str) -> Path:
        return self.bpffs / node


def cni_args(namespace: str, name: str, uid: str) -> str:
    """CNI_ARGS as container runtimes pass them for a Kubernetes pod (IgnoreUnknown: plugins
    that do not know the K8S_* keys must not fail)."""
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"


PRIMARY_PLUGINS = ("ptp", "bridge")
DEFAULT_PRIMARY_PLUGIN = "bridge"
"""The primary CNI plugin when none is asked for: ``bridge`` + host-local, like most clusters'
default networks (ebpf/ re-assigns the socket at the bridge's ingress, docs/ebpf.md). ``ptp``
stays selectable."""


def conflist(
    node: NodePlan,
    *,
    ipam_dir: Path,
    agent_socket: Path | None,
    primary: str = DEFAULT_PRIMARY_PLUGIN,
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
