"""The mesh data model: immutable records mirroring Istio's workload xDS resources.

Owns: `Workload`, `Service` (``istio.workload.Address``), `Authorization`
(``istio.security.Authorization``) and their parts; strict parsing of those records from plain
dicts (what YAML/JSON gives) and serialisation back (`to_dict`, for /config_dump); the static
`MeshConfig` file loader.

Sources checked (istio/ztunnel, 2026): ``proto/workload.proto`` (field names and enums),
``proto/authorization.proto`` and ``src/rbac.rs``. Istio's newest Authorization nesting is
``rules`` (ORed) -> ``clauses`` (ANDed) -> ``matches`` (ORed) -> fields; inside one Match each
field kind is ORed over its values and the kinds are ANDed. Older Istio named the same three
levels ``groups -> rules -> matches``; we follow the current names. ``service_accounts`` in a
Match are ``{namespace, serviceAccount}`` pairs as in ztunnel's ServiceAccountMatch.

Wire shape (protobuf JSON mapping, lowerCamelCase field names, enums by name), with these
deliberate differences, all for hand-written YAML:
- IP addresses are text (``"10.0.0.1"``), not base64 bytes; CIDRs are ``"10.0.0.0/8"`` text
  instead of ``{address, length}``; a bare IP in a CIDR list means a single host.
- `StringMatch` may also be written as a plain string using AuthorizationPolicy wildcard
  syntax: ``"*"`` = presence, ``"abc*"`` = prefix, ``"*abc"`` = suffix, else exact.
- Principals may be written with or without ``spiffe://``; they are stored without it,
  as Istio does (``cluster.local/ns/x/sa/y``).
- `Authorization.scope` is required (the proto default, GLOBAL, would silently make a
  policy mesh-wide). A workload `uid` defaults to ``<clusterId|Kubernetes>//Pod/<ns>/<name>``.
- GatewayAddress ``hostname`` may be given as the string ``"ns/hostname"``.
- Fields we do not model yet (application_tunnel, network_gateway, extensions, capacity,
  dry_run, ip_families, ...) are unknown fields and therefore errors.

Invariants:
- Every record is frozen, slotted and keyword-only, hence hashable and safe to share between
  snapshots. Collections are tuples; `Workload.services` is a tuple of (key, ports) pairs
  sorted by key, so two equal workloads compare equal.
- Parsing is strict: an unknown field, a wrong type, a bad IP or an out-of-range port is a
  `ConfigError` whose `path` names the field (``workloads[2].adresses``).
- ``parse_x(x.to_dict()) == x`` for every parsed record (tested as a property).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from meshcore.errors import ConfigError, IdentityError
from meshcore.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HBONE_PORT = 15008
"""Default ``hbone_mtls_port`` of a GatewayAddress (the HBONE listener)."""
ROOT_NAMESPACE = "istio-system"
"""Istio's root namespace: an AuthorizationPolicy there becomes a GLOBAL-scope policy."""

_E = TypeVar("_E", bound=enum.Enum)
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Enums (names and order as in workload.proto / authorization.proto)


class TunnelProtocol(enum.Enum):
    """How to reach a workload: NONE = plain TCP, HBONE = mTLS HTTP/2 CONNECT on 15008."""

    NONE = "NONE"
    HBONE = "HBONE"


class WorkloadStatus(enum.Enum):
    """HEALTHY workloads are eligible service endpoints; UNHEALTHY ones are not."""

    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


class WorkloadType(enum.Enum):
    """Kind of the owning controller, for telemetry (baggage ``k8s.<type>.name``)."""

    DEPLOYMENT = "DEPLOYMENT"
    CRONJOB = "CRONJOB"
    POD = "POD"
    JOB = "JOB"


class AppProtocol(enum.Enum):
    """Application protocol declared on a service port (``Port.app_protocol``)."""

    UNKNOWN = "UNKNOWN"
    HTTP11 = "HTTP11"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"


class LoadBalancingMode(enum.Enum):
    """``LoadBalancing.Mode``: how routing preferences are applied."""

    UNSPECIFIED_MODE = "UNSPECIFIED_MODE"
    STRICT = "STRICT"
    FAILOVER = "FAILOVER"
    PASSTHROUGH = "PASSTHROUGH"


class LoadBalancingScope(enum.Enum):
    """``LoadBalancing.Scope``: a routing preference."""

    UNSPECIFIED_SCOPE = "UNSPECIFIED_SCOPE"
    REGION = "REGION"
    ZONE = "ZONE"
    SUBZONE = "SUBZONE"
    NODE = "NODE"
    CLUSTER = "CLUSTER"
    NETWORK = "NETWORK"


