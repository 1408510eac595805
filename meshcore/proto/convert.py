"""Conversion between `meshcore.model` records and the wire messages of the xDS contract.

Owns: model -> protobuf (control plane side) and protobuf -> model (node proxy side), the type
URLs, and `Any` packing of single resources.

Invariants:
- Decoding goes through the model's strict parsers (`parse_workload`, ...), so a resource the
  node proxy accepts over xDS satisfies exactly the checks a static config file does; every
  problem is a `ConfigError` whose path starts with the resource name.
- ``decode(encode(r)) == r`` for every record (tested as a property).
- IPs are raw 4/16-byte strings on the wire (workload.proto ``bytes``); CIDRs are
  ``{address, length}`` (authorization.proto ``Address``).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from google.protobuf import any_pb2

from meshcore.errors import ConfigError
from meshcore.model import (
    Action,
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    IPNetwork,
    Match,
    MatchKind,
    NetworkAddress,
    Port,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    Workload,
)
from meshcore.proto import ambientmesh_pb2 as ampb
from meshcore.proto import authorization_pb2 as apb
from meshcore.proto import workload_pb2 as wpb
from meshcore.proto.yamlform import parse_service, parse_workload

HTTP3_EXTENSION = "ambient-mesh.io/hbone-http3"
"""Name of our `istio.workload.Extension` carrying `Workload.http3` (an
`ambientmesh.v1.Http3Endpoint`). Istio's ztunnel skips extensions it does not know; so do we
(an extension is opaque config for whoever understands it), except a malformed one of ours."""
HTTP3_ENDPOINT_TYPE = "type.googleapis.com/ambientmesh.v1.Http3Endpoint"

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
"""Type URL of Workload/Service resources (an `istio.workload.Address` oneof)."""
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
"""Type URL of L4 authorization policies."""
TYPE_URLS = (ADDRESS_TYPE, AUTHORIZATION_TYPE)

_APP_PROTOCOL_TO_PB = {
    AppProtocol.UNKNOWN: wpb.UNKNOWN,
    AppProtocol.HTTP11: wpb.HTTP11,
    AppProtocol.HTTP2: wpb.HTTP2,
    AppProtocol.GRPC: wpb.GRPC,
}
# TCP/TLS are Istio values we do not model: treated as UNKNOWN (opaque TCP) by the node proxy.
_APP_PROTOCOL_FROM_PB = {
    wpb.UNKNOWN: "UNKNOWN",
    wpb.HTTP11: "HTTP11",
    wpb.HTTP2: "HTTP2",
    wpb.GRPC: "GRPC",
    wpb.TCP: "UNKNOWN",
    wpb.TLS: "UNKNOWN",
}


# ---------------------------------------------------------------------------------- encoding


def _port_pb(p: Port) -> wpb.Port:
    return wpb.Port(
        service_port=p.service_port,
        target_port=p.target_port,
        app_protocol=_APP_PROTOCOL_TO_PB[p.app_protocol],
    )


def _net_addr_pb(na: NetworkAddress) -> wpb.NetworkAddress:
    return wpb.NetworkAddress(network=na.network, address=na.address.packed)


def _gateway_pb(g: GatewayAddress) -> wpb.GatewayAddress:
    out = wpb.GatewayAddress(hbone_mtls_port=g.hbone_mtls_port)
    if g.hostname is not None:
        out.hostname.namespace = g.hostname.namespace
        out.hostname.hostname = g.hostname.hostname
    elif g.address is not None:
        out.address.CopyFrom(_net_addr_pb(g.address))
    return out


def workload_pb(w: Workload) -> wpb.Workload:
    out = wpb.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[a.packed for a in w.addresses],
        hostname=w.hostname,
        network=w.network,
        tunnel_protocol=wpb.TunnelProtocol.Value(w.tunnel_protocol.value),
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=wpb.WorkloadType.Value(w.workload_type.value),
        workload_name=w.workload_name,
        authorization_policies=list(w.authorization_policies),
        status=wpb.WorkloadStatus.Value(w.status.value),
        cluster_id=w.cluster_id,
    )
    if w.waypoint is not None:
        out.waypoint.CopyFrom(_gateway_pb(w.waypoint))
    for key, ports in w.services:
        out.services[key].ports.extend(_port_pb(p) for p in ports)
    if w.locality is not None:
        out.locality.region = w.locality.region
        out.locality.zone = w.locality.zone
        out.locality.subzone = w.locality.subzone
    if w.http3 is not None:
        ext = out.extensions.add(name=HTTP3_EXTENSION)
        ext.config.Pack(
            ampb.Http3Endpoint(address=w.http3.address.packed, port=w.http3.port),
            type_url_prefix="type.googleapis.com/",
        )
    return out


def service_pb(s: Service) -> wpb.Service:
    out = wpb.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[_net_addr_pb(a) for a in s.addresses],
        ports=[_port_pb(p) for p in s.ports],
        subject_alt_names=list(s.subject_alt_names),
    )
    if s.waypoint is not None:
        out.waypoint.CopyFrom(_gateway_pb(s.waypoint))
    if s.load_balancing is not None:
        lb = s.load_balancing
        out.load_balancing.routing_preference.extend(
            wpb.LoadBalancing.Scope.Value(x.value) for x in lb.routing_preference
        )
        out.load_balancing.mode = wpb.LoadBalancing.Mode.Value(lb.mode.value)
        out.load_balancing.health_policy = wpb.LoadBalancing.HealthPolicy.Value(
            lb.health_policy.value
        )
    return out


def address_pb(record: Workload | Service) -> wpb.Address:
    """The ``istio.workload.Address`` wrapping one workload or service."""
    if isinstance(record, Workload):
        return wpb.Address(workload=workload_pb(record))
    return wpb.Address(service=service_pb(record))


def _string_match_pb(m: StringMatch) -> apb.StringMatch:
    out = apb.StringMatch()
    if m.kind.value == "presence":
        out.presence.SetInParent()
    else:
        setattr(out, m.kind.value, m.value)
    return out


def _cidr_pb(n: IPNetwork) -> apb.Address:
    return apb.Address(address=n.network_address.packed, length=n.prefixlen)


def _match_pb(m: Match) -> apb.Match:
    return apb.Match(
        namespaces=[_string_match_pb(x) for x in m.namespaces],
        not_namespaces=[_string_match_pb(x) for x in m.not_namespaces],
        service_accounts=[
            apb.ServiceAccountMatch(namespace=x.namespace, serviceAccount=x.service_account)
            for x in m.service_accounts
        ],
        not_service_accounts=[
            apb.ServiceAccountMatch(namespace=x.namespace, serviceAccount=x.service_account)
            for x in m.not_service_accounts
        ],
        principals=[_string_match_pb(x) for x in m.principals],
        not_principals=[_string_match_pb(x) for x in m.not_principals],
        source_ips=[_cidr_pb(x) for x in m.source_ips],
        not_source_ips=[_cidr_pb(x) for x in m.not_source_ips],
        destination_ips=[_cidr_pb(x) for x in m.destination_ips],
        not_destination_ips=[_cidr_pb(x) for x in m.not_destination_ips],
        destination_ports=list(m.destination_ports),
        not_destination_ports=list(m.not_destination_ports),
    )


def authorization_pb(a: Authorization) -> apb.Authorization:
    return apb.Authorization(
        name=a.name,
        namespace=a.namespace,
        scope=apb.Scope.Value(a.scope.value),
        action=apb.Action.Value(a.action.value),
        rules=[
            apb.Rule(
                clauses=[
                    apb.Clause(matches=[_match_pb(m) for m in c.matches]) for c in rule.clauses
                ]
            )
            for rule in a.rules
        ],
    )


def pack(record: Workload | Service | Authorization) -> any_pb2.Any:
    """One record as a `google.protobuf.Any` with Istio's type URL."""
    msg: Any = authorization_pb(record) if isinstance(record, Authorization) else address_pb(record)
    out = any_pb2.Any()
    out.Pack(msg, type_url_prefix="type.googleapis.com/")
    return out


