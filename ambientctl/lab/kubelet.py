"""The lab kubelet: a lab node as a node of a real Kubernetes cluster (ambientctl.lab.kube).

Owns, for one node: its Node object (registered with the node's own ``system:node:<name>``
credential, so the API server's Node authorizer and NodeRestriction apply; Ready with a
heartbeat, the node IP as InternalIP); the pods bound to it (``spec.nodeName``): each gets a
network namespace through the node's real CNI chain (the lab's conflist: primary plugin, our
plugin chained last) unless it is ``hostNetwork``, and each container's command + args run as
a process in that namespace, with the kubelet's ``$(VAR)`` expansion of the rendered env; its
readiness and liveness probes run (exec in the container's namespaces, tcpSocket, httpGet: a
container is ready only once its readiness probe passes, a failed liveness probe restarts it)
and a container that exits is restarted as the pod's restartPolicy says, with the crash-loop
back-off (`ambientctl.lab.probes`); the pod's status (phase, podIP, conditions, container
states, ready, restart counts) written back through the ``status`` subresource; a pod being
deleted gets its preStop hooks and SIGTERM, its processes get the deletion's grace period to
exit (in the background: the kubelet serves its other pods meanwhile) before SIGKILL, then CNI
DEL runs, its netns is removed and its object deleted (the kubelet's final delete).

Images are not pulled: a container's command names one of the project's installed entry points
(the chart renders ``ztunnel``, ``python -m cni.agent``, ...) or any program on the node.
Volumes are mapped onto the host (`ambientctl.lab.volumes`); container paths in command, args
and env are rewritten to them (`map_paths`).

The pure part (`expand`, `resolve_env`, `map_paths`, `container_process`, `pod_status`) is
`ambientctl.lab.podspec`, the probes' and restarts' rules `ambientctl.lab.probes`, their
scheduling (when a check runs, what its result does, restarts) `ambientctl.lab.supervise`, the
kubelet-written volumes' files `ambientctl.lab.volumes`. This module
is the I/O edge: `LabKubelet` (API calls through meshcore.kubeapi, processes and CNI through
ambientctl.lab.system). Invariant: `stop` leaves no process, netns or pod directory behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambientctl.errors import LabCommandError
from ambientctl.lab import container, kubeproxy, probes, supervise, system, topology, volumes
from ambientctl.lab.podspec import (
    PodRun,
    container_process,
    field_values,
    pod_status,
    timestamp,
)
from meshcore.kubeapi import KubeApi

log = logging.getLogger(__name__)

Json = Mapping[str, Any]
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# -- the I/O edge ---------------------------------------------------------------------------------


@dataclass(slots=True)
class RunningPod:
    uid: str
    namespace: str
    name: str
    netns: str | None
    """None: hostNetwork (the node's netns)."""
    ip: str
    dir: Path
    started: dt.datetime
    cni_result: dict[str, Any] | None = None
    conflist: Mapping[str, Any] | None = None
    """The CNI config the pod was added with (DEL uses the node's current one if any)."""
    pids: dict[str, int] = field(default_factory=dict)
    pre_stop: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    """container -> (argv, env) of its preStop exec hook."""
    grace: float = 10.0
    exited: dict[str, int] = field(default_factory=dict)
    reported: str = ""
    containers: dict[str, supervise.Container] = field(default_factory=dict)
    terminating: asyncio.Task[None] | None = None
    """Set once the pod's deletion began (`LabKubelet._finish`): no probes, no restarts."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeletSettings:
    """How a lab node's kubelet runs its pods (`LabKubelet`): fixed for its lifetime."""

    lab: str
    conflist: Mapping[str, Any]
    """The CNI config when there is no ``conf_dir``."""
    cni_path: Sequence[Path]
    root: Path
    """The kubelet's pod directories."""
    path_env: str
    interval: float = 0.5
    heartbeat: float = 10.0
    bind_mounts: bool = False
    """Containers run in their own mount namespace with their volumes mounted at the rendered
    paths (`ambientctl.lab.container`), else container paths in command/args/env are rewritten
    (`map_paths`)."""
    node_paths: Mapping[str, Path] = field(default_factory=dict)
    """This node's own host directories (``/etc/cni/net.d`` -> a directory of the node):
    hostPath volumes under them resolve there, and CNI plugins run with them mounted in place
    (lab nodes share one machine's filesystem)."""
    conf_dir: Path | None = None
    """The CNI config is the first ``*.conflist`` there at each ADD (as a container runtime
    reads it), else ``conflist``."""
    python: str = sys.executable
    image_paths: Mapping[str, Path] = field(default_factory=dict)
    """Files every container sees (what the image would hold beyond the installed entry
    points, e.g. the node image's ``/opt/ambient/cni``)."""


class LabKubelet:
    """The kubelet of one lab node (see module doc). `run()` until cancelled; `stop()` after."""

    def __init__(
        self,
        *,
        api: KubeApi,
        node: topology.NodePlan,
        settings: KubeletSettings,
        proxy_api: KubeApi | None = None,
    ) -> None:
        """``proxy_api``: run the lab kube-proxy (`ambientctl.lab.kubeproxy`) with this client,
        and write Services into each pod's /etc/hosts (the lab has no cluster DNS)."""
        self.api = api
        self.node = node
        self.lab = settings.lab
        self.conflist = settings.conflist
        self.cni_path = list(settings.cni_path)
        self.root = settings.root
        self.path_env = settings.path_env
        self.interval = settings.interval
        self.heartbeat = settings.heartbeat
        self.bind_mounts = settings.bind_mounts
        self.node_paths = dict(settings.node_paths)
        self.conf_dir = settings.conf_dir
        self.proxy_api = proxy_api
        self.python = settings.python
        self.image_paths = dict(settings.image_paths)
        self.needed = container.lab_paths(settings.python)
        """What every container runs from (`container.hidden`)."""
        self.supervisor = supervise.Supervisor(
            node_netns=node.netns,
            python=settings.python,
            path_env=settings.path_env,
            bind_mounts=settings.bind_mounts,
        )
        self.services: list[Json] = []
        self._proxied = ""
        self._proxy_at = -1e9
        self.pods: dict[str, RunningPod] = {}
        self.failures: dict[str, str] = {}
        """pod key -> why it could not be started (also logged and written as an event)."""

    # -- node -------------------------------------------------------------------------------
    async def register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node.name,
                "labels": {
                    "kubernetes.io/hostname": self.node.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }
        status, data = await self.api.call("POST", "/api/v1/nodes", body)
        if status not in (201, 409):
            raise LabCommandError(f"register node {self.node.name}: HTTP {status}: {data}")
        await self._node_status()

    async def _node_status(self) -> None:
        now = timestamp(dt.datetime.now(dt.UTC))
        capacity = {"cpu": "8", "memory": "16Gi", "pods": "110"}
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "lab kubelet",
            "lastHeartbeatTime": now,
        }
        body = {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [ready],
                "addresses": [
                    {"type": "InternalIP", "address": self.node.ip},
                    {"type": "Hostname", "address": self.node.name},
                ],
                "nodeInfo": {
                    "kubeletVersion": "lab",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "lab://0",
                },
            }
        }
        path = f"/api/v1/nodes/{self.node.name}/status"
        status, data = await self.api.call("PATCH", path, body)  # a merge patch
        if status != 200:
            raise LabCommandError(f"node {self.node.name} status: HTTP {status}: {data}")

    # -- loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.register()
        beat = asyncio.get_running_loop().time()
        while True:
            try:
                if self.proxy_api is not None:
                    await self.sync_proxy()
                await self.sync_once()
                self.supervisor.probe_due(self.pods.values())
                if asyncio.get_running_loop().time() - beat > self.heartbeat:
                    await self._node_status()
                    beat = asyncio.get_running_loop().time()
            except (TimeoutError, OSError, LabCommandError) as e:
                log.warning("lab kubelet %s: %s", self.node.name, e)
            await asyncio.sleep(self.interval)

    async def sync_proxy(self, *, every: float = 1.0) -> None:
        """The lab kube-proxy: Services + EndpointSlices -> the node's nft table (when
        changed; at most every ``every`` seconds)."""
        now = asyncio.get_running_loop().time()
        if self.proxy_api is None or now - self._proxy_at < every:
            return
        self._proxy_at = now
        lists = []
        for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
            status, data = await self.proxy_api.call("GET", path)
            if status != 200 or not isinstance(data, Mapping):
                raise LabCommandError(f"kube-proxy: GET {path}: HTTP {status}")
            lists.append(list(data.get("items", [])))
        names = _service_names(self.services)
        self.services = lists[0]
        if _service_names(self.services) != names and self.bind_mounts:
            for rp in list(self.pods.values()):  # the DNS stand-in follows Services
                await asyncio.to_thread(self._write_hosts, rp)
        script = kubeproxy.ruleset(lists[0], lists[1])
        if script != self._proxied:
            await asyncio.to_thread(kubeproxy.apply, self.node.netns, script)
            self._proxied = script

    def service_env(self) -> dict[str, str]:
        """What a kubelet puts in every container: the ``kubernetes`` Service's address."""
        for svc in self.services:
            meta, spec = svc["metadata"], svc.get("spec") or {}
            if (meta["namespace"], meta["name"]) == ("default", "kubernetes"):
                port = str((spec.get("ports") or [{}])[0].get("port", 443))
                host = str(spec.get("clusterIP", ""))
                return {
                    "KUBERNETES_SERVICE_HOST": host,
                    "KUBERNETES_SERVICE_PORT": port,
                    "KUBERNETES_SERVICE_PORT_HTTPS": port,
                }
        return {}

    async def sync_once(self) -> None:
        """One pass: list this node's pods (the API server filters by spec.nodeName), start
        new ones, finish deleted ones, report exits."""
        query = [("fieldSelector", f"spec.nodeName={self.node.name}")]
        status, data = await self.api.call("GET", "/api/v1/pods", query=query)
        if status != 200 or not isinstance(data, Mapping):
            raise LabCommandError(f"list pods of {self.node.name}: HTTP {status}")
        seen: set[str] = set()
        for pod in data.get("items", []):
            meta = pod["metadata"]
            uid = str(meta["uid"])
            seen.add(uid)
            if meta.get("deletionTimestamp"):
                await self._finish(pod)
                continue
            if uid not in self.pods and (pod.get("status") or {}).get("phase") not in (
                "Succeeded",
                "Failed",
            ):
                key = f"{meta['namespace']}/{meta['name']}"
                try:
                    files = await volumes.materialise(self.api, pod, node_ip=self.node.ip)
                    await asyncio.to_thread(self._start, pod, files)
                except LabCommandError as e:
                    if self.failures.get(key) != str(e):
                        log.warning("pod %s: %s", key, e)
                    self.failures[key] = str(e)
                    continue
            if uid in self.pods:
                await self._report(pod, self.pods[uid])
        for uid in set(self.pods) - seen:  # deleted with grace 0 by someone else
            rp = self.pods.pop(uid)
            if rp.terminating is None:
                await asyncio.to_thread(self._teardown, rp)

    # -- a pod --------------------------------------------------------------------------------
    def _start(self, pod: Json, files: Mapping[str, Mapping[str, bytes]]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
        host = bool(spec.get("hostNetwork"))
        conflist = None if host else self._conflist()
        rp = RunningPod(
            uid=uid,
            namespace=ns,
            name=name,
            netns=None if host else topology.pod_netns(self.lab, ns, name),
            ip=self.node.ip,
            dir=self.root / "pods" / uid,
            started=dt.datetime.now(dt.UTC),
            grace=float(spec.get("terminationGracePeriodSeconds", 30)),
        )
        self.pods[uid] = rp
        rp.dir.mkdir(parents=True, exist_ok=True)
        try:
            mounts_by_volume = volumes.host_volumes(pod, rp.dir, files, self._host_path)
            if rp.netns is not None:
                assert conflist is not None
                system.netns_add(rp.netns)
                rp.conflist = conflist
                result = system.cni_chain("ADD", conflist, self._attachment(rp, pod))
                assert result is not None
                rp.cni_result = result
                rp.ip = str(result["ips"][0]["address"]).split("/")[0]
            fields = field_values(pod, node_ip=self.node.ip, pod_ip=rp.ip)
            if self.bind_mounts:
                self._write_hosts(rp)
            # Init containers run to completion, in order, before the app containers.
            for c in spec.get("initContainers", []):
                argv, env = self._launch(c, rp, fields, mounts_by_volume)
                log_path = rp.dir / f"init-{c['name']}.log"
                with open(log_path, "ab") as out:
                    proc = subprocess.run(
                        argv,
                        env=env,
                        cwd=rp.dir,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=120,
                        check=False,
                    )
                if proc.returncode != 0:
                    raise LabCommandError(
                        f"init container {c['name']} exited {proc.returncode}: "
                        + log_path.read_text(errors="replace")[-500:]
                    )
            # Probes are read first: a probe the lab cannot run fails the pod before it starts.
            found = [
                {w: p for w in probes.WHICH if (p := probes.probe(c, w))}
                for c in spec.get("containers", [])
            ]
            for c, probed in zip(spec.get("containers", []), found, strict=True):
                name = str(c["name"])
                argv, env = self._launch(c, rp, fields, mounts_by_volume)
                ct = rp.containers[name] = supervise.Container(argv=argv, env=env, declared=probed)
                if not self.bind_mounts:
                    for w, p in probed.items():
                        probe_c = {**c, "command": list(p.command), "args": []}
                        if p.kind == "exec":
                            ct.exec_argv[w] = self._launch(probe_c, rp, fields, mounts_by_volume)[0]
                rp.pids[name] = system.spawn(argv, log=rp.dir / f"{name}.log", cwd=rp.dir, env=env)
                ct.begin(time.monotonic())
                hook = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec")
                if hook and hook.get("command"):
                    hook_c = {**c, "command": hook["command"], "args": []}
                    rp.pre_stop[name] = self._launch(hook_c, rp, fields, mounts_by_volume)
        except BaseException:
            self._teardown(self.pods.pop(uid))
            raise

    def _launch(
        self, c: Json, rp: RunningPod, fields: Mapping[str, str], volumes: Mapping[str, Path]
    ) -> tuple[list[str], dict[str, str]]:
        """(argv, env) of one container process: in the pod's netns (the node's for
        hostNetwork), with its volumes bind-mounted at their mountPaths or its paths mapped."""
        netns = rp.netns or self.node.netns
        mounts = {str(m["mountPath"]): volumes[str(m["name"])] for m in c.get("volumeMounts", [])}
        if not self.bind_mounts:
            proc = container_process(c, fields=fields, mounts=mounts)
            env = {"PATH": self.path_env, "HOME": "/root", **proc.env}
            return system.nsenter(netns, list(proc.argv)), env
        proc = container_process(c, fields=fields, mounts={})
        binds = [
            container.Bind(source=src, target=Path(dst))
            for dst, src in (*self.image_paths.items(), *mounts.items())
        ]
        over = [b.target for b in binds if b.source != b.target]  # same-path hostPaths hide nothing
        if why := container.hidden(self.needed, over):
            raise LabCommandError(f"container {c['name']}: {why}, which it mounts over")
        binds.append(container.Bind(source=rp.dir / "hosts", target=Path("/etc/hosts")))
        binds.append(container.Bind(source=rp.dir / "resolv.conf", target=Path("/etc/resolv.conf")))
        argv = container.launcher_argv(
            self.python, binds, list(proc.argv), created=self.root / "mountpoints"
        )
        env = {"PATH": self.path_env, "HOME": "/root", **self.service_env(), **proc.env}
        return system.nsenter(netns, argv), env

    def _node_view(self, rp: RunningPod) -> list[str]:
        """The prefix that runs a CNI plugin with this node's own directories in place."""
        if not self.node_paths:
            return []
        binds = [
            container.Bind(source=src, target=Path(dst)) for dst, src in self.node_paths.items()
        ]
        return container.launcher_argv(self.python, binds, [], created=self.root / "mountpoints")

    def _conflist(self) -> Mapping[str, Any]:
        """The network config a runtime would use now: the node's first *.conflist."""
        if self.conf_dir is None:
            return self.conflist
        files = sorted(self.conf_dir.glob("*.conflist"))
        if not files:
            raise LabCommandError(f"network not ready: no CNI config in {self.conf_dir}")
        try:
            data = json.loads(files[0].read_text())
        except (OSError, ValueError) as e:
            raise LabCommandError(f"CNI config {files[0]}: {e}") from e
        if not isinstance(data, dict):
            raise LabCommandError(f"CNI config {files[0]}: not an object")
        return data

    def _write_hosts(self, rp: RunningPod) -> None:
        """The pod's /etc/hosts: itself, and every Service (the lab's stand-in for cluster
        DNS: names resolve to ClusterIPs, which the node proxy or the lab kube-proxy serve)."""
        ns = rp.namespace
        lines = ["127.0.0.1 localhost", f"{rp.ip} {rp.name}"]
        for svc in self.services:
            meta, spec = svc["metadata"], svc.get("spec") or {}
            cip = spec.get("clusterIP")
            if not cip or cip == "None":
                continue
            n, sns = meta["name"], meta["namespace"]
            names = [f"{n}.{sns}.svc.{topology.TRUST_DOMAIN}", f"{n}.{sns}.svc", f"{n}.{sns}"]
            if sns == ns:
                names.append(n)
            lines.append(f"{cip} {' '.join(names)}")
        # No cluster DNS server: a resolver that asks one gets "refused" at once from the pod's
        # own loopback (gRPC's c-ares resolver asks DNS for AAAA records the hosts file lacks,
        # and the machine's nameserver is unreachable from a pod: each lookup would hang).
        (rp.dir / "resolv.conf").write_text(
            "# lab kubelet: no cluster DNS; names are in /etc/hosts\nnameserver 127.0.0.1\n"
        )
        # In place (not rename): the file is bind-mounted on the containers' /etc/hosts.
        with open(rp.dir / "hosts", "w") as f:
            f.write("\n".join(lines) + "\n")

    def _host_path(self, path: str) -> Path:
        """A hostPath on this node: under one of the node's own directories, or the machine's."""
        p = Path(path)
        for prefix in sorted(self.node_paths, key=len, reverse=True):
            if p == Path(prefix) or Path(prefix) in p.parents:
                return self.node_paths[prefix] / p.relative_to(prefix)
        return p

    def _attachment(self, rp: RunningPod, pod: Json | None = None) -> system.CniAttachment:
        """The pod's attachment as the CNI runtime passes it to each plugin of the chain."""
        assert rp.netns is not None
        return system.CniAttachment(
            container_id=self._container_id(rp),
            netns_path=f"/run/netns/{rp.netns}",
            cni_args=_cni_args(pod) if pod is not None else "",
            cni_path=self.cni_path,
            run_in=self.node.netns,
            wrap=self._node_view(rp),
        )

    def _container_id(self, rp: RunningPod) -> str:
        return f"{self.lab}-{rp.uid}"

    async def _report(self, pod: Json, rp: RunningPod) -> None:
        now = time.monotonic()
        for c, pid in list(rp.pids.items()):
            if c not in rp.exited and (code := _reap(pid)) is not None:
                rp.exited[c] = code
                if c in rp.containers:
                    rp.containers[c].exited_at = now
        self.supervisor.restart(rp, str(pod["spec"].get("restartPolicy", "Always")), now)
        run = PodRun(
            pod_ip=rp.ip,
            node_ip=self.node.ip,
            started=rp.started,
            exited=rp.exited,
            ready={
                c: ct.state["readiness"].ok
                for c, ct in rp.containers.items()
                if "readiness" in ct.state
            },
            restarts={c: ct.restarts for c, ct in rp.containers.items()},
            container_started={c: ct.started_at for c, ct in rp.containers.items()},
        )
        status = pod_status(pod, run, now=dt.datetime.now(dt.UTC))
        digest = json.dumps(
            {k: status[k] for k in ("phase", "podIP", "containerStatuses")},
            sort_keys=True,
            default=str,
        ).replace(timestamp(dt.datetime.now(dt.UTC)), "")
        if digest == rp.reported:
            return
        path = f"/api/v1/namespaces/{rp.namespace}/pods/{rp.name}/status"
        code, data = await self.api.call("PATCH", path, {"status": status})  # merge patch
        if code != 200:
            raise LabCommandError(f"status of {rp.namespace}/{rp.name}: HTTP {code}: {data}")
        rp.reported = digest
        if status["phase"] in ("Succeeded", "Failed"):
            # A finished pod keeps its object (and logs) but not its sandbox: processes, IP
            # and netns are released.
            self.pods.pop(rp.uid, None)
            await asyncio.to_thread(self._teardown, rp, keep_dir=True)

    # -- deletion -----------------------------------------------------------------------------
    async def _finish(self, pod: Json) -> None:
        """A pod being deleted: stop it within its grace period (`_terminate`, in the
        background: the kubelet goes on serving its other pods, e.g. a surge pod's probes
        while the old pod's node proxy drains), then the final delete."""
        meta = pod["metadata"]
        rp = self.pods.get(str(meta["uid"]))
        if rp is not None:
            if rp.terminating is None:
                grace = meta.get("deletionGracePeriodSeconds")
                grace = rp.grace if grace is None else float(grace)
                rp.terminating = asyncio.create_task(self._terminate(rp, grace))
            if not rp.terminating.done():
                return
            self.pods.pop(rp.uid, None)
            rp.terminating.result()
        else:  # finished earlier: only its directory (logs) is left
            shutil.rmtree(self.root / "pods" / str(meta["uid"]), ignore_errors=True)
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        code, _ = await self.api.call("DELETE", path, body)
        if code not in (200, 404, 409):
            raise LabCommandError(f"delete {meta['namespace']}/{meta['name']}: HTTP {code}")

    async def _terminate(self, rp: RunningPod, grace: float) -> None:
        """preStop hooks and SIGTERM, then wait for the processes up to the deletion's grace
        period (the pod's ``terminationGracePeriodSeconds``: a node proxy that handed over
        drains its connections for up to an hour), then SIGKILL and release the sandbox."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await asyncio.to_thread(self._signal, rp, grace)
        while loop.time() < deadline and any(system.alive(pid) for pid in rp.pids.values()):
            await asyncio.sleep(0.2)

        def kill_and_release() -> None:
            for pid in rp.pids.values():
                system.stop(pid, timeout=0.0, sig=signal.SIGKILL)
            self._release(rp)

        await asyncio.to_thread(kill_and_release)

    def _teardown(self, rp: RunningPod, *, keep_dir: bool = False) -> None:
        """Stop the pod's processes (preStop, SIGTERM, SIGKILL after the pod's grace period,
        capped at 30 s: the lab does not wait an hour here), CNI DEL, netns, directory."""
        grace = min(rp.grace, 30.0)
        self._signal(rp, grace)
        for pid in rp.pids.values():
            system.stop(pid, timeout=grace)
        self._release(rp, keep_dir=keep_dir)

    def _signal(self, rp: RunningPod, grace: float) -> None:
        """preStop hooks first (bounded by the grace period), then SIGTERM."""
        for c, (argv, env) in rp.pre_stop.items():
            if c in rp.pids and system.alive(rp.pids[c]):
                with open(rp.dir / f"{c}.log", "ab") as out:
                    try:
                        subprocess.run(
                            argv,
                            env=env,
                            cwd=rp.dir,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            timeout=grace,
                            check=False,
                        )
                    except subprocess.TimeoutExpired:
                        log.warning("pod %s/%s: preStop of %s timed out", rp.namespace, rp.name, c)
        for pid in rp.pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)

    def _release(self, rp: RunningPod, *, keep_dir: bool = False) -> None:
        """The sandbox of a pod whose processes are gone: CNI DEL, netns, directory."""
        if rp.netns is not None:
            conflist = rp.conflist or self.conflist
            with contextlib.suppress(LabCommandError):
                conflist = self._conflist()  # DEL with the config the runtime has now
            with contextlib.suppress(LabCommandError):
                system.cni_chain("DEL", conflist, self._attachment(rp), rp.cni_result)
            system.netns_del(rp.netns)
        if not keep_dir:
            # The logs outlive the pod (what `kubectl logs --previous` would show).
            done = self.root / "logs"
            done.mkdir(parents=True, exist_ok=True)
            for f in rp.dir.glob("*.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(f, done / f"{rp.namespace}_{rp.name}_{f.name}")
            shutil.rmtree(rp.dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop every pod this kubelet runs (processes, CNI DEL, netns, directory), the ones
        being deleted included (their termination is cancelled: `stop` caps the grace)."""
        for rp in self.pods.values():
            if rp.terminating is not None:
                with contextlib.suppress(RuntimeError):  # its loop is closed already
                    rp.terminating.get_loop().call_soon_threadsafe(rp.terminating.cancel)
        for uid in list(self.pods):
            self._teardown(self.pods.pop(uid))


