"""Kubernetes and Istio objects as frozen records, parsed strictly from their API dicts.

Owns: the records the control plane reads from its sources (Namespace, Pod, Service,
EndpointSlice, ServiceAccount, AuthorizationPolicy, PeerAuthentication, and stored-only objects
such as VirtualService, DestinationRule, Gateway, HTTPRoute), `parse_object`, and `ObjectKey`.

Invariants:
- Records are frozen, slotted, keyword-only; collections are tuples and label maps are sorted
  tuples of pairs, so equal inputs give equal records (the translator caches on that).
- Only the fields the control plane reads are validated; other fields of built-in kinds are
  ignored (real API objects carry many). A problem raises `ConfigError` whose path names the
  object and the field (``Pod default/web-1: spec.nodeName``); the source reports it and skips
  the object.
- AuthorizationPolicy is the exception to "skip": it is read by the one parser
  (`meshcore.config.authorization`), which never skips: anything it cannot read or does not
  implement makes the policy fail closed (see there), because skipping a DENY policy, or the
  only ALLOW policy of a workload, would silently widen access.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshcore.config.authorization import AuthzPolicy, parse_policy
from meshcore.config.labels import Labels as Labels
from meshcore.errors import ConfigError

HTTP3_ANNOTATION = "ambient-mesh.io/hbone-http3"
"""Pod annotation (ours, issue 16): its node proxy takes HBONE over HTTP/3 on the node's address;
value "true" (UDP port 15008) or a UDP port number."""

CORE_KINDS = ("Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount", "Node")
ISTIO_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
STORED_KINDS = (
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "HTTPRoute",
    "RequestAuthentication",
    "HTTPLocalRateLimitPolicy",
    "GRPCRoute",
    "TCPRoute",
    "TLSRoute",
)
"""Kept in the store (and visible in /debug), served to waypoints as written; a
RequestAuthentication is also translated for node proxies (a DENY for the workloads it selects:
they cannot validate JWTs; waypoints do)."""
KINDS = CORE_KINDS + ISTIO_KINDS + STORED_KINDS
UNIMPLEMENTED_KINDS = (
    "ServiceEntry",
    "WorkloadEntry",
    "Sidecar",
    "EnvoyFilter",
    "Gateway.networking.istio.io",
    "Telemetry",
    "WasmPlugin",
)
"""Kinds the mesh does not implement, read from Kubernetes only to be reported (AMB0204 on
/debug/warnings and in their status) instead of dropped silently: `parse_unimplemented`
stores them as `StoredObject` under these names (the keys of
`meshcore.config.fields.UNSUPPORTED_KINDS`; Istio's Gateway is told from Gateway API's by its
group). Nothing else reads them."""


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class ObjectKey:
    """Identity of an object in the store: kind, namespace ("" if cluster-scoped), name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind} {self.name}")
        )


# ------------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True, kw_only=True)
class Namespace:
    name: str
    labels: Labels = ()

    @property
    def namespace(self) -> str:
        return ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerPort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True, kw_only=True)