def resource_name(record: Workload | Service | Authorization) -> str:
    """The xDS resource name: workload uid, service ``ns/hostname``, policy ``ns/name``."""
    return record.uid if isinstance(record, Workload) else record.key


# ---------------------------------------------------------------------------------- decoding


def _ip_text(raw: bytes, path: str) -> str:
    if len(raw) not in (4, 16):
        raise ConfigError(path, f"an IP address is 4 or 16 bytes, got {len(raw)}")
    return str(ipaddress.ip_address(raw))


def _port_dict(p: wpb.Port) -> dict[str, Any]:
    return {
        "servicePort": p.service_port,
        "targetPort": p.target_port,
        "appProtocol": _APP_PROTOCOL_FROM_PB.get(p.app_protocol, "UNKNOWN"),
    }


def _net_addr_dict(na: wpb.NetworkAddress, path: str) -> dict[str, Any]:
    return {"network": na.network, "address": _ip_text(na.address, f"{path}.address")}


def _gateway_dict(g: wpb.GatewayAddress, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"hboneMtlsPort": g.hbone_mtls_port or None}
    which = g.WhichOneof("destination")
    if which == "hostname":
        out["hostname"] = {"namespace": g.hostname.namespace, "hostname": g.hostname.hostname}
    elif which == "address":
        out["address"] = _net_addr_dict(g.address, f"{path}.address")
    return out