def _service_names(services: Sequence[Json]) -> list[tuple[str, str, str]]:
    return sorted(
        (
            str(s["metadata"]["namespace"]),
            str(s["metadata"]["name"]),
            str((s.get("spec") or {}).get("clusterIP", "")),
        )
        for s in services
    )


def _cni_args(pod: Json) -> str:
    meta = pod["metadata"]
    return topology.cni_args(str(meta["namespace"]), str(meta["name"]), str(meta["uid"]))


def _reap(pid: int) -> int | None:
    """The exit code of a process we spawned once it has exited (reaped here), else None;
    137 when it is gone but was reaped elsewhere."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if system.alive(pid) else 137
    return os.waitstatus_to_exitcode(status) if done else None


# -- the process (one per lab node, started by ambientctl.lab.kubelab) ---------------------------


async def _serve(kubelet: LabKubelet) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(kubelet.run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("lab kubelet %s: stopping its pods", kubelet.node.name)
    await asyncio.to_thread(kubelet.stop)
    await asyncio.to_thread(kubeproxy.remove, kubelet.node.netns)
    await kubelet.api.close()
    if kubelet.proxy_api is not None:
        await kubelet.proxy_api.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ambientctl.lab.kubelet``: the kubelet of one lab node until SIGTERM, which
    stops every pod it runs (preStop hooks, processes, CNI DEL, netns) before it exits."""
    import argparse

    p = argparse.ArgumentParser(prog="ambientctl.lab.kubelet")
    p.add_argument("--lab", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--kubeconfig", type=Path, required=True, help="the node's credential")
    p.add_argument("--proxy-kubeconfig", type=Path, help="system:kube-proxy (lab kube-proxy)")
    p.add_argument("--root", type=Path, required=True, help="the kubelet's pod directories")
    p.add_argument("--conf-dir", type=Path, required=True, help="the node's CNI config dir")
    p.add_argument("--cni-path", type=Path, action="append", default=[])
    p.add_argument(
        "--node-path",
        action="append",
        default=[],
        metavar="PATH=HOSTDIR",
        help="a directory of this node (hostPath PATH is HOSTDIR)",
    )
    p.add_argument(
        "--image-path",
        action="append",
        default=[],
        metavar="PATH=HOSTDIR",
        help="a directory every container sees at PATH",
    )
    p.add_argument("--path-env", default=os.environ.get("PATH", "/usr/bin:/bin"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    node_paths, image_paths = {}, {}
    for item in args.node_path:
        dst, _, src = item.partition("=")
        node_paths[dst] = Path(src)
    for item in args.image_path:
        dst, _, src = item.partition("=")
        image_paths[dst] = Path(src)
    settings = KubeletSettings(
        lab=args.lab,
        conflist={},
        cni_path=args.cni_path,
        root=args.root,
        path_env=args.path_env,
        bind_mounts=True,
        node_paths=node_paths,
        conf_dir=args.conf_dir,
        image_paths=image_paths,
    )
    kubelet = LabKubelet(
        api=KubeApi(kubeconfig=args.kubeconfig),
        node=topology.node_plan(args.lab, args.node, args.index),
        settings=settings,
        proxy_api=KubeApi(kubeconfig=args.proxy_kubeconfig) if args.proxy_kubeconfig else None,
    )
    asyncio.run(_serve(kubelet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
