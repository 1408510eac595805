"""The lab's pods: each pod a network namespace wired by the REAL CNI chain in its node's netns,
its process, the waypoint pods, and the pod-facing commands (pods, exec, label).

Invariant: label changes never restart a node proxy: the new labels are written, agents are told
to sync (capture changes at once), and `label_namespace` returns once every running node proxy
has applied the control plane's push.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ambientctl.errors import LabCommandError, LabStateError
from ambientctl.lab import manifests, system, topology, waypoints
from ambientctl.lab.processes import LabProcesses
from ambientctl.lab.state import LabState, NodeState, PodState, _atomic_write, _tail
from cni import protocol
from cni.errors import CniError


class LabPods(LabProcesses):
    """Pods, waypoint pods, exec and label."""

    def _add_pod(self, spec: manifests.LabSpec, pod: manifests.PodSpec) -> None:
        st = self.state
        assert st is not None
        node = st.node(pod.node)
        netns = topology.pod_netns(self.name, pod.namespace, pod.name)
        ps = PodState(
            key=pod.key,
            namespace=pod.namespace,
            name=pod.name,
            node=pod.node,
            netns=netns,
            uid=pod.uid,
            container_id=f"{self.name}-{pod.uid}",
        )
        st.pods[pod.key] = ps
        self.save()
        system.netns_add(netns)
        conflist = self._conflist(node)
        self.paths.node_dir(pod.node).mkdir(parents=True, exist_ok=True)
        self.paths.conflist(pod.node).write_text(json.dumps(conflist, indent=2))
        result = system.cni_chain(
            "ADD",
            conflist,
            system.CniAttachment(
                container_id=ps.container_id,
                netns_path=f"/run/netns/{netns}",
                cni_args=_cni_args(pod),
                cni_path=self.cni_path(),
                run_in=node.plan.netns,
            ),
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
            name=ps.name,
            namespace=ps.namespace,
            labels={},
            service_account="",
            node=ps.node,
            command=(),
        )
        try:
            system.cni_chain(
                "DEL",
                self._conflist(node),
                system.CniAttachment(
                    container_id=ps.container_id,
                    netns_path=f"/run/netns/{ps.netns}",
                    cni_args=_cni_args(pod, ps.uid),
                    cni_path=self.cni_path(),
                    run_in=node.plan.netns,
                ),
                ps.cni_result,
            )
        except LabCommandError as err:
            self.log(f"CNI DEL of {ps.key} failed (netns removed anyway): {err}")

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
            self._remove_pod(st, key)
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
            docs.append(
                waypoints.pod_doc(
                    gw,
                    node=node,
                    token_file=self.paths.node_token(node),
                    roots=self.paths.roots,
                    roots_pem=self.paths.roots.read_text(),
                )
            )
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
            self._wait_waypoint_ready(st.pods[key], timeout)
        return new, removed

    def _remove_pod(self, st: LabState, key: str) -> None:
        """Stop a pod's process, CNI-delete it and remove its netns (a waypoint pod whose
        Gateway is gone)."""
        ps = st.pods.get(key)
        if ps is None:
            return
        if ps.pid:
            system.stop(ps.pid, timeout=3)
        self._del_pod(st, ps)
        system.netns_del(ps.netns)
        shutil.rmtree(Path("/etc/netns") / ps.netns, ignore_errors=True)
        del st.pods[key]
        self.save()
        self.log(f"waypoint pod {key} removed")

    def _wait_waypoint_ready(self, ps: PodState, timeout: float) -> None:
        pid = ps.pid
        url = f"http://127.0.0.1:{waypoints.ADMIN_PORT}/healthz/ready"
        system.wait_for(
            lambda: system.http_ok(ps.netns, url) or not system.alive(pid),
            timeout=timeout,
            what=f"waypoint {ps.key}",
            interval=0.1,
        )
        log = self.paths.logs / f"pod-{ps.namespace}-{ps.name}.log"
        if not system.alive(pid):
            raise LabCommandError(f"waypoint {ps.key} exited during start:\n{_tail(log)}")
        self.log(f"waypoint {ps.key} on {ps.node}: {ps.ip}, ready (config from the control plane)")

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
    return topology.cni_args(pod.namespace, pod.name, uid or pod.uid)


def _pod_env(pod: manifests.PodSpec) -> dict[str, str]:
    """A pod's environment; the OTLP collector and sampler settings (``OTEL_EXPORTER_OTLP_*``,
    ``OTEL_TRACES_SAMPLER[_ARG]``) of the lab's own environment pass through, so waypoint pods
    export and sample spans as the node proxies do."""
    prefixes = ("OTEL_EXPORTER_OTLP_", "OTEL_TRACES_SAMPLER")
    otel = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "NODE_NAME": pod.node,
        "PYTHONUNBUFFERED": "1",
        **otel,
    }
