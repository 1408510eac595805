"""What a pod spec means on a lab node, as pure functions (the lab kubelet's protocol side,
`ambientctl.lab.kubelet` is its I/O edge): the kubelet's ``$(VAR)`` expansion, fieldRef values,
each container's environment, container paths rewritten to the host directories backing its
volumes, the host process a container becomes, and the pod status reported to the API server.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambientctl.errors import LabCommandError

Json = Mapping[str, Any]


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
        if "value" in e or "valueFrom" not in e:  # an empty value is omitted by the API
            env[e["name"]] = expand(str(e.get("value", "")), env)
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


def timestamp(now: dt.datetime) -> str:
    """RFC 3339 in UTC, as the API server writes times."""
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRun:
    """What the kubelet knows of a pod it runs, for the pod's status."""

    pod_ip: str
    node_ip: str
    started: dt.datetime
    exited: Mapping[str, int]
    """container -> exit code, for the containers that exited."""
    ready: Mapping[str, bool] = field(default_factory=dict)
    """container -> its readiness probe's result (a container without one: absent)."""
    restarts: Mapping[str, int] = field(default_factory=dict)
    """container -> how often it was restarted."""
    container_started: Mapping[str, dt.datetime] = field(default_factory=dict)
    """container -> when its running process started (default: the pod's start)."""


def pod_status(pod: Json, run: PodRun, *, now: dt.datetime) -> dict[str, Any]:
    """The status a kubelet reports. A container is ready while it runs and its readiness
    probe passes (``run.ready``; one without a probe is ready while it runs); the pod is Ready
    when all its containers are. A container that exited is ``terminated`` with its code until
    it is restarted (``run.restarts``: the count so far). Phase: Succeeded / Failed once every
    container exited and the pod does not restart them (``restartPolicy`` Never, or OnFailure
    with every exit 0), else Running."""
    pod_ip, node_ip, started, exited = run.pod_ip, run.node_ip, run.started, run.exited
    spec = pod.get("spec") or {}
    names = [str(c["name"]) for c in spec.get("containers", [])]
    ready, restarts, container_started = run.ready, run.restarts, run.container_started
    statuses = []
    for c in spec.get("containers", []):
        name = str(c["name"])
        if name in exited:
            state: dict[str, Any] = {
                "terminated": {"exitCode": exited[name], "finishedAt": timestamp(now)}
            }
        else:
            since = container_started.get(name, started)
            state = {"running": {"startedAt": timestamp(since)}}
        status: dict[str, Any] = {
            "name": name,
            "image": c.get("image", ""),
            "imageID": "",
            "started": name not in exited,
            "ready": name not in exited and ready.get(name, True),
            "restartCount": restarts.get(name, 0),
            "state": state,
        }
        statuses.append(status)
    all_ready = all(s["ready"] for s in statuses)
    policy = spec.get("restartPolicy", "Always")
    if len(exited) == len(names) and (
        policy == "Never" or (policy == "OnFailure" and not any(exited.values()))
    ):
        phase = "Succeeded" if not any(exited.values()) else "Failed"
    else:
        phase = "Running"
    t = timestamp(started)
    flag = "True" if all_ready else "False"
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
        {"type": "Initialized", "status": "True", "lastTransitionTime": t},
        {"type": "ContainersReady", "status": flag, "lastTransitionTime": t},
        {"type": "Ready", "status": flag, "lastTransitionTime": t},
    ]
    return {
        "phase": phase,
        "hostIP": node_ip,
        "hostIPs": [{"ip": node_ip}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": t,
        "conditions": conditions,
        "containerStatuses": statuses,
    }
