"""The lab's commands: up, down, pods, exec, label.

Owns the order in which a lab is built and torn down, and the lab state file
(/run/ambient-lab/<name>/state.json) that every later command reads.

up:   manifests validated -> underlay + node netns (uplinks, routes, forwarding) -> bpffs mount ->
      node agents (nsenter into the node netns, so /sys keeps the real bpffs) -> per pod: netns,
      REAL CNI chain (bridge + host-local, then ambient-cni) run in the node netns, /etc/netns
      hosts file -> mesh config from the pods' IPs -> node proxies (ztunnel, transparent) ->
      pod processes (`ip netns exec`, so /etc/netns/<pod>/hosts is their /etc/hosts).
down: pods stopped -> CNI DEL chain per pod -> node proxies and agents stopped -> capture
      uninstalled per node -> netns and /etc/netns dirs deleted -> bpffs unmounted -> state dir
      removed.

Invariants:
- The state file is written before each resource is created, and every name is recomputable
  from (lab, manifests) (ambientctl.lab.topology), so `down` cleans up after any partial `up`.
- A failing `up` tears down what it built before raising.
- Label changes: the overrides file is rewritten (the agents watch it), agents are asked to
  sync, and when the set of ambient pods changed the mesh config is rewritten and the node
  proxies restarted (static config has no reload yet).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambientctl.errors import LabCommandError, LabStateError
from ambientctl.lab import manifests, system, topology
from ambientctl.lab.topology import NodePlan, StatePaths
from cni import protocol
from cni.errors import CniError
from cni.install import write_launcher

CNI_PATH_SYSTEM = Path("/usr/lib/cni")
PYTHON = sys.executable
ZTUNNEL = str(Path(sys.executable).with_name("ztunnel"))
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
    primary: str = "ptp"
    nodes: list[NodeState] = field(default_factory=list)
    pods: dict[str, PodState] = field(default_factory=dict)
    bpffs: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capture": self.capture,
            "source": self.source,
            "primary": self.primary,
            "bpffs": self.bpffs,
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
            primary=d.get("primary", "ptp"),
            bpffs=d.get("bpffs", False),
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


class Lab:
    """One lab, addressed by name; all commands go through here."""

    def __init__(
        self, name: str = "lab", *, state_root: Path = topology.STATE_ROOT, log: LogFn = _quiet
    ) -> None:
        if not topology.valid_lab_name(name):
            raise LabStateError(f"invalid lab name {name!r} (lowercase, digits, '-', <= 16)")
        self.name = name
        self.paths = StatePaths.of(name, state_root)
        self.log = log
        self.state: LabState | None = None

    # -- state -------------------------------------------------------------------------------
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

    def overrides(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.paths.labels.read_text() or "{}")
            return data
        except FileNotFoundError:
            return {}

    def ambient_map(self, spec: manifests.LabSpec) -> dict[str, bool]:
        ns_labels = manifests.effective_namespace_labels(spec, self.overrides())
        return {p.key: manifests.is_ambient(p, ns_labels) for p in spec.pods}

    # -- up ----------------------------------------------------------------------------------
    def up(
        self,
        source: Path,
        *,
        capture: str = "ebpf",
        nodes: Sequence[str] = (),
        primary: str = "ptp",
    ) -> None:
        if self.paths.root.exists():
            raise LabStateError(
                f"lab {self.name!r} exists ({self.paths.root}); run `ambientctl lab down` first"
            )
        spec = manifests.load(source, tuple(nodes))  # validate before creating anything
        self.paths.root.mkdir(parents=True)
        self.state = LabState(
            name=self.name, capture=capture, source=str(source.resolve()), primary=primary
        )
        try:
            shutil.copytree(source, self.paths.manifests)
            self.paths.labels.write_text("{}\n")
            self.paths.logs.mkdir()
            self.save()
            self._up(spec)
        except BaseException:
            kept = Path(f"/tmp/ambient-lab-{self.name}-failed-logs")
            shutil.rmtree(kept, ignore_errors=True)
            if self.paths.logs.exists():
                shutil.copytree(self.paths.logs, kept)
            self.log(f"up failed; logs kept in {kept}; tearing down what was built")
            self.down()
            raise

    def _up(self, spec: manifests.LabSpec) -> None:
        st = self.state
        assert st is not None
        plans = topology.nodes_plan(self.name, spec.nodes)
        st.nodes = [NodeState(plan=p) for p in plans]
        self.save()
        self._underlay(plans)
        meshed = st.capture == "ebpf"
        if meshed:
            system.mount_bpffs(self.paths.bpffs)
            st.bpffs = True
            self.save()
            self.paths.bin.mkdir(exist_ok=True)
            write_launcher(self.paths.bin, PYTHON)
            for node in st.nodes:
                self._start_agent(node)
        for pod in spec.pods:
            self._add_pod(spec, pod)
        self.write_mesh_config(spec)
        if meshed:
            for node in st.nodes:
                self._start_ztunnel(node)
        for pod in spec.pods:
            self._start_pod(pod)
        self.log(f"lab {self.name} is up: {len(st.nodes)} nodes, {len(spec.pods)} pods")

    def _underlay(self, plans: Sequence[NodePlan]) -> None:
        under = topology.underlay_netns(self.name)
        system.netns_add(under)
        if "br0" not in system.ip(under, "-br", "link", "show", check=False):
            system.ip(under, "link", "add", "br0", "type", "bridge")
        system.ip(under, "link", "set", "br0", "up")
        for p in plans:
            system.netns_add(p.netns)
            if topology.UPLINK not in system.ip(p.netns, "-br", "link", "show", check=False):
                system.ip(
                    p.netns,
                    "link",
                    "add",
                    topology.UPLINK,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    p.underlay_port,
                    "netns",
                    under,
                )
            system.ip(p.netns, "addr", "replace", f"{p.ip}/24", "dev", topology.UPLINK)
            system.ip(p.netns, "link", "set", topology.UPLINK, "up")
            system.ip(under, "link", "set", p.underlay_port, "master", "br0", "up")
            system.sysctl(p.netns, "net.ipv4.ip_forward", "1")
            # Replies to pod sources the proxy spoofs (IP_TRANSPARENT) must not be dropped by
            # reverse-path filtering on the node.
            system.sysctl(p.netns, "net.ipv4.conf.all.rp_filter", "0")
            for q in plans:
                if q.name != p.name:
                    system.ip(p.netns, "route", "replace", q.pod_subnet, "via", q.ip)
        self.log(f"underlay {under}: nodes {', '.join(f'{p.name}={p.ip}' for p in plans)}")

    def _start_agent(self, node: NodeState) -> None:
        p = node.plan
        sock = self.paths.agent_socket(p.name)
        self.paths.node_dir(p.name).mkdir(parents=True, exist_ok=True)
        self.paths.bpf_dir(p.name).mkdir(exist_ok=True)
        argv = system.nsenter(p.netns, [
            PYTHON, "-m", "cni.agent", "run",
            "--node", p.name,
            "--socket", str(sock),
            "--state-dir", str(self.paths.node_dir(p.name) / "agent"),
            "--uplink", topology.UPLINK,
            "--bpffs-dir", str(self.paths.bpf_dir(p.name)),
            "--manifests", str(self.paths.manifests),
            "--label-overrides", str(self.paths.labels),
        ])  # fmt: skip
        node.agent_pid = system.spawn(argv, log=self.paths.logs / f"agent-{p.name}.log")
        self.save()
        pid = node.agent_pid
        system.wait_for(
            lambda: _answers(sock) or not system.alive(pid),
            timeout=60,
            what=f"node agent {p.name}",
        )
        if not system.alive(pid):
            tail = _tail(self.paths.logs / f"agent-{p.name}.log")
            raise LabCommandError(f"node agent {p.name} exited during start:\n{tail}")
        self.log(f"node agent {p.name} up (pid {pid})")

    def restart_agent(self, node_name: str) -> None:
        st = self.state or self.load()
        node = st.node(node_name)
        system.stop(node.agent_pid)
        self._start_agent(node)

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

    def cni_path(self) -> list[Path]:
        return [self.paths.bin, CNI_PATH_SYSTEM]

    def _add_pod(self, spec: manifests.LabSpec, pod: manifests.PodSpec) -> None:
        st = self.state
        assert st is not None
        node = st.node(pod.node)
        netns = topology.pod_netns(self.name, pod.namespace, pod.name)
        ps = PodState(
            key=pod.key, namespace=pod.namespace, name=pod.name, node=pod.node, netns=netns,
            uid=pod.uid, container_id=f"{self.name}-{pod.uid}",
        )  # fmt: skip
        st.pods[pod.key] = ps
        self.save()
        system.netns_add(netns)
        conflist = self._conflist(node)
        self.paths.node_dir(pod.node).mkdir(parents=True, exist_ok=True)
        self.paths.conflist(pod.node).write_text(json.dumps(conflist, indent=2))
        result = system.cni_chain(
            "ADD",
            conflist,
            container_id=ps.container_id,
            netns_path=f"/run/netns/{netns}",
            cni_args=_cni_args(pod),
            cni_path=self.cni_path(),
            run_in=node.plan.netns,
        )
        assert result is not None
        ps.cni_result = result
        ps.ip = result["ips"][0]["address"].split("/")[0]
        self.save()
        etc = Path("/etc/netns") / netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(manifests.hosts_file(spec, pod))
        self.log(f"pod {pod.key} on {pod.node}: {ps.ip} ({netns})")

    def _start_pod(self, pod: manifests.PodSpec) -> None:
        st = self.state
        assert st is not None
        ps = st.pods[pod.key]
        ps.pid = system.spawn(
            ["ip", "netns", "exec", ps.netns, *pod.command],
            log=self.paths.logs / f"pod-{pod.namespace}-{pod.name}.log",
            cwd=self.paths.manifests,
            env=_pod_env(pod),
        )
        self.save()

    def write_mesh_config(self, spec: manifests.LabSpec) -> dict[str, Any]:
        st = self.state
        assert st is not None
        ips = {k: p.ip for k, p in st.pods.items() if p.ip}
        config = manifests.mesh_config(spec, ips, self.ambient_map(spec))
        text = "# written by `ambientctl lab`; shape: meshcore/model.py\n"
        text += yaml.safe_dump(config, sort_keys=False)
        for node in st.nodes:
            path = self.paths.mesh_config(node.plan.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return config

    def _start_ztunnel(self, node: NodeState) -> None:
        p = node.plan
        log = self.paths.logs / f"ztunnel-{p.name}.log"
        argv = system.nsenter(p.netns, [
            ZTUNNEL,
            "--node", p.name,
            "--node-ip", p.ip,
            "--capture", "transparent",
            "--mesh-config", str(self.paths.mesh_config(p.name)),
            "--ca-dir", str(self.paths.ca),
            "--drain-timeout", "1",
        ])  # fmt: skip
        node.ztunnel_pid = system.spawn(argv, log=log)
        self.save()
        pid = node.ztunnel_pid
        ready = f"http://{p.ip}:15021/healthz/ready"
        system.wait_for(
            lambda: system.http_ok(p.netns, ready) or not system.alive(pid),
            timeout=60,
            what=f"node proxy {p.name}",
        )
        if not system.alive(pid):
            raise LabCommandError(f"node proxy {p.name} exited during start:\n{_tail(log)}")
        self.log(f"node proxy {p.name} up (pid {pid}) on {p.ip}")

    def stop_ztunnel(self, node_name: str) -> None:
        st = self.state or self.load()
        node = st.node(node_name)
        system.stop(node.ztunnel_pid)

    def start_ztunnel(self, node_name: str) -> None:
        st = self.state or self.load()
        self._start_ztunnel(st.node(node_name))

    # -- down --------------------------------------------------------------------------------
    def down(self) -> None:
        if self.state is None:
            try:
                self.load()
            except LabStateError:
                if not self.paths.root.exists():
                    raise
                self.state = None
        st = self.state
        if st is not None:
            for ps in st.pods.values():
                if ps.pid:
                    system.stop(ps.pid, timeout=3)
            for ps in st.pods.values():
                self._del_pod(st, ps)
            for node in st.nodes:
                if node.ztunnel_pid:
                    system.stop(node.ztunnel_pid)
            for node in st.nodes:
                if node.agent_pid:
                    system.stop(node.agent_pid)
            if st.capture == "ebpf" and st.bpffs:
                for node in st.nodes:
                    self._uninstall_capture(node)
            for ps in st.pods.values():
                system.netns_del(ps.netns)
                shutil.rmtree(Path("/etc/netns") / ps.netns, ignore_errors=True)
            for node in st.nodes:
                system.netns_del(node.plan.netns)
        system.netns_del(topology.underlay_netns(self.name))
        system.umount(self.paths.bpffs)
        shutil.rmtree(self.paths.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.paths.root.parent.rmdir()  # only if no other lab lives there
        self.log(f"lab {self.name} is down")

    def _del_pod(self, st: LabState, ps: PodState) -> None:
        if not system.netns_exists(ps.netns):
            return
        try:
            node = st.node(ps.node)
        except LabStateError:
            return
        if not system.netns_exists(node.plan.netns):
            return
        pod = manifests.PodSpec(
            name=ps.name, namespace=ps.namespace, labels={}, service_account="", node=ps.node,
            command=(),
        )  # fmt: skip
        try:
            system.cni_chain(
                "DEL",
                self._conflist(node),
                container_id=ps.container_id,
                netns_path=f"/run/netns/{ps.netns}",
                cni_args=_cni_args(pod, ps.uid),
                cni_path=self.cni_path(),
                prev_result=ps.cni_result,
                run_in=node.plan.netns,
            )
        except LabCommandError as err:
            self.log(f"CNI DEL of {ps.key} failed (netns removed anyway): {err}")

    def _uninstall_capture(self, node: NodeState) -> None:
        p = node.plan
        if not system.netns_exists(p.netns):
            return
        argv = system.nsenter(p.netns, [
            PYTHON, "-m", "cni.agent", "uninstall",
            "--node", p.name,
            "--uplink", topology.UPLINK,
            "--bpffs-dir", str(self.paths.bpf_dir(p.name)),
        ])  # fmt: skip
        try:
            system.run(argv)
        except LabCommandError as err:
            self.log(f"capture uninstall on {p.name} failed: {err}")

    # -- pods / exec / label ----------------------------------------------------------------
    def pods(self) -> list[dict[str, str]]:
        st = self.state or self.load()
        redirection: dict[str, str] = {}
        for node in st.nodes:
            for pod in self._agent_pods(node):
                redirection[f"{pod.get('namespace')}/{pod.get('name')}"] = pod.get(
                    "redirection", ""
                )
        rows = []
        for key, ps in sorted(st.pods.items()):
            rows.append(
                {
                    "namespace": ps.namespace,
                    "name": ps.name,
                    "node": ps.node,
                    "ip": ps.ip,
                    "status": "Running" if ps.pid and system.alive(ps.pid) else "Exited",
                    "redirection": redirection.get(key, "") or "-",
                }
            )
        return rows

    def _agent_pods(self, node: NodeState) -> list[dict[str, Any]]:
        st = self.state
        assert st is not None
        if st.capture != "ebpf":
            return []
        try:
            answer = protocol.call(
                str(self.paths.agent_socket(node.plan.name)), {"op": "status"}, timeout=5
            )
            pods: list[dict[str, Any]] = answer.get("pods", [])
            return pods
        except CniError:
            # agent down: its registry on disk is the last known state
            path = self.paths.node_dir(node.plan.name) / "agent" / "pods.json"
            try:
                return list(json.loads(path.read_text()).get("pods", {}).values())
            except (FileNotFoundError, ValueError):
                return []

    def exec_argv(self, pod_key: str, command: Sequence[str]) -> list[str]:
        st = self.state or self.load()
        ps = self._pod(st, pod_key)
        return ["ip", "netns", "exec", ps.netns, *command]

    def node_argv(self, node_name: str, command: Sequence[str]) -> list[str]:
        st = self.state or self.load()
        return system.nsenter(st.node(node_name).plan.netns, command)

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

    def label_namespace(self, namespace: str, changes: dict[str, str | None]) -> list[str]:
        st = self.state or self.load()
        spec = self.spec()
        before = self.ambient_map(spec)
        overrides = self.overrides()
        ns_over = overrides.setdefault("namespaces", {}).setdefault(namespace, {})
        ns_over.update(changes)
        tmp = self.paths.labels.with_suffix(".tmp")
        tmp.write_text(json.dumps(overrides, indent=2))
        os.replace(tmp, self.paths.labels)
        out: list[str] = []
        if st.capture == "ebpf":
            for node in st.nodes:
                try:
                    answer = protocol.call(
                        str(self.paths.agent_socket(node.plan.name)), {"op": "sync"}, timeout=10
                    )
                    out.extend(f"{node.plan.name}: {c}" for c in answer.get("changes", []))
                except CniError as err:
                    out.append(f"{node.plan.name}: agent not reachable ({err}); it syncs on start")
        if self.ambient_map(spec) != before:
            self.write_mesh_config(spec)
            if st.capture == "ebpf":
                # The static node proxy has no config reload yet: restart it.
                for node in st.nodes:
                    if node.ztunnel_pid and system.alive(node.ztunnel_pid):
                        system.stop(node.ztunnel_pid)
                        self._start_ztunnel(node)
                out.append("mesh config rewritten; node proxies restarted")
        return out


def _cni_args(pod: manifests.PodSpec, uid: str | None = None) -> str:
    return (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
        f"K8S_POD_UID={uid or pod.uid}"
    )


def _pod_env(pod: manifests.PodSpec) -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "NODE_NAME": pod.node,
        "PYTHONUNBUFFERED": "1",
    }


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
