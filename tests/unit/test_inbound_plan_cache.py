"""Tests for `ztunnel.protocol.plan.InboundPlanCache` (issue 14): an allowed inbound plan is
reused on the same snapshot only; a policy or workload change is decided on by the very next
CONNECT; refusals are never kept; the cache is bounded."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meshcore.errors import BadRequest, Unauthorized
from meshcore.identity import SpiffeId
from meshcore.proto.yamlform import parse_mesh_config
from meshcore.state import MeshState
from ztunnel.protocol.plan import MAX_CACHED_INBOUND, InboundPlanCache, plan_inbound
from ztunnel.protocol.plantypes import InboundConnect

RECEIVER = "127.0.2.10"
CLIENT = "127.0.1.10"
SLEEP = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="sleep")
DENY_SLEEP = {
    "name": "deny-sleep",
    "namespace": "default",
    "scope": "NAMESPACE",
    "action": "DENY",
    "rules": [{"clauses": [{"matches": [{"principals": ["cluster.local/ns/default/sa/sleep"]}]}]}],
}


def state(*, policies: tuple[dict[str, Any], ...] = (), echo: bool = True) -> MeshState:
    workloads: list[dict[str, Any]] = [
        {
            "uid": "sleep",
            "name": "sleep",
            "namespace": "default",
            "serviceAccount": "sleep",
            "addresses": [CLIENT],
            "tunnelProtocol": "HBONE",
            "node": "node-a",
        }
    ]
    if echo:
        workloads.append(
            {
                "uid": "echo",
                "name": "echo",
                "namespace": "default",
                "serviceAccount": "echo",
                "addresses": [RECEIVER],
                "tunnelProtocol": "HBONE",
                "node": "node-b",
                "services": {"default/echo.default.svc": {}},
            }
        )
    services = [
        {
            "name": "echo",
            "namespace": "default",
            "hostname": "echo.default.svc",
            "addresses": [{"address": "127.0.3.10"}],
            "ports": [{"servicePort": 80, "targetPort": 8080}],
        },
        {  # bound to a waypoint: a CONNECT naming it must come from the waypoint
            "name": "guarded",
            "namespace": "default",
            "hostname": "guarded.default.svc",
            "addresses": [{"address": "127.0.3.20"}],
            "ports": [{"servicePort": 80, "targetPort": 8080}],
            "waypoint": {"hostname": {"namespace": "default", "hostname": "wp.default.svc"}},
        },
    ]
    return MeshState.from_config(
        parse_mesh_config(
            {"workloads": workloads, "services": services, "policies": list(policies)}
        )
    )


def connect(port: int = 8080, service: str | None = "default/echo.default.svc") -> InboundConnect:
    return InboundConnect(
        dst_ip=RECEIVER,
        dst_port=port,
        src_identity=SLEEP,
        src_ip=CLIENT,
        conn_dst_ip=RECEIVER,
        addressed_service=service,
    )


def plan(st: MeshState, cache: InboundPlanCache, c: InboundConnect | None = None) -> Any:
    return plan_inbound(st, c or connect(), network="", node="node-b", cache=cache)


def test_reused_on_the_same_snapshot_only() -> None:
    """The same CONNECT on the same snapshot gets the plan made for the first one (fails
    without a cache: a new plan each time); on another snapshot it is planned again."""
    open_ = state()
    cache = InboundPlanCache()
    first = plan(open_, cache)
    assert first.decision.allowed
    assert plan(open_, cache) is first
    assert len(cache) == 1
    again = state()  # equal records, another snapshot object
    assert plan(again, cache) is not first
    assert plan(again, cache) is plan(again, cache)


def test_a_policy_added_refuses_the_next_connect() -> None:
    """Authorization is decided on the current snapshot: a DENY policy added takes effect for
    the very next CONNECT, and its removal too, through the same cache."""
    cache = InboundPlanCache()
    open_ = state()
    assert plan(open_, cache).decision.allowed
    denied = state(policies=(DENY_SLEEP,))
    for _ in range(3):  # refused each time, never kept
        with pytest.raises(Unauthorized, match="deny-sleep"):
            plan(denied, cache)
    assert len(cache) == 0
    assert plan(state(), cache).decision.allowed


def test_a_workload_removed_is_seen_by_the_next_connect() -> None:
    cache = InboundPlanCache()
    assert plan(state(), cache).destination_workload.uid == "echo"
    with pytest.raises(BadRequest, match="unknown destination"):
        plan(state(echo=False), cache)


def test_bounded_and_peer_texts_not_kept() -> None:
    """Target ports are the peer's pick: at most `MAX_CACHED_INBOUND` plans, the newest kept;
    an addressed service the snapshot does not know (the peer's text) is never kept."""
    st = state()
    cache = InboundPlanCache()
    for port in range(1000, 1000 + 3 * MAX_CACHED_INBOUND):
        assert plan(st, cache, connect(port)).target_addr == (RECEIVER, port)
        assert len(cache) <= MAX_CACHED_INBOUND
    assert len(cache) == MAX_CACHED_INBOUND
    last = connect(1000 + 3 * MAX_CACHED_INBOUND - 1)
    assert plan(st, cache, last) is plan(st, cache, last)

    cache = InboundPlanCache()
    for i in range(50):
        c = connect(service=f"default/made-up-{i}.default.svc")
        assert plan(st, cache, c).decision.allowed
    assert len(cache) == 0


OTHER = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="other")
ALLOW_SLEEP_FROM_CLIENT = {
    "name": "allow-sleep",
    "namespace": "default",
    "scope": "NAMESPACE",
    "action": "ALLOW",
    "rules": [
        {
            "clauses": [
                {"matches": [{"principals": ["cluster.local/ns/default/sa/sleep"]}]},
                {"matches": [{"sourceIps": [CLIENT]}]},
            ]
        }
    ],
}


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"src_identity": OTHER}, Unauthorized),
        ({"src_identity": None}, Unauthorized),
        ({"src_ip": "127.0.1.99"}, Unauthorized),
        ({"src_ip": "::ffff:127.0.1.10"}, Unauthorized),  # IPv4-mapped: another address
        ({"conn_dst_ip": "127.0.2.99"}, BadRequest),  # no workload there
        ({"dst_ip": "127.0.2.99"}, BadRequest),  # not the connection's destination
        ({"addressed_service": "default/guarded.default.svc"}, Unauthorized),  # waypoint bypass
    ],
    ids=[
        "other-identity",
        "no-identity",
        "other-source-ip",
        "mapped-source-ip",
        "other-conn-dst",
        "other-target",
        "other-service",
    ],
)
def test_every_field_the_decision_reads_keys_the_cache(
    change: dict[str, Any], refusal: type[Exception]
) -> None:
    """On ONE snapshot, a CONNECT that differs from an allowed (and kept) one in a field the
    decision reads is decided anew and refused: a key without that field would hand it the
    allowed plan (an authorization bypass; reviewer, checked by removing each field)."""
    st = state(policies=(ALLOW_SLEEP_FROM_CLIENT,))
    cache = InboundPlanCache()
    assert plan(st, cache).decision.allowed
    assert len(cache) == 1
    with pytest.raises(refusal):
        plan(st, cache, dataclasses.replace(connect(), **change))
    assert plan(st, cache).decision.allowed  # the kept plan is still the allowed one's


