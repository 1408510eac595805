"""SPIFFE ID parsing/formatting (meshcore.identity)."""

from __future__ import annotations

import dataclasses

import pytest

from meshcore.errors import IdentityError, MeshError
from meshcore.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, validate_trust_domain

VALID = [
    ("spiffe://cluster.local/ns/default/sa/default", "cluster.local", "default", "default"),
    (
        "spiffe://cluster.local/ns/istio-system/sa/ztunnel",
        "cluster.local",
        "istio-system",
        "ztunnel",
    ),
    ("spiffe://example.org/ns/a/sa/b", "example.org", "a", "b"),
    (
        "spiffe://td_with-all.chars09/ns/n.s-1_x/sa/S.A-2_y",
        "td_with-all.chars09",
        "n.s-1_x",
        "S.A-2_y",
    ),
    ("spiffe://x/ns/ns/sa/sa", "x", "ns", "sa"),
    ("spiffe://a/ns/.../sa/..x", "a", "...", "..x"),
]


@pytest.mark.parametrize(("text", "td", "ns", "sa"), VALID)
def test_parse_valid_round_trips(text: str, td: str, ns: str, sa: str) -> None:
    parsed = SpiffeId.parse(text)
    assert parsed == SpiffeId(trust_domain=td, namespace=ns, service_account=sa)
    assert str(parsed) == text
    assert parsed.uri == text


INVALID = [
    ("", "empty"),
    ("cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    ("http://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    ("spiffe:/cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    (" spiffe://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    ("spiffe://", "no trust domain"),
    ("spiffe:///ns/a/sa/b", "no trust domain"),
    ("spiffe://cluster.local", "no /ns/<namespace>/sa/<service-account> path"),
    ("spiffe://cluster.local/", "no /ns/<namespace>/sa/<service-account> path"),
    ("spiffe://Cluster.local/ns/a/sa/b", "lowercase letters"),
    ("spiffe://clus ter/ns/a/sa/b", "lowercase letters"),
    ("spiffe://cluster%2Elocal/ns/a/sa/b", "lowercase letters"),
    ("spiffe://cluster.local:8443/ns/a/sa/b", "may not have a port"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "may not have userinfo"),
    ("spiffe://cluster.local/ns/a", "path must be /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/ns/a/sa", "path must be /ns/<namespace>/sa/<service-account>"),
    ("spiffe://cluster.local/sa/b/ns/a", "must start with /ns/"),
    ("spiffe://cluster.local/NS/a/sa/b", "must start with /ns/"),
    ("spiffe://cluster.local/ns/a/SA/b", "must have /sa/"),
    ("spiffe://cluster.local/ns/a/xx/b", "must have /sa/"),
    ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
    ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
    ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
    ("spiffe://cluster.local/ns/a/sa/b/c", "extra path segments"),
    ("spiffe://cluster.local//ns/a/sa/b", "empty segment"),
    ("spiffe://cluster.local/x/ns/a/sa/b", "extra path segments"),
    ("spiffe://cluster.local/ns/./sa/b", "dot segment"),
    ("spiffe://cluster.local/ns/a/sa/..", "dot segment"),
    ("spiffe://cluster.local/ns/a b/sa/b", "namespace 'a b' may only contain"),
    ("spiffe://cluster.local/ns/a/sa/b%20", "service account 'b%20' may only contain"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query or fragment"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "query or fragment"),
    ("spiffe://cluster.local/ns/ä/sa/b", "namespace 'ä' may only contain"),
    ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "longer than 255 bytes"),
    ("spiffe://cluster.local/ns/a/sa/" + "b" * 2048, "longer than 2048 bytes"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_parse_invalid(text: str, message: str) -> None:
    with pytest.raises(IdentityError) as info:
        SpiffeId.parse(text)
    assert message in str(info.value)
    assert isinstance(info.value, MeshError)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(IdentityError, match="must be a string"):
        SpiffeId.parse(b"spiffe://cluster.local/ns/a/sa/b")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("td", "ns", "sa", "message"),
    [
        ("", "a", "b", "trust domain is empty"),
        ("UPPER", "a", "b", "lowercase"),
        ("td", "", "b", "namespace is empty"),
        ("td", "a/b", "c", "may only contain"),
        ("td", "a", "", "service account is empty"),
        ("td", "a", "..", "dot segment"),
    ],
)
def test_constructor_validates(td: str, ns: str, sa: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        SpiffeId(trust_domain=td, namespace=ns, service_account=sa)


def test_value_semantics() -> None:
    a = SpiffeId(trust_domain="cluster.local", namespace="a", service_account="b")
    b = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.namespace = "c"  # type: ignore[misc]
    with pytest.raises(TypeError):
        SpiffeId("cluster.local", "a", "b")  # type: ignore[call-arg]
    ids = [SpiffeId.parse(f"spiffe://cluster.local/ns/{n}/sa/x") for n in ("c", "a", "b")]
    assert [i.namespace for i in sorted(ids)] == ["a", "b", "c"]


def test_defaults_and_trust_domain_validation() -> None:
    assert DEFAULT_TRUST_DOMAIN == "cluster.local"
    assert validate_trust_domain("example.org") == "example.org"
    with pytest.raises(IdentityError):
        validate_trust_domain("example.org:443")
