"""Cluster accounting (pure, injected clock/rng): LB, outlier ejection, pool admission."""

from __future__ import annotations

import random
from collections import Counter

from meshcore.config.routes import ConnectionPool, LbPolicy, OutlierDetection, TrafficPolicy
from meshcore.identity import SpiffeId
from waypoint.protocol.cluster import Admission, Cluster, EndpointSpec

ID = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="r")


def cluster(n: int, **policy: object) -> Cluster:
    pol = TrafficPolicy(**policy)  # type: ignore[arg-type]
    c = Cluster(name="c", policy=pol)
    c.update(
        [EndpointSpec(uid=f"e{i}", ip=f"10.0.0.{i}", port=80, identity=ID) for i in range(n)], pol
    )
    return c


def test_round_robin_and_avoid() -> None:
    c = cluster(3, lb=LbPolicy.ROUND_ROBIN)
    rng = random.Random(0)
    picks = [c.pick(0.0, rng) for _ in range(6)]
    assert Counter(p.uid for p in picks if p) == {"e0": 2, "e1": 2, "e2": 2}
    for _ in range(10):
        p = c.pick(0.0, rng, avoid={"e0", "e1"})
        assert p is not None
        assert p.uid == "e2"


def test_least_request_prefers_idle_endpoints() -> None:
    c = cluster(2, lb=LbPolicy.LEAST_REQUEST)
    c.endpoints["e0"].active = 10
    rng = random.Random(0)
    assert {c.pick(0.0, rng).uid for _ in range(20)} == {"e1"}  # type: ignore[union-attr]


def test_consecutive_5xx_ejects_then_returns_after_base_time() -> None:
    od = OutlierDetection(consecutive_5xx=3, base_ejection_time=30.0, max_ejection_percent=100)
    c = cluster(2, outlier=od, lb=LbPolicy.ROUND_ROBIN)
    e0 = c.endpoints["e0"]
    assert not c.record(e0, 503, 1.0)
    assert not c.record(e0, 200, 1.0)  # a success resets the streak
    assert not c.record(e0, 500, 2.0)
    assert not c.record(e0, None, 2.0)  # connect failure counts
    assert c.record(e0, 502, 3.0)
    rng = random.Random(0)
    assert {c.pick(10.0, rng).uid for _ in range(10)} == {"e1"}  # type: ignore[union-attr]
    assert {c.pick(33.5, rng).uid for _ in range(10)} == {"e0", "e1"}  # type: ignore[union-attr]
    # Second ejection lasts twice as long.
    for _ in range(3):
        c.record(e0, 503, 40.0)
    assert e0.ejected_until == 40.0 + 60.0


def test_max_ejection_percent_keeps_at_least_one_and_panic_uses_all() -> None:
    od = OutlierDetection(consecutive_5xx=1, max_ejection_percent=10)
    c = cluster(3, outlier=od)
    assert c.record(c.endpoints["e0"], 500, 0.0)  # at least one may be ejected
    assert not c.record(c.endpoints["e1"], 500, 0.0)  # 10% of 3 -> only one
    od_all = OutlierDetection(consecutive_5xx=1, max_ejection_percent=100)
    c2 = cluster(2, outlier=od_all)
    c2.record(c2.endpoints["e0"], 500, 0.0)
    c2.record(c2.endpoints["e1"], 500, 0.0)
    assert c2.pick(1.0, random.Random(0)) is not None  # all ejected: panic, not nothing


def test_pool_admission() -> None:
    c = cluster(1, pool=ConnectionPool(max_connections=2, max_pending=1))
    assert [c.admit() for _ in range(4)] == [
        Admission.GO,
        Admission.GO,
        Admission.WAIT,
        Admission.OVERFLOW,
    ]
    assert not c.can_promote()
    c.release()
    assert c.can_promote()
    c.promote()
    assert (c.active, c.pending, c.overflows) == (2, 0, 1)


def test_update_keeps_counters_of_unchanged_endpoints() -> None:
    c = cluster(2)
    c.endpoints["e0"].consecutive_5xx = 2
    c.update(
        [
            EndpointSpec(uid="e0", ip="10.0.0.0", port=80, identity=ID),
            EndpointSpec(uid="e9", ip="10.0.0.9", port=80, identity=ID),
        ],
        c.policy,
    )
    assert c.endpoints["e0"].consecutive_5xx == 2
    assert set(c.endpoints) == {"e0", "e9"}