def _enum_name(enum_type: Any, value: int, path: str) -> str:
    try:
        name: str = enum_type.Name(value)
    except ValueError:
        raise ConfigError(path, f"unknown enum value {value}") from None
    return name


def workload_from_pb(w: wpb.Workload, path: str) -> Workload:
    d: dict[str, Any] = {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "addresses": [_ip_text(a, f"{path}.addresses[{i}]") for i, a in enumerate(w.addresses)],
        "hostname": w.hostname,
        "network": w.network,
        "tunnelProtocol": _enum_name(wpb.TunnelProtocol, w.tunnel_protocol, f"{path}.tp"),
        "trustDomain": w.trust_domain,
        "serviceAccount": w.service_account,
        "node": w.node,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "workloadType": _enum_name(wpb.WorkloadType, w.workload_type, f"{path}.workloadType"),
        "workloadName": w.workload_name,
        "authorizationPolicies": list(w.authorization_policies),
        "status": _enum_name(wpb.WorkloadStatus, w.status, f"{path}.status"),
        "clusterId": w.cluster_id,
        "services": {
            key: {"ports": [_port_dict(p) for p in pl.ports]} for key, pl in w.services.items()
        },
    }
    if d["tunnelProtocol"] == "LEGACY_ISTIO_MTLS":
        raise ConfigError(f"{path}.tunnelProtocol", "LEGACY_ISTIO_MTLS is not supported")
    if w.HasField("waypoint"):
        d["waypoint"] = _gateway_dict(w.waypoint, f"{path}.waypoint")
    if w.HasField("locality"):
        d["locality"] = {
            "region": w.locality.region,
            "zone": w.locality.zone,
            "subzone": w.locality.subzone,
        }
    for i, ext in enumerate(w.extensions):
        if ext.name == HTTP3_EXTENSION:
            d["http3"] = _http3_dict(ext.config, f"{path}.extensions[{i}]")
    return parse_workload(d, path)


def _http3_dict(config: any_pb2.Any, path: str) -> dict[str, Any]:
    if config.type_url != HTTP3_ENDPOINT_TYPE:
        raise ConfigError(
            f"{path}.config", f"expected {HTTP3_ENDPOINT_TYPE}, got {config.type_url!r}"
        )
    msg = ampb.Http3Endpoint()
    if not config.Unpack(msg):
        raise ConfigError(f"{path}.config", "undecodable Http3Endpoint")
    return {"address": _ip_text(msg.address, f"{path}.address"), "port": msg.port}


