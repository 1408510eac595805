"""Wire layer (pure parts): model <-> protobuf, pre-encoded delta responses, per-resource
apply/NACK on the client, and the CA's signing decision."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2, struct_pb2

from controlplane.auth import NodeCredentials, bearer_token
from controlplane.ca import CertificateService, IssuancePolicy
from controlplane.errors import InvalidRequest, PermissionDenied, Unauthenticated
from controlplane.translate import Record
from controlplane.translator import Delta
from controlplane.xds import ResourceTable, encode_response
from meshcore.ca import MeshCA, generate_csr
from meshcore.caclient import build_request, response_parts
from meshcore.certhelper import CertHelper
from meshcore.certs import WorkloadCertificate, split_pem_chain, utcnow
from meshcore.errors import CertificateError, ConfigError
from meshcore.identity import SpiffeId
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto import workload_pb2
from meshcore.proto.convert import ADDRESS_TYPE, AUTHORIZATION_TYPE, pack, resource_name, unpack
from meshcore.proto.yamlform import parse_mesh_config
from meshcore.state import MeshState
from meshcore.xds import ControlPlaneEndpoint, apply_response
from tests.helpers import run
from tests.loopback.harness import mesh_config

POLICY = {
    "name": "p",
    "namespace": "default",
    "scope": "WORKLOAD_SELECTOR",
    "action": "DENY",
    "rules": [
        {
            "clauses": [
                {
                    "matches": [
                        {
                            "notPrincipals": ["*"],
                            "sourceIps": ["10.0.0.0/8", "fd00::/64"],
                            "principals": ["cluster.local/ns/*"],
                            "destinationPorts": [80],
                            "serviceAccounts": [{"namespace": "a", "serviceAccount": "b"}],
                        },
                    ]
                }
            ]
        }
    ],
}
CONFIG = parse_mesh_config(mesh_config(policies=[POLICY]))
RECORDS: list[Record] = [*CONFIG.workloads, *CONFIG.services, *CONFIG.policies]


def checked(identity: SpiffeId, key: bytes, chain: list[str]) -> WorkloadCertificate:
    """A CA answer validated as `ControlPlaneCAProvider.fetch` does (in-process helper)."""
    return run(CertHelper(in_process=True).check(identity, key, *response_parts(identity, chain)))


@pytest.mark.parametrize("record", RECORDS, ids=resource_name)
def test_model_wire_round_trip(record: object) -> None:
    packed = pack(record)  # type: ignore[arg-type]
    assert unpack(packed.type_url, resource_name(record), packed) == record  # type: ignore[arg-type]


def test_unpack_rejects_name_mismatch_and_garbage() -> None:
    packed = pack(CONFIG.workloads[0])
    with pytest.raises(ConfigError, match="does not match"):
        unpack(ADDRESS_TYPE, "other", packed)
    junk = any_pb2.Any(type_url=ADDRESS_TYPE, value=b"\xff\xff\xff")
    with pytest.raises(ConfigError, match="cannot decode"):
        unpack(ADDRESS_TYPE, "x", junk)
    with pytest.raises(ConfigError, match=r"not type\.googleapis\.com/istio\.security"):
        unpack(AUTHORIZATION_TYPE, "x", packed)


def test_pre_encoded_response_parses_and_versions_are_content_hashes() -> None:
    table = ResourceTable()
    touched = table.apply(Delta(upserts=tuple(RECORDS)))
    addresses: list[Record] = [*CONFIG.workloads, *CONFIG.services]
    assert touched[ADDRESS_TYPE] == {resource_name(r) for r in addresses}
    again = ResourceTable()
    again.apply(Delta(upserts=tuple(reversed(RECORDS))))
    assert {n: e.version for n, e in table.types[ADDRESS_TYPE].items()} == {
        n: e.version for n, e in again.types[ADDRESS_TYPE].items()
    }, "versions depend on content only (a restarted control plane computes the same)"
    raw = encode_response(
        type_url=ADDRESS_TYPE,
        nonce="7",
        system_version="3",
        resources=[e.wire for e in table.types[ADDRESS_TYPE].values()],
        removed=["gone"],
    )
    resp = dpb.DeltaDiscoveryResponse.FromString(raw)
    assert resp.nonce == "7"
    assert list(resp.removed_resources) == ["gone"]
    assert {r.name for r in resp.resources} == set(table.types[ADDRESS_TYPE])
    applied = apply_response(MeshState.empty(), resp)
    assert not applied.errors
    assert {w.uid for w in applied.state.workloads} == {w.uid for w in CONFIG.workloads}


def test_apply_response_nacks_one_bad_resource_and_keeps_the_rest() -> None:
    start = MeshState.from_config(CONFIG)
    bad = any_pb2.Any()
    bad.Pack(
        workload_pb2.Address(
            workload=workload_pb2.Workload(
                uid="bad", name="bad", namespace="default", addresses=[b"\x01"]
            )
        ),
        type_url_prefix="type.googleapis.com/",
    )
    new_wl = CONFIG.workloads[0].__class__(
        uid="new",
        name="new",
        namespace="default",
        addresses=CONFIG.workloads[0].addresses[:0],
        hostname="new.example",
    )
    resp = dpb.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, nonce="1", removed_resources=["c1"])
    resp.resources.add(name="bad", version="1", resource=bad)
    resp.resources.add(name="new", version="1", resource=pack(new_wl))
    applied = apply_response(start, resp)
    assert [name for name, _ in applied.errors] == ["bad"]
    assert applied.state.workload("new") == new_wl
    assert applied.state.workload("c1") is None, "removals always apply"
    assert applied.state.workload("s1") is not None, "untouched records stay"


# ------------------------------------------------------------------------------------ CA


def _service(ca: MeshCA, node_of: dict[str, str]) -> CertificateService:
    creds = NodeCredentials({"node-a": "a" * 20, "node-b": "b" * 20})
    return CertificateService(
        ca,
        authenticator=creds,
        policy=IssuancePolicy(
            may_impersonate=lambda node, ident: node_of.get(ident.service_account) == node,
            max_ttl=timedelta(hours=2),
        ),
    )


def test_ca_decision() -> None:
    ca = MeshCA.create_root()
    svc = _service(ca, {"sleep": "node-a", "echo": "node-b"})
    sleep = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    _, csr = generate_csr(sleep)
    req = build_request(sleep, csr, timedelta(days=3))
    with pytest.raises(Unauthenticated):
        svc.decide(None, req)
    with pytest.raises(Unauthenticated):
        svc.decide("wrong-token-000000000", req)
    grant = svc.decide("a" * 20, req)
    assert grant.node == "node-a"
    assert grant.identity == sleep
    assert grant.ttl == timedelta(hours=2), "clamped to max_ttl"
    with pytest.raises(PermissionDenied, match="node 'node-b' may not obtain"):
        svc.decide("b" * 20, req)
    bad = build_request(sleep, csr, timedelta(hours=1))
    bad.metadata.fields["ImpersonatedIdentity"].string_value = "not-spiffe"
    with pytest.raises(InvalidRequest):
        svc.decide("a" * 20, bad)
    assert bearer_token([("authorization", "Bearer xyz")]) == "xyz"
    assert bearer_token([("authorization", "Basic xyz")]) is None


def test_ca_answer_carries_bundle_and_client_checks_san() -> None:
    ca = MeshCA.create_root()
    other_root = MeshCA.create_root()
    ca.add_trusted_root(other_root.root_pem)
    svc = _service(ca, {"sleep": "node-a"})
    sleep = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    key, csr = generate_csr(sleep)
    grant = svc.decide("a" * 20, build_request(sleep, csr, timedelta(hours=1)))
    chain = svc.sign(grant, csr.decode())
    assert len(split_pem_chain(chain[-1].encode())) == 2, "trust bundle with both roots"
    cert = checked(sleep, key, chain)
    assert cert.identity == sleep
    assert cert.not_after > utcnow()
    echo = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo")
    with pytest.raises(
        CertificateError, match=r"expected spiffe://cluster\.local/ns/default/sa/echo"
    ):
        checked(echo, key, chain)
    with pytest.raises(CertificateError):
        checked(sleep, key, chain[:1])
    # CSR SAN must equal the impersonated identity.
    _, echo_csr = generate_csr(echo)
    with pytest.raises(InvalidRequest):
        svc.sign(grant, echo_csr.decode())
    meta = struct_pb2.Struct()
    meta.fields["ImpersonatedIdentity"].number_value = 3
    with pytest.raises(InvalidRequest):
        svc.decide(
            "a" * 20,
            build_request(sleep, csr, timedelta(hours=1)).__class__(
                csr=csr.decode(), metadata=meta
            ),
        )


def test_endpoint_rereads_a_rotated_token_file(tmp_path: Path) -> None:
    """Projected service-account tokens are rotated on disk: every call reads the file again."""
    token = tmp_path / "token"
    token.write_text("first\n")
    ep = ControlPlaneEndpoint(address="127.0.0.1:1", token="first", token_file=token)
    assert ep.metadata() == (("authorization", "Bearer first"),)
    token.write_text("rotated\n")
    assert ep.metadata() == (("authorization", "Bearer rotated"),)
    assert ControlPlaneEndpoint(address="x:1").metadata() == ()


def test_one_change_encoded_once_for_every_connection_nonces_never_repeat_per_stream() -> None:
    """A change every proxy gets (a policy) is encoded once and the same bytes (one nonce) go
    to every connection (issue 14: the 100-proxy fan-out); a stream never sees a nonce twice
    and its nonces increase, also when a private response came in between."""
    from controlplane.xds import ProxyConnection, XdsServer

    srv = XdsServer()
    srv.publish(Delta(upserts=tuple(RECORDS)))
    conns = [ProxyConnection(id=i, node=f"n{i}", peer="t", connected_at=0.0) for i in range(3)]
    for conn in conns:
        srv.connections[conn.id] = conn
        srv._handle_request(conn, dpb.DeltaDiscoveryRequest(type_url=AUTHORIZATION_TYPE))
        srv._build(conn, AUTHORIZATION_TYPE)  # the initial state
    pol = CONFIG.policies[0]
    changed = parse_mesh_config(mesh_config(policies=[{**POLICY, "action": "ALLOW"}])).policies[0]
    assert changed != pol
    assert resource_name(changed) == resource_name(pol)
    srv.publish(Delta(upserts=(changed,)))
    out = [srv._build(c, AUTHORIZATION_TYPE) for c in conns]
    assert out[0] is not None
    assert out[1] is out[0]
    assert out[2] is out[0]
    resp = dpb.DeltaDiscoveryResponse.FromString(out[0])
    assert [r.name for r in resp.resources] == [resource_name(pol)]
    assert all(resp.nonce in c.pending for c in conns)
    # Same table version: connection 2 is sent a private response (an on-demand lookup's
    # answer, a newer nonce); the shared encoding of the next change must not go to it with
    # its older nonce.
    srv.publish(Delta(upserts=(pol,)))
    first = srv._build(conns[0], AUTHORIZATION_TYPE)
    srv._handle_request(conns[2], dpb.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE))
    private = srv._build(conns[2], ADDRESS_TYPE)
    third = srv._build(conns[2], AUTHORIZATION_TYPE)
    assert first is not None
    assert private is not None
    assert third is not None
    assert third is not first
    assert third[1:] != first[1:]
    last = srv._build(conns[1], AUTHORIZATION_TYPE)
    assert last is first or last is third  # still one of the encodings, not a third one
    for c in conns:
        mine = [int(n, 16) for n in c.pending]
        assert mine == sorted(mine), mine
        assert len(mine) == len(set(mine)), mine


# The dict route the node proxy used before issue 14 (protobuf -> protobuf-JSON dict -> strict
# `parse_authorization`): the reference the direct decoder must agree with, value or error.
def _reference_authorization(a: Any, path: str) -> Any:
    from meshcore.proto import authorization_pb2 as apb
    from meshcore.proto.convert import _enum_name, _ip_text
    from meshcore.proto.yamlform import parse_authorization

    def sm(m: Any) -> dict[str, Any]:
        which = m.WhichOneof("match_type")
        return (
            {}
            if which is None
            else {"presence": {}}
            if which == "presence"
            else {which: getattr(m, which)}
        )

    def match(m: Any, p: str) -> dict[str, Any]:
        def cidrs(items: Any, f: str) -> list[str]:
            return [
                f"{_ip_text(x.address, f'{p}.{f}[{i}].address')}/{x.length}"
                for i, x in enumerate(items)
            ]

        def sas(items: Any) -> list[dict[str, str]]:
            return [{"namespace": x.namespace, "serviceAccount": x.serviceAccount} for x in items]

        return {
            "namespaces": [sm(x) for x in m.namespaces],
            "notNamespaces": [sm(x) for x in m.not_namespaces],
            "serviceAccounts": sas(m.service_accounts),
            "notServiceAccounts": sas(m.not_service_accounts),
            "principals": [sm(x) for x in m.principals],
            "notPrincipals": [sm(x) for x in m.not_principals],
            "sourceIps": cidrs(m.source_ips, "sourceIps"),
            "notSourceIps": cidrs(m.not_source_ips, "notSourceIps"),
            "destinationIps": cidrs(m.destination_ips, "destinationIps"),
            "notDestinationIps": cidrs(m.not_destination_ips, "notDestinationIps"),
            "destinationPorts": list(m.destination_ports),
            "notDestinationPorts": list(m.not_destination_ports),
        }

    d = {
        "name": a.name,
        "namespace": a.namespace,
        "scope": _enum_name(apb.Scope, a.scope, f"{path}.scope"),
        "action": _enum_name(apb.Action, a.action, f"{path}.action"),
        "rules": [
            {
                "clauses": [
                    {
                        "matches": [
                            match(m, f"{path}.rules[{i}].clauses[{j}].matches[{k}]")
                            for k, m in enumerate(c.matches)
                        ]
                    }
                    for j, c in enumerate(r.clauses)
                ]
            }
            for i, r in enumerate(a.rules)
        ],
    }
    return parse_authorization(d, path)


def _auth_mutations() -> list[tuple[str, Any]]:
    from google.protobuf import empty_pb2

    from meshcore.proto.convert import authorization_pb
    from meshcore.proto.yamlform import parse_authorization

    rich = parse_authorization(
        {
            "name": "rich",
            "namespace": "ns",
            "scope": "NAMESPACE",
            "action": "ALLOW",
            "rules": [
                {
                    "clauses": [
                        {
                            "matches": [
                                {
                                    "namespaces": ["ns-*", "*-x", "exact", "*"],
                                    "notNamespaces": [{"exact": ""}],
                                    "principals": [
                                        "spiffe://td/ns/a/sa/b",
                                        "spiffe://td/*",
                                        "*/sa/c",
                                    ],
                                    "notPrincipals": ["*"],
                                    "serviceAccounts": [{"namespace": "a", "serviceAccount": "b"}],
                                    "notServiceAccounts": [
                                        {"namespace": "c", "serviceAccount": "d"}
                                    ],
                                    "sourceIps": ["10.0.0.0/8", "10.1.2.3", "fd00::/64"],
                                    "notSourceIps": ["::1"],
                                    "destinationIps": ["192.168.0.0/16"],
                                    "notDestinationIps": ["0.0.0.0/0"],
                                    "destinationPorts": [1, 65535],
                                    "notDestinationPorts": [8080],
                                },
                                {},
                            ]
                        },
                        {"matches": []},
                    ]
                },
                {"clauses": []},
            ],
        }
    )
    out: list[tuple[str, Any]] = [("rich", authorization_pb(rich))]
    out += [("policy-" + resource_name(p), authorization_pb(p)) for p in CONFIG.policies]

    def mutate(label: str, fn: Any) -> None:
        pb = authorization_pb(rich)
        fn(pb)
        out.append((label, pb))

    def m0(pb: Any) -> Any:
        return pb.rules[0].clauses[0].matches[0]

    mutate("empty name", lambda pb: setattr(pb, "name", ""))
    mutate("slash name", lambda pb: setattr(pb, "name", "a/b"))
    mutate("empty namespace", lambda pb: setattr(pb, "namespace", ""))
    mutate("slash namespace", lambda pb: setattr(pb, "namespace", "a/b"))
    mutate("unknown scope", lambda pb: setattr(pb, "scope", 7))
    mutate("unknown action", lambda pb: setattr(pb, "action", 9))
    mutate("unset string match", lambda pb: m0(pb).namespaces.add())
    mutate("unset principal", lambda pb: m0(pb).not_principals.add())
    mutate("empty sa namespace", lambda pb: m0(pb).service_accounts.add(serviceAccount="x"))
    mutate("empty sa", lambda pb: m0(pb).not_service_accounts.add(namespace="x"))
    mutate(
        "cidr host bits", lambda pb: m0(pb).source_ips.add(address=b"\x0a\x00\x00\x01", length=8)
    )
    mutate("cidr too long", lambda pb: m0(pb).destination_ips.add(address=b"\x0a" * 4, length=33))
    mutate("ip 5 bytes", lambda pb: m0(pb).not_source_ips.add(address=b"\x01" * 5, length=8))
    mutate("port 0", lambda pb: m0(pb).destination_ports.append(0))
    mutate("port 65536", lambda pb: m0(pb).not_destination_ports.append(65536))
    mutate("presence principal", lambda pb: m0(pb).principals.add(presence=empty_pb2.Empty()))
    return out


@pytest.mark.parametrize(("label", "pb"), _auth_mutations(), ids=lambda x: str(x)[:24])
def test_authorization_direct_decoder_agrees_with_strict_dict_parser(label: str, pb: Any) -> None:
    """Issue 14: Authorization is decoded without the dict detour; every value and every error
    (field path and message) must stay what the strict dict-form parser gives."""
    from meshcore.proto.convert import authorization_from_pb

    try:
        want: Any = _reference_authorization(pb, "p")
    except ConfigError as exc:
        want = ("error", str(exc))
    try:
        got: Any = authorization_from_pb(pb, "p")
    except ConfigError as exc:
        got = ("error", str(exc))
    assert got == want, label
