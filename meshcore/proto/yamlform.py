"""The dict form (what YAML / JSON give) of the mesh data model: strict decoding of
`meshcore.model` records, beside the protobuf codec (`meshcore.proto.convert`), and the static
`MeshConfig` file loader. Encoding is each record's ``to_dict``.

Owns: `parse_workload`, `parse_service`, `parse_authorization`, `parse_port`,
`parse_network_address`, `parse_gateway_address`, `parse_mesh_config`, `load_mesh_config`,
`check_unique`, and the strict readers they share. The wire shape and its deliberate
differences from the protobuf JSON mapping are documented in `meshcore.model`.

Invariants: parsing is strict: an unknown field, a wrong type, a bad IP or an out-of-range port
is a `ConfigError` whose `path` names the field (``workloads[2].adresses``);
``parse_x(x.to_dict()) == x`` for every parsed record (tested as a property).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from meshcore.errors import ConfigError, IdentityError
from meshcore.identity import DEFAULT_TRUST_DOMAIN
from meshcore.model import (
    _MATCH_FIELDS,
    _SERVICE_FIELDS,
    _WORKLOAD_FIELDS,
    HBONE_PORT,
    Action,
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthPolicy,
    Http3Endpoint,
    IPAddress,
    IPNetwork,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Match,
    MatchKind,
    MeshConfig,
    NamespacedHostname,
    NetworkAddress,
    Port,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    WorkloadType,
)

_E = TypeVar("_E", bound=enum.Enum)


_T = TypeVar("_T")


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


def parse_network_address(obj: object, path: str) -> NetworkAddress:
    o = _object(obj, path, ("network", "address"))
    if "address" not in o:
        raise ConfigError(_join(path, "address"), "required field is missing")
    return NetworkAddress(
        network=_str(o, "network", path), address=_ip(o["address"], _join(path, "address"))
    )


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


def _parse_locality(obj: object, path: str) -> Locality:
    o = _object(obj, path, ("region", "zone", "subzone"))
    return Locality(
        region=_str(o, "region", path), zone=_str(o, "zone", path), subzone=_str(o, "subzone", path)
    )


def _parse_http3(obj: object, path: str) -> Http3Endpoint:
    o = _object(obj, path, ("address", "port"))
    if o.get("address") is None:
        raise ConfigError(_join(path, "address"), "required")
    port = o.get("port", 15008)
    return Http3Endpoint(
        address=_ip(o["address"], _join(path, "address")), port=_port(port, _join(path, "port"))
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
    http3 = None
    if o.get("http3") is not None:
        http3 = _parse_http3(o["http3"], _join(path, "http3"))
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
        http3=http3,
    )
    try:
        workload.identity  # noqa: B018 - validates trust domain / namespace / service account
    except IdentityError as exc:
        raise ConfigError(path, f"invalid identity: {exc}") from None
    return workload


def _parse_lb_scope(value: object, path: str) -> LoadBalancingScope:
    return _enum_value(value, path, LoadBalancingScope)


def _parse_load_balancing(obj: object, path: str) -> LoadBalancing:
    o = _object(obj, path, ("routingPreference", "mode", "healthPolicy"))
    return LoadBalancing(
        routing_preference=_items(o, "routingPreference", path, _parse_lb_scope),
        mode=_enum(o, "mode", path, LoadBalancingMode, LoadBalancingMode.UNSPECIFIED_MODE),
        health_policy=_enum(o, "healthPolicy", path, HealthPolicy, HealthPolicy.ONLY_HEALTHY),
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


def _parse_sa_match(obj: object, path: str) -> ServiceAccountMatch:
    o = _object(obj, path, ("namespace", "serviceAccount"))
    return ServiceAccountMatch(
        namespace=_required_str(o, "namespace", path),
        service_account=_required_str(o, "serviceAccount", path),
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


def _parse_clause(obj: object, path: str) -> Clause:
    o = _object(obj, path, ("matches",))
    return Clause(matches=_items(o, "matches", path, _parse_match))


def _parse_rule(obj: object, path: str) -> Rule:
    o = _object(obj, path, ("clauses",))
    return Rule(clauses=_items(o, "clauses", path, _parse_clause))


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
    """Load a YAML mesh config file; any problem is a ConfigError (path names the field).
    `yaml` is imported here, not with the module: a node proxy fed by the control plane uses
    this module's strict readers (`meshcore.state`) but never a file (issue 14, memory)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"invalid YAML: {exc}") from None
    return parse_mesh_config(data)