def service_from_pb(s: wpb.Service, path: str) -> Service:
    d: dict[str, Any] = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "addresses": [
            _net_addr_dict(a, f"{path}.addresses[{i}]") for i, a in enumerate(s.addresses)
        ],
        "ports": [_port_dict(p) for p in s.ports],
        "subjectAltNames": list(s.subject_alt_names),
    }
    if s.HasField("waypoint"):
        d["waypoint"] = _gateway_dict(s.waypoint, f"{path}.waypoint")
    if s.HasField("load_balancing"):
        lb = s.load_balancing
        d["loadBalancing"] = {
            "routingPreference": [
                _enum_name(wpb.LoadBalancing.Scope, x, f"{path}.loadBalancing")
                for x in lb.routing_preference
            ],
            "mode": _enum_name(wpb.LoadBalancing.Mode, lb.mode, f"{path}.loadBalancing.mode"),
            "healthPolicy": _enum_name(
                wpb.LoadBalancing.HealthPolicy, lb.health_policy, f"{path}.loadBalancing"
            ),
        }
    return parse_service(d, path)


# Authorization is decoded straight into the model (no protobuf-JSON dict and strict-parser
# detour: that was a quarter of a node proxy's apply time for a policy change, issue 14) with
# the same rules and error paths as `parse_authorization` on the dict form (a differential test
# in tests/unit/test_cp_xds.py holds the two together).

_SCOPES = {
    v.number: Scope(v.name) for v in apb.Scope.DESCRIPTOR.values if v.name in Scope.__members__
}
_ACTIONS = {
    v.number: Action(v.name) for v in apb.Action.DESCRIPTOR.values if v.name in Action.__members__
}
_SPIFFE = "spiffe://"
_ONE_OF = "exactly one of exact, prefix, suffix, presence must be set"


def _model_enum(table: dict[int, Any], enum_type: Any, value: int, path: str) -> Any:
    member = table.get(value)
    if member is None:
        name = _enum_name(enum_type, value, path)  # unknown number: "unknown enum value"
        raise ConfigError(path, f"{name!r} is not a value the node proxy knows")
    return member


def _string_matches(items: Any, path: str, principal: bool = False) -> tuple[StringMatch, ...]:
    out: list[StringMatch] = []
    for i, m in enumerate(items):
        which = m.WhichOneof("match_type")
        if which is None:
            raise ConfigError(f"{path}[{i}]", _ONE_OF)
        if which == "presence":
            out.append(StringMatch(kind=MatchKind.PRESENCE))
            continue
        value: str = getattr(m, which)
        # Istio principals carry no scheme; ztunnel strips "spiffe://" before comparing.
        if principal and which != "suffix" and value.startswith(_SPIFFE):
            value = value[len(_SPIFFE) :]
        out.append(StringMatch(kind=MatchKind(which), value=value))
    return tuple(out)


def _sa_matches(items: Any, path: str) -> tuple[ServiceAccountMatch, ...]:
    out: list[ServiceAccountMatch] = []
    for i, x in enumerate(items):
        if not x.namespace:
            raise ConfigError(f"{path}[{i}].namespace", "must not be empty")
        if not x.serviceAccount:
            raise ConfigError(f"{path}[{i}].serviceAccount", "must not be empty")
        out.append(ServiceAccountMatch(namespace=x.namespace, service_account=x.serviceAccount))
    return tuple(out)


