"""The lab kubelet: a lab node as a node of a real Kubernetes cluster (ambientctl.lab.kube).

Owns, for one node: its Node object (registered with the node's own ``system:node:<name>``
credential, so the API server's Node authorizer and NodeRestriction apply; Ready with a
heartbeat, the node IP as InternalIP); the pods bound to it (``spec.nodeName``): each gets a
network namespace through the node's real CNI chain (the lab's conflist: primary plugin, our
plugin chained last) unless it is ``hostNetwork``, and each container's command + args run as
a process in that namespace, with the kubelet's ``$(VAR)`` expansion of the rendered env; the
pod's status (phase, podIP, conditions, container states) written back through the ``status``
subresource; a pod being deleted has its processes stopped, CNI DEL run, its netns removed,
then its object deleted (the kubelet's final delete).

Images are not pulled: a container's command names one of the project's installed entry points
(the chart renders ``ztunnel``, ``python -m cni.agent``, ...) or any program on the node.
Volumes are mapped onto the host: ``hostPath`` as is, ``emptyDir`` and the kubelet-written
ones (``configMap``, ``secret``, ``projected`` service-account token + ``kube-root-ca.crt``)
in a per-pod directory; container paths in command, args and env are rewritten to them
(`map_paths`).

Pure: `expand`, `resolve_env`, `map_paths`, `container_process`, `pod_status`. The I/O edge is
`LabKubelet` (API calls through meshcore.kubeapi, processes and CNI through
ambientctl.lab.system). Invariant: `stop` leaves no process, netns or pod directory behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambientctl.errors import LabCommandError
from ambientctl.lab import system, topology
from meshcore.kubeapi import KubeApi

log = logging.getLogger(__name__)

Json = Mapping[str, Any]
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


# -- pure: a container as a host process --------------------------------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion in command/args/env (``$$`` escapes; unknown stay)."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def field_values(pod: Json, *, node_ip: str, pod_ip: str) -> dict[str, str]:
    """The downward-API fields a fieldRef may name."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    return {
        "metadata.name": str(meta.get("name", "")),
        "metadata.namespace": str(meta.get("namespace", "")),
        "metadata.uid": str(meta.get("uid", "")),
        "spec.nodeName": str(spec.get("nodeName", "")),
        "spec.serviceAccountName": str(spec.get("serviceAccountName", "")),
        "status.hostIP": node_ip,
        "status.podIP": pod_ip,
    }


