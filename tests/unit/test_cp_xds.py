"""Wire layer (pure parts): model <-> protobuf, pre-encoded delta responses, per-resource
apply/NACK on the client, and the CA's signing decision."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf import any_pb2, struct_pb2

from controlplane.auth import NodeCredentials, bearer_token
from controlplane.ca import CertificateService, IssuancePolicy
from controlplane.errors import InvalidRequest, PermissionDenied, Unauthenticated
from controlplane.translate import Delta, Record
from controlplane.xds import ResourceTable, encode_response
from meshcore.ca import MeshCA, generate_csr
from meshcore.caclient import build_request, parse_response
from meshcore.certs import split_pem_chain, utcnow
from meshcore.errors import CertificateError, ConfigError
from meshcore.identity import SpiffeId
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto import workload_pb2
from meshcore.proto.convert import ADDRESS_TYPE, AUTHORIZATION_TYPE, pack, resource_name, unpack
from meshcore.proto.yamlform import parse_mesh_config
from meshcore.state import MeshState
from meshcore.xds import ControlPlaneEndpoint, apply_response
from tests.loopback.harness import mesh_config

POLICY = {
    "name": "p", "namespace": "default", "scope": "WORKLOAD_SELECTOR", "action": "DENY",
    "rules": [{"clauses": [{"matches": [
        {"notPrincipals": ["*"], "sourceIps": ["10.0.0.0/8", "fd00::/64"],
         "principals": ["cluster.local/ns/*"], "destinationPorts": [80],
         "serviceAccounts": [{"namespace": "a", "serviceAccount": "b"}]},
    ]}]}],
}  # fmt: skip
CONFIG = parse_mesh_config(mesh_config(policies=[POLICY]))
RECORDS: list[Record] = [*CONFIG.workloads, *CONFIG.services, *CONFIG.policies]


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
        type_url=ADDRESS_TYPE, nonce="7", system_version="3",
        resources=[e.wire for e in table.types[ADDRESS_TYPE].values()], removed=["gone"],
    )  # fmt: skip
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
    bad.Pack(workload_pb2.Address(workload=workload_pb2.Workload(
        uid="bad", name="bad", namespace="default", addresses=[b"\x01"])),
        type_url_prefix="type.googleapis.com/")  # fmt: skip
    new_wl = CONFIG.workloads[0].__class__(
        uid="new", name="new", namespace="default", addresses=CONFIG.workloads[0].addresses[:0],
        hostname="new.example",
    )  # fmt: skip
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
    cert = parse_response(sleep, key, chain)
    assert cert.identity == sleep
    assert cert.not_after > utcnow()
    echo = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo")
    with pytest.raises(
        CertificateError, match=r"expected spiffe://cluster\.local/ns/default/sa/echo"
    ):
        parse_response(echo, key, chain)
    with pytest.raises(CertificateError):
        parse_response(sleep, key, chain[:1])
    # CSR SAN must equal the impersonated identity.
    _, echo_csr = generate_csr(echo)
    with pytest.raises(InvalidRequest):
        svc.sign(grant, echo_csr.decode())
    meta = struct_pb2.Struct()
    meta.fields["ImpersonatedIdentity"].number_value = 3
    with pytest.raises(InvalidRequest):
        svc.decide("a" * 20, build_request(sleep, csr, timedelta(hours=1)).__class__(
            csr=csr.decode(), metadata=meta))  # fmt: skip


def test_endpoint_rereads_a_rotated_token_file(tmp_path: Path) -> None:
    """Projected service-account tokens are rotated on disk: every call reads the file again."""
    token = tmp_path / "token"
    token.write_text("first\n")
    ep = ControlPlaneEndpoint(address="127.0.0.1:1", token="first", token_file=token)
    assert ep.metadata() == (("authorization", "Bearer first"),)
    token.write_text("rotated\n")
    assert ep.metadata() == (("authorization", "Bearer rotated"),)
    assert ControlPlaneEndpoint(address="x:1").metadata() == ()