def _cidrs(items: Any, path: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for i, a in enumerate(items):
        text = f"{_ip_text(a.address, f'{path}[{i}].address')}/{a.length}"
        try:
            # strict: host bits set is an error, as for the dict form (yamlform._cidr).
            out.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ConfigError(f"{path}[{i}]", f"{text!r} is not a valid CIDR: {exc}") from None
    return tuple(out)


def _ports(items: Any, path: str) -> tuple[int, ...]:
    for i, p in enumerate(items):
        if not 1 <= p <= 65535:
            raise ConfigError(f"{path}[{i}]", f"{p} is out of range [1, 65535]")
    return tuple(items)


_MATCH_PB_FIELDS = (
    # (protobuf field, JSON name in error paths, decoder)
    ("namespaces", "namespaces", lambda v, p: _string_matches(v, p)),
    ("not_namespaces", "notNamespaces", lambda v, p: _string_matches(v, p)),
    ("service_accounts", "serviceAccounts", _sa_matches),
    ("not_service_accounts", "notServiceAccounts", _sa_matches),
    ("principals", "principals", lambda v, p: _string_matches(v, p, principal=True)),
    ("not_principals", "notPrincipals", lambda v, p: _string_matches(v, p, principal=True)),
    ("source_ips", "sourceIps", _cidrs),
    ("not_source_ips", "notSourceIps", _cidrs),
    ("destination_ips", "destinationIps", _cidrs),
    ("not_destination_ips", "notDestinationIps", _cidrs),
    ("destination_ports", "destinationPorts", _ports),
    ("not_destination_ports", "notDestinationPorts", _ports),
)
_MATCH_PB_ORDER = {name: i for i, (name, _, _) in enumerate(_MATCH_PB_FIELDS)}


def _match_from_pb(m: apb.Match, path: str) -> Match:
    # Only the fields set (ListFields: one call; a policy sets 1-2 of 12), in declaration
    # order so that the first error reported is the one the dict-form parser reports.
    kwargs: dict[str, Any] = {}
    for fd, value in sorted(m.ListFields(), key=lambda fv: _MATCH_PB_ORDER[fv[0].name]):
        _, json_name, decode = _MATCH_PB_FIELDS[_MATCH_PB_ORDER[fd.name]]
        kwargs[fd.name] = decode(value, f"{path}.{json_name}")
    return Match(**kwargs)


def authorization_from_pb(a: apb.Authorization, path: str) -> Authorization:
    for key, value in (("name", a.name), ("namespace", a.namespace)):
        if not value:
            raise ConfigError(f"{path}.{key}", "must not be empty")
        if "/" in value:
            raise ConfigError(f"{path}.{key}", "must not contain '/'")
    return Authorization(
        name=a.name,
        namespace=a.namespace,
        scope=_model_enum(_SCOPES, apb.Scope, a.scope, f"{path}.scope"),
        action=_model_enum(_ACTIONS, apb.Action, a.action, f"{path}.action"),
        rules=tuple(
            Rule(
                clauses=tuple(
                    Clause(
                        matches=tuple(
                            _match_from_pb(m, f"{path}.rules[{i}].clauses[{j}].matches[{k}]")
                            for k, m in enumerate(c.matches)
                        )
                    )
                    for j, c in enumerate(r.clauses)
                )
            )
            for i, r in enumerate(a.rules)
        ),
    )


def unpack(type_url: str, name: str, resource: any_pb2.Any) -> Workload | Service | Authorization:
    """Decode one xDS resource of `type_url` named `name`; ConfigError on any problem
    (bad bytes, wrong inner type, invalid field, or a name that does not match the record)."""
    path = name
    try:
        if type_url == ADDRESS_TYPE:
            addr = wpb.Address()
            if not resource.Unpack(addr):
                raise ConfigError(path, f"resource is a {resource.type_url}, not {type_url}")
            which = addr.WhichOneof("type")
            record: Workload | Service | Authorization
            if which == "workload":
                record = workload_from_pb(addr.workload, path)
            elif which == "service":
                record = service_from_pb(addr.service, path)
            else:
                raise ConfigError(path, "Address has neither workload nor service")
        elif type_url == AUTHORIZATION_TYPE:
            pol = apb.Authorization()
            if not resource.Unpack(pol):
                raise ConfigError(path, f"resource is a {resource.type_url}, not {type_url}")
            record = authorization_from_pb(pol, path)
        else:
            raise ConfigError(path, f"unknown type URL {type_url!r}")
    except ConfigError:
        raise
    except Exception as exc:  # protobuf DecodeError and friends
        raise ConfigError(path, f"cannot decode: {type(exc).__name__}: {exc}") from None
    if resource_name(record) != name:
        raise ConfigError(
            path, f"resource name does not match its content ({resource_name(record)})"
        )
    return record
