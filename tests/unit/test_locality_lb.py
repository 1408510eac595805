"""Locality-aware load balancing (DestinationRule localityLbSetting): priorities by locality
and failoverPriority labels, Envoy's health spill-over as endpoints are ejected, distribute
weights, and the rules' validation (pure: clock and rng injected)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshcore.config.routes import TrafficPolicy
from meshcore.identity import SpiffeId
from tests.waypoint_fixtures import destination_rule, dr_policy, parsed
from waypoint.protocol.cluster import Cluster, EndpointSpec, Origin, priorities

ID = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="r")
OD = """
    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 30s, maxEjectionPercent: 100}"""
FAILOVER = (
    OD
    + """
    loadBalancer: {localityLbSetting: {failover: [{from: region1, to: region2}]}}"""
)
ORIGIN = Origin(
    locality=("region1", "zone1", ""), network="n1", labels=(("app", "wp"), ("tier", "gold"))
)
# uid -> (region, zone, subzone)
EPS = {
    "a": ("region1", "zone1", ""),
    "b": ("region1", "zone1", ""),
    "c": ("region1", "zone2", ""),
    "d": ("region2", "zone3", ""),
    "e": ("region3", "zone4", ""),
}


def policy(tp: str) -> TrafficPolicy:
    return dr_policy(tp.lstrip(" "))


def specs(labels: dict[str, tuple[tuple[str, str], ...]] | None = None) -> list[EndpointSpec]:
    return [
        EndpointSpec(
            uid=u,
            ip=f"10.0.0.{i}",
            port=80,
            identity=ID,
            locality=loc,
            network="n1",
            labels=(labels or {}).get(u, ()),
        )
        for i, (u, loc) in enumerate(EPS.items())
    ]


def cluster(pol: TrafficPolicy, origin: Origin = ORIGIN) -> Cluster:
    c = Cluster(name="c", policy=pol)
    c.update(specs(), pol, origin)
    return c


def picks(c: Cluster, n: int = 2000, now: float = 0.0) -> Counter[str]:
    rng = random.Random(5)
    out: Counter[str] = Counter()
    for _ in range(n):
        ep = c.pick(now, rng)
        assert ep is not None
        out[ep.uid] += 1
    return out


def eject(c: Cluster, *uids: str) -> None:
    for u in uids:
        c.endpoints[u].ejected_until = 100.0


def test_istio_priorities_with_and_without_a_failover_rule() -> None:
    # The Istio task's table: 0 same zone, 2 other zone, 3 failover region, 4 others.
    pol = policy(FAILOVER)
    assert priorities(pol, ORIGIN, specs()) == [0, 0, 2, 3, 4]
    plain = policy(OD)
    assert priorities(plain, ORIGIN, specs()) == [0, 0, 2, 3, 3]


def test_failover_moves_traffic_only_as_endpoints_are_ejected() -> None:
    # main: localityLbSetting was refused (the DestinationRule was not applied).
    pol = policy(FAILOVER)
    c = cluster(pol)
    assert set(picks(c)) == {"a", "b"}  # all healthy: the waypoint's zone only
    eject(c, "a")
    # Priority 0 is 50% healthy: 1.4 x 50 = 70% stays, 30% spills to zone2.
    got = picks(c, now=1.0)
    assert set(got) == {"b", "c"}
    assert 0.65 < got["b"] / 2000 < 0.75, got
    eject(c, "b")
    assert set(picks(c, now=1.0)) == {"c"}
    eject(c, "c")
    assert set(picks(c, now=1.0)) == {"d"}  # the failover region, not region3
    eject(c, "d")
    assert set(picks(c, now=1.0)) == {"e"}
    eject(c, "e")
    assert set(picks(c, now=1.0)) == set(EPS)  # all ejected: panic over all
    assert set(picks(c, now=200.0)) == {"a", "b"}  # ejections over: home again


def test_without_outlier_detection_there_is_no_failover_priority() -> None:
    # Istio applies locality failover only with outlierDetection.
    c = cluster(policy(" {loadBalancer: {simple: ROUND_ROBIN}}"))
    assert set(picks(c, 50)) == set(EPS)
    off = cluster(policy(OD + "\n    loadBalancer: {localityLbSetting: {enabled: false}}"))
    assert set(picks(off, 200)) == set(EPS)


def test_failover_priority_labels() -> None:
    pol = policy(
        OD + "\n    loadBalancer: {localityLbSetting: {failoverPriority: "
        "[topology.kubernetes.io/region, tier]}}"
    )
    gold: tuple[tuple[str, str], ...] = (("tier", "gold"),)
    labels = {"a": gold, "c": gold, "d": gold}
    # region1+gold: a, c -> 0; region1 only: b -> 1; others -> 2.
    assert priorities(pol, ORIGIN, specs(labels)) == [0, 1, 0, 2, 2]
    c = Cluster(name="c", policy=pol)
    c.update(specs(labels), pol, ORIGIN)
    assert set(picks(c)) == {"a", "c"}
    eject(c, "a", "c")
    assert set(picks(c, now=1.0)) == {"b"}


def test_failover_priority_label_value_matches_the_endpoint_not_the_client() -> None:
    # Istio: "Specify labels with key and value [key1=value1, ...], istio would compare the
    # labels with endpoints": the client (network n1, tier gold) does not take part.
    pol = policy(
        OD + "\n    loadBalancer: {localityLbSetting: {failoverPriority: "
        "['topology.istio.io/network=n2', tier=silver]}}"
    )
    eps = [
        EndpointSpec(uid=u, ip=f"10.0.0.{i}", port=80, identity=ID, network=net, labels=lab)
        for i, (u, net, lab) in enumerate(
            [
                ("a", "n1", (("tier", "silver"),)),
                ("b", "n1", (("tier", "gold"),)),
                ("c", "n2", (("tier", "silver"),)),
                ("d", "n2", (("tier", "gold"),)),
                ("e", "n2", ()),
            ]
        )
    ]
    assert priorities(pol, ORIGIN, eps) == [2, 2, 0, 1, 1]
    c = Cluster(name="c", policy=pol)
    c.update(eps, pol, ORIGIN)
    assert set(picks(c)) == {"c"}
    eject(c, "c")
    assert set(picks(c, now=1.0)) == {"d", "e"}


def test_failover_priority_label_missing_on_both_sides_matches() -> None:
    # Istio compares label maps (a missing key is ""): the waypoint has no "rack" label, so an
    # endpoint without one matches and one with a rack does not. Before, neither matched.
    pol = policy(OD + "\n    loadBalancer: {localityLbSetting: {failoverPriority: [rack, tier]}}")
    eps = [
        EndpointSpec(uid=u, ip=f"10.0.0.{i}", port=80, identity=ID, labels=lab)
        for i, (u, lab) in enumerate(
            [
                ("a", (("rack", "r1"), ("tier", "gold"))),
                ("b", (("tier", "gold"),)),
                ("c", ()),
            ]
        )
    ]
    assert priorities(pol, ORIGIN, eps) == [2, 0, 1]


def test_failover_priority_with_failover_orders_localities_within_each_label_priority() -> None:
    # Istio (ApplyLocalityLoadBalancer): failoverPriority first, then locality failover
    # within each of its priorities (label priority x 5 + locality priority).
    pol = policy(
        OD + "\n    loadBalancer: {localityLbSetting: {failoverPriority: [tier], "
        "failover: [{from: region1, to: region2}]}}"
    )
    gold: tuple[tuple[str, str], ...] = (("tier", "gold"),)
    labels = {"c": gold, "d": gold, "e": gold}
    # gold: c (region1/zone2) 2, d (failover region) 3, e (other region) 4; not gold: a, b
    # (the waypoint's zone) 5 + 0.
    assert priorities(pol, ORIGIN, specs(labels)) == [5, 5, 2, 3, 4]
    c = Cluster(name="c", policy=pol)
    c.update(specs(labels), pol, ORIGIN)
    assert set(picks(c)) == {"c"}
    eject(c, "c")
    assert set(picks(c, now=1.0)) == {"d"}
    eject(c, "d")
    assert set(picks(c, now=1.0)) == {"e"}
    eject(c, "e")
    assert set(picks(c, now=1.0)) == {"a", "b"}


def test_distribute_weights() -> None:
    pol = policy(
        " {loadBalancer: {localityLbSetting: {distribute: [{from: region1/zone1/*, "
        "to: {region1/zone1/*: 80, region2: 20}}]}}}"
    )
    got = picks(cluster(pol), 4000)
    assert set(got) == {"a", "b", "d"}  # zone2 and region3 are not listed: no traffic
    assert 0.77 < (got["a"] + got["b"]) / 4000 < 0.83, got
    # An origin no rule matches: no locality weighting.
    elsewhere = Origin(locality=("region9", "z", ""))
    assert set(picks(cluster(pol, elsewhere), 500)) == set(EPS)


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("{distribute: [{from: region1, to: {region1: 50}}]}", "sum to 100"),
        ("{failover: [{from: region1, to: region1}]}", "different regions"),
        ("{distribute: [{from: '*', to: {'*': 100}}], failover: [{from: a, to: b}]}", "combined"),
        (
            "{failover: [{from: a, to: b}], failoverPriority: [topology.kubernetes.io/zone]}",
            "failover cannot be combined with 'topology.kubernetes.io/zone'",
        ),
        ("{failoverPriority: ['=n1']}", "not label or label=value"),
        ("{failoverPriority: ['tier=a=b']}", "not label or label=value"),
        ("{failoverPriority: ['tier=']}", "not label or label=value"),
        ("{distribute: [{from: 'a*b', to: {'*': 100}}]}", "not a locality"),
        ("{enabled: yes-please}", "boolean"),
    ],
)
def test_bad_settings_are_refused(setting: str, error: str) -> None:
    policy = f"trafficPolicy: {{loadBalancer: {{localityLbSetting: {setting}}}}}"
    cfg = parsed(destination_rule(policy, name="r"))
    assert cfg.destination_rules == ()
    assert any(error in f.render() for _r, f in cfg.findings), cfg.findings
