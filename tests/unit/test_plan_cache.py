"""Tests for `ztunnel.protocol.plan.OutboundPlanCache` (issue 14): `plan_outbound`'s outcomes
reused on the same snapshot only, random picks still drawn per connection, bounded by the state.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from meshcore.model import WorkloadStatus
from meshcore.proto.yamlform import parse_mesh_config
from meshcore.state import MeshState
from tests.unit.test_plan import backs, w
from tests.unit.test_plan import s as service
from ztunnel.protocol.plan import (
    MAX_CACHED_PLANS,
    MAX_PLANS_PER_OUTCOME,
    PlanScope,
    _plan,
    _resolve,
    plan_outbound,
)
from ztunnel.protocol.plantypes import OutboundPlan, PlanKind

SRC = "127.0.1.10"
VIP = "127.0.3.10"
WAYPOINT = {"hostname": {"namespace": "default", "hostname": "wp.default.svc"}}


def s(name: str, vip: str, port: int = 80, **over: Any) -> dict[str, Any]:
    return service(name, vip, [{"servicePort": port, "targetPort": 8080}], **over)


def mesh(sources: int = 1, endpoints: int = 0) -> MeshState:
    """`sources` local clients; service "lb" (VIP) backed by a-1, a-2 and "guarded" (behind
    the waypoint service "wp": two healthy instances and a sick one), plus `endpoints` more."""
    workloads = [w(f"client-{i}", f"127.0.1.{10 + i}", node="node-a") for i in range(sources)]
    workloads += [
        w("a-1", "127.0.2.1", services=backs("lb")),
        w("a-2", "127.0.2.2", services=backs("lb")),
        w("guarded", "127.0.2.3", services=backs("lb"), waypoint=WAYPOINT),
        w("wp-1", "127.0.4.1", services=backs("wp")),
        w("wp-2", "127.0.4.2", services=backs("wp")),
        w("wp-3", "127.0.4.3", services=backs("wp"), status="UNHEALTHY"),
        w("solo", "127.0.2.9"),
    ]
    workloads += [
        w(f"many-{i}", f"127.0.{50 + i // 200}.{i % 200}", services=backs("many"))
        for i in range(endpoints)
    ]
    return MeshState.from_config(
        parse_mesh_config(
            {
                "workloads": workloads,
                "services": [
                    s("lb", VIP),
                    s("wp", "127.0.3.40", 15008),
                    s("many", "127.0.3.50"),
                ],
            }
        )
    )


STATE = mesh()


def expected_picks(state: MeshState, rng: random.Random, n: int) -> list[str]:
    """Istio's outbound picks written out: a random endpoint of "lb" (in the state's order),
    and for "guarded" then a random HEALTHY instance of its waypoint (in the state's order)."""
    endpoints = [ep.workload.uid for ep in state.endpoints("default/lb.default.svc")]
    waypoints = [
        ep.workload.uid
        for ep in state.endpoints("default/wp.default.svc")
        if ep.workload.status is WorkloadStatus.HEALTHY
    ]
    out = []
    for _ in range(n):
        uid = rng.choice(endpoints)
        out.append(f"{uid} via {rng.choice(waypoints)}" if uid == "guarded" else uid)
    return out


def pick(state: MeshState, scope: PlanScope, dst: str = VIP, port: int = 80) -> str:
    plan = plan_outbound(state, scope, src_ip=SRC, dst_ip=dst, dst_port=port)
    assert plan.kind is PlanKind.HBONE
    assert plan.destination_workload is not None
    uid = plan.destination_workload.uid
    return f"{uid} via {plan.waypoint.uid}" if plan.waypoint is not None else uid


def test_same_snapshot_reuses_the_outcome_and_draws_every_pick() -> None:
    """On one snapshot, the second connection's plan is one planned for the first (fails
    without a cache: a new plan per connection), and every connection still makes the random
    picks, nested ones too (endpoint, then its waypoint), the same draws in the same order."""
    scope = PlanScope(node="node-a", rng=random.Random(11))
    first = plan_outbound(STATE, scope, src_ip=SRC, dst_ip="127.0.2.9", dst_port=80)
    assert len(scope.plans) == 0  # a workload IP: the port is the client's pick, not kept
    picks = [pick(STATE, scope) for _ in range(300)]
    assert len(scope.plans) == 1
    assert picks == expected_picks(STATE, random.Random(11), 300)  # no draw for "solo"
    assert set(picks) == {"a-1", "a-2", "guarded via wp-1", "guarded via wp-2"}
    assert first.kind is PlanKind.HBONE
    plans = {
        id(plan_outbound(STATE, scope, src_ip=SRC, dst_ip=VIP, dst_port=80)) for _ in range(60)
    }
    assert len(plans) == 4  # the same four plan objects, reused


def test_a_new_snapshot_is_planned_on_at_once() -> None:
    """A state change is seen by the very next connection: the endpoint removed, the waypoint
    made unhealthy, the service gone."""
    scope = PlanScope(node="node-a", rng=random.Random(1))
    assert {pick(STATE, scope) for _ in range(100)} >= {"a-1", "a-2"}
    gone = STATE.with_updates(removals=["a-1"])
    assert "a-1" not in {pick(gone, scope) for _ in range(100)}
    wp1, wp2 = STATE.workload("wp-1"), STATE.workload("wp-2")
    assert wp1 is not None
    assert wp2 is not None
    sick = gone.with_updates(
        [dataclasses.replace(wp, status=WorkloadStatus.UNHEALTHY) for wp in (wp1, wp2)]
    )
    plans = [plan_outbound(sick, scope, src_ip=SRC, dst_ip=VIP, dst_port=80) for _ in range(100)]
    assert {p.kind for p in plans} == {PlanKind.HBONE, PlanKind.NO_ENDPOINTS}
    hbone = {p.destination_workload for p in plans if p.kind is PlanKind.HBONE}
    assert hbone == {gone.workload("a-2")}
    no_service = sick.with_updates(removals=["default/lb.default.svc"])
    plan = plan_outbound(no_service, scope, src_ip=SRC, dst_ip=VIP, dst_port=80)
    assert plan.kind is PlanKind.PASSTHROUGH
    # ... and back to the first snapshot (an older object): planned on it again, not stale.
    assert {pick(STATE, scope) for _ in range(100)} >= {"a-1", "a-2"}


def test_only_what_the_state_names_is_kept() -> None:
    """Client-picked ports of a workload IP, addresses outside the mesh, undeclared VIP ports
    and unknown sources are planned per connection and never kept."""
    scope = PlanScope(node="node-a", rng=random.Random(2))
    for port in range(1000, 1400):
        assert plan_outbound(STATE, scope, src_ip=SRC, dst_ip="127.0.2.9", dst_port=port).authority
        outside = f"10.9.{port // 256}.{port % 256}"
        plan = plan_outbound(STATE, scope, src_ip=SRC, dst_ip=outside, dst_port=443)
        assert plan.kind is PlanKind.PASSTHROUGH
        plan = plan_outbound(STATE, scope, src_ip=SRC, dst_ip=VIP, dst_port=port)
        assert plan.kind is PlanKind.REJECT
        plan = plan_outbound(STATE, scope, src_ip=f"127.0.7.{port % 250}", dst_ip=VIP, dst_port=80)
        assert plan.kind is PlanKind.REJECT
    assert len(scope.plans) == 0


def test_bounded() -> None:
    """At most `MAX_CACHED_PLANS` plans in all (many sources x a service with the most
    endpoints an outcome may keep), and a service with more endpoints than one outcome may
    keep is planned per connection over all of them."""
    sources = MAX_CACHED_PLANS // MAX_PLANS_PER_OUTCOME + 8
    state = mesh(sources=sources, endpoints=MAX_PLANS_PER_OUTCOME)
    scope = PlanScope(node="node-a", rng=random.Random(3))
    for i in range(sources):
        src = f"127.0.1.{10 + i}"
        plan = plan_outbound(state, scope, src_ip=src, dst_ip="127.0.3.50", dst_port=80)
        assert plan.kind is PlanKind.HBONE
        assert scope.plans.plans <= MAX_CACHED_PLANS
    assert scope.plans.plans > MAX_CACHED_PLANS - MAX_PLANS_PER_OUTCOME
    # the newest are kept: the last source's outcome is reused
    last = f"127.0.1.{10 + sources - 1}"
    seen = {
        id(plan_outbound(state, scope, src_ip=last, dst_ip="127.0.3.50", dst_port=80))
        for _ in range(400)
    }
    assert len(seen) == MAX_PLANS_PER_OUTCOME

    big = mesh(endpoints=MAX_PLANS_PER_OUTCOME + 1)
    scope = PlanScope(node="node-a", rng=random.Random(4))
    uids = set()
    for _ in range(2000):
        plan = plan_outbound(big, scope, src_ip=SRC, dst_ip="127.0.3.50", dst_port=80)
        assert plan.destination_workload is not None
        uids.add(plan.destination_workload.uid)
    assert len(uids) == MAX_PLANS_PER_OUTCOME + 1
    assert len(scope.plans) == 1  # "planned per connection", kept as such
    assert scope.plans.plans == 1


def test_the_source_keys_the_outcome() -> None:
    """On ONE snapshot, with a local client's outcome kept: a source the state does not know
    and one on another node are still REJECT, and a source that is an instance of the
    service's waypoint goes straight to the endpoint (a key without the source would hand
    each of them the kept outcome; reviewer, checked by removing the source from the key)."""
    front = "127.0.3.60"
    member = "127.0.1.20"
    st = MeshState.from_config(
        parse_mesh_config(
            {
                "workloads": [
                    w("client-0", SRC, node="node-a"),
                    w("wp-local", member, node="node-a", services=backs("wp")),
                    w("wp-1", "127.0.4.1", services=backs("wp")),
                    w("b-1", "127.0.2.1", services=backs("front")),
                ],
                "services": [s("front", front, waypoint=WAYPOINT), s("wp", "127.0.3.40", 15008)],
            }
        )
    )
    scope = PlanScope(node="node-a", rng=random.Random(3))

    def plan(src: str) -> OutboundPlan:
        return plan_outbound(st, scope, src_ip=src, dst_ip=front, dst_port=80)

    via = plan(SRC)
    assert via.kind is PlanKind.HBONE
    assert via.waypoint is not None
    assert len(scope.plans) == 1
    assert plan("127.0.1.99").kind is PlanKind.REJECT  # unknown source
    assert plan("127.0.2.1").kind is PlanKind.REJECT  # a workload on node-b
    direct = plan(member)
    assert direct.kind is PlanKind.HBONE
    assert direct.waypoint is None
    assert direct.destination_workload is not None
    assert direct.destination_workload.uid == "b-1"
    assert plan(SRC).waypoint is not None


def test_the_destination_keys_the_outcome() -> None:
    """On ONE snapshot, with the outcome for VIP:80 kept: a port the service does not declare
    is still REJECT, and another VIP (same port or not) is planned to its own service (checked
    by removing the port, then the address, from the key)."""
    scope = PlanScope(node="node-a", rng=random.Random(5))
    assert pick(STATE, scope) in {"a-1", "a-2", "guarded via wp-1", "guarded via wp-2"}
    undeclared = plan_outbound(STATE, scope, src_ip=SRC, dst_ip=VIP, dst_port=81)
    assert undeclared.kind is PlanKind.REJECT
    assert pick(STATE, scope, dst="127.0.3.40", port=15008) in {"wp-1", "wp-2"}
    other = plan_outbound(STATE, scope, src_ip=SRC, dst_ip="127.0.3.50", dst_port=80)
    assert other.kind is PlanKind.NO_ENDPOINTS  # "many", with no endpoint in STATE


def test_a_replaced_scope_has_a_cache_of_its_own() -> None:
    """`dataclasses.replace` of a scope (another node) shares no outcome with the original: the
    source, local to node-a, is unknown on node-x (fails when the cache is an init field)."""
    scope = PlanScope(node="node-a", rng=random.Random(1))
    assert plan_outbound(STATE, scope, src_ip=SRC, dst_ip=VIP, dst_port=80).kind is PlanKind.HBONE
    other = dataclasses.replace(scope, node="node-x")
    assert other.plans is not scope.plans
    refused = plan_outbound(STATE, other, src_ip=SRC, dst_ip=VIP, dst_port=80)
    assert refused.kind is PlanKind.REJECT


def guarded_mesh(guarded: int, plain: int = 0) -> MeshState:
    """Service "g" (VIP 127.0.3.60): `guarded` endpoints behind the waypoint "wp" (two healthy
    instances, one sick) and `plain` endpoints reached directly."""
    workloads = [w("client-0", SRC, node="node-a")]
    workloads += [
        w(f"g-{i}", f"127.0.60.{i}", services=backs("g"), waypoint=WAYPOINT) for i in range(guarded)
    ]
    workloads += [w(f"p-{i}", f"127.0.61.{i}", services=backs("g")) for i in range(plain)]
    workloads += [
        w("wp-1", "127.0.4.1", services=backs("wp")),
        w("wp-2", "127.0.4.2", services=backs("wp")),
        w("wp-3", "127.0.4.3", services=backs("wp"), status="UNHEALTHY"),
    ]
    return MeshState.from_config(
        parse_mesh_config(
            {"workloads": workloads, "services": [s("g", "127.0.3.60"), s("wp", "127.0.4.40")]}
        )
    )


def test_cached_outcomes_draw_as_planning_afresh() -> None:
    """Differential: through the cache (options built on first use) and planned afresh per
    connection (`_plan` with the rng, nothing kept), the same seed gives equal plans, connection
    after connection, nested picks included, across snapshot swaps and on both sides of the
    per-outcome budget (3 per guarded endpoint: itself and its two healthy waypoint
    instances; 21 fit in `MAX_PLANS_PER_OUTCOME`, 22 do not)."""
    assert 3 * 21 <= MAX_PLANS_PER_OUTCOME < 3 * 22
    states = [STATE, guarded_mesh(21, 1), guarded_mesh(22), mesh(endpoints=60), STATE]
    targets = [(VIP, 80), ("127.0.3.60", 80), ("127.0.3.50", 80), ("127.0.2.3", 80)]
    cached = PlanScope(node="node-a", rng=random.Random(7))
    afresh = PlanScope(node="node-a", rng=random.Random(7))
    for state in states:
        for i in range(600):
            dst, port = targets[i % len(targets)]
            got = plan_outbound(state, cached, src_ip=SRC, dst_ip=dst, dst_port=port)
            svc = state.service_by_vip(dst, "")
            want = _resolve(_plan(state, afresh, (SRC, dst, port), svc, afresh.rng), afresh.rng)
            assert got == want, (state, dst, i)
    assert cached.plans.plans <= MAX_CACHED_PLANS


def test_budget_counts_unbuilt_options() -> None:
    """An outcome counts the plans it may come to hold, built or not: 21 guarded endpoints
    and one plain one are 43 plans (kept), 22 guarded are past the budget (kept as "planned
    per connection", 1)."""
    scope = PlanScope(node="node-a", rng=random.Random(5))
    plan_outbound(guarded_mesh(21, 1), scope, src_ip=SRC, dst_ip="127.0.3.60", dst_port=80)
    assert scope.plans.plans == 2 * 21 + 1
    plan_outbound(guarded_mesh(22), scope, src_ip=SRC, dst_ip="127.0.3.60", dst_port=80)
    assert scope.plans.plans == 1


def test_options_are_built_on_first_use() -> None:
    """The first connection after a snapshot swap builds the plan it draws, not every
    alternative (a 60-endpoint service: one plan built, not 60); each option is built once
    and then reused."""
    state = mesh(endpoints=60)
    scope = PlanScope(node="node-a", rng=random.Random(9))
    key = (SRC, "127.0.3.50", 80)
    first = plan_outbound(state, scope, src_ip=SRC, dst_ip=key[1], dst_port=80)
    outcome: Any = scope.plans._entries[key]
    built = [o for o in outcome._memo if o is not None]
    assert built == [first]
    assert outcome.count == 60
    plans = [plan_outbound(state, scope, src_ip=SRC, dst_ip=key[1], dst_port=80) for _ in range(30)]
    built = [o for o in outcome._memo if o is not None]
    assert len(built) == len({id(p) for p in [first, *plans]}) < 60
    assert {id(p) for p in plans} <= {id(o) for o in built}