class HealthPolicy(enum.Enum):
    """``LoadBalancing.HealthPolicy``: ONLY_HEALTHY (default) or ALLOW_ALL endpoints."""

    ONLY_HEALTHY = "ONLY_HEALTHY"
    ALLOW_ALL = "ALLOW_ALL"


class Scope(enum.Enum):
    """Where an Authorization applies: mesh-wide, one namespace, or the workloads listing it."""

    GLOBAL = "GLOBAL"
    NAMESPACE = "NAMESPACE"
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"


class Action(enum.Enum):
    """What a matching Authorization does."""

    ALLOW = "ALLOW"
    DENY = "DENY"


class MatchKind(enum.Enum):
    """The ``match_type`` oneof of ``istio.security.StringMatch``."""

    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


# --------------------------------------------------------------------------------------------
# Strict readers. Each takes the containing object, the key and the object's path.


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _object(value: object, path: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    """Check `value` is a mapping with only `allowed` string keys; return it."""
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected an object, got {_type_name(value)}")
    allowed_set = frozenset(allowed)
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, f"field names must be strings, got {key!r}")
        if key not in allowed_set:
            raise ConfigError(_join(path, key), "unknown field")
    return value


def _str(obj: Mapping[str, Any], key: str, path: str, default: str | None = "") -> str:
    if key not in obj or obj[key] is None:
        if default is None:
            raise ConfigError(_join(path, key), "required field is missing")
        return default
    value = obj[key]
    if not isinstance(value, str):
        raise ConfigError(_join(path, key), f"expected a string, got {_type_name(value)}")
    return value


def _required_str(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = _str(obj, key, path, default=None)
    if not value:
        raise ConfigError(_join(path, key), "must not be empty")
    return value


def _int(value: object, path: str, lo: int, hi: int) -> int:
    # bool is an int subclass in Python; YAML `true` is never a port.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise ConfigError(path, f"{value} is out of range [{lo}, {hi}]")
    return value


def _list(obj: Mapping[str, Any], key: str, path: str) -> Sequence[Any]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError(_join(path, key), f"expected a list, got {_type_name(value)}")
    return value


def _items(
    obj: Mapping[str, Any], key: str, path: str, parse: Callable[[object, str], _T]
) -> tuple[_T, ...]:
    p = _join(path, key)
    return tuple(parse(item, f"{p}[{i}]") for i, item in enumerate(_list(obj, key, path)))


def _enum_value(value: object, path: str, cls: type[_E]) -> _E:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_type_name(value)}")
    for member in cls:
        if member.value == value:
            return member
    names = ", ".join(m.value for m in cls)
    raise ConfigError(path, f"{value!r} is not one of {names}")


def _enum(obj: Mapping[str, Any], key: str, path: str, cls: type[_E], default: _E | None) -> _E:
    if key not in obj or obj[key] is None:
        if default is None:
            raise ConfigError(_join(path, key), "required field is missing")
        return default
    return _enum_value(obj[key], _join(path, key), cls)


