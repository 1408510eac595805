"""The mesh data model: immutable records mirroring Istio's workload xDS resources.

Owns: `Workload`, `Service` (``istio.workload.Address``), `Authorization`
(``istio.security.Authorization``) and their parts, `MeshConfig`, and serialisation to the
dict form (`to_dict`, for /config_dump). Strict parsing from the dict form (what YAML/JSON
gives) and the static `MeshConfig` file loader are the dict codec, `meshcore.proto.yamlform`,
beside the protobuf codec (`meshcore.proto.convert`).

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
- The dict form below is what `meshcore.proto.yamlform` parses strictly and `to_dict` writes;
  ``parse_x(x.to_dict()) == x`` for every parsed record (tested as a property).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass
from typing import Any

from meshcore.config.matchers import MatchKind as MatchKind
from meshcore.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HBONE_PORT = 15008
"""Default ``hbone_mtls_port`` of a GatewayAddress (the HBONE listener)."""
ROOT_NAMESPACE = "istio-system"
"""Istio's root namespace: an AuthorizationPolicy there becomes a GLOBAL-scope policy."""


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


# --------------------------------------------------------------------------------------------
# Helpers the records (and the dict codec, `meshcore.proto.yamlform`) use.


@functools.lru_cache(maxsize=65536)
def _identity_of(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """Memoised: identities are immutable values, built (and validated) once."""
    return SpiffeId(trust_domain=trust_domain, namespace=namespace, service_account=service_account)


def ip_from_text(text: str) -> IPAddress:
    """Parse an address. Raises ValueError. Not memoised: the text may be a peer's (a CONNECT
    target), and a memo keyed by it would grow with the peer's choices; the per-connection
    memo of address texts, bounded by the state, is `meshcore.state.address_texts`."""
    return ipaddress.ip_address(text)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Locality:
    """Where a workload runs geographically."""

    region: str = ""
    zone: str = ""
    subzone: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.region, "zone": self.zone, "subzone": self.subzone}


@dataclass(frozen=True, slots=True, kw_only=True)
class Http3Endpoint:
    """Where a workload's node proxy takes HBONE over HTTP/3 (QUIC; issue 16): the node's own
    address and UDP port, published by the control plane in our own xDS extension
    (`meshcore.proto.convert.HTTP3_EXTENSION`) for workloads annotated
    ``ambient-mesh.io/hbone-http3``. Absent: HTTP/2, as for every Istio peer."""

    address: IPAddress
    port: int = 15008

    def to_dict(self) -> dict[str, Any]:
        return {"address": _ip_text(self.address), "port": self.port}


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
    http3: Http3Endpoint | None = None
    """HBONE over HTTP/3 toward this workload (our extension; None: HTTP/2)."""

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
        if self.http3 is not None:
            out["http3"] = self.http3.to_dict()
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
    "http3",
)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccountMatch:
    """A (namespace, service account) pair; matches an identity of any trust domain."""

    namespace: str
    service_account: str

    def to_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "serviceAccount": self.service_account}


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Clause:
    """Matches are ORed. An empty clause matches everything (ztunnel)."""

    matches: tuple[Match, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"matches": [m.to_dict() for m in self.matches]}


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """Clauses (from / to / when) are ANDed. A rule with no clauses matches everything."""

    clauses: tuple[Clause, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"clauses": [c.to_dict() for c in self.clauses]}


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