def resolve_env(container: Json, fields: Mapping[str, str]) -> dict[str, str]:
    """A container's env: values (with ``$(VAR)`` of earlier entries) and fieldRefs. Other
    sources (configMapKeyRef, secretKeyRef, resourceFieldRef) are refused, never dropped."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
            continue
        ref = (e.get("valueFrom") or {}).get("fieldRef")
        if ref is None or ref.get("fieldPath") not in fields:
            raise LabCommandError(f"env {e['name']}: unsupported source {e.get('valueFrom')}")
        env[e["name"]] = fields[ref["fieldPath"]]
    return env


def map_paths(text: str, mounts: Mapping[str, Path]) -> str:
    """Container paths -> host paths, in one pass (longest mount first; a mapped path is never
    mapped again)."""
    if not mounts:
        return text
    alternation = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    return re.sub(
        rf"(?<![\w/])({alternation})(?=/|$|\s|\")", lambda m: str(mounts[m.group(1)]), text
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Process:
    container: str
    argv: tuple[str, ...]
    env: Mapping[str, str]


def container_process(
    container: Json, *, fields: Mapping[str, str], mounts: Mapping[str, Path]
) -> Process:
    """The host process of one container: command + args expanded and path-mapped."""
    env = resolve_env(container, fields)
    words = [*container.get("command", []), *container.get("args", [])]
    if not words:
        raise LabCommandError(
            f"container {container.get('name')}: no command (images are not run in the lab)"
        )
    argv = tuple(map_paths(expand(str(w), env), mounts) for w in words)
    return Process(
        container=str(container["name"]),
        argv=argv,
        env={k: map_paths(v, mounts) for k, v in env.items()},
    )


def _ts(now: dt.datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRun:
    """What a kubelet knows about one run of a pod."""

    pod_ip: str
    node_ip: str
    started: dt.datetime
    exited: Mapping[str, int]
    """Container name -> exit code, for the containers that exited."""


def pod_status(pod: Json, run: PodRun, now: dt.datetime) -> dict[str, Any]:
    """The status a kubelet reports: Running and Ready while every container runs; a container
    that exited is ``terminated`` with its code (phase Succeeded when all exited 0 and the pod
    does not restart, else Failed)."""
    spec = pod.get("spec") or {}
    exited, started = run.exited, run.started
    names = [str(c["name"]) for c in spec.get("containers", [])]
    ready = not exited
    statuses = []
    for c in spec.get("containers", []):
        name = str(c["name"])
        if name in exited:
            state: dict[str, Any] = {"terminated": {"exitCode": exited[name],
                                                    "finishedAt": _ts(now)}}  # fmt: skip
        else:
            state = {"running": {"startedAt": _ts(started)}}
        statuses.append({
            "name": name, "image": c.get("image", ""), "imageID": "", "started": name not in exited,
            "ready": name not in exited, "restartCount": 0, "state": state,
        })  # fmt: skip
    if len(exited) == len(names) and spec.get("restartPolicy") in ("Never", "OnFailure"):
        phase = "Succeeded" if not any(exited.values()) else "Failed"
    else:
        phase = "Running" if not exited or len(exited) < len(names) else "Failed"
    flag = "True" if ready else "False"
    t = _ts(started)
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
        {"type": "Initialized", "status": "True", "lastTransitionTime": t},
        {"type": "ContainersReady", "status": flag, "lastTransitionTime": t},
        {"type": "Ready", "status": flag, "lastTransitionTime": t},
    ]
    return {
        "phase": phase,
        "hostIP": run.node_ip,
        "hostIPs": [{"ip": run.node_ip}],
        "podIP": run.pod_ip,
        "podIPs": [{"ip": run.pod_ip}],
        "startTime": t,
        "conditions": conditions,
        "containerStatuses": statuses,
    }


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
    pids: dict[str, int] = field(default_factory=dict)
    exited: dict[str, int] = field(default_factory=dict)
    reported: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeletSettings:
    """How a lab kubelet runs its node's pods."""

    lab: str
    """The lab's name (prefix of CNI container ids)."""
    conflist: Mapping[str, Any]
    """The node's CNI chain."""
    cni_path: tuple[Path, ...]
    """Where the CNI plugins are (CNI_PATH)."""
    root: Path
    """Pod directories (volumes, logs) go under ``<root>/pods/<uid>``."""
    path_env: str
    """PATH of container processes."""
    interval: float = 0.5
    """Seconds between pod syncs."""
    heartbeat: float = 10.0
    """Seconds between node status updates."""