@pytest.mark.parametrize(
    ("where", "refusal"),
    [({"node": "node-x"}, "not on node"), ({"network": "other"}, "unknown destination")],
)
def test_the_node_and_network_planned_for_key_the_cache(
    where: dict[str, str], refusal: str
) -> None:
    st = state()
    cache = InboundPlanCache()
    assert plan(st, cache).decision.allowed
    place = {"network": "", "node": "node-b"} | where
    with pytest.raises(BadRequest, match=refusal):
        plan_inbound(st, connect(), network=place["network"], node=place["node"], cache=cache)


def test_spellings_of_one_address_share_a_plan() -> None:
    """The key holds the addresses as parsed: other spellings of the CONNECT's IPv6 addresses
    get the plan kept for the first (fails with the texts in the key: one entry per spelling,
    as many as a peer cares to send); a scoped address is another address."""
    v6 = MeshState.from_config(
        parse_mesh_config(
            {
                "workloads": [
                    {
                        "uid": "echo6",
                        "name": "echo6",
                        "namespace": "default",
                        "serviceAccount": "echo",
                        "addresses": ["fd00::10"],
                        "tunnelProtocol": "HBONE",
                        "node": "node-b",
                    }
                ]
            }
        )
    )
    cache = InboundPlanCache()

    def spelled(receiver: str, client: str) -> Any:
        c = InboundConnect(
            dst_ip=receiver,
            dst_port=8080,
            src_identity=SLEEP,
            src_ip=client,
            conn_dst_ip=receiver,
        )
        return plan_inbound(v6, c, network="", node="node-b", cache=cache)

    first = spelled("fd00::10", "fd00::1")
    assert first.target_addr == ("fd00::10", 8080)
    assert spelled("FD00:0:0::0010", "fd00:0::0:1") is first
    assert spelled("fd00:0000::10", "FD00::1") is first
    assert len(cache) == 1
    with pytest.raises(BadRequest, match="unknown destination"):
        spelled("fd00::10%eth0", "fd00::1")
    assert len(cache) == 1
