"""`MeshState.with_updates` is incremental (issue 14) and equals a rebuild.

A hypothesis property replays random sequences of workload/service/policy upserts and removals
(colliding uids, addresses, VIPs, nodes and service keys on purpose) both through
`with_updates`, one step at a time, and through an independent reference written here (the
pre-incremental rebuild: plain dicts in upsert order, later record owns an address); every index
must be equal after every step, and the snapshot of each earlier step must be unchanged.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore import state as state_mod
from meshcore.model import Authorization, Service, Workload
from meshcore.pmap import PMap
from meshcore.proto.yamlform import parse_authorization, parse_service, parse_workload
from meshcore.state import MeshState

IPS = [f"10.0.0.{i}" for i in range(1, 6)]
VIPS = [f"10.96.0.{i}" for i in range(1, 4)]
UIDS = [f"w{i}" for i in range(12)]
SVC_KEYS = [f"default/s{i}.default.svc.cluster.local" for i in range(3)]


def _workload(uid: str, ips: list[str], node: str, svcs: list[str], port: int) -> Workload:
    return parse_workload(
        {
            "uid": uid,
            "name": uid,
            "namespace": "default",
            "addresses": ips,
            "node": node,
            "services": {k: {"ports": [{"servicePort": 80, "targetPort": port}]} for k in svcs},
        }
    )


def _service(i: int, vips: list[str], port: int) -> Service:
    return parse_service(
        {
            "name": f"s{i}",
            "namespace": "default",
            "hostname": f"s{i}.default.svc.cluster.local",
            "addresses": [{"address": v} for v in vips],
            "ports": [{"servicePort": 80, "targetPort": port}],
        }
    )


def _policy(i: int, scope: str) -> Authorization:
    return parse_authorization({"name": f"p{i}", "namespace": "default", "scope": scope})


workloads = st.builds(
    _workload,
    st.sampled_from([*UIDS, "default/s0.default.svc.cluster.local"]),
    st.lists(st.sampled_from(IPS), min_size=1, max_size=2, unique=True),
    st.sampled_from(["n0", "n1"]),
    st.lists(st.sampled_from(SVC_KEYS), max_size=2, unique=True),
    st.integers(8000, 8002),
)
services = st.builds(
    _service,
    st.integers(0, 2),
    st.lists(st.sampled_from(VIPS), max_size=2, unique=True),
    st.integers(1, 3),
)
policies = st.builds(_policy, st.integers(0, 2), st.sampled_from(["GLOBAL", "NAMESPACE"]))
names = st.sampled_from([*UIDS, *SVC_KEYS, "nope"])
step = st.tuples(
    # up to 14 records: more than 8 changed workloads of one service/node take the batch path
    st.lists(st.one_of(workloads, workloads, services, policies), max_size=14),
    st.lists(names, max_size=2),
    st.lists(st.sampled_from(["default/p0", "default/p1", "default/p2"]), max_size=1),
)


class Reference:
    """The rebuild semantics, independent of meshcore.state's code."""

    def __init__(self) -> None:
        self.wl: dict[str, Workload] = {}
        self.svc: dict[str, Service] = {}
        self.pol: dict[str, Authorization] = {}

    def apply(self, ups: list[Any], rem: list[str], prem: list[str]) -> None:
        for n in rem:
            self.wl.pop(n, None)
            self.svc.pop(n, None)
        for n in prem:
            self.pol.pop(n, None)
        for r in ups:
            d: dict[str, Any] = (
                self.wl
                if isinstance(r, Workload)
                else self.svc
                if isinstance(r, Service)
                else self.pol
            )
            key = r.uid if isinstance(r, Workload) else r.key
            d.pop(key, None)
            d[key] = r

    def indexes(self) -> dict[str, Any]:
        by_addr: dict[Any, str] = {}
        by_node: dict[str, list[str]] = {}
        eps: dict[str, list[tuple[str, Any]]] = {}
        for w in self.wl.values():
            for a in w.addresses:
                by_addr[(w.network, a)] = w.uid
            by_node.setdefault(w.node, []).append(w.uid)
            for k, ports in w.services:
                eps.setdefault(k, []).append((w.uid, ports))
        by_vip = {(na.network, na.address): s.key for s in self.svc.values() for na in s.addresses}
        return {
            "workloads": dict(self.wl),
            "services": dict(self.svc),
            "policies": dict(self.pol),
            "by_addr": by_addr,
            "by_vip": by_vip,
            "by_node": {k: sorted(v) for k, v in by_node.items()},
            "endpoints": {k: sorted(v, key=lambda e: e[0]) for k, v in eps.items()},
        }