class Pod:
    namespace: str
    name: str
    uid: str = ""
    labels: Labels = ()
    service_account: str = "default"
    node: str = ""
    ips: tuple[str, ...] = ()
    """status.podIPs (or status.podIP); filled in by the kubelet, or by the lab."""
    phase: str = ""
    ready: bool | None = None
    """The Ready condition; None when the object has no conditions (manifest files)."""
    terminating: bool = False
    host_network: bool = False
    container_ports: tuple[ContainerPort, ...] = ()
    owner_kind: str = ""
    owner_name: str = ""
    host_ip: str = ""
    """status.hostIP: the node's address (where its node proxy takes HBONE over HTTP/3)."""
    http3: str = ""
    """The ``ambient-mesh.io/hbone-http3`` annotation as written ("" = absent), checked by
    `controlplane.translate` (issue 16)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePortSpec:
    name: str
    port: int
    target_port: int | str
    """A number, or the name of a container port."""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeService:
    namespace: str
    name: str
    labels: Labels = ()
    cluster_ips: tuple[str, ...] = ()
    """Empty for headless services (clusterIP: None)."""
    ports: tuple[ServicePortSpec, ...] = ()
    selector: Labels | None = None
    """None: no selector (endpoints come from EndpointSlices)."""
    type: str = "ClusterIP"


@dataclass(frozen=True, slots=True, kw_only=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    pod_name: str = ""
    ready: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    endpoints: tuple[SliceEndpoint, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccount:
    namespace: str
    name: str
    labels: Labels = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy:
    """An AuthorizationPolicy as read by the one parser (`meshcore.config.authorization`)."""

    namespace: str
    name: str
    policy: AuthzPolicy
    raw_json: str = ""
    """The object as written (canonical JSON), served to waypoints (``controlplane.l7``)."""

    @property
    def selector(self) -> Labels | None:
        """None: no selector (namespace- or mesh-wide)."""
        return self.policy.selector

    @property
    def targeted(self) -> bool:
        """targetRef(s) set: the policy is for waypoints/gateways, not node proxies."""
        return self.policy.targeted

    @property
    def action(self) -> str:
        return self.policy.action.value

    @property
    def error(self) -> str | None:
        """Why the policy is enforced fail-closed (None: enforced as written)."""
        return self.policy.error


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthentication:
    namespace: str
    name: str
    selector: Labels | None = None
    mode: str = "UNSET"
    port_modes: tuple[tuple[int, str], ...] = ()
    error: str | None = None
    """Why the object could not be read: it is then enforced as STRICT for its scope (fail
    closed: skipping it could let plaintext in where the user asked for mTLS)."""
    raw_json: str = ""
    """The object as written (canonical JSON): its field findings are reported from it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredObject:
    """A kind stored but not translated yet (VirtualService, DestinationRule, Gateway,
    HTTPRoute). Gateway labels and class are read for waypoint binding."""

    kind: str
    namespace: str
    name: str
    labels: Labels = ()
    gateway_class: str = ""
    raw_json: str = ""
    """The object as written (canonical JSON), served to waypoints (``controlplane.l7``)."""


KubeObject = (
    Namespace
    | Pod
    | KubeService
    | EndpointSlice
    | ServiceAccount
    | AuthorizationPolicy
    | PeerAuthentication
    | StoredObject
)


def object_key(obj: KubeObject) -> ObjectKey:
    kind = {
        Namespace: "Namespace",
        Pod: "Pod",
        KubeService: "Service",
        EndpointSlice: "EndpointSlice",
        ServiceAccount: "ServiceAccount",
        AuthorizationPolicy: "AuthorizationPolicy",
        PeerAuthentication: "PeerAuthentication",
    }.get(type(obj))
    if isinstance(obj, StoredObject):
        kind = obj.kind
    assert kind is not None
    return ObjectKey(kind=kind, namespace=obj.namespace, name=obj.name)


# ------------------------------------------------------------------------------------ readers


