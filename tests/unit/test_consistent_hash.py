"""Consistent-hash load balancing (DestinationRule loadBalancer.consistentHash)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml

from meshcore.config.objects import parse_objects
from meshcore.config.routes import TrafficPolicy
from meshcore.identity import SpiffeId
from tests.waypoint_fixtures import destination_rule, dr_policy, parsed
from waypoint.protocol.cluster import Cluster, EndpointSpec, hash_cookie, hash_key, maglev_table

ID = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="r")


def dr(hash_spec: str) -> TrafficPolicy:
    return dr_policy(f"{{loadBalancer: {{consistentHash: {hash_spec}}}}}")


def cluster(policy: TrafficPolicy, n: int) -> Cluster:
    c = Cluster(name="c", policy=policy)
    c.update(
        [EndpointSpec(uid=f"ep{i}", ip=f"10.0.0.{i}", port=80, identity=ID) for i in range(n)],
        policy,
    )
    return c


def test_header_key_is_sticky_spread_and_moves_only_the_removed_endpoints_keys() -> None:
    # main: consistentHash was refused (the DestinationRule was not applied at all).
    policy = dr("{httpHeaderName: x-user}")
    assert policy.hash is not None
    assert policy.hash.header == "x-user"
    c = cluster(policy, 5)
    rng = random.Random(1)
    first = {}
    for u in range(500):
        key = hash_key(policy.hash, [("x-user", f"u{u}")], "/", "10.1.1.1")
        ep = c.pick(0.0, rng, (), key)
        assert ep is not None
        first[u] = ep.uid
        assert all(c.pick(0.0, rng, (), key) is ep for _ in range(3))  # sticky
    spread = Counter(first.values())
    assert len(spread) == 5
    assert min(spread.values()) > 50
    # Remove ep2: its keys move; most others stay (the ring is re-spread over 4 endpoints, as
    # Envoy's ring is; a modulo hash would move ~80% of them).
    c.update(
        [EndpointSpec(uid=f"ep{i}", ip=f"10.0.0.{i}", port=80, identity=ID) for i in (0, 1, 3, 4)],
        policy,
    )
    kept = moved = 0
    for u, uid in first.items():
        key = hash_key(policy.hash, [("x-user", f"u{u}")], "/", "")
        got = c.pick(0.0, rng, (), key)
        assert got is not None
        assert got.uid != "ep2"
        if uid != "ep2":
            kept += got.uid == uid
            moved += got.uid != uid
    assert kept / (kept + moved) > 0.7, (kept, moved)
    # An ejected endpoint is skipped; a retry avoids the tried one.
    key = hash_key(policy.hash, [("x-user", "u1")], "/", "")
    home = c.pick(0.0, rng, (), key)
    assert home is not None
    assert c.pick(0.0, rng, (home.uid,), key) is not home


@pytest.mark.parametrize(
    ("spec", "headers", "target", "ip", "want"),
    [
        ("{useSourceIp: true}", [], "/", "10.1.1.1", b"10.1.1.1"),
        ("{httpQueryParameterName: user}", [], "/a?x=1&user=bob", "", b"bob"),
        ("{httpQueryParameterName: user}", [], "/a?x=1", "", None),
        ("{httpCookie: {name: sid, ttl: 0s}}", [("cookie", "a=1; sid=xyz")], "/", "", b"xyz"),
        ("{httpCookie: {name: sid}}", [("cookie", "a=1")], "/", "", None),
        ("{httpHeaderName: X-User, ringHash: {minimumRingSize: 64}}", [], "/", "", None),
    ],
)
def test_keys(
    spec: str, headers: list[tuple[str, str]], target: str, ip: str, want: bytes | None
) -> None:
    assert hash_key(dr(spec).hash, headers, target, ip) == want


def test_exactly_one_key() -> None:
    text = destination_rule(
        """
trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}
""",
        name="r",
    )
    cfg = parse_objects(list(yaml.safe_load_all(text)))
    assert cfg.destination_rules == ()
    assert cfg.findings


def test_cookie_generation_fields_and_set_cookie() -> None:
    # main: ttl/path/attributes were only warned about; no cookie was ever generated.
    h = dr(
        "{httpCookie: {name: sid, ttl: 3600s, path: /shop, "
        "attributes: [{name: SameSite, value: Strict}, {name: Secure}]}}"
    ).hash
    assert h is not None
    assert (h.cookie, h.cookie_ttl, h.cookie_path) == ("sid", 3600.0, "/shop")
    assert h.cookie_attributes == (("SameSite", "Strict"), ("Secure", ""))
    key, header = hash_cookie(h, random.Random(7))
    value = key.decode()
    assert len(value) == 16
    assert int(value, 16) >= 0
    assert header == f'sid="{value}"; Max-Age=3600; Path=/shop; SameSite=Strict; Secure; HttpOnly'
    # The client sends it back (quoted, as set): the same key, so the same endpoint.
    assert hash_key(h, [("cookie", f'sid="{value}"')], "/", "") == key
    session = dr("{httpCookie: {name: sid, ttl: 0s}}").hash
    assert session is not None
    assert hash_cookie(session, random.Random(1))[1].endswith('"; HttpOnly')  # no Max-Age


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("{httpCookie: {name: 'a b'}}", "cookie name"),
        ("{httpCookie: {name: sid, attributes: [{name: x, value: 'a;b'}]}}", "attribute"),
        ("{httpCookie: {name: sid, path: '/a b'}}", "cookie path"),
        ("{httpHeaderName: x, maglev: {tableSize: 1000}}", "prime"),
        ("{httpHeaderName: x, maglev: {tableSize: 131071}}", "65537"),
    ],
)
def test_bad_cookie_and_maglev_settings_are_refused(spec: str, error: str) -> None:
    policy = f"trafficPolicy: {{loadBalancer: {{consistentHash: {spec}}}}}"
    cfg = parsed(destination_rule(policy, name="r"))
    assert cfg.destination_rules == ()
    assert any(error in f.render() for _r, f in cfg.findings), cfg.findings


def test_maglev_table_is_even_and_moves_only_the_removed_endpoints_keys() -> None:
    # main: maglev was served by the ring (no table, tableSize only sized the ring).
    table = maglev_table([f"ep{i}" for i in range(7)], 65537)
    counts = Counter(table)
    assert len(counts) == 7
    assert max(counts.values()) - min(counts.values()) <= 1
    policy = dr("{httpHeaderName: x-user, maglev: {tableSize: 4099}}")
    assert policy.hash is not None
    assert policy.hash.maglev
    assert policy.hash.ring_size == 4099
    c = cluster(policy, 5)
    rng = random.Random(3)
    keys = [hash_key(policy.hash, [("x-user", f"u{u}")], "/", "") for u in range(2000)]
    first = {}
    for k in keys:
        assert k is not None
        ep = c.pick(0.0, rng, (), k)
        assert ep is not None
        first[k] = ep.uid
    spread = Counter(first.values())
    assert len(spread) == 5, spread
    assert min(spread.values()) > 300, spread
    # An ejected endpoint: only its keys move (re-hashed); every other key stays put.
    c.endpoints["ep2"].ejected_until = 10.0
    for k, uid in first.items():
        got = c.pick(1.0, rng, (), k)
        assert got is not None
        assert got.uid != "ep2"
        if uid != "ep2":
            assert got.uid == uid
    # A retry avoids the tried endpoint.
    k = keys[0]
    home = c.pick(20.0, rng, (), k)
    assert home is not None
    assert c.pick(20.0, rng, (home.uid,), k) is not home


def test_a_ring_larger_than_served_is_reported() -> None:
    text = destination_rule(
        """
trafficPolicy:
  loadBalancer: {consistentHash: {httpHeaderName: x, ringHash: {minimumRingSize: 1000000}}}
""",
        name="r",
    )
    cfg = parse_objects(list(yaml.safe_load_all(text)))
    (rule,) = cfg.destination_rules
    assert rule.policy.hash is not None
    assert rule.policy.hash.ring_size == 65537
    assert any("65537" in f.render() and f.level == "Warning" for _r, f in cfg.findings)