@functools.lru_cache(maxsize=65536)
def _identity_of(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """Memoised: identities are immutable values, built (and validated) once."""
    return SpiffeId(trust_domain=trust_domain, namespace=namespace, service_account=service_account)


@functools.lru_cache(maxsize=65536)
def ip_from_text(text: str) -> IPAddress:
    """Parse an address, memoised: the proxies look up the same few thousand addresses on
    every connection, and ipaddress parsing costs microseconds each time. Raises ValueError."""
    return ipaddress.ip_address(text)


def _ip(value: object, path: str) -> IPAddress:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected an IP address string, got {_type_name(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(path, f"{value!r} is not a valid IP address") from None


def _cidr(value: object, path: str) -> IPNetwork:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a CIDR string, got {_type_name(value)}")
    try:
        # strict=True: "10.0.0.1/8" (host bits set) is almost always a typo.
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(path, f"{value!r} is not a valid CIDR: {exc}") from None


def _port(value: object, path: str) -> int:
    return _int(value, path, 1, 65535)


def _ip_text(ip: IPAddress) -> str:
    return str(ip)


# --------------------------------------------------------------------------------------------
# Shared small records


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkAddress:
    """An IP address on a named network (``""`` = the default network)."""

    network: str = ""
    """Network name; (network, address) is unique among workloads and service VIPs."""
    address: IPAddress
    """The IP address."""

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "address": _ip_text(self.address)}


def parse_network_address(obj: object, path: str) -> NetworkAddress:
    o = _object(obj, path, ("network", "address"))
    if "address" not in o:
        raise ConfigError(_join(path, "address"), "required field is missing")
    return NetworkAddress(
        network=_str(o, "network", path), address=_ip(o["address"], _join(path, "address"))
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespacedHostname:
    """A service named by namespace and hostname; `key` is the xDS name ``ns/hostname``."""

    namespace: str
    """Namespace of the service."""
    hostname: str
    """Hostname (FQDN) of the service."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def to_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "hostname": self.hostname}


def _parse_namespaced_hostname(obj: object, path: str) -> NamespacedHostname:
    if isinstance(obj, str):
        ns, slash, host = obj.partition("/")
        if not slash or not ns or not host or "/" in host:
            raise ConfigError(path, f"expected 'namespace/hostname', got {obj!r}")
        return NamespacedHostname(namespace=ns, hostname=host)
    o = _object(obj, path, ("namespace", "hostname"))
    return NamespacedHostname(
        namespace=_required_str(o, "namespace", path), hostname=_required_str(o, "hostname", path)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayAddress:
    """Where a waypoint (or gateway) is reached: exactly one of `hostname` or `address`."""

    hostname: NamespacedHostname | None = None
    """A service (``ns/hostname``) fronting the gateway's workloads."""
    address: NetworkAddress | None = None
    """A service VIP or a workload IP of the gateway."""
    hbone_mtls_port: int = HBONE_PORT
    """Port of the gateway's HBONE (mTLS) listener."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.hostname is not None:
            out["hostname"] = self.hostname.to_dict()
        if self.address is not None:
            out["address"] = self.address.to_dict()
        out["hboneMtlsPort"] = self.hbone_mtls_port
        return out


def parse_gateway_address(obj: object, path: str) -> GatewayAddress:
    o = _object(obj, path, ("hostname", "address", "hboneMtlsPort"))
    hostname = address = None
    if o.get("hostname") is not None:
        hostname = _parse_namespaced_hostname(o["hostname"], _join(path, "hostname"))
    if o.get("address") is not None:
        address = parse_network_address(o["address"], _join(path, "address"))
    if (hostname is None) == (address is None):
        raise ConfigError(path, "exactly one of hostname or address must be set")
    port = HBONE_PORT
    if o.get("hboneMtlsPort") is not None:
        port = _port(o["hboneMtlsPort"], _join(path, "hboneMtlsPort"))
    return GatewayAddress(hostname=hostname, address=address, hbone_mtls_port=port)


@dataclass(frozen=True, slots=True, kw_only=True)
class Port:
    """A service port and the workload port it forwards to (``istio.workload.Port``)."""

    service_port: int
    """Port the service is reached at (frontend)."""
    target_port: int
    """Port on the workload (backend); 0 = not set here (fall back to the service's)."""
    app_protocol: AppProtocol = AppProtocol.UNKNOWN
    """Declared application protocol (services only)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"servicePort": self.service_port, "targetPort": self.target_port}
        if self.app_protocol is not AppProtocol.UNKNOWN:
            out["appProtocol"] = self.app_protocol.value
        return out


PortMapping = Port
"""A workload's per-service port mapping uses the same proto message as a service port."""


def parse_port(obj: object, path: str) -> Port:
    o = _object(obj, path, ("servicePort", "targetPort", "appProtocol"))
    if "servicePort" not in o:
        raise ConfigError(_join(path, "servicePort"), "required field is missing")
    target = 0
    if o.get("targetPort") is not None:
        target = _int(o["targetPort"], _join(path, "targetPort"), 0, 65535)
    return Port(
        service_port=_port(o["servicePort"], _join(path, "servicePort")),
        target_port=target,
        app_protocol=_enum(o, "appProtocol", path, AppProtocol, AppProtocol.UNKNOWN),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Locality:
    """Where a workload runs geographically."""

    region: str = ""
    zone: str = ""
    subzone: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.region, "zone": self.zone, "subzone": self.subzone}


def _parse_locality(obj: object, path: str) -> Locality:
    o = _object(obj, path, ("region", "zone", "subzone"))
    return Locality(
        region=_str(o, "region", path), zone=_str(o, "zone", path), subzone=_str(o, "subzone", path)
    )


# --------------------------------------------------------------------------------------------
# Workload


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One workload (pod, VM...). xDS name: `uid`; aliases: each (network, address)."""

    uid: str
    """Globally unique id, e.g. ``Kubernetes//Pod/default/client-1``."""
    name: str
    """Pod name."""
    namespace: str
    """Namespace; also the identity's namespace."""
    addresses: tuple[IPAddress, ...] = ()
    """Pod IPs (dual stack: one per family)."""
    network: str = ""
    """Network of the addresses."""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    """HBONE if the workload is captured by a node proxy (in the mesh)."""
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    """SPIFFE trust domain of the identity."""
    service_account: str = "default"
    """Service account of the identity."""
    waypoint: GatewayAddress | None = None
    """Waypoint that all traffic addressed to this workload must traverse."""
    node: str = ""
    """Node the workload runs on (whose node proxy serves it)."""
    canonical_name: str = ""
    """Telemetry: canonical service name (``app`` label)."""
    canonical_revision: str = ""
    """Telemetry: canonical revision (``version`` label)."""
    workload_type: WorkloadType = WorkloadType.DEPLOYMENT
    """Telemetry: kind of the owning controller."""
    workload_name: str = ""
    """Telemetry: name of the owning controller."""
    authorization_policies: tuple[str, ...] = ()
    """Keys (``ns/name``) of WORKLOAD_SELECTOR policies selecting this workload."""
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    """Readiness; UNHEALTHY workloads are not picked as service endpoints."""
    cluster_id: str = ""
    """Cluster the workload belongs to."""
    hostname: str = ""
    """DNS name, for workloads without addresses."""
    services: tuple[tuple[str, tuple[Port, ...]], ...] = ()
    """Services (``ns/hostname``) this workload backs, with per-service port mappings;
    sorted by key."""
    locality: Locality | None = None
    """Region/zone/subzone."""

    @property
    def identity(self) -> SpiffeId:
        """The workload's SPIFFE identity (raises IdentityError if the parts are invalid)."""
        return _identity_of(self.trust_domain, self.namespace, self.service_account)

    @property
    def services_map(self) -> dict[str, tuple[Port, ...]]:
        """`services` as a fresh dict."""
        return dict(self.services)

    def service_ports(self, service_key: str) -> tuple[Port, ...] | None:
        """Port mappings for `service_key`, or None if this workload does not back it."""
        for key, ports in self.services:
            if key == service_key:
                return ports
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "uid": self.uid,
            "name": self.name,
            "namespace": self.namespace,
            "addresses": [_ip_text(a) for a in self.addresses],
            "network": self.network,
            "tunnelProtocol": self.tunnel_protocol.value,
            "trustDomain": self.trust_domain,
            "serviceAccount": self.service_account,
        }
        if self.waypoint is not None:
            out["waypoint"] = self.waypoint.to_dict()
        out.update(
            {
                "node": self.node,
                "canonicalName": self.canonical_name,
                "canonicalRevision": self.canonical_revision,
                "workloadType": self.workload_type.value,
                "workloadName": self.workload_name,
                "authorizationPolicies": list(self.authorization_policies),
                "status": self.status.value,
                "clusterId": self.cluster_id,
                "hostname": self.hostname,
                "services": {
                    key: {"ports": [p.to_dict() for p in ports]} for key, ports in self.services
                },
            }
        )
        if self.locality is not None:
            out["locality"] = self.locality.to_dict()
        return out


_WORKLOAD_FIELDS = (
    "uid",
    "name",
    "namespace",
    "addresses",
    "network",
    "tunnelProtocol",
    "trustDomain",
    "serviceAccount",
    "waypoint",
    "node",
    "canonicalName",
    "canonicalRevision",
    "workloadType",
    "workloadName",
    "authorizationPolicies",
    "status",
    "clusterId",
    "hostname",
    "services",
    "locality",
)


def _parse_policy_key(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_type_name(value)}")
    ns, slash, name = value.partition("/")
    if not slash or not ns or not name or "/" in name:
        raise ConfigError(path, f"expected a policy key 'namespace/name', got {value!r}")
    return value


def _parse_workload_services(
    obj: Mapping[str, Any], path: str
) -> tuple[tuple[str, tuple[Port, ...]], ...]:
    raw = obj.get("services")
    if raw is None:
        return ()
    p = _join(path, "services")
    if not isinstance(raw, Mapping):
        raise ConfigError(p, f"expected an object, got {_type_name(raw)}")
    out: list[tuple[str, tuple[Port, ...]]] = []
    for key, value in raw.items():
        kp = f"{p}[{key!r}]"
        if not isinstance(key, str):
            raise ConfigError(kp, "service keys must be strings")
        _parse_namespaced_hostname(key, kp)
        port_list = _object(value if value is not None else {}, kp, ("ports",))
        ports = _items(port_list, "ports", kp, parse_port)
        seen: set[int] = set()
        for i, port in enumerate(ports):
            if port.service_port in seen:
                raise ConfigError(f"{kp}.ports[{i}]", f"duplicate servicePort {port.service_port}")
            seen.add(port.service_port)
        out.append((key, ports))
    return tuple(sorted(out, key=lambda kv: kv[0]))


def parse_workload(obj: object, path: str = "workload") -> Workload:
    """Parse one Workload from its protobuf-JSON dict form; raise ConfigError naming the field."""
    o = _object(obj, path, _WORKLOAD_FIELDS)
    name = _required_str(o, "name", path)
    namespace = _required_str(o, "namespace", path)
    cluster_id = _str(o, "clusterId", path)
    uid = _str(o, "uid", path) or f"{cluster_id or 'Kubernetes'}//Pod/{namespace}/{name}"
    addresses = _items(o, "addresses", path, _ip)
    hostname = _str(o, "hostname", path)
    if not addresses and not hostname:
        raise ConfigError(_join(path, "addresses"), "a workload needs addresses or a hostname")
    if len(set(addresses)) != len(addresses):
        raise ConfigError(_join(path, "addresses"), "duplicate address")
    waypoint = None
    if o.get("waypoint") is not None:
        waypoint = parse_gateway_address(o["waypoint"], _join(path, "waypoint"))
    locality = None
    if o.get("locality") is not None:
        locality = _parse_locality(o["locality"], _join(path, "locality"))
    workload = Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        addresses=addresses,
        network=_str(o, "network", path),
        tunnel_protocol=_enum(o, "tunnelProtocol", path, TunnelProtocol, TunnelProtocol.NONE),
        trust_domain=_str(o, "trustDomain", path, DEFAULT_TRUST_DOMAIN) or DEFAULT_TRUST_DOMAIN,
        service_account=_str(o, "serviceAccount", path, "default") or "default",
        waypoint=waypoint,
        node=_str(o, "node", path),
        canonical_name=_str(o, "canonicalName", path),
        canonical_revision=_str(o, "canonicalRevision", path),
        workload_type=_enum(o, "workloadType", path, WorkloadType, WorkloadType.DEPLOYMENT),
        workload_name=_str(o, "workloadName", path),
        authorization_policies=_items(o, "authorizationPolicies", path, _parse_policy_key),
        status=_enum(o, "status", path, WorkloadStatus, WorkloadStatus.HEALTHY),
        cluster_id=cluster_id,
        hostname=hostname,
        services=_parse_workload_services(o, path),
        locality=locality,
    )
    try:
        workload.identity  # noqa: B018 - validates trust domain / namespace / service account
    except IdentityError as exc:
        raise ConfigError(path, f"invalid identity: {exc}") from None
    return workload


# --------------------------------------------------------------------------------------------
# Service


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancing:
    """Endpoint selection policy (kept minimal: only `health_policy` is acted on today)."""

    routing_preference: tuple[LoadBalancingScope, ...] = ()
    """Scopes to keep traffic within, most important first."""
    mode: LoadBalancingMode = LoadBalancingMode.UNSPECIFIED_MODE
    """How `routing_preference` applies."""
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY
    """Whether UNHEALTHY endpoints may be picked."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "routingPreference": [s.value for s in self.routing_preference],
            "mode": self.mode.value,
            "healthPolicy": self.health_policy.value,
        }


def _parse_lb_scope(value: object, path: str) -> LoadBalancingScope:
    return _enum_value(value, path, LoadBalancingScope)


def _parse_load_balancing(obj: object, path: str) -> LoadBalancing:
    o = _object(obj, path, ("routingPreference", "mode", "healthPolicy"))
    return LoadBalancing(
        routing_preference=_items(o, "routingPreference", path, _parse_lb_scope),
        mode=_enum(o, "mode", path, LoadBalancingMode, LoadBalancingMode.UNSPECIFIED_MODE),
        health_policy=_enum(o, "healthPolicy", path, HealthPolicy, HealthPolicy.ONLY_HEALTHY),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A service: a hostname and VIPs fronting the workloads that list it in `services`."""

    name: str
    """Service name."""
    namespace: str
    """Service namespace."""
    hostname: str
    """FQDN, e.g. ``echo.default.svc.cluster.local``."""
    addresses: tuple[NetworkAddress, ...] = ()
    """VIPs (empty for a headless service)."""
    ports: tuple[Port, ...] = ()
    """Service ports and their default target ports."""
    subject_alt_names: tuple[str, ...] = ()
    """Extra SANs to accept from endpoints (normally empty: per-workload identity is used)."""
    waypoint: GatewayAddress | None = None
    """Waypoint that traffic to this service must traverse."""
    load_balancing: LoadBalancing | None = None
    """Endpoint selection policy."""

    @property
    def key(self) -> str:
        """The xDS resource name ``namespace/hostname``."""
        return f"{self.namespace}/{self.hostname}"

    def port(self, service_port: int) -> Port | None:
        """The declared port `service_port`, or None."""
        for p in self.ports:
            if p.service_port == service_port:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "hostname": self.hostname,
            "addresses": [a.to_dict() for a in self.addresses],
            "ports": [p.to_dict() for p in self.ports],
            "subjectAltNames": list(self.subject_alt_names),
        }
        if self.waypoint is not None:
            out["waypoint"] = self.waypoint.to_dict()
        if self.load_balancing is not None:
            out["loadBalancing"] = self.load_balancing.to_dict()
        return out


_SERVICE_FIELDS = (
    "name",
    "namespace",
    "hostname",
    "addresses",
    "ports",
    "subjectAltNames",
    "waypoint",
    "loadBalancing",
)


def _parse_san(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a non-empty string, got {_type_name(value)}")
    return value


def parse_service(obj: object, path: str = "service") -> Service:
    """Parse one Service from its protobuf-JSON dict form; raise ConfigError naming the field."""
    o = _object(obj, path, _SERVICE_FIELDS)
    addresses = _items(o, "addresses", path, parse_network_address)
    if len(set(addresses)) != len(addresses):
        raise ConfigError(_join(path, "addresses"), "duplicate address")
    ports = _items(o, "ports", path, parse_port)
    seen: set[int] = set()
    for i, port in enumerate(ports):
        if port.service_port in seen:
            raise ConfigError(f"{path}.ports[{i}]", f"duplicate servicePort {port.service_port}")
        seen.add(port.service_port)
    waypoint = None
    if o.get("waypoint") is not None:
        waypoint = parse_gateway_address(o["waypoint"], _join(path, "waypoint"))
    lb = None
    if o.get("loadBalancing") is not None:
        lb = _parse_load_balancing(o["loadBalancing"], _join(path, "loadBalancing"))
    return Service(
        name=_required_str(o, "name", path),
        namespace=_required_str(o, "namespace", path),
        hostname=_required_str(o, "hostname", path),
        addresses=addresses,
        ports=ports,
        subject_alt_names=_items(o, "subjectAltNames", path, _parse_san),
        waypoint=waypoint,
        load_balancing=lb,
    )


# --------------------------------------------------------------------------------------------
# Authorization


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatch:
    """``istio.security.StringMatch``: exact / prefix / suffix / presence (non-empty)."""

    kind: MatchKind
    """Which comparison."""
    value: str = ""
    """Operand (ignored for PRESENCE)."""

    def matches(self, candidate: str) -> bool:
        """Compare like ztunnel's StringMatch::matches (presence = non-empty)."""
        if self.kind is MatchKind.EXACT:
            return candidate == self.value
        if self.kind is MatchKind.PREFIX:
            return candidate.startswith(self.value)
        if self.kind is MatchKind.SUFFIX:
            return candidate.endswith(self.value)
        return candidate != ""

    def to_dict(self) -> dict[str, Any]:
        if self.kind is MatchKind.PRESENCE:
            return {"presence": {}}
        return {self.kind.value: self.value}


_SPIFFE_PREFIX = "spiffe://"


def _parse_string_match(obj: object, path: str, *, principal: bool = False) -> StringMatch:
    if isinstance(obj, str):
        # AuthorizationPolicy wildcard syntax, as istiod translates it.
        if obj == "*":
            return StringMatch(kind=MatchKind.PRESENCE)
        if obj.count("*") > 1 or ("*" in obj[1:-1]):
            raise ConfigError(path, f"'*' is only allowed at the start or end: {obj!r}")
        if obj.endswith("*"):
            m = StringMatch(kind=MatchKind.PREFIX, value=obj[:-1])
        elif obj.startswith("*"):
            m = StringMatch(kind=MatchKind.SUFFIX, value=obj[1:])
        else:
            m = StringMatch(kind=MatchKind.EXACT, value=obj)
    else:
        o = _object(obj, path, ("exact", "prefix", "suffix", "presence"))
        set_keys = [k for k in o if o[k] is not None]
        if len(set_keys) != 1:
            raise ConfigError(path, "exactly one of exact, prefix, suffix, presence must be set")
        key = set_keys[0]
        if key == "presence":
            _object(o[key], _join(path, key), ())
            m = StringMatch(kind=MatchKind.PRESENCE)
        else:
            m = StringMatch(kind=MatchKind(key), value=_str(o, key, path))
    # Istio principals carry no scheme; ztunnel strips "spiffe://" before comparing.
    if (
        principal
        and m.kind in (MatchKind.EXACT, MatchKind.PREFIX)
        and m.value.startswith(_SPIFFE_PREFIX)
    ):
        m = StringMatch(kind=m.kind, value=m.value[len(_SPIFFE_PREFIX) :])
    return m


def _parse_principal_match(obj: object, path: str) -> StringMatch:
    return _parse_string_match(obj, path, principal=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccountMatch:
    """A (namespace, service account) pair; matches an identity of any trust domain."""

    namespace: str
    service_account: str

    def to_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "serviceAccount": self.service_account}


def _parse_sa_match(obj: object, path: str) -> ServiceAccountMatch:
    o = _object(obj, path, ("namespace", "serviceAccount"))
    return ServiceAccountMatch(
        namespace=_required_str(o, "namespace", path),
        service_account=_required_str(o, "serviceAccount", path),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    """One match: each field ORs over its values, set fields AND together; not_* negate.

    A Match with no field set matches nothing (ztunnel skips empty matches).
    """

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    """Principals without scheme: ``cluster.local/ns/x/sa/y``."""
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not any(
            (
                self.namespaces,
                self.not_namespaces,
                self.service_accounts,
                self.not_service_accounts,
                self.principals,
                self.not_principals,
                self.source_ips,
                self.not_source_ips,
                self.destination_ips,
                self.not_destination_ips,
                self.destination_ports,
                self.not_destination_ports,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for camel, attr in _MATCH_FIELDS:
            values = getattr(self, attr)
            if not values:
                continue
            if attr.endswith("_ips"):
                out[camel] = [str(v) for v in values]
            elif attr.endswith("_ports"):
                out[camel] = list(values)
            else:
                out[camel] = [v.to_dict() for v in values]
        return out


_MATCH_FIELDS = (
    ("namespaces", "namespaces"),
    ("notNamespaces", "not_namespaces"),
    ("serviceAccounts", "service_accounts"),
    ("notServiceAccounts", "not_service_accounts"),
    ("principals", "principals"),
    ("notPrincipals", "not_principals"),
    ("sourceIps", "source_ips"),
    ("notSourceIps", "not_source_ips"),
    ("destinationIps", "destination_ips"),
    ("notDestinationIps", "not_destination_ips"),
    ("destinationPorts", "destination_ports"),
    ("notDestinationPorts", "not_destination_ports"),
)


def _parse_host_or_cidr(value: object, path: str) -> IPNetwork:
    if isinstance(value, str) and "/" not in value:
        ip = _ip(value, path)
        return ipaddress.ip_network(ip)
    return _cidr(value, path)


def _parse_match(obj: object, path: str) -> Match:
    o = _object(obj, path, (camel for camel, _ in _MATCH_FIELDS))
    return Match(
        namespaces=_items(o, "namespaces", path, _parse_string_match),
        not_namespaces=_items(o, "notNamespaces", path, _parse_string_match),
        service_accounts=_items(o, "serviceAccounts", path, _parse_sa_match),
        not_service_accounts=_items(o, "notServiceAccounts", path, _parse_sa_match),
        principals=_items(o, "principals", path, _parse_principal_match),
        not_principals=_items(o, "notPrincipals", path, _parse_principal_match),
        source_ips=_items(o, "sourceIps", path, _parse_host_or_cidr),
        not_source_ips=_items(o, "notSourceIps", path, _parse_host_or_cidr),
        destination_ips=_items(o, "destinationIps", path, _parse_host_or_cidr),
        not_destination_ips=_items(o, "notDestinationIps", path, _parse_host_or_cidr),
        destination_ports=_items(o, "destinationPorts", path, _port),
        not_destination_ports=_items(o, "notDestinationPorts", path, _port),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Clause:
    """Matches are ORed. An empty clause matches everything (ztunnel)."""

    matches: tuple[Match, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"matches": [m.to_dict() for m in self.matches]}


def _parse_clause(obj: object, path: str) -> Clause:
    o = _object(obj, path, ("matches",))
    return Clause(matches=_items(o, "matches", path, _parse_match))


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """Clauses (from / to / when) are ANDed. A rule with no clauses matches everything."""

    clauses: tuple[Clause, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"clauses": [c.to_dict() for c in self.clauses]}


def _parse_rule(obj: object, path: str) -> Rule:
    o = _object(obj, path, ("clauses",))
    return Rule(clauses=_items(o, "clauses", path, _parse_clause))


@dataclass(frozen=True, slots=True, kw_only=True)
class Authorization:
    """An L4 authorization policy. Rules are ORed; no rules = the policy matches nothing."""

    name: str
    """Policy name."""
    namespace: str
    """Policy namespace (for NAMESPACE scope: the namespace it applies to)."""
    scope: Scope
    """Where it applies."""
    action: Action = Action.ALLOW
    """What a match does."""
    rules: tuple[Rule, ...] = ()
    """ORed rules."""

    @property
    def key(self) -> str:
        """The xDS resource name ``namespace/name``."""
        return f"{self.namespace}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "scope": self.scope.value,
            "action": self.action.value,
            "rules": [r.to_dict() for r in self.rules],
        }


def parse_authorization(obj: object, path: str = "policy") -> Authorization:
    """Parse one Authorization from its protobuf-JSON dict form; raise ConfigError naming the
    field."""
    o = _object(obj, path, ("name", "namespace", "scope", "action", "rules"))
    name = _required_str(o, "name", path)
    if "/" in name:
        raise ConfigError(_join(path, "name"), "must not contain '/'")
    namespace = _required_str(o, "namespace", path)
    if "/" in namespace:
        raise ConfigError(_join(path, "namespace"), "must not contain '/'")
    return Authorization(
        name=name,
        namespace=namespace,
        scope=_enum(o, "scope", path, Scope, None),
        action=_enum(o, "action", path, Action, Action.ALLOW),
        rules=_items(o, "rules", path, _parse_rule),
    )


# --------------------------------------------------------------------------------------------
# Static mesh configuration


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """A whole static mesh: what a file-based control plane serves."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "workloads": [w.to_dict() for w in self.workloads],
            "services": [s.to_dict() for s in self.services],
            "policies": [p.to_dict() for p in self.policies],
        }


def check_unique(
    workloads: Sequence[Workload],
    services: Sequence[Service],
    policies: Sequence[Authorization],
) -> None:
    """Raise ConfigError if two records share a uid, service key, policy key, or an address on
    one network (workload IPs and service VIPs share one address space)."""
    uids: dict[str, int] = {}
    owners: dict[tuple[str, IPAddress], str] = {}
    for i, w in enumerate(workloads):
        if w.uid in uids:
            raise ConfigError(f"workloads[{i}].uid", f"duplicate uid {w.uid!r}")
        uids[w.uid] = i
        for j, addr in enumerate(w.addresses):
            owner = owners.get((w.network, addr))
            if owner is not None:
                raise ConfigError(
                    f"workloads[{i}].addresses[{j}]",
                    f"{addr} on network {w.network!r} is already used by {owner}",
                )
            owners[(w.network, addr)] = f"workload {w.uid!r}"
    keys: set[str] = set()
    for i, s in enumerate(services):
        if s.key in keys:
            raise ConfigError(f"services[{i}]", f"duplicate service {s.key!r}")
        keys.add(s.key)
        for j, na in enumerate(s.addresses):
            owner = owners.get((na.network, na.address))
            if owner is not None:
                raise ConfigError(
                    f"services[{i}].addresses[{j}]",
                    f"{na.address} on network {na.network!r} is already used by {owner}",
                )
            owners[(na.network, na.address)] = f"service {s.key!r}"
    pkeys: set[str] = set()
    for i, p in enumerate(policies):
        if p.key in pkeys:
            raise ConfigError(f"policies[{i}]", f"duplicate policy {p.key!r}")
        pkeys.add(p.key)


def parse_mesh_config(obj: object, path: str = "") -> MeshConfig:
    """Parse ``{workloads, services, policies}`` (all optional) and check uniqueness."""
    if obj is None:
        obj = {}
    o = _object(obj, path, ("workloads", "services", "policies"))
    cfg = MeshConfig(
        workloads=_items(o, "workloads", path, parse_workload),
        services=_items(o, "services", path, parse_service),
        policies=_items(o, "policies", path, parse_authorization),
    )
    check_unique(cfg.workloads, cfg.services, cfg.policies)
    return cfg


def load_mesh_config(path: Path) -> MeshConfig:
    """Load a YAML mesh config file; any problem is a ConfigError (path names the field)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"invalid YAML: {exc}") from None
    return parse_mesh_config(data)