class LabKubelet:
    """The kubelet of one lab node (see module doc). `run()` until cancelled; `stop()` after."""

    def __init__(self, *, api: KubeApi, node: topology.NodePlan, settings: KubeletSettings) -> None:
        self.api = api
        self.node = node
        self.settings = settings
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
        now = _ts(dt.datetime.now(dt.UTC))
        capacity = {"cpu": "8", "memory": "16Gi", "pods": "110"}
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "lab kubelet", "lastHeartbeatTime": now}  # fmt: skip
        body = {"status": {
            "capacity": capacity, "allocatable": capacity, "conditions": [ready],
            "addresses": [{"type": "InternalIP", "address": self.node.ip},
                          {"type": "Hostname", "address": self.node.name}],
            "nodeInfo": {"kubeletVersion": "lab", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "lab://0"},
        }}  # fmt: skip
        path = f"/api/v1/nodes/{self.node.name}/status"
        status, data = await self.api.call("PATCH", path, body)
        if status != 200:
            raise LabCommandError(f"node {self.node.name} status: HTTP {status}: {data}")

    # -- loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.register()
        beat = asyncio.get_running_loop().time()
        while True:
            try:
                await self.sync_once()
                if asyncio.get_running_loop().time() - beat > self.settings.heartbeat:
                    await self._node_status()
                    beat = asyncio.get_running_loop().time()
            except (TimeoutError, OSError, LabCommandError) as e:
                log.warning("lab kubelet %s: %s", self.node.name, e)
            await asyncio.sleep(self.settings.interval)

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
                "Succeeded", "Failed",
            ):  # fmt: skip
                key = f"{meta['namespace']}/{meta['name']}"
                try:
                    files = await self._materialise(pod)
                    await asyncio.to_thread(self._start, pod, files)
                except LabCommandError as e:
                    if self.failures.get(key) != str(e):
                        log.warning("pod %s: %s", key, e)
                    self.failures[key] = str(e)
                    continue
            if uid in self.pods:
                await self._report(pod, self.pods[uid])
        for uid in set(self.pods) - seen:  # deleted with grace 0 by someone else
            await asyncio.to_thread(self._teardown, self.pods.pop(uid))

    # -- a pod --------------------------------------------------------------------------------
    def _start(self, pod: Json, files: Mapping[str, Mapping[str, bytes]]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
        host = bool(spec.get("hostNetwork"))
        rp = RunningPod(
            uid=uid,
            namespace=ns,
            name=name,
            netns=None if host else topology.pod_netns(self.settings.lab, ns, name),
            ip=self.node.ip,
            dir=self.settings.root / "pods" / uid,
            started=dt.datetime.now(dt.UTC),
        )
        self.pods[uid] = rp
        rp.dir.mkdir(parents=True, exist_ok=True)
        try:
            mounts_by_volume = self._volumes(pod, rp, files)
            if rp.netns is not None:
                system.netns_add(rp.netns)
                result = system.cni_chain("ADD", self.settings.conflist, self._attachment(rp, pod))
                assert result is not None
                rp.cni_result = result
                rp.ip = str(result["ips"][0]["address"]).split("/")[0]
            fields = field_values(pod, node_ip=self.node.ip, pod_ip=rp.ip)
            for c in spec.get("containers", []):
                mounts = {
                    str(m["mountPath"]): mounts_by_volume[str(m["name"])]
                    for m in c.get("volumeMounts", [])
                }
                proc = container_process(c, fields=fields, mounts=mounts)
                env = {"PATH": self.settings.path_env, "HOME": "/root", **proc.env}
                netns = rp.netns or self.node.netns
                rp.pids[proc.container] = system.spawn(
                    system.nsenter(netns, list(proc.argv)),
                    log=rp.dir / f"{proc.container}.log",
                    cwd=rp.dir,
                    env=env,
                )
        except BaseException:
            self._teardown(self.pods.pop(uid))
            raise

    def _container_id(self, rp: RunningPod) -> str:
        return f"{self.settings.lab}-{rp.uid}"

    def _attachment(self, rp: RunningPod, pod: Json | None = None) -> system.CniAttachment:
        """`rp`'s CNI attachment; `pod` (ADD) gives the K8S_POD_* CNI_ARGS."""
        assert rp.netns is not None
        return system.CniAttachment(
            container_id=self._container_id(rp),
            netns_path=f"/run/netns/{rp.netns}",
            cni_args=_cni_args(pod) if pod is not None else "",
            cni_path=self.settings.cni_path,
            run_in=self.node.netns,
        )

    def _volumes(
        self, pod: Json, rp: RunningPod, files: Mapping[str, Mapping[str, bytes]]
    ) -> dict[str, Path]:
        """volume name -> host path; hostPath as is, the others in the pod's directory."""
        out: dict[str, Path] = {}
        for v in pod["spec"].get("volumes", []):
            name = str(v["name"])
            if "hostPath" in v:
                out[name] = Path(v["hostPath"]["path"])
                continue
            d = rp.dir / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            out[name] = d
            for rel, data in files.get(name, {}).items():
                target = d / rel
                if d not in target.resolve().parents:
                    raise LabCommandError(f"volume {name}: path {rel!r} leaves the volume")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return out

    async def _materialise(self, pod: Json) -> dict[str, dict[str, bytes]]:
        """The files of kubelet-written volumes: configMap, secret, projected (service-account
        token from the TokenRequest API bound to the pod, configMap, downwardAPI); emptyDir and
        hostPath need none; any other volume type is refused."""
        meta, spec = pod["metadata"], pod["spec"]
        ns = str(meta["namespace"])
        out: dict[str, dict[str, bytes]] = {}
        for v in spec.get("volumes", []):
            name = str(v["name"])
            if "hostPath" in v or "emptyDir" in v:
                continue
            if "configMap" in v:
                out[name] = await self._object_files(ns, "configmaps", v["configMap"])
            elif "secret" in v:
                ref = {**v["secret"], "name": v["secret"].get("secretName", "")}
                out[name] = await self._object_files(ns, "secrets", ref)
            elif "projected" in v:
                files: dict[str, bytes] = {}
                for src in v["projected"].get("sources", []):
                    if "serviceAccountToken" in src:
                        t = src["serviceAccountToken"]
                        files[str(t["path"])] = await self._token(pod, t)
                    elif "configMap" in src:
                        files.update(await self._object_files(ns, "configmaps", src["configMap"]))
                    elif "secret" in src:
                        files.update(await self._object_files(ns, "secrets", src["secret"]))
                    elif "downwardAPI" in src:
                        fields = field_values(pod, node_ip=self.node.ip, pod_ip="")
                        for item in src["downwardAPI"].get("items", []):
                            fp = (item.get("fieldRef") or {}).get("fieldPath")
                            if fp not in fields:
                                raise LabCommandError(f"volume {name}: unsupported {item}")
                            files[str(item["path"])] = fields[fp].encode()
                    else:
                        raise LabCommandError(f"volume {name}: unsupported source {sorted(src)}")
                out[name] = files
            else:
                raise LabCommandError(f"volume {name}: unsupported type {sorted(v)}")
        return out

    async def _object_files(self, ns: str, plural: str, ref: Json) -> dict[str, bytes]:
        path = f"/api/v1/namespaces/{ns}/{plural}/{ref['name']}"
        status, obj = await self.api.call("GET", path)
        if status != 200 or not isinstance(obj, Mapping):
            if status == 404 and ref.get("optional"):
                return {}
            raise LabCommandError(f"GET {path}: HTTP {status}")
        data: dict[str, bytes] = {}
        if plural == "secrets":
            data = {k: _b64(str(v)) for k, v in (obj.get("data") or {}).items()}
        else:
            data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: _b64(str(v)) for k, v in (obj.get("binaryData") or {}).items()})
        items = ref.get("items")
        if not items:
            return data
        return {str(i["path"]): data[str(i["key"])] for i in items if str(i["key"]) in data}

    async def _token(self, pod: Json, source: Json) -> bytes:
        """A projected token as the kubelet gets it: TokenRequest for the pod's service
        account, bound to the pod (NodeRestriction lets a node ask only for its pods)."""
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": int(source.get("expirationSeconds", 3600)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "uid": meta["uid"]},
        }  # fmt: skip
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token"
        status, data = await self.api.call("POST", path, body)
        if status != 201 or not isinstance(data, Mapping):
            raise LabCommandError(f"token for {meta['namespace']}/{sa}: HTTP {status}: {data}")
        return str(data["status"]["token"]).encode()

    async def _report(self, pod: Json, rp: RunningPod) -> None:
        for c, pid in list(rp.pids.items()):
            if c not in rp.exited and (code := _reap(pid)) is not None:
                rp.exited[c] = code
        run = PodRun(pod_ip=rp.ip, node_ip=self.node.ip, started=rp.started, exited=rp.exited)
        status = pod_status(pod, run, dt.datetime.now(dt.UTC))
        digest = json.dumps(
            {k: status[k] for k in ("phase", "podIP", "containerStatuses")},
            sort_keys=True,
            default=str,
        ).replace(_ts(dt.datetime.now(dt.UTC)), "")
        if digest == rp.reported:
            return
        path = f"/api/v1/namespaces/{rp.namespace}/pods/{rp.name}/status"
        code, data = await self.api.call("PATCH", path, {"status": status})
        if code != 200:
            raise LabCommandError(f"status of {rp.namespace}/{rp.name}: HTTP {code}: {data}")
        rp.reported = digest

    async def _finish(self, pod: Json) -> None:
        meta = pod["metadata"]
        rp = self.pods.pop(str(meta["uid"]), None)
        if rp is not None:
            await asyncio.to_thread(self._teardown, rp)
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}  # fmt: skip
        code, _ = await self.api.call("DELETE", path, body)
        if code not in (200, 404, 409):
            raise LabCommandError(f"delete {meta['namespace']}/{meta['name']}: HTTP {code}")

    def _teardown(self, rp: RunningPod) -> None:
        for pid in rp.pids.values():
            system.stop(pid, timeout=10)
        if rp.netns is not None:
            with contextlib.suppress(LabCommandError):
                system.cni_chain("DEL", self.settings.conflist, self._attachment(rp), rp.cni_result)
            system.netns_del(rp.netns)
        shutil.rmtree(rp.dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop every pod this kubelet runs (processes, CNI DEL, netns, directory)."""
        for uid in list(self.pods):
            self._teardown(self.pods.pop(uid))


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


def _b64(data: str) -> bytes:
    return base64.b64decode(data)
