"""The lab's commands: up, down, pods, exec, label.

Owns the order in which a lab is built and torn down, the lab state file
(/run/ambient-lab/<name>/state.json) that every later command reads, and the writes the lab
makes into its copy of the manifest directory (the cluster state; see below).

up:   manifests validated -> underlay + node netns (uplinks, routes, forwarding; br0 gets the
      control plane's address) -> bpffs mount -> node agents (nsenter into the node netns, so
      /sys keeps the real bpffs) -> per pod: netns, REAL CNI chain (ptp/bridge + host-local,
      then ambient-cni) run in the node netns, /etc/netns hosts file -> each Pod's node and
      status (pod IP) written into the manifests -> mesh CA + node tokens -> control plane
      (ambient-controlplane in the underlay netns, TLS) -> node proxies (ztunnel, transparent,
      config over xDS, certificates from the control plane's CA) -> pod processes
      (`ip netns exec`, so /etc/netns/<pod>/hosts is their /etc/hosts).
down: pods stopped -> CNI DEL chain per pod -> node proxies, control plane and agents stopped
      -> capture uninstalled per node -> netns and /etc/netns dirs deleted -> bpffs unmounted
      -> state dir (manifests, CA, tokens, logs) removed.

The manifest directory (``<state>/manifests``) is the lab's API server: the control plane
watches it (every kind it reads: Namespaces, Pods, Services, AuthorizationPolicies,
PeerAuthentications, ...), the node agents read Namespace/Pod labels from it, pods run in it.
The lab writes into it what Kubernetes components write into API objects: Pod spec.nodeName,
metadata.uid and status.podIP (scheduler/kubelet, at `up`), Namespace labels (`lab label`).
Anyone may drop or remove other manifests (e.g. an AuthorizationPolicy) there at any time.

Invariants:
- The state file is written before each resource is created, and every name is recomputable
  from (lab, manifests) (ambientctl.lab.topology), so `down` cleans up after any partial `up`.
- A failing `up` tears down what it built before raising.
- The control plane is the only source of node-proxy config and certificates: node proxies get
  no mesh config file and no CA directory, only the control plane's address, the CA roots to
  verify it, and their node's token (which lets them obtain certificates only for service
  accounts with a pod on their node).
- Manifest files are replaced atomically (temp file + rename), so a reader (control plane,
  agent) sees the old or the new file, never a partial one.
- Label changes never restart a node proxy: the new labels are written, agents are told to
  sync (capture changes at once), and `label_namespace` returns once every running node proxy
  has applied the control plane's push.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambientctl.errors import LabCommandError, LabStateError
from ambientctl.lab import manifests, system, topology, waypoints
from ambientctl.lab.topology import NodePlan, StatePaths
from cni import protocol
from cni.errors import CniError
from cni.install import write_launcher
from meshcore.ca import MeshCA

CNI_PATH_SYSTEM = Path("/usr/lib/cni")
PYTHON = sys.executable
ZTUNNEL = str(Path(sys.executable).with_name("ztunnel"))
CONTROLPLANE = str(Path(sys.executable).with_name("ambient-controlplane"))
XDS_ADDRESS = f"{topology.CONTROLPLANE_IP}:{topology.CONTROLPLANE_PORT}"
# Debug views on loopback only (inside the underlay netns); metrics also on the lab address.
CONTROLPLANE_DEBUG = f"http://127.0.0.1:{topology.CONTROLPLANE_DEBUG_PORT}"
MANIFEST_HEADER = (
    "# Lab copy of {source}, written by `ambientctl lab`: Pod nodeName/uid/status (the\n"
    "# scheduler's and kubelet's part) and Namespace labels (`lab label`) are filled in.\n"
)
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capture": self.capture,
            "source": self.source,
            "primary": self.primary,
            "bpffs": self.bpffs,
            "controlplane_pid": self.controlplane_pid,
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

    @staticmethod
    def ambient_map(spec: manifests.LabSpec) -> dict[str, bool]:
        return {p.key: manifests.is_ambient(p, spec.namespaces) for p in spec.pods}

    # -- the manifest directory (the lab's API server) ---------------------------------------
    def _manifest_files(self) -> list[Path]:
        """The files the lab and the agents read (top level, like `manifests.load`)."""
        d = self.paths.manifests
        return sorted([*d.glob("*.yaml"), *d.glob("*.yml")])

    def _rewrite_objects(
        self, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> set[tuple[str, str, str]]:
        """Apply `change` to every Pod/Namespace document of the top-level manifest files
        (None = leave it); rewrite changed files atomically. Returns the refs it changed."""
        st = self.state
        done: set[tuple[str, str, str]] = set()
        for path in self._manifest_files():
            docs = list(yaml.safe_load_all(path.read_text()))
            changed = False
            for i, doc in enumerate(docs):
                ref = manifests.object_ref(doc) if isinstance(doc, dict) else None
                if ref is None:
                    continue
                new = change(doc)
                if new is not None and new != doc:
                    docs[i] = new
                    changed = True
                    done.add(ref)
            if changed:
                header = MANIFEST_HEADER.format(source=st.source if st else "the manifests")
                _atomic_write(path, header + yaml.safe_dump_all(docs, sort_keys=False))
        return done

    def _write_pod_facts(self, spec: manifests.LabSpec) -> None:
        st = self.state
        assert st is not None
        facts = {
            key: manifests.PodFacts(
                node=ps.node, ip=ps.ip, host_ip=st.node(ps.node).plan.ip, uid=ps.uid
            )
            for key, ps in st.pods.items()
            if ps.ip
        }

        def change(doc: dict[str, Any]) -> dict[str, Any] | None:
            ref = manifests.object_ref(doc)
            if ref is None or ref[0] != "Pod":
                return None
            f = facts.get(f"{ref[1]}/{ref[2]}")
            return manifests.with_pod_facts(doc, f) if f is not None else None

        self._rewrite_objects(change)
        self.log(f"pod nodes and IPs written into {self.paths.manifests}")

    def _write_namespace_labels(self, namespace: str, changes: dict[str, str | None]) -> None:
        def change(doc: dict[str, Any]) -> dict[str, Any] | None:
            ref = manifests.object_ref(doc)
            if ref != ("Namespace", "", namespace):
                return None
            return manifests.with_labels(doc, changes)

        self._rewrite_objects(change)
        declared = {
            ref
            for path in self._manifest_files()
            for doc in yaml.safe_load_all(path.read_text())
            if isinstance(doc, dict) and (ref := manifests.object_ref(doc)) is not None
        }
        if ("Namespace", "", namespace) in declared:
            return
        # A namespace only implied by its pods: create its Namespace object.
        path = self.paths.lab_namespaces
        docs = list(yaml.safe_load_all(path.read_text())) if path.exists() else []
        labels = {k: v for k, v in changes.items() if v is not None}
        docs.append(manifests.namespace_doc(namespace, labels))
        header = "# Namespaces created by `ambientctl lab label`\n"
        _atomic_write(path, header + yaml.safe_dump_all(docs, sort_keys=False))

    # -- up ----------------------------------------------------------------------------------
    def up(
        self,
        source: Path,
        *,
        capture: str = "ebpf",
        nodes: Sequence[str] = (),
        primary: str = topology.DEFAULT_PRIMARY_PLUGIN,
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
        self._write_pod_facts(spec)
        if meshed:
            self._write_credentials()
            self._start_controlplane()
            for node in st.nodes:
                self._start_ztunnel(node)
        for pod in spec.pods:
            self._start_pod(pod)
        if meshed:
            self.sync_waypoints()
        self.log(f"lab {self.name} is up: {len(st.nodes)} nodes, {len(spec.pods)} pods")

    def _underlay(self, plans: Sequence[NodePlan]) -> None:
        under = topology.underlay_netns(self.name)
        system.netns_add(under)
        if "br0" not in system.ip(under, "-br", "link", "show", check=False):
            system.ip(under, "link", "add", "br0", "type", "bridge")
        system.ip(under, "link", "set", "br0", "up")
        # The control plane listens on the bridge's own address in the underlay netns.
        system.ip(under, "addr", "replace", f"{topology.CONTROLPLANE_IP}/24", "dev", "br0")
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
            # Pods that talk to the control plane themselves (waypoints) are answered via
            # their node.
            system.ip(under, "route", "replace", p.pod_subnet, "via", p.ip)
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

    # -- waypoints -------------------------------------------------------------------------
    def sync_waypoints(self, *, timeout: float = 60) -> tuple[list[str], list[str]]:
        """Make the waypoint pods match the waypoint Gateways in the lab's manifests (see
        `ambientctl.lab.waypoints`): new ones get a pod (real CNI chain), their Pod object with
        node and IP, a running `waypoint` and a readiness wait; pods whose Gateway is gone are
        stopped, CNI-deleted and removed. Returns (started, removed) pod keys."""
        st = self.state or self.load()
        if st.capture != "ebpf":
            raise LabCommandError("waypoints need the control plane (a lab with eBPF capture)")
        path = self.paths.manifests / waypoints.WAYPOINT_FILE
        gws = waypoints.read_gateways(self.paths.manifests)
        nodes = [n.plan.name for n in st.nodes]
        wanted = {gw.pod_key: (i, gw) for i, gw in enumerate(gws)}
        have: dict[str, dict[str, Any]] = {}
        for doc in waypoints.pods_in_file(path):
            meta = doc.get("metadata") or {}
            have[f"{meta.get('namespace', 'default')}/{meta.get('name')}"] = doc
        removed = [k for k in have if k not in wanted]
        for key in removed:
            ps = st.pods.get(key)
            if ps is None:
                continue
            if ps.pid:
                system.stop(ps.pid, timeout=3)
            self._del_pod(st, ps)
            system.netns_del(ps.netns)
            shutil.rmtree(Path("/etc/netns") / ps.netns, ignore_errors=True)
            del st.pods[key]
            self.save()
            self.log(f"waypoint pod {key} removed")
        new = [k for k in wanted if k not in have or k not in st.pods]
        docs = [d for k, d in have.items() if k in wanted]
        for key in new:
            if key in have:
                continue
            index, gw = wanted[key]
            try:
                node = waypoints.choose_node(gw, index, nodes)
            except ValueError as err:
                raise LabCommandError(str(err)) from None
            docs.append(waypoints.pod_doc(
                gw, node=node, token_file=self.paths.node_token(node), roots=self.paths.roots
            ))  # fmt: skip
        if removed or new:
            if docs:
                header = "# Waypoint pods, one per istio-waypoint Gateway (`ambientctl lab`)\n"
                _atomic_write(path, header + yaml.safe_dump_all(docs, sort_keys=False))
            else:
                path.unlink(missing_ok=True)
        if not new:
            return [], removed
        spec = self.spec()
        for key in new:
            if key not in st.pods:
                self._add_pod(spec, spec.pod(key))
        self._write_pod_facts(spec)
        for key in new:
            self._start_pod(spec.pod(key))
        for key in new:
            ps = st.pods[key]
            pid = ps.pid
            url = f"http://127.0.0.1:{waypoints.ADMIN_PORT}/healthz/ready"
            system.wait_for(
                lambda: system.http_ok(ps.netns, url) or not system.alive(pid),  # noqa: B023
                timeout=timeout,
                what=f"waypoint {key}",
                interval=0.1,
            )
            log = self.paths.logs / f"pod-{ps.namespace}-{ps.name}.log"
            if not system.alive(pid):
                raise LabCommandError(f"waypoint {key} exited during start:\n{_tail(log)}")
            self.log(f"waypoint {key} on {ps.node}: {ps.ip}, ready (config from the control plane)")
        return new, removed

    def waypoint_admin(self, pod_key: str, path: str) -> str:
        """GET a waypoint pod's admin endpoint (``/metrics``) or debug view (``/debug/config``,
        on the pod's loopback only)."""
        st = self.state or self.load()
        ps = self._pod(st, pod_key)
        port = waypoints.DEBUG_PORT if path.startswith("/debug/") else waypoints.ADMIN_PORT
        status, body = system.http_get(ps.netns, f"http://127.0.0.1:{port}{path}")
        if status != 200:
            raise LabCommandError(f"waypoint {pod_key} {path}: HTTP {status}")
        return body

    # -- control plane ---------------------------------------------------------------------
    def _write_credentials(self) -> None:
        """The mesh CA (created here, kept in <state>/ca for the control plane only), the roots
        node proxies verify the control plane with, and one random token per node."""
        st = self.state
        assert st is not None
        ca = MeshCA.load_or_create(self.paths.ca, trust_domain=topology.TRUST_DOMAIN)
        self.paths.controlplane.mkdir(parents=True, exist_ok=True)
        self.paths.roots.write_bytes(ca.roots_pem)
        tokens = {n.plan.name: secrets.token_urlsafe(32) for n in st.nodes}
        _atomic_write(self.paths.node_credentials, yaml.safe_dump(tokens), mode=0o600)
        for node, token in tokens.items():
            self.paths.node_dir(node).mkdir(parents=True, exist_ok=True)
            _atomic_write(self.paths.node_token(node), token + "\n", mode=0o600)

    def _start_controlplane(self) -> None:
        st = self.state
        assert st is not None
        under = topology.underlay_netns(self.name)
        log = self.paths.logs / "controlplane.log"
        argv = system.nsenter(under, [
            CONTROLPLANE,
            "--manifest-dir", str(self.paths.manifests),
            "--ca-dir", str(self.paths.ca),
            "--node-credentials", str(self.paths.node_credentials),
            "--listen", XDS_ADDRESS,
            "--debug-listen", f"127.0.0.1:{topology.CONTROLPLANE_DEBUG_PORT}",
            "--metrics-listen", f"{topology.CONTROLPLANE_IP}:{topology.CONTROLPLANE_DEBUG_PORT}",
            "--trust-domain", topology.TRUST_DOMAIN,
            "--poll-interval", "0.1",
        ])  # fmt: skip
        st.controlplane_pid = system.spawn(argv, log=log)
        self.save()
        pid = st.controlplane_pid
        system.wait_for(
            lambda: system.http_ok(under, f"{CONTROLPLANE_DEBUG}/ready") or not system.alive(pid),
            timeout=60,
            what="control plane",
        )
        if not system.alive(pid):
            raise LabCommandError(f"control plane exited during start:\n{_tail(log)}")
        self.log(f"control plane up (pid {pid}) on {XDS_ADDRESS} (TLS), watching the manifests")

    def stop_controlplane(self) -> None:
        st = self.state or self.load()
        system.stop(st.controlplane_pid)

    def start_controlplane(self) -> None:
        self.state or self.load()
        self._start_controlplane()

    def controlplane_debug(self, path: str) -> Any:
        """GET a control-plane debug endpoint (JSON), e.g. ``/debug/connections``."""
        status, body = system.http_get(
            topology.underlay_netns(self.name), f"{CONTROLPLANE_DEBUG}{path}"
        )
        if status != 200:
            raise LabCommandError(f"control plane {path}: HTTP {status}: {body.strip()}")
        return body if path == "/metrics" else json.loads(body)

    # -- node proxies ------------------------------------------------------------------------
    def _start_ztunnel(self, node: NodeState) -> None:
        p = node.plan
        log = self.paths.logs / f"ztunnel-{p.name}.log"
        argv = system.nsenter(p.netns, [
            ZTUNNEL,
            "--node", p.name,
            "--node-ip", p.ip,
            "--capture", "transparent",
            "--xds-address", XDS_ADDRESS,
            "--ca-address", XDS_ADDRESS,
            "--node-credential-file", str(self.paths.node_token(p.name)),
            "--controlplane-roots", str(self.paths.roots),
            "--trust-domain", topology.TRUST_DOMAIN,
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
        self.log(f"node proxy {p.name} up (pid {pid}) on {p.ip}, fed by the control plane")

    def proxy_config(self, node_name: str) -> dict[str, Any]:
        """The node proxy's /config_dump (workloads, services, policies, certificates)."""
        st = self.state or self.load()
        p = st.node(node_name).plan
        status, body = system.http_get(p.netns, "http://127.0.0.1:15000/config_dump")
        if status != 200:
            raise LabCommandError(f"node proxy {node_name} /config_dump: HTTP {status}")
        data: dict[str, Any] = json.loads(body)
        return data

    def wait_proxies(
        self, predicate: Callable[[dict[str, Any]], bool], *, what: str, timeout: float = 15
    ) -> None:
        """Until every running node proxy's config_dump satisfies `predicate`."""
        st = self.state or self.load()
        running = [n for n in st.nodes if n.ztunnel_pid and system.alive(n.ztunnel_pid)]

        def check() -> bool:
            try:
                return all(predicate(self.proxy_config(n.plan.name)) for n in running)
            except (OSError, LabCommandError, ValueError):
                return False

        system.wait_for(check, timeout=timeout, what=what, interval=0.1)

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
            if st.controlplane_pid:
                system.stop(st.controlplane_pid)
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
        """`kubectl label namespace` for the lab: the Namespace object in the manifests is
        rewritten; the agents are told to sync (capture follows at once) and the control plane
        pushes the workloads' new tunnel protocol to the node proxies, which apply it live.
        Returns when every running node proxy has applied it (no restart, connections kept)."""
        st = self.state or self.load()
        self._write_namespace_labels(namespace, changes)
        spec = self.spec()
        out: list[str] = []
        if st.capture != "ebpf":
            return out
        for node in st.nodes:
            try:
                answer = protocol.call(
                    str(self.paths.agent_socket(node.plan.name)), {"op": "sync"}, timeout=10
                )
                out.extend(f"{node.plan.name}: {c}" for c in answer.get("changes", []))
            except CniError as err:
                out.append(f"{node.plan.name}: agent not reachable ({err}); it syncs on start")
        want = {
            manifests.workload_uid(key): "HBONE" if ambient else "NONE"
            for key, ambient in self.ambient_map(spec).items()
            if st.pods.get(key) is not None and st.pods[key].ip
        }

        def applied(dump: dict[str, Any]) -> bool:
            have = {w["uid"]: w.get("tunnelProtocol", "NONE") for w in dump.get("workloads", [])}
            return all(have.get(uid) == proto for uid, proto in want.items())

        self.wait_proxies(applied, what=f"node proxies to apply the labels of {namespace}")
        mesh = sum(1 for proto in want.values() if proto == "HBONE")
        out.append(
            f"node proxies updated live by the control plane ({mesh} of {len(want)} pods in "
            "the mesh; no restart)"
        )
        return out


def _cni_args(pod: manifests.PodSpec, uid: str | None = None) -> str:
    return (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
        f"K8S_POD_UID={uid or pod.uid}"
    )


def _pod_env(pod: manifests.PodSpec) -> dict[str, str]:
    """A pod's environment; the OTLP collector settings (``OTEL_EXPORTER_OTLP_*``) of the lab's
    own environment pass through, so waypoint pods export spans where the node proxies do."""
    otel = {k: v for k, v in os.environ.items() if k.startswith("OTEL_EXPORTER_OTLP_")}
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "NODE_NAME": pod.node,
        "PYTHONUNBUFFERED": "1",
        **otel,
    }


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
