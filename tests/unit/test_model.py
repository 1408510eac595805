"""Tests for meshcore.model: strict parsing, defaults, round trips, the static config loader."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.errors import ConfigError
from meshcore.identity import SpiffeId
from meshcore.model import (
    Action,
    AppProtocol,
    Authorization,
    GatewayAddress,
    MatchKind,
    MeshConfig,
    NamespacedHostname,
    Port,
    Scope,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    WorkloadType,
)
from meshcore.proto.yamlform import (
    load_mesh_config,
    parse_authorization,
    parse_mesh_config,
    parse_service,
    parse_workload,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "static" / "mesh.yaml"


def wl_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "client",
        "namespace": "default",
        "addresses": ["127.0.1.10"],
        "tunnelProtocol": "HBONE",
        "serviceAccount": "sleep",
        "node": "node-a",
    }
    d.update(over)
    return d


def svc_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "echo",
        "namespace": "default",
        "hostname": "echo.default.svc.cluster.local",
        "addresses": [{"address": "127.0.3.10"}],
        "ports": [{"servicePort": 80, "targetPort": 8080}],
    }
    d.update(over)
    return d


def pol_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "allow",
        "namespace": "default",
        "scope": "NAMESPACE",
        "action": "ALLOW",
        "rules": [{"clauses": [{"matches": [{"principals": ["cluster.local/ns/a/sa/b"]}]}]}],
    }
    d.update(over)
    return d


# --- the example ---------------------------------------------------------------------------


def test_example_config_loads_with_expected_content() -> None:
    cfg = load_mesh_config(EXAMPLE)
    by_name = {w.name: w for w in cfg.workloads}
    assert set(by_name) == {"client", "server"}
    client, server = by_name["client"], by_name["server"]
    assert client.addresses == (ipaddress.ip_address("127.0.1.10"),)
    assert client.node == "node-a"
    assert server.node == "node-b"
    assert str(client.identity) == "spiffe://cluster.local/ns/default/sa/sleep"
    assert str(server.identity) == "spiffe://cluster.local/ns/default/sa/echo"
    assert server.tunnel_protocol is TunnelProtocol.HBONE
    (svc,) = cfg.services
    assert svc.key == "default/echo.default.svc.cluster.local"
    assert svc.addresses[0].address == ipaddress.ip_address("127.0.3.10")
    assert svc.ports == (Port(service_port=80, target_port=8080),)
    assert server.service_ports(svc.key) == (Port(service_port=80, target_port=8080),)
    (pol,) = cfg.policies
    assert pol.action is Action.ALLOW
    assert pol.key in server.authorization_policies


# --- defaults and shapes -------------------------------------------------------------------


def test_workload_defaults() -> None:
    w = parse_workload({"name": "p", "namespace": "ns", "addresses": ["10.0.0.1"]})
    assert w.uid == "Kubernetes//Pod/ns/p"
    assert w.trust_domain == "cluster.local"
    assert w.service_account == "default"
    assert w.tunnel_protocol is TunnelProtocol.NONE
    assert w.status is WorkloadStatus.HEALTHY
    assert w.workload_type is WorkloadType.DEPLOYMENT
    assert w.waypoint is None
    assert w.services == ()
    assert w.network == ""
    assert w.identity == SpiffeId(
        trust_domain="cluster.local", namespace="ns", service_account="default"
    )


def test_workload_uid_default_uses_cluster_id() -> None:
    w = parse_workload(wl_dict(clusterId="c1"))
    assert w.uid == "c1//Pod/default/client"


def test_workload_full_fields() -> None:
    w = parse_workload(
        wl_dict(
            uid="u1",
            addresses=["127.0.1.10", "::1"],
            network="n1",
            trustDomain="td.example",
            waypoint={"hostname": "istio-system/wp.svc", "hboneMtlsPort": 15009},
            canonicalName="app",
            canonicalRevision="v2",
            workloadType="JOB",
            workloadName="j",
            authorizationPolicies=["default/a", "default/b"],
            status="UNHEALTHY",
            clusterId="c",
            hostname="h.example",
            services={
                "default/z.svc": {"ports": [{"servicePort": 1, "targetPort": 2}]},
                "default/a.svc": {"ports": []},
            },
            locality={"region": "r", "zone": "z"},
        )
    )
    assert w.addresses[1] == ipaddress.IPv6Address("::1")
    assert w.waypoint == GatewayAddress(
        hostname=NamespacedHostname(namespace="istio-system", hostname="wp.svc"),
        hbone_mtls_port=15009,
    )
    # services are sorted by key so equal workloads compare equal
    assert [k for k, _ in w.services] == ["default/a.svc", "default/z.svc"]
    assert w.services_map["default/z.svc"] == (Port(service_port=1, target_port=2),)
    assert w.service_ports("default/none") is None
    assert w.identity.trust_domain == "td.example"
    assert w.locality is not None
    assert w.locality.subzone == ""


def test_records_are_frozen_and_hashable() -> None:
    w = parse_workload(wl_dict(services={"default/a": {"ports": [{"servicePort": 1}]}}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.name = "x"  # type: ignore[misc]
    assert hash(w) == hash(
        parse_workload(wl_dict(services={"default/a": {"ports": [{"servicePort": 1}]}}))
    )
    assert {parse_service(svc_dict()), parse_service(svc_dict())} == {parse_service(svc_dict())}
    assert len({parse_authorization(pol_dict()), parse_authorization(pol_dict(name="x"))}) == 2


def test_service_fields_and_key() -> None:
    s = parse_service(
        svc_dict(
            ports=[{"servicePort": 80, "targetPort": 8080, "appProtocol": "HTTP2"}],
            subjectAltNames=["spiffe://cluster.local/ns/default/sa/echo"],
            waypoint={"address": {"address": "127.0.9.1"}},
            loadBalancing={"healthPolicy": "ALLOW_ALL", "routingPreference": ["ZONE", "NODE"]},
        )
    )
    assert s.key == "default/echo.default.svc.cluster.local"
    assert s.port(80) == Port(service_port=80, target_port=8080, app_protocol=AppProtocol.HTTP2)
    assert s.port(81) is None
    assert s.waypoint is not None
    assert s.waypoint.hbone_mtls_port == 15008
    assert s.load_balancing is not None
    assert [p.value for p in s.load_balancing.routing_preference] == ["ZONE", "NODE"]


def test_authorization_defaults_and_key() -> None:
    p = parse_authorization({"name": "n", "namespace": "ns", "scope": "GLOBAL"})
    assert p.key == "ns/n"
    assert p.action is Action.ALLOW
    assert p.rules == ()
    assert p.scope is Scope.GLOBAL


@pytest.mark.parametrize(
    ("written", "kind", "value"),
    [
        ("*", MatchKind.PRESENCE, ""),
        ("foo*", MatchKind.PREFIX, "foo"),
        ("*foo", MatchKind.SUFFIX, "foo"),
        ("foo", MatchKind.EXACT, "foo"),
        ({"exact": "foo"}, MatchKind.EXACT, "foo"),
        ({"prefix": "f"}, MatchKind.PREFIX, "f"),
        ({"suffix": "o"}, MatchKind.SUFFIX, "o"),
        ({"presence": {}}, MatchKind.PRESENCE, ""),
    ],
)
def test_string_match_forms(written: object, kind: MatchKind, value: str) -> None:
    p = parse_authorization(
        pol_dict(rules=[{"clauses": [{"matches": [{"namespaces": [written]}]}]}])
    )
    assert p.rules[0].clauses[0].matches[0].namespaces == (StringMatch(kind=kind, value=value),)


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (
            "spiffe://cluster.local/ns/a/sa/b",
            StringMatch(kind=MatchKind.EXACT, value="cluster.local/ns/a/sa/b"),
        ),
        (
            "cluster.local/ns/a/sa/b",
            StringMatch(kind=MatchKind.EXACT, value="cluster.local/ns/a/sa/b"),
        ),
        (
            "spiffe://cluster.local/ns/a/*",
            StringMatch(kind=MatchKind.PREFIX, value="cluster.local/ns/a/"),
        ),
        (
            {"exact": "spiffe://td/ns/a/sa/b"},
            StringMatch(kind=MatchKind.EXACT, value="td/ns/a/sa/b"),
        ),
        ("*/sa/b", StringMatch(kind=MatchKind.SUFFIX, value="/sa/b")),
    ],
)
def test_principals_stored_without_scheme(written: object, expected: StringMatch) -> None:
    p = parse_authorization(
        pol_dict(rules=[{"clauses": [{"matches": [{"principals": [written]}]}]}])
    )
    assert p.rules[0].clauses[0].matches[0].principals == (expected,)


def test_cidr_forms() -> None:
    p = parse_authorization(
        pol_dict(
            rules=[{"clauses": [{"matches": [{"sourceIps": ["10.0.0.0/8", "127.0.0.1", "::1"]}]}]}]
        )
    )
    ips = p.rules[0].clauses[0].matches[0].source_ips
    assert ips == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )


# --- strict errors ---------------------------------------------------------------------------

WORKLOAD_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    (wl_dict(adresses=["1.2.3.4"]), "workloads[0].adresses", "unknown field"),
    (wl_dict(addresses="127.0.0.1"), "workloads[0].addresses", "expected a list"),
    (wl_dict(addresses=["300.0.0.1"]), "workloads[0].addresses[0]", "not a valid IP"),
    (wl_dict(addresses=["127.0.0.1", "nope"]), "workloads[0].addresses[1]", "not a valid IP"),
    (wl_dict(addresses=[7]), "workloads[0].addresses[0]", "expected an IP address string"),
    (wl_dict(addresses=["1.1.1.1", "1.1.1.1"]), "workloads[0].addresses", "duplicate"),
    (wl_dict(addresses=[]), "workloads[0].addresses", "addresses or a hostname"),
    (wl_dict(name=None), "workloads[0].name", "required"),
    (wl_dict(name=""), "workloads[0].name", "must not be empty"),
    (wl_dict(namespace=3), "workloads[0].namespace", "expected a string"),
    (wl_dict(tunnelProtocol="QUIC"), "workloads[0].tunnelProtocol", "not one of"),
    (wl_dict(status=1), "workloads[0].status", "expected a string"),
    (wl_dict(serviceAccount="bad sa"), "workloads[0]", "invalid identity"),
    (wl_dict(trustDomain="UPPER"), "workloads[0]", "invalid identity"),
    (
        wl_dict(authorizationPolicies=["noslash"]),
        "workloads[0].authorizationPolicies[0]",
        "policy key",
    ),
    (wl_dict(services=[]), "workloads[0].services", "expected an object"),
    (wl_dict(services={"nokey": {}}), "workloads[0].services['nokey']", "namespace/hostname"),
    (
        wl_dict(services={"a/b": {"ports": [{"servicePort": 0}]}}),
        "workloads[0].services['a/b'].ports[0].servicePort",
        "out of range",
    ),
    (
        wl_dict(services={"a/b": {"ports": [{"servicePort": True}]}}),
        "workloads[0].services['a/b'].ports[0].servicePort",
        "expected an integer",
    ),
    (
        wl_dict(services={"a/b": {"ports": [{"servicePort": 1}, {"servicePort": 1}]}}),
        "workloads[0].services['a/b'].ports[1]",
        "duplicate servicePort",
    ),
    (
        wl_dict(services={"a/b": {"portz": []}}),
        "workloads[0].services['a/b'].portz",
        "unknown field",
    ),
    (wl_dict(waypoint={}), "workloads[0].waypoint", "exactly one"),
    (
        wl_dict(waypoint={"address": {"address": "1.1.1.1"}, "hostname": "a/b"}),
        "workloads[0].waypoint",
        "exactly one",
    ),
    (
        wl_dict(waypoint={"address": {"adress": "1.1.1.1"}}),
        "workloads[0].waypoint.address.adress",
        "unknown field",
    ),
    (
        wl_dict(waypoint={"address": {"address": "1.1.1.1"}, "hboneMtlsPort": 70000}),
        "workloads[0].waypoint.hboneMtlsPort",
        "out of range",
    ),
    (wl_dict(locality={"planet": "earth"}), "workloads[0].locality.planet", "unknown field"),
]


@pytest.mark.parametrize(("obj", "path", "msg"), WORKLOAD_ERRORS)
def test_workload_errors_name_the_path(obj: dict[str, Any], path: str, msg: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_mesh_config({"workloads": [obj]})
    assert ei.value.path == path
    assert msg in ei.value.message


def test_error_index_points_at_the_bad_item() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_mesh_config(
            {
                "workloads": [
                    wl_dict(name="a", addresses=["127.0.0.1"]),
                    wl_dict(name="b", addresses=["127.0.0.2"]),
                    wl_dict(name="c", adresses=["127.0.0.3"]),
                ]
            }
        )
    assert ei.value.path == "workloads[2].adresses"
    assert str(ei.value) == "workloads[2].adresses: unknown field"


SERVICE_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    (svc_dict(hostname=""), "services[0].hostname", "must not be empty"),
    (svc_dict(addresses=[{"address": "x"}]), "services[0].addresses[0].address", "not a valid IP"),
    (svc_dict(addresses=[{"network": "n"}]), "services[0].addresses[0].address", "required"),
    (svc_dict(addresses=["127.0.0.1"]), "services[0].addresses[0]", "expected an object"),
    (svc_dict(ports=[{"targetPort": 1}]), "services[0].ports[0].servicePort", "required"),
    (
        svc_dict(ports=[{"servicePort": 1, "targetPort": -1}]),
        "services[0].ports[0].targetPort",
        "out of range",
    ),
    (
        svc_dict(ports=[{"servicePort": 1, "appProtocol": "SMTP"}]),
        "services[0].ports[0].appProtocol",
        "not one of",
    ),
    (
        svc_dict(ports=[{"servicePort": 80}, {"servicePort": 80}]),
        "services[0].ports[1]",
        "duplicate",
    ),
    (svc_dict(loadBalancing={"mode": "FAST"}), "services[0].loadBalancing.mode", "not one of"),
    (
        svc_dict(loadBalancing={"routingPreference": ["ZONE", "PLANET"]}),
        "services[0].loadBalancing.routingPreference[1]",
        "not one of",
    ),
    (svc_dict(subjectAltNames=[""]), "services[0].subjectAltNames[0]", "non-empty"),
    (svc_dict(ipFamilies="DUAL"), "services[0].ipFamilies", "unknown field"),
]


@pytest.mark.parametrize(("obj", "path", "msg"), SERVICE_ERRORS)
def test_service_errors_name_the_path(obj: dict[str, Any], path: str, msg: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_mesh_config({"services": [obj]})
    assert ei.value.path == path
    assert msg in ei.value.message


def _rules(match: Any) -> list[Any]:
    return [{"clauses": [{"matches": [match]}]}]


POLICY_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    (pol_dict(scope=None), "policies[0].scope", "required"),
    (pol_dict(scope="CLUSTER"), "policies[0].scope", "not one of"),
    (pol_dict(action="AUDIT"), "policies[0].action", "not one of"),
    (pol_dict(name="a/b"), "policies[0].name", "'/'"),
    (pol_dict(groups=[]), "policies[0].groups", "unknown field"),
    (pol_dict(rules=[{"matches": []}]), "policies[0].rules[0].matches", "unknown field"),
    (
        pol_dict(rules=_rules({"sourceIps": ["10.0.0.1/8"]})),
        "policies[0].rules[0].clauses[0].matches[0].sourceIps[0]",
        "not a valid CIDR",
    ),
    (
        pol_dict(rules=_rules({"destinationIps": ["banana"]})),
        "policies[0].rules[0].clauses[0].matches[0].destinationIps[0]",
        "not a valid IP",
    ),
    (
        pol_dict(rules=_rules({"destinationPorts": ["80"]})),
        "policies[0].rules[0].clauses[0].matches[0].destinationPorts[0]",
        "expected an integer",
    ),
    (
        pol_dict(rules=_rules({"principals": [{"exact": "a", "prefix": "b"}]})),
        "policies[0].rules[0].clauses[0].matches[0].principals[0]",
        "exactly one",
    ),
    (
        pol_dict(rules=_rules({"namespaces": ["a*b"]})),
        "policies[0].rules[0].clauses[0].matches[0].namespaces[0]",
        "'*'",
    ),
    (
        pol_dict(rules=_rules({"namespaces": [{"regex": ".*"}]})),
        "policies[0].rules[0].clauses[0].matches[0].namespaces[0].regex",
        "unknown field",
    ),
    (
        pol_dict(rules=_rules({"serviceAccounts": [{"namespace": "a"}]})),
        "policies[0].rules[0].clauses[0].matches[0].serviceAccounts[0].serviceAccount",
        "required",
    ),
    (
        pol_dict(rules=_rules({"methods": ["GET"]})),
        "policies[0].rules[0].clauses[0].matches[0].methods",
        "unknown field",
    ),
]


@pytest.mark.parametrize(("obj", "path", "msg"), POLICY_ERRORS)
def test_policy_errors_name_the_path(obj: dict[str, Any], path: str, msg: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_mesh_config({"policies": [obj]})
    assert ei.value.path == path
    assert msg in ei.value.message


# --- uniqueness -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "path", "msg"),
    [
        (
            {"workloads": [wl_dict(uid="u"), wl_dict(uid="u", addresses=["127.0.0.9"])]},
            "workloads[1].uid",
            "duplicate uid",
        ),
        (
            {"workloads": [wl_dict(name="a"), wl_dict(name="b")]},
            "workloads[1].addresses[0]",
            "already used by workload",
        ),
        (
            {"workloads": [wl_dict(addresses=["127.0.3.10"])], "services": [svc_dict()]},
            "services[0].addresses[0]",
            "already used by workload",
        ),
        (
            {"services": [svc_dict(), svc_dict(addresses=[])]},
            "services[1]",
            "duplicate service",
        ),
        (
            {"services": [svc_dict(), svc_dict(name="other", hostname="other.svc")]},
            "services[1].addresses[0]",
            "already used by service",
        ),
        ({"policies": [pol_dict(), pol_dict(scope="GLOBAL")]}, "policies[1]", "duplicate policy"),
    ],
)
def test_duplicates_are_config_errors(cfg: dict[str, Any], path: str, msg: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_mesh_config(cfg)
    assert ei.value.path == path
    assert msg in ei.value.message


def test_same_address_on_different_networks_is_fine() -> None:
    cfg = parse_mesh_config(
        {"workloads": [wl_dict(name="a", network="n1"), wl_dict(name="b", network="n2")]}
    )
    assert len(cfg.workloads) == 2


# --- file loading ----------------------------------------------------------------------------


def test_load_empty_file_gives_empty_config(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("")
    assert load_mesh_config(f) == MeshConfig()


@pytest.mark.parametrize(
    ("text", "path_suffix", "msg"),
    [
        ("workloads: [\n", "m.yaml", "invalid YAML"),
        ("- 1\n", "", "expected an object"),
        ("workload: []\n", "workload", "unknown field"),
        ("workloads: {}\n", "workloads", "expected a list"),
    ],
)
def test_load_errors(tmp_path: Path, text: str, path_suffix: str, msg: str) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_mesh_config(f)
    assert ei.value.path.endswith(path_suffix)
    assert msg in ei.value.message


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_mesh_config(tmp_path / "absent.yaml")


# --- round trips ------------------------------------------------------------------------------


def test_example_round_trips() -> None:
    cfg = load_mesh_config(EXAMPLE)
    again = parse_mesh_config(copy.deepcopy(cfg.to_dict()))
    assert again == cfg


names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)
ips = st.one_of(ipv4, st.ip_addresses(v=6).map(str))
ports = st.integers(min_value=1, max_value=65535)
string_match = st.one_of(
    names,
    names.map(lambda s: s + "*"),
    names.map(lambda s: "*" + s),
    st.just("*"),
    names.map(lambda s: {"exact": s}),
    st.just({"presence": {}}),
)
cidr = st.one_of(
    ips,
    st.builds(
        lambda ip, n: str(ipaddress.ip_network(f"{ip}/{n}", strict=False)),
        ipv4,
        st.integers(0, 32),
    ),
)
gateway = st.one_of(
    st.fixed_dictionaries({"hostname": st.builds(lambda a, b: f"{a}/{b}", names, names)}),
    st.fixed_dictionaries(
        {"address": st.fixed_dictionaries({"address": ips}, optional={"network": names})},
        optional={"hboneMtlsPort": ports},
    ),
)
port_dict = st.fixed_dictionaries(
    {"servicePort": ports},
    optional={
        "targetPort": st.integers(0, 65535),
        "appProtocol": st.sampled_from([p.value for p in AppProtocol]),
    },
)


def _unique_ports(ps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[int, dict[str, Any]] = {}
    for p in ps:
        seen.setdefault(p["servicePort"], p)
    return list(seen.values())


workload_dicts = st.fixed_dictionaries(
    {
        "name": names,
        "namespace": names,
        "addresses": st.lists(ips, min_size=1, max_size=2, unique=True),
    },
    optional={
        "uid": names,
        "network": names,
        "tunnelProtocol": st.sampled_from(["NONE", "HBONE"]),
        "serviceAccount": names,
        "trustDomain": names,
        "waypoint": gateway,
        "node": names,
        "workloadType": st.sampled_from([t.value for t in WorkloadType]),
        "authorizationPolicies": st.lists(
            st.builds(lambda a, b: f"{a}/{b}", names, names), max_size=3
        ),
        "status": st.sampled_from(["HEALTHY", "UNHEALTHY"]),
        "services": st.dictionaries(
            st.builds(lambda a, b: f"{a}/{b}.svc", names, names),
            st.fixed_dictionaries({"ports": st.lists(port_dict, max_size=3).map(_unique_ports)}),
            max_size=3,
        ),
        "locality": st.fixed_dictionaries({}, optional={"region": names, "zone": names}),
    },
)
service_dicts = st.fixed_dictionaries(
    {"name": names, "namespace": names, "hostname": names},
    optional={
        "addresses": st.lists(
            st.fixed_dictionaries({"address": ips}, optional={"network": names}),
            max_size=2,
            unique_by=lambda d: (d.get("network", ""), d["address"]),
        ),
        "ports": st.lists(port_dict, max_size=3).map(_unique_ports),
        "subjectAltNames": st.lists(names, max_size=2),
        "waypoint": gateway,
        "loadBalancing": st.fixed_dictionaries(
            {},
            optional={
                "healthPolicy": st.sampled_from(["ONLY_HEALTHY", "ALLOW_ALL"]),
                "routingPreference": st.lists(st.sampled_from(["ZONE", "NODE", "REGION"])),
            },
        ),
    },
)
match_dicts = st.fixed_dictionaries(
    {},
    optional={
        "namespaces": st.lists(string_match, max_size=2),
        "notNamespaces": st.lists(string_match, max_size=2),
        "principals": st.lists(string_match, max_size=2),
        "notPrincipals": st.lists(string_match, max_size=2),
        "serviceAccounts": st.lists(
            st.fixed_dictionaries({"namespace": names, "serviceAccount": names}), max_size=2
        ),
        "sourceIps": st.lists(cidr, max_size=2),
        "notDestinationIps": st.lists(cidr, max_size=2),
        "destinationPorts": st.lists(ports, max_size=2),
        "notDestinationPorts": st.lists(ports, max_size=2),
    },
)
policy_dicts = st.fixed_dictionaries(
    {
        "name": names,
        "namespace": names,
        "scope": st.sampled_from([s.value for s in Scope]),
    },
    optional={
        "action": st.sampled_from(["ALLOW", "DENY"]),
        "rules": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "clauses": st.lists(
                        st.fixed_dictionaries(
                            {}, optional={"matches": st.lists(match_dicts, max_size=2)}
                        ),
                        max_size=2,
                    )
                },
            ),
            max_size=2,
        ),
    },
)


@settings(max_examples=150, deadline=None)
@given(workload_dicts)
def test_workload_round_trip(d: dict[str, Any]) -> None:
    w = parse_workload(d)
    out = w.to_dict()
    assert parse_workload(out) == w
    assert out == parse_workload(out).to_dict()


@settings(max_examples=150, deadline=None)
@given(service_dicts)
def test_service_round_trip(d: dict[str, Any]) -> None:
    s = parse_service(d)
    assert parse_service(s.to_dict()) == s


@settings(max_examples=150, deadline=None)
@given(policy_dicts)
def test_policy_round_trip(d: dict[str, Any]) -> None:
    p = parse_authorization(d)
    assert parse_authorization(p.to_dict()) == p


def test_direct_construction_matches_parsing() -> None:
    w = Workload(
        uid="Kubernetes//Pod/default/client",
        name="client",
        namespace="default",
        addresses=(ipaddress.IPv4Address("127.0.1.10"),),
        tunnel_protocol=TunnelProtocol.HBONE,
        service_account="sleep",
        node="node-a",
    )
    assert parse_workload(wl_dict()) == w
    a = Authorization(name="allow", namespace="default", scope=Scope.NAMESPACE)
    assert parse_authorization(a.to_dict()) == a
