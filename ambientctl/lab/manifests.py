"""Lab manifests: Kubernetes-style YAML documents -> `LabSpec`, and LabSpec -> mesh config.

Owns the subset of Kubernetes objects the lab understands and their strict reading:
- Namespace: metadata.name, metadata.labels.
- Pod: metadata.{name, namespace (default "default"), labels}, spec.serviceAccountName (default
  "default"), spec.nodeName (default: the first node), spec.containers[0].command (+ args).
- Service: metadata.{name, namespace}, spec.selector, spec.ports[].{port, targetPort, name},
  spec.clusterIP (required: the lab has no IP allocator for services).
Other kinds are ignored (later issues read Istio and Gateway API resources).
And `mesh_config`: the node proxies' static configuration in the xDS-record shape of
meshcore/model.py (workloads, services; policies later), from the spec, the pod IPs that CNI
(host-local) assigned and which pods are ambient.

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
from cni.labels import wants_ambient

CLUSTER_DOMAIN = "cluster.local"
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
        return f"Kubernetes//Pod/{self.namespace}/{self.name}"


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
            name = _name(meta, where)
            containers = spec.get("containers") or []
            if not containers or not isinstance(containers[0], dict):
                raise ManifestError(f"{where}: pod {name}: spec.containers[0] is required")
            c0 = containers[0]
            command = [*(c0.get("command") or []), *(c0.get("args") or [])]
            if not command or not all(isinstance(a, str | int | float) for a in command):
                raise ManifestError(f"{where}: pod {name}: spec.containers[0].command is required")
            pods.append(
                {
                    "name": name,
                    "namespace": str(meta.get("namespace", "default")),
                    "labels": _labels(meta, where),
                    "service_account": str(spec.get("serviceAccountName") or "default"),
                    "node": str(spec.get("nodeName") or ""),
                    "command": tuple(str(a) for a in command),
                }
            )
        elif kind == "Service":
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
            services.append(
                ServiceSpec(
                    name=name,
                    namespace=str(meta.get("namespace", "default")),
                    cluster_ip=str(cip),
                    selector={str(k): str(v) for k, v in selector.items()},
                    ports=tuple(ports),
                )
            )
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
    for p in out_pods:
        namespaces.setdefault(p.namespace, {})
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


def effective_namespace_labels(
    spec: LabSpec, overrides: Mapping[str, Any]
) -> dict[str, dict[str, str]]:
    from cni.labels import apply_overrides

    out = {ns: dict(labels) for ns, labels in spec.namespaces.items()}
    for ns, changes in (overrides.get("namespaces") or {}).items():
        out[ns] = apply_overrides(out.get(ns, {}), changes)
    return out


def is_ambient(pod: PodSpec, ns_labels: Mapping[str, Mapping[str, str]]) -> bool:
    return wants_ambient(ns_labels.get(pod.namespace, {}), pod.labels)


def mesh_config(
    spec: LabSpec, pod_ips: Mapping[str, str], ambient: Mapping[str, bool]
) -> dict[str, Any]:
    """The node proxies' static config (meshcore/model.py shape). `pod_ips` and `ambient` are
    keyed by pod key (``ns/name``); pods without an IP yet are left out."""
    workloads: list[dict[str, Any]] = []
    for pod in spec.pods:
        ip = pod_ips.get(pod.key)
        if not ip:
            continue
        wl: dict[str, Any] = {
            "uid": pod.workload_uid,
            "name": pod.name,
            "namespace": pod.namespace,
            "serviceAccount": pod.service_account,
            "addresses": [ip],
            "node": pod.node,
            "tunnelProtocol": "HBONE" if ambient.get(pod.key) else "NONE",
            "canonicalName": pod.labels.get("app", pod.name),
            "canonicalRevision": pod.labels.get("version", "latest"),
            "workloadName": pod.name,
            "workloadType": "POD",
        }
        services = {
            svc.key: {
                "ports": [{"servicePort": p.port, "targetPort": p.target_port} for p in svc.ports]
            }
            for svc in spec.services
            if svc.selects(pod)
        }
        if services:
            wl["services"] = services
        workloads.append(wl)
    services_out = [
        {
            "name": svc.name,
            "namespace": svc.namespace,
            "hostname": svc.hostname,
            "addresses": [{"address": svc.cluster_ip}],
            "ports": [{"servicePort": p.port, "targetPort": p.target_port} for p in svc.ports],
        }
        for svc in spec.services
    ]
    return {"workloads": workloads, "services": services_out, "policies": []}


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
