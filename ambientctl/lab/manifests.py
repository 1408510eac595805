"""Lab manifests: Kubernetes-style YAML documents -> `LabSpec`, and what the lab writes back.

Owns the subset of Kubernetes objects the lab understands and their strict reading:
- Namespace: metadata.name, metadata.labels.
- Pod: metadata.{name, namespace (default "default"), labels}, spec.serviceAccountName (default
  "default"), spec.nodeName (default: the first node), spec.containers[0].command (+ args).
- Service: metadata.{name, namespace}, spec.selector, spec.ports[].{port, targetPort, name},
  spec.clusterIP (required: the lab has no IP allocator for services).
Other kinds (AuthorizationPolicy, PeerAuthentication, ...) are left to the control plane, which
reads the same directory (controlplane/sources/files.py).
And the documents the lab writes back into its copy of the directory, as the scheduler, the
kubelet and `kubectl label` would into API objects: `with_pod_facts` (spec.nodeName,
metadata.uid, status.podIP/phase/hostIP), `with_labels`, `namespace_doc`.

Invariants: pure (no I/O but `load`), deterministic output order; every error is a
`ManifestError` naming the file/document/field.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambientctl.errors import ManifestError
from cni.labels import apply_overrides, wants_ambient
from controlplane.objects import HTTP3_ANNOTATION

CLUSTER_DOMAIN = "cluster.local"
CLUSTER_ID = "Kubernetes"
"""The control plane's default --cluster-id (first part of a workload uid)."""
UID_NAMESPACE = uuid.UUID("5c1d2b54-8a1e-4d0f-9c55-2f8f6a0b7e11")
"""uuid5 namespace for lab pod uids (stable across `lab up` runs of the same manifests)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    name: str
    namespace: str
    cluster_ip: str
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def selects(self, pod: PodSpec) -> bool:
        return (
            bool(self.selector)
            and self.namespace == pod.namespace
            and all(pod.labels.get(k) == v for k, v in self.selector.items())
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PodSpec:
    name: str
    namespace: str
    labels: Mapping[str, str]
    service_account: str
    node: str
    command: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def uid(self) -> str:
        return str(uuid.uuid5(UID_NAMESPACE, self.key))

    @property
    def workload_uid(self) -> str:
        return workload_uid(self.key)


@dataclass(frozen=True, slots=True, kw_only=True)
class LabSpec:
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    pods: tuple[PodSpec, ...] = ()
    services: tuple[ServiceSpec, ...] = ()
    nodes: tuple[str, ...] = ()

    def pod(self, key: str) -> PodSpec:
        """A pod by ``ns/name`` or by bare name when that is unambiguous."""
        matches = [p for p in self.pods if key in (p.key, p.name)]
        if len(matches) != 1:
            raise ManifestError(
                f"no pod {key!r}" if not matches else f"pod name {key!r} is ambiguous; use ns/name"
            )
        return matches[0]


def workload_uid(pod_key: str) -> str:
    """The control plane's workload uid for pod ``ns/name`` (default cluster id)."""
    namespace, _, name = pod_key.partition("/")
    return f"{CLUSTER_ID}//Pod/{namespace}/{name}"


def _labels(meta: Mapping[str, Any], where: str) -> dict[str, str]:
    raw = meta.get("labels") or {}
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: metadata.labels must be a mapping")
    return {str(k): str(v) for k, v in raw.items()}


def _name(meta: Mapping[str, Any], where: str) -> str:
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: metadata.name is required")
    return name


