"""The lab's state: what exists (`LabState`, saved as /run/ambient-lab/<name>/state.json after
every step) and `LabCore`, the part of `Lab` every other part builds on (paths, load/save, the
manifests as a `LabSpec`, a node's CNI conflist, pod lookup), plus the small file helpers.

Invariant: the state file is replaced atomically and written before each resource is created, so
`down` can clean up after any partial `up` (see ambientctl.lab.lab).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ambientctl.errors import LabStateError
from ambientctl.lab import manifests, topology
from ambientctl.lab.topology import NodePlan, StatePaths

CNI_PATH_SYSTEM = Path("/usr/lib/cni")
PYTHON = sys.executable
ZTUNNEL = str(Path(sys.executable).with_name("ztunnel"))
CONTROLPLANE = str(Path(sys.executable).with_name("ambient-controlplane"))
XDS_ADDRESS = f"{topology.CONTROLPLANE_IP}:{topology.CONTROLPLANE_PORT}"
# Debug views on loopback only (inside the underlay netns); metrics also on the lab address.
CONTROLPLANE_DEBUG = f"http://127.0.0.1:{topology.CONTROLPLANE_DEBUG_PORT}"
LogFn = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(slots=True, kw_only=True)
class PodState:
    key: str
    namespace: str
    name: str
    node: str
    netns: str
    uid: str
    container_id: str
    ip: str = ""
    pid: int = 0
    cni_result: dict[str, Any] | None = None


@dataclass(slots=True, kw_only=True)
class NodeState:
    plan: NodePlan
    agent_pid: int = 0
    ztunnel_pid: int = 0


@dataclass(slots=True, kw_only=True)
class LabState:
    """What exists; mutated as `up` progresses and saved after every step."""

    name: str
    capture: str
    source: str
    primary: str = topology.DEFAULT_PRIMARY_PLUGIN
    nodes: list[NodeState] = field(default_factory=list)
    pods: dict[str, PodState] = field(default_factory=dict)
    bpffs: bool = False
    controlplane_pid: int = 0
    http3: bool = False
    """--http3: node proxies serve HBONE over HTTP/3 (15008/udp on the node address) and every
    pod is annotated so that peers use it (issue 16)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capture": self.capture,
            "source": self.source,
            "primary": self.primary,
            "bpffs": self.bpffs,
            "controlplane_pid": self.controlplane_pid,
            "http3": self.http3,
            "nodes": [
                {"plan": asdict(n.plan), "agent_pid": n.agent_pid, "ztunnel_pid": n.ztunnel_pid}
                for n in self.nodes
            ],
            "pods": {k: asdict(p) for k, p in self.pods.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabState:
        return cls(
            name=d["name"],
            capture=d["capture"],
            source=d.get("source", ""),
            primary=d.get("primary", topology.DEFAULT_PRIMARY_PLUGIN),
            bpffs=d.get("bpffs", False),
            controlplane_pid=d.get("controlplane_pid", 0),
            http3=d.get("http3", False),
            nodes=[
                NodeState(
                    plan=NodePlan(**n["plan"]),
                    agent_pid=n["agent_pid"],
                    ztunnel_pid=n["ztunnel_pid"],
                )
                for n in d.get("nodes", [])
            ],
            pods={k: PodState(**p) for k, p in d.get("pods", {}).items()},
        )

    def node(self, name: str) -> NodeState:
        for n in self.nodes:
            if n.plan.name == name:
                return n
        raise LabStateError(f"no node {name!r} in lab {self.name}")


class LabCore:
    """One lab, addressed by name: its paths, state and manifests."""

    def __init__(
        self, name: str = "lab", *, state_root: Path = topology.STATE_ROOT, log: LogFn = _quiet
    ) -> None:
        if not topology.valid_lab_name(name):
            raise LabStateError(f"invalid lab name {name!r} (lowercase, digits, '-', <= 16)")
        self.name = name
        self.paths = StatePaths.of(name, state_root)
        self.log = log
        self.state: LabState | None = None

    def save(self) -> None:
        assert self.state is not None
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state.to_dict(), indent=2))
        os.replace(tmp, self.paths.state)

    def load(self) -> LabState:
        try:
            self.state = LabState.from_dict(json.loads(self.paths.state.read_text()))
        except FileNotFoundError as err:
            raise LabStateError(f"no lab {self.name!r} (no {self.paths.state})") from err
        except (ValueError, KeyError, TypeError) as err:
            raise LabStateError(f"unreadable lab state {self.paths.state}: {err}") from err
        return self.state

    def spec(self) -> manifests.LabSpec:
        return manifests.load(self.paths.manifests)

    @staticmethod
    def ambient_map(spec: manifests.LabSpec) -> dict[str, bool]:
        return {p.key: manifests.is_ambient(p, spec.namespaces) for p in spec.pods}

    def cni_path(self) -> list[Path]:
        return [self.paths.bin, CNI_PATH_SYSTEM]

    def _conflist(self, node: NodeState) -> dict[str, Any]:
        st = self.state
        assert st is not None
        sock = self.paths.agent_socket(node.plan.name) if st.capture == "ebpf" else None
        return topology.conflist(
            node.plan,
            ipam_dir=self.paths.node_dir(node.plan.name) / "ipam",
            agent_socket=sock,
            primary=st.primary,
        )

    @staticmethod
    def _pod(st: LabState, key: str) -> PodState:
        matches = [p for p in st.pods.values() if key in (p.key, p.name)]
        if len(matches) != 1:
            raise LabStateError(
                f"no pod {key!r}" if not matches else f"pod {key!r} is ambiguous; use ns/name"
            )
        return matches[0]

    def pod(self, key: str) -> PodState:
        return self._pod(self.state or self.load(), key)


def _atomic_write(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Write via a temp file (``.name.tmp``: no reader globs it) and rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(_read_from(path, 0).splitlines()[-lines:])
