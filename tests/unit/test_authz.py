"""Tests for meshcore.authz: Istio/ztunnel L4 RBAC semantics as a table."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from meshcore.authz import ConnectionInfo, evaluate, policy_matches
from meshcore.identity import SpiffeId
from meshcore.model import Authorization, MatchKind, StringMatch
from meshcore.proto.yamlform import parse_authorization

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
OTHER = "spiffe://cluster.local/ns/other/sa/bot"
FOREIGN = "spiffe://td.example/ns/default/sa/sleep"


def conn(
    identity: str | None = SLEEP,
    src: str = "127.0.1.10",
    dst: str = "127.0.2.10",
    port: int = 8080,
) -> ConnectionInfo:
    return ConnectionInfo(
        src_identity=SpiffeId.parse(identity) if identity else None,
        src_ip=ipaddress.ip_address(src),
        dst_ip=ipaddress.ip_address(dst),
        dst_port=port,
    )


def pol(
    match: dict[str, Any] | None = None,
    *,
    action: str = "ALLOW",
    name: str = "p",
    rules: list[Any] | None = None,
) -> Authorization:
    if rules is None:
        rules = [{"clauses": [{"matches": [match or {}]}]}]
    return parse_authorization(
        {
            "name": name,
            "namespace": "default",
            "scope": "NAMESPACE",
            "action": action,
            "rules": rules,
        }
    )


# (description, policy, connection, expected policy_matches)
MATCH_TABLE: list[tuple[str, Authorization, ConnectionInfo, bool]] = [
    # principals
    ("principal exact", pol({"principals": ["cluster.local/ns/default/sa/sleep"]}), conn(), True),
    (
        "principal exact other",
        pol({"principals": ["cluster.local/ns/default/sa/sleep"]}),
        conn(OTHER),
        False,
    ),
    ("principal with scheme", pol({"principals": [SLEEP]}), conn(), True),
    ("principal trust domain matters", pol({"principals": [SLEEP]}), conn(FOREIGN), False),
    ("principal presence", pol({"principals": ["*"]}), conn(OTHER), True),
    ("principal presence plaintext", pol({"principals": ["*"]}), conn(None), False),
    ("principal prefix", pol({"principals": ["cluster.local/ns/default/*"]}), conn(), True),
    (
        "principal prefix other ns",
        pol({"principals": ["cluster.local/ns/default/*"]}),
        conn(OTHER),
        False,
    ),
    ("principal suffix", pol({"principals": ["*/sa/sleep"]}), conn(FOREIGN), True),
    ("principal plaintext exact", pol({"principals": [SLEEP]}), conn(None), False),
    ("principal ORed values", pol({"principals": [OTHER, SLEEP]}), conn(), True),
    ("not_principal excludes", pol({"notPrincipals": [SLEEP]}), conn(), False),
    ("not_principal other passes", pol({"notPrincipals": [SLEEP]}), conn(OTHER), True),
    ("not_principal plaintext passes", pol({"notPrincipals": [SLEEP]}), conn(None), True),
    ("not_principal presence = plaintext only", pol({"notPrincipals": ["*"]}), conn(None), True),
    ("not_principal presence vs mTLS", pol({"notPrincipals": ["*"]}), conn(), False),
    # namespaces
    ("namespace exact", pol({"namespaces": ["default"]}), conn(), True),
    ("namespace exact other", pol({"namespaces": ["default"]}), conn(OTHER), False),
    ("namespace plaintext", pol({"namespaces": ["default"]}), conn(None), False),
    ("namespace presence plaintext", pol({"namespaces": ["*"]}), conn(None), False),
    (
        "namespace raw empty prefix plaintext",
        pol({"namespaces": [{"prefix": ""}]}),
        conn(None),
        False,
    ),
    ("namespace prefix", pol({"namespaces": ["def*"]}), conn(), True),
    ("not_namespace plaintext", pol({"notNamespaces": ["default"]}), conn(None), True),
    ("not_namespace same", pol({"notNamespaces": ["default"]}), conn(), False),
    ("not_namespace other", pol({"notNamespaces": ["default"]}), conn(OTHER), True),
    # service accounts
    (
        "sa match",
        pol({"serviceAccounts": [{"namespace": "default", "serviceAccount": "sleep"}]}),
        conn(),
        True,
    ),
    (
        "sa any trust domain",
        pol({"serviceAccounts": [{"namespace": "default", "serviceAccount": "sleep"}]}),
        conn(FOREIGN),
        True,
    ),
    (
        "sa mismatch",
        pol({"serviceAccounts": [{"namespace": "default", "serviceAccount": "sleep"}]}),
        conn(OTHER),
        False,
    ),
    (
        "sa plaintext",
        pol({"serviceAccounts": [{"namespace": "default", "serviceAccount": "sleep"}]}),
        conn(None),
        False,
    ),
    (
        "not_sa same",
        pol({"notServiceAccounts": [{"namespace": "default", "serviceAccount": "sleep"}]}),
        conn(),
        False,
    ),
    (
        "not_sa plaintext",
        pol({"notServiceAccounts": [{"namespace": "default", "serviceAccount": "sleep"}]}),
        conn(None),
        True,
    ),
    # IPs and ports
    ("source ip host", pol({"sourceIps": ["127.0.1.10"]}), conn(), True),
    ("source ip other", pol({"sourceIps": ["127.0.1.11"]}), conn(), False),
    ("source cidr", pol({"sourceIps": ["127.0.1.0/24"]}), conn(src="127.0.1.200"), True),
    ("source cidr outside", pol({"sourceIps": ["127.0.1.0/24"]}), conn(src="127.0.2.1"), False),
    ("not source cidr", pol({"notSourceIps": ["127.0.1.0/24"]}), conn(), False),
    (
        "not source cidr outside",
        pol({"notSourceIps": ["127.0.1.0/24"]}),
        conn(src="10.0.0.1"),
        True,
    ),
    ("ipv6 source vs v4 cidr", pol({"sourceIps": ["127.0.0.0/8"]}), conn(src="::1"), False),
    ("ipv6 source cidr", pol({"sourceIps": ["::/0"]}), conn(src="::1"), True),
    ("destination ip", pol({"destinationIps": ["127.0.2.10"]}), conn(), True),
    ("destination ip other", pol({"destinationIps": ["127.0.2.11"]}), conn(), False),
    ("not destination ip", pol({"notDestinationIps": ["127.0.2.10"]}), conn(), False),
    ("destination port", pol({"destinationPorts": [8080]}), conn(), True),
    ("destination port other", pol({"destinationPorts": [80]}), conn(), False),
    ("destination ports ORed", pol({"destinationPorts": [80, 8080]}), conn(), True),
    ("not destination port", pol({"notDestinationPorts": [8080]}), conn(), False),
    ("not destination port other", pol({"notDestinationPorts": [80]}), conn(), True),
    # combinations inside one match: kinds AND
    (
        "principal AND port ok",
        pol({"principals": [SLEEP], "destinationPorts": [8080]}),
        conn(),
        True,
    ),
    (
        "principal AND port wrong port",
        pol({"principals": [SLEEP], "destinationPorts": [80]}),
        conn(),
        False,
    ),
    (
        "positive and negative same field",
        pol({"namespaces": ["*"], "notNamespaces": ["other"]}),
        conn(),
        True,
    ),
    (
        "positive and negative same field hit",
        pol({"namespaces": ["*"], "notNamespaces": ["other"]}),
        conn(OTHER),
        False,
    ),
    # structure
    ("empty match matches nothing", pol({}), conn(), False),
    ("no rules matches nothing", pol(rules=[]), conn(), False),
    ("rule without clauses matches all", pol(rules=[{}]), conn(None), True),
    ("clause without matches matches all", pol(rules=[{"clauses": [{}]}]), conn(None), True),
    (
        "empty match skipped, next matches",
        pol(rules=[{"clauses": [{"matches": [{}, {"destinationPorts": [8080]}]}]}]),
        conn(),
        True,
    ),
    (
        "clauses AND: both hold",
        pol(
            rules=[
                {
                    "clauses": [
                        {"matches": [{"namespaces": ["default"]}]},
                        {"matches": [{"destinationPorts": [8080]}]},
                    ]
                }
            ]
        ),
        conn(),
        True,
    ),
    (
        "clauses AND: one fails",
        pol(
            rules=[
                {
                    "clauses": [
                        {"matches": [{"namespaces": ["default"]}]},
                        {"matches": [{"destinationPorts": [80]}]},
                    ]
                }
            ]
        ),
        conn(),
        False,
    ),
    (
        "matches OR within a clause",
        pol(rules=[{"clauses": [{"matches": [{"namespaces": ["a"]}, {"namespaces": ["other"]}]}]}]),
        conn(OTHER),
        True,
    ),
    (
        "rules OR",
        pol(
            rules=[
                {"clauses": [{"matches": [{"destinationPorts": [1]}]}]},
                {"clauses": [{"matches": [{"principals": [OTHER]}]}]},
            ]
        ),
        conn(OTHER),
        True,
    ),
    (
        "rules OR: none",
        pol(
            rules=[
                {"clauses": [{"matches": [{"destinationPorts": [1]}]}]},
                {"clauses": [{"matches": [{"principals": [OTHER]}]}]},
            ]
        ),
        conn(),
        False,
    ),
]


@pytest.mark.parametrize(
    ("policy", "connection", "expected"),
    [pytest.param(p, c, e, id=d) for d, p, c, e in MATCH_TABLE],
)
def test_policy_matches(policy: Authorization, connection: ConnectionInfo, expected: bool) -> None:
    assert policy_matches(policy, connection) is expected


ALLOW_SLEEP = pol({"principals": [SLEEP]}, name="allow-sleep")
ALLOW_PORT_80 = pol({"destinationPorts": [80]}, name="allow-80")
DENY_PLAINTEXT = pol({"notPrincipals": ["*"]}, action="DENY", name="strict")
DENY_OTHER_NS = pol({"namespaces": ["other"]}, action="DENY", name="deny-other")
ALLOW_NOTHING = pol(rules=[], name="allow-nothing")
DENY_NOTHING = pol(rules=[], action="DENY", name="deny-nothing")
DENY_ALL = pol(rules=[{}], action="DENY", name="deny-all")
ALLOW_ALL = pol(rules=[{}], name="allow-all")

# (description, policies, connection, allowed, deciding policy key)
EVAL_TABLE: list[tuple[str, list[Authorization], ConnectionInfo, bool, str | None]] = [
    ("no policies allows", [], conn(None), True, None),
    ("only non-matching DENY allows", [DENY_OTHER_NS], conn(), True, None),
    ("matching DENY denies", [DENY_OTHER_NS], conn(OTHER), False, "default/deny-other"),
    ("ALLOW match allows", [ALLOW_SLEEP], conn(), True, "default/allow-sleep"),
    ("ALLOW no match denies", [ALLOW_SLEEP], conn(OTHER), False, None),
    ("ALLOW plaintext denies", [ALLOW_SLEEP], conn(None), False, None),
    (
        "any ALLOW suffices",
        [ALLOW_SLEEP, ALLOW_PORT_80],
        conn(OTHER, port=80),
        True,
        "default/allow-80",
    ),
    ("DENY beats ALLOW", [ALLOW_ALL, DENY_OTHER_NS], conn(OTHER), False, "default/deny-other"),
    (
        "DENY first regardless of order",
        [DENY_OTHER_NS, ALLOW_SLEEP],
        conn(),
        True,
        "default/allow-sleep",
    ),
    ("allow-nothing denies everything", [ALLOW_NOTHING], conn(), False, None),
    ("deny-nothing denies nothing", [DENY_NOTHING], conn(None), True, None),
    ("deny-all denies", [DENY_ALL, ALLOW_SLEEP], conn(), False, "default/deny-all"),
    ("STRICT denies plaintext", [DENY_PLAINTEXT], conn(None), False, "default/strict"),
    ("STRICT lets mTLS through", [DENY_PLAINTEXT], conn(OTHER), True, None),
    (
        "allow-nothing + allow-sleep",
        [ALLOW_NOTHING, ALLOW_SLEEP],
        conn(),
        True,
        "default/allow-sleep",
    ),
]


@pytest.mark.parametrize(
    ("policies", "connection", "allowed", "policy"),
    [pytest.param(ps, c, a, k, id=d) for d, ps, c, a, k in EVAL_TABLE],
)
def test_evaluate(
    policies: list[Authorization], connection: ConnectionInfo, allowed: bool, policy: str | None
) -> None:
    d = evaluate(policies, connection)
    assert d.allowed is allowed
    assert d.policy == policy
    assert d.reason


def test_decision_reasons_name_policies() -> None:
    d = evaluate([ALLOW_SLEEP, ALLOW_PORT_80], conn(OTHER))
    assert not d.allowed
    assert "default/allow-sleep" in d.reason
    assert "default/allow-80" in d.reason
    d = evaluate([DENY_PLAINTEXT], conn(None))
    assert d.reason == "denied by DENY policy default/strict"
    assert evaluate((), conn()).reason == "no ALLOW policy applies"


@pytest.mark.parametrize(
    ("matcher", "candidate", "expected"),
    [
        (StringMatch(kind=MatchKind.EXACT, value="foo"), "foo", True),
        (StringMatch(kind=MatchKind.EXACT, value="foo"), "not", False),
        (StringMatch(kind=MatchKind.EXACT, value="foo"), "", False),
        (StringMatch(kind=MatchKind.PREFIX, value="foo"), "foobar", True),
        (StringMatch(kind=MatchKind.PREFIX, value="foo"), "notfoo", False),
        (StringMatch(kind=MatchKind.PREFIX, value="foo"), "", False),
        (StringMatch(kind=MatchKind.SUFFIX, value="foo"), "barfoo", True),
        (StringMatch(kind=MatchKind.SUFFIX, value="foo"), "foonot", False),
        (StringMatch(kind=MatchKind.SUFFIX, value="foo"), "", False),
        (StringMatch(kind=MatchKind.PRESENCE), "foo", True),
        (StringMatch(kind=MatchKind.PRESENCE), "", False),
    ],
)
def test_string_match(matcher: StringMatch, candidate: str, expected: bool) -> None:
    assert matcher.matches(candidate) is expected