def indexes(s: MeshState) -> dict[str, Any]:
    """Every index of a snapshot, read through its public lookups."""
    addrs = {(w.network, a) for w in s.workloads for a in w.addresses}
    addrs |= {(n, ipaddress.ip_address(ip)) for ip in IPS for n in ("",)}
    vips = {(n, ipaddress.ip_address(ip)) for ip in VIPS for n in ("",)}
    by_addr = {k: w.uid for k in addrs if (w := s.workload_by_address(k[1], k[0])) is not None}
    by_vip = {k: v.key for k in vips if (v := s.service_by_vip(k[1], k[0])) is not None}
    keys = set(SVC_KEYS) | {k for w in s.workloads for k, _ in w.services}
    return {
        "workloads": {w.uid: w for w in s.workloads},
        "services": {v.key: v for v in s.services},
        "policies": {p.key: p for p in s.policies},
        "by_addr": by_addr,
        "by_vip": by_vip,
        "by_node": {n: [w.uid for w in ws] for n in ("n0", "n1") if (ws := s.local_workloads(n))},
        "endpoints": {
            k: [(e.workload.uid, e.ports) for e in eps] for k in keys if (eps := s.endpoints(k))
        },
    }


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=8))
def test_incremental_updates_equal_a_rebuild(steps: list[Any]) -> None:
    _check(steps)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=8))
def test_incremental_updates_equal_a_rebuild_batch_path(steps: list[Any]) -> None:
    """The same with every endpoint/node list update taking the filter + sort path."""
    saved = state_mod.SPLICE_MAX
    state_mod.SPLICE_MAX = 0
    try:
        _check(steps)
    finally:
        state_mod.SPLICE_MAX = saved


def _check(steps: list[Any]) -> None:
    ref = Reference()
    state = MeshState.empty()
    history: list[tuple[MeshState, dict[str, Any]]] = []
    for ups, rem, prem in steps:
        ref.apply(ups, rem, prem)
        state = state.with_updates(ups, rem, policy_removals=prem)
        got = indexes(state)
        assert got == ref.indexes()
        # The constructor (a from-scratch build in the same order) agrees too.
        assert indexes(MeshState(ref.wl, ref.svc, ref.pol)) == got
        history.append((state, got))
    for old, seen in history:  # earlier snapshots never change (readers keep a consistent view)
        assert indexes(old) == seen


def _big(n: int) -> MeshState:
    wls = [
        _workload(
            f"w{i}",
            [str(ipaddress.ip_address(0x0A000000 + i))],
            f"n{i % 100}",
            [SVC_KEYS[i % 3]],
            8080,
        )
        for i in range(n)
    ]
    return MeshState.build(workloads=wls)


def test_one_workload_delta_shares_untouched_index_shards() -> None:
    """O(changed): a one-workload delta copies only the shards it touches; every other shard of
    every index is the previous snapshot's own object (a rebuild would share none)."""
    before = _big(2000)
    w = before.workload("w7")
    assert w is not None
    moved = _workload("w7", ["10.1.0.7"], "n3", [SVC_KEYS[0]], 9090)
    after = before.with_updates([moved])
    assert after.workload_by_address("10.1.0.7") is moved
    assert before.workload_by_address(w.addresses[0]) is w  # old snapshot unchanged
    assert after.workload_by_address(w.addresses[0]) is None
    for name in ("_workloads", "_wl_by_addr", "_addr_claims", "_wl_by_node", "_endpoints"):
        a: PMap[Any, Any] = getattr(before, name)
        b: PMap[Any, Any] = getattr(after, name)
        assert b.shared_shards(a) >= a.shared_shards(a) - 4, name  # non-empty ones


def test_pmap_evolve_is_persistent() -> None:
    m: PMap[str, int] = PMap((str(i), i) for i in range(100))
    m2 = m.evolve({"1": None, "x": 7, "2": 22, "missing": None})
    assert len(m) == 100
    assert m.get("1") == 1
    assert "x" not in m
    assert m["2"] == 2
    assert len(m2) == 100
    assert m2.get("1") is None
    assert m2["x"] == 7
    assert m2["2"] == 22
    assert sorted(m2) == sorted({*map(str, range(100)), "x"} - {"1"})
    assert m.evolve({}) is m