class _Reader:
    """Path-tracking accessors over one raw object; errors name object and field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {field}", message)

    def obj(self, value: object, field: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(field, f"expected an object, got {type(value).__name__}")
        return value

    def strict_obj(self, value: object, field: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        o = self.obj(value, field)
        for k in o:
            if k not in allowed:
                raise self.fail(f"{field}.{k}", "unknown field")
        return o

    def seq(self, value: object, field: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list, got {type(value).__name__}")
        return value

    def text(self, value: object, field: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {type(value).__name__}")
        return value

    def strs(self, value: object, field: str) -> tuple[str, ...]:
        return tuple(self.text(v, f"{field}[{i}]") for i, v in enumerate(self.seq(value, field)))

    def port(self, value: object, field: str) -> int:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(field, f"{value!r} is not a port number (1-65535)")
        return value

    def labels(self, value: object, field: str) -> Labels:
        o = self.obj(value, field)
        out = []
        for k, v in o.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise self.fail(f"{field}.{k}", "label keys and values must be strings")
            out.append((k, v))
        return tuple(sorted(out))

    def ip(self, value: object, field: str) -> str:
        text = self.text(value, field)
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise self.fail(field, f"{text!r} is not an IP address") from None

    def cidr(self, value: object, field: str) -> str:
        text = self.text(value, field)
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise self.fail(field, f"{text!r} is not an IP address or CIDR") from None


def _meta(raw: Mapping[str, Any], kind: str, namespaced: bool) -> tuple[str, str, Labels, str]:
    meta = raw.get("metadata")
    if not isinstance(meta, Mapping):
        raise ConfigError(f"{kind}: metadata", "required object is missing")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{kind}: metadata.name", "required string is missing")
    ns = meta.get("namespace") or ("default" if namespaced else "")
    if not isinstance(ns, str):
        raise ConfigError(f"{kind} {name}: metadata.namespace", "expected a string")
    if not namespaced:
        ns = ""
    where = f"{kind} {ns}/{name}" if ns else f"{kind} {name}"
    labels = _Reader(where).labels(meta.get("labels"), "metadata.labels")
    return ns, name, labels, where


def _parse_pod(raw: Mapping[str, Any]) -> Pod:
    ns, name, labels, where = _meta(raw, "Pod", True)
    r = _Reader(where)
    spec = r.obj(raw.get("spec"), "spec")
    status = r.obj(raw.get("status"), "status")
    meta = r.obj(raw.get("metadata"), "metadata")
    ips: list[str] = []
    for i, item in enumerate(r.seq(status.get("podIPs"), "status.podIPs")):
        ips.append(r.ip(r.obj(item, f"status.podIPs[{i}]").get("ip"), f"status.podIPs[{i}].ip"))
    if not ips and status.get("podIP"):
        ips.append(r.ip(status.get("podIP"), "status.podIP"))
    ready: bool | None = None
    for i, cond in enumerate(r.seq(status.get("conditions"), "status.conditions")):
        c = r.obj(cond, f"status.conditions[{i}]")
        if c.get("type") == "Ready":
            ready = r.text(c.get("status"), f"status.conditions[{i}].status") == "True"
    ports: list[ContainerPort] = []
    for i, ctr in enumerate(r.seq(spec.get("containers"), "spec.containers")):
        c = r.obj(ctr, f"spec.containers[{i}]")
        for j, p in enumerate(r.seq(c.get("ports"), f"spec.containers[{i}].ports")):
            f = f"spec.containers[{i}].ports[{j}]"
            po = r.obj(p, f)
            ports.append(
                ContainerPort(
                    name=r.text(po.get("name"), f"{f}.name"),
                    port=r.port(po.get("containerPort"), f"{f}.containerPort"),
                    protocol=r.text(po.get("protocol"), f"{f}.protocol", "TCP"),
                )
            )
    owner_kind = owner_name = ""
    for i, o in enumerate(r.seq(meta.get("ownerReferences"), "metadata.ownerReferences")):
        oo = r.obj(o, f"metadata.ownerReferences[{i}]")
        if oo.get("controller") or i == 0:
            owner_kind = r.text(oo.get("kind"), f"metadata.ownerReferences[{i}].kind")
            owner_name = r.text(oo.get("name"), f"metadata.ownerReferences[{i}].name")
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise r.fail("spec.hostNetwork", "expected a boolean")
    annotations = r.obj(meta.get("annotations"), "metadata.annotations")
    http3 = annotations.get(HTTP3_ANNOTATION, "")
    if not isinstance(http3, str):
        raise r.fail(f"metadata.annotations[{HTTP3_ANNOTATION}]", "expected a string")
    host_ip = status.get("hostIP")
    return Pod(
        namespace=ns,
        name=name,
        uid=r.text(meta.get("uid"), "metadata.uid"),
        labels=labels,
        service_account=r.text(spec.get("serviceAccountName"), "spec.serviceAccountName")
        or "default",
        node=r.text(spec.get("nodeName"), "spec.nodeName"),
        ips=tuple(ips),
        phase=r.text(status.get("phase"), "status.phase"),
        ready=ready,
        terminating=meta.get("deletionTimestamp") is not None,
        host_network=host_network,
        container_ports=tuple(ports),
        owner_kind=owner_kind,
        owner_name=owner_name,
        host_ip=r.ip(host_ip, "status.hostIP") if host_ip else "",
        http3=http3,
    )


def _parse_service(raw: Mapping[str, Any]) -> KubeService:
    ns, name, labels, where = _meta(raw, "Service", True)
    r = _Reader(where)
    spec = r.obj(raw.get("spec"), "spec")
    ips = [*r.strs(spec.get("clusterIPs"), "spec.clusterIPs")]
    if not ips and spec.get("clusterIP"):
        ips.append(r.text(spec.get("clusterIP"), "spec.clusterIP"))
    cluster_ips = tuple(
        r.ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(ips) if ip not in ("None", "")
    )
    ports: list[ServicePortSpec] = []
    for i, p in enumerate(r.seq(spec.get("ports"), "spec.ports")):
        f = f"spec.ports[{i}]"
        po = r.obj(p, f)
        port = r.port(po.get("port"), f"{f}.port")
        tp = po.get("targetPort", port)
        named = isinstance(tp, str) and not tp.isdigit()
        target: int | str = tp if named else r.port(tp, f"{f}.targetPort")
        ports.append(
            ServicePortSpec(
                name=r.text(po.get("name"), f"{f}.name"),
                port=port,
                target_port=target,
                protocol=r.text(po.get("protocol"), f"{f}.protocol", "TCP"),
                app_protocol=r.text(po.get("appProtocol"), f"{f}.appProtocol"),
            )
        )
    selector = None
    if spec.get("selector") is not None:
        selector = r.labels(spec.get("selector"), "spec.selector")
    return KubeService(
        namespace=ns,
        name=name,
        labels=labels,
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        selector=selector or None,
        type=r.text(spec.get("type"), "spec.type", "ClusterIP"),
    )


def _parse_endpoint_slice(raw: Mapping[str, Any]) -> EndpointSlice:
    ns, name, labels, where = _meta(raw, "EndpointSlice", True)
    r = _Reader(where)
    svc = dict(labels).get("kubernetes.io/service-name", "")
    eps: list[SliceEndpoint] = []
    for i, e in enumerate(r.seq(raw.get("endpoints"), "endpoints")):
        f = f"endpoints[{i}]"
        eo = r.obj(e, f)
        ref = r.obj(eo.get("targetRef"), f"{f}.targetRef")
        cond = r.obj(eo.get("conditions"), f"{f}.conditions")
        eps.append(
            SliceEndpoint(
                addresses=tuple(
                    r.ip(a, f"{f}.addresses[{j}]")
                    for j, a in enumerate(r.seq(eo.get("addresses"), f"{f}.addresses"))
                ),
                pod_name=r.text(ref.get("name"), f"{f}.targetRef.name")
                if ref.get("kind") == "Pod"
                else "",
                ready=cond.get("ready", True) is not False,
            )
        )
    return EndpointSlice(namespace=ns, name=name, service_name=svc, endpoints=tuple(eps))


def _selector(r: _Reader, spec: Mapping[str, Any]) -> Labels | None:
    if spec.get("selector") is None:
        return None
    sel = r.strict_obj(spec.get("selector"), "spec.selector", ("matchLabels",))
    return r.labels(sel.get("matchLabels"), "spec.selector.matchLabels")


def _parse_authorization_policy(raw: Mapping[str, Any]) -> AuthorizationPolicy:
    ns, name, _labels, where = _meta(raw, "AuthorizationPolicy", True)
    try:
        policy = parse_policy(raw)
    except ConfigError as exc:  # metadata only; `_meta` read it already
        raise ConfigError(f"{where}: {exc.path}", exc.message) from None
    return AuthorizationPolicy(namespace=ns, name=name, policy=policy, raw_json=raw_json(raw))


_MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")


def _parse_peer_authentication(raw: Mapping[str, Any]) -> PeerAuthentication:
    ns, name, _labels, where = _meta(raw, "PeerAuthentication", True)
    try:
        return _read_peer_authentication(raw, ns, name, where)
    except ConfigError as exc:
        selector: Labels | None = None
        spec = raw.get("spec")
        if isinstance(spec, Mapping):
            try:
                selector = _selector(_Reader(where), spec)
            except ConfigError:
                selector = None  # unreadable scope: the whole namespace (mesh in the root)
        return PeerAuthentication(
            namespace=ns,
            name=name,
            selector=selector,
            mode="STRICT",
            error=str(exc),
            raw_json=raw_json(raw),
        )


def _read_peer_authentication(
    raw: Mapping[str, Any], ns: str, name: str, where: str
) -> PeerAuthentication:
    r = _Reader(where)
    spec = r.strict_obj(raw.get("spec"), "spec", ("selector", "mtls", "portLevelMtls"))

    def mode(value: object, field: str) -> str:
        m = r.text(r.strict_obj(value, field, ("mode",)).get("mode"), f"{field}.mode", "UNSET")
        if m not in _MTLS_MODES:
            raise r.fail(f"{field}.mode", f"{m!r} is not one of {', '.join(_MTLS_MODES)}")
        return m

    ports = []
    for k, v in r.obj(spec.get("portLevelMtls"), "spec.portLevelMtls").items():
        ports.append((r.port(k, f"spec.portLevelMtls.{k}"), mode(v, f"spec.portLevelMtls.{k}")))
    selector = _selector(r, spec)
    if ports and selector is None:
        raise r.fail("spec.portLevelMtls", "is only allowed together with a selector")
    return PeerAuthentication(
        namespace=ns,
        name=name,
        selector=selector,
        mode=mode(spec.get("mtls"), "spec.mtls"),
        port_modes=tuple(sorted(ports)),
        raw_json=raw_json(raw),
    )


def raw_json(raw: Mapping[str, Any]) -> str:
    """Canonical JSON of an object as written, without the fields the API server adds (status,
    managedFields, resourceVersion...), so an unchanged object keeps the same text."""
    meta = raw.get("metadata")
    keep_meta: dict[str, Any] = {}
    if isinstance(meta, Mapping):
        keep_meta = {k: meta[k] for k in ("name", "namespace", "labels") if k in meta}
    out = {k: raw[k] for k in ("apiVersion", "kind", "spec") if k in raw}
    out["metadata"] = keep_meta
    return json.dumps(out, sort_keys=True, separators=(",", ":"), default=str)


def parse_unimplemented(raw: Mapping[str, Any], kind: str) -> StoredObject:
    """An object of a kind in `UNIMPLEMENTED_KINDS`, kept only to be reported."""
    ns, name, labels, _where = _meta(raw, kind, True)
    return StoredObject(kind=kind, namespace=ns, name=name, labels=labels, raw_json=raw_json(raw))


def parse_object(raw: object) -> KubeObject:
    """Parse one API object (a YAML document / watch event object); ConfigError names the
    object and field. Kinds we do not handle are a ConfigError too (the caller may ignore)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("object", f"expected a mapping, got {type(raw).__name__}")
    kind = raw.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ConfigError("object: kind", "required string is missing")
    if kind == "Namespace":
        _ns, name, labels, _w = _meta(raw, kind, False)
        return Namespace(name=name, labels=labels)
    if kind == "Pod":
        return _parse_pod(raw)
    if kind == "Service":
        return _parse_service(raw)
    if kind == "EndpointSlice":
        return _parse_endpoint_slice(raw)
    if kind == "ServiceAccount":
        ns, name, labels, _w = _meta(raw, kind, True)
        return ServiceAccount(namespace=ns, name=name, labels=labels)
    if kind == "Node":
        # Only its labels are read (locality: topology.kubernetes.io/region|zone,
        # topology.istio.io/subzone); stored cluster-scoped (namespace "").
        _ns, name, labels, _w = _meta(raw, kind, False)
        return StoredObject(kind="Node", namespace="", name=name, labels=labels)
    if kind == "AuthorizationPolicy":
        return _parse_authorization_policy(raw)
    if kind == "PeerAuthentication":
        return _parse_peer_authentication(raw)
    if kind in STORED_KINDS:
        ns, name, labels, where = _meta(raw, kind, True)
        spec = _Reader(where).obj(raw.get("spec"), "spec")
        gw_class = spec.get("gatewayClassName") if kind == "Gateway" else ""
        return StoredObject(
            kind=kind,
            namespace=ns,
            name=name,
            labels=labels,
            gateway_class=gw_class if isinstance(gw_class, str) else "",
            raw_json=raw_json(raw),
        )
    raise ConfigError(f"{kind}: kind", f"kind {kind!r} is not handled by the control plane")