def _pod(where: str, meta: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """A Pod's `PodSpec` fields (its node may still be empty)."""
    name = _name(meta, where)
    containers = spec.get("containers") or []
    if not containers or not isinstance(containers[0], dict):
        raise ManifestError(f"{where}: pod {name}: spec.containers[0] is required")
    c0 = containers[0]
    command = [*(c0.get("command") or []), *(c0.get("args") or [])]
    if not command or not all(isinstance(a, str | int | float) for a in command):
        raise ManifestError(f"{where}: pod {name}: spec.containers[0].command is required")
    return {
        "name": name,
        "namespace": str(meta.get("namespace", "default")),
        "labels": _labels(meta, where),
        "service_account": str(spec.get("serviceAccountName") or "default"),
        "node": str(spec.get("nodeName") or ""),
        "command": tuple(str(a) for a in command),
    }


def _service(where: str, meta: Mapping[str, Any], spec: Mapping[str, Any]) -> ServiceSpec:
    name = _name(meta, where)
    cip = spec.get("clusterIP")
    try:
        ipaddress.IPv4Address(str(cip))
    except ValueError as err:
        raise ManifestError(
            f"{where}: service {name}: spec.clusterIP must be an IPv4 address"
        ) from err
    ports = []
    for i, p in enumerate(spec.get("ports") or []):
        port = p.get("port") if isinstance(p, dict) else None
        target = p.get("targetPort", port) if isinstance(p, dict) else None
        if not isinstance(port, int) or not isinstance(target, int):
            raise ManifestError(
                f"{where}: service {name}: ports[{i}] needs integer port/targetPort"
            )
        pname = str(p.get("name", ""))
        ports.append(ServicePort(port=port, target_port=target, name=pname))
    selector = spec.get("selector") or {}
    return ServiceSpec(
        name=name,
        namespace=str(meta.get("namespace", "default")),
        cluster_ip=str(cip),
        selector={str(k): str(v) for k, v in selector.items()},
        ports=tuple(ports),
    )


def parse(docs: list[tuple[str, dict[str, Any]]], nodes: tuple[str, ...] = ()) -> LabSpec:
    """`docs` = (where, document) pairs; `nodes` = extra node names (kept in order)."""
    namespaces: dict[str, dict[str, str]] = {}
    pods: list[dict[str, Any]] = []
    services: list[ServiceSpec] = []
    for where, doc in docs:
        kind = doc.get("kind")
        meta = doc.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ManifestError(f"{where}: metadata must be a mapping")
        spec = doc.get("spec") or {}
        if kind == "Namespace":
            namespaces[_name(meta, where)] = _labels(meta, where)
        elif kind == "Pod":
            pods.append(_pod(where, meta, spec))
        elif kind == "Service":
            services.append(_service(where, meta, spec))
    all_nodes = list(nodes)
    for p in pods:
        if p["node"] and p["node"] not in all_nodes:
            all_nodes.append(p["node"])
    if not all_nodes:
        all_nodes = ["node-1"]
    out_pods = tuple(PodSpec(**{**p, "node": p["node"] or all_nodes[0]}) for p in pods)
    keys = [p.key for p in out_pods]
    if len(set(keys)) != len(keys):
        raise ManifestError(f"duplicate pods: {sorted(k for k in keys if keys.count(k) > 1)}")
    for pod in out_pods:
        namespaces.setdefault(pod.namespace, {})
    return LabSpec(
        namespaces=namespaces, pods=out_pods, services=tuple(services), nodes=tuple(all_nodes)
    )


def load(directory: Path, nodes: tuple[str, ...] = ()) -> LabSpec:
    if not directory.is_dir():
        raise ManifestError(f"{directory}: not a directory")
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as err:
            raise ManifestError(f"{path}: {err}") from err
        for n, doc in enumerate(loaded):
            if isinstance(doc, dict) and "kind" in doc:
                docs.append((f"{path.name}#{n}", doc))
    return parse(docs, nodes)


def is_ambient(pod: PodSpec, ns_labels: Mapping[str, Mapping[str, str]]) -> bool:
    return wants_ambient(ns_labels.get(pod.namespace, {}), pod.labels)


# -- the lab as the cluster's writer ------------------------------------------------------------
# The lab's copy of the manifest directory is the cluster state the control plane and the node
# agents read. The lab writes into it what Kubernetes components would write into API objects:
# a pod's node and status (the scheduler and kubelet) and namespace labels (`kubectl label`).


@dataclass(frozen=True, slots=True, kw_only=True)
class PodFacts:
    """What the lab decided/learned about a pod: its node and the IP host-local assigned."""

    node: str
    ip: str
    host_ip: str
    uid: str
    http3: bool = False
    """Annotate the pod ``ambient-mesh.io/hbone-http3: "true"`` (the lab's --http3): peers
    reach its node proxy over HTTP/3 (controlplane/objects.py HTTP3_ANNOTATION)."""


def with_pod_facts(doc: Mapping[str, Any], facts: PodFacts) -> dict[str, Any]:
    """`doc` (a Pod) with spec.nodeName, metadata.uid and status (phase Running, podIP(s),
    hostIP) set: the fields the control plane translates into the workload's node, address
    and the CA's impersonation check (controlplane/objects.py `_parse_pod`)."""
    out = dict(doc)
    meta = dict(out.get("metadata") or {})
    meta["uid"] = facts.uid
    if facts.http3:
        meta["annotations"] = {**(meta.get("annotations") or {}), HTTP3_ANNOTATION: "true"}
    spec = dict(out.get("spec") or {})
    spec["nodeName"] = facts.node
    status = dict(out.get("status") or {})
    status.update(
        {
            "phase": "Running",
            "hostIP": facts.host_ip,
            "podIP": facts.ip,
            "podIPs": [{"ip": facts.ip}],
        }
    )
    out.update(metadata=meta, spec=spec, status=status)
    return out


def with_labels(doc: Mapping[str, Any], changes: Mapping[str, str | None]) -> dict[str, Any]:
    """`doc` with metadata.labels changed: ``value`` sets, ``None`` removes (``key-``)."""
    out = dict(doc)
    meta = dict(out.get("metadata") or {})
    current = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    labels = apply_overrides(current, changes)
    if labels:
        meta["labels"] = labels
    else:
        meta.pop("labels", None)
    out["metadata"] = meta
    return out


def namespace_doc(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def object_ref(doc: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of a Pod or Namespace document; None for anything else."""
    kind = doc.get("kind")
    meta = doc.get("metadata")
    if kind not in ("Pod", "Namespace") or not isinstance(meta, dict):
        return None
    namespace = "" if kind == "Namespace" else str(meta.get("namespace", "default"))
    return str(kind), namespace, str(meta.get("name", ""))


def hosts_file(spec: LabSpec, pod: PodSpec) -> str:
    """/etc/hosts for a pod: localhost, itself, and every service's names (short names only for
    services of the pod's own namespace, as Kubernetes' search path would resolve them)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for svc in spec.services:
        names = [svc.hostname, f"{svc.name}.{svc.namespace}.svc", f"{svc.name}.{svc.namespace}"]
        if svc.namespace == pod.namespace:
            names.append(svc.name)
        lines.append(f"{svc.cluster_ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"
