"""Tests for ztunnel.protocol.plan: outbound and inbound plans as tables over one test mesh."""

from __future__ import annotations

import dataclasses
import gc
import ipaddress
import random
from collections import Counter
from typing import Any

import pytest

from meshcore import native
from meshcore.errors import BadRequest, HboneError, Unauthorized, UpstreamUnavailable
from meshcore.identity import SpiffeId
from meshcore.model import WorkloadStatus
from meshcore.proto.yamlform import parse_mesh_config
from meshcore.state import MeshState
from ztunnel.protocol.plan import PlanScope, format_authority, plan_inbound, plan_outbound
from ztunnel.protocol.plantypes import InboundConnect, InboundPlan, PlanKind

WAYPOINT_SVC = {"hostname": {"namespace": "default", "hostname": "waypoint.default.svc"}}


def w(name: str, ip: str, node: str = "node-b", **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "uid": name,
        "name": name,
        "namespace": "default",
        "serviceAccount": name,
        "addresses": [ip],
        "tunnelProtocol": "HBONE",
        "node": node,
    }
    d.update(over)
    return d


def s(name: str, vip: str, ports: list[dict[str, int]], **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": name,
        "namespace": "default",
        "hostname": f"{name}.default.svc",
        "addresses": [{"address": vip}],
        "ports": ports,
    }
    d.update(over)
    return d


def backs(*names: str) -> dict[str, Any]:
    return {f"default/{n}.default.svc": {} for n in names}


MESH = parse_mesh_config(
    {
        "workloads": [
            w("sleep", "127.0.1.10", node="node-a"),
            w("plain-client", "127.0.1.11", node="node-a", tunnelProtocol="NONE"),
            w(
                "echo",
                "127.0.2.10",
                authorizationPolicies=["default/allow-sleep"],
                services={
                    "default/echo.default.svc": {
                        "ports": [{"servicePort": 80, "targetPort": 8080}]
                    },
                    "default/notarget.default.svc": {},
                },
            ),
            w(
                "echo-sick",
                "127.0.2.11",
                status="UNHEALTHY",
                services=backs("echo", "sick", "sickok"),
            ),
            w("legacy", "127.0.2.20", tunnelProtocol="NONE", services=backs("legacy")),
            w("reviews", "127.0.2.30", services=backs("reviews", "ghost-backed")),
            w("guarded", "127.0.2.40", waypoint={"address": {"address": "127.0.4.10"}}),
            w("wp", "127.0.4.10", services=backs("waypoint")),
            w("wp2", "127.0.4.11", status="UNHEALTHY", services=backs("waypoint")),
            w("lb-1", "127.0.2.50", services=backs("lb")),
            w("lb-2", "127.0.2.51", services=backs("lb")),
            w("elsewhere", "127.0.2.60", network="remote", services=backs("remote-only")),
            w(
                "ep-guarded",
                "127.0.2.70",
                services=backs("epwp"),
                waypoint={"address": {"address": "127.0.4.10"}},
            ),
            w("v6b", "fd00::10"),
        ],
        "services": [
            s("echo", "127.0.3.10", [{"servicePort": 80, "targetPort": 9999}]),
            s("legacy", "127.0.3.20", [{"servicePort": 80, "targetPort": 9090}]),
            s(
                "reviews",
                "127.0.3.30",
                [{"servicePort": 9080, "targetPort": 9080}],
                waypoint=WAYPOINT_SVC,
            ),
            s("waypoint", "127.0.3.40", [{"servicePort": 15008, "targetPort": 15008}]),
            s("empty", "127.0.3.50", [{"servicePort": 80, "targetPort": 80}]),
            s("sick", "127.0.3.60", [{"servicePort": 80, "targetPort": 80}]),
            s(
                "sickok",
                "127.0.3.61",
                [{"servicePort": 80, "targetPort": 80}],
                loadBalancing={"healthPolicy": "ALLOW_ALL"},
            ),
            s("notarget", "127.0.3.70", [{"servicePort": 81}]),
            s(
                "brokenwp",
                "127.0.3.80",
                [{"servicePort": 80, "targetPort": 80}],
                waypoint={"hostname": "default/missing.svc"},
            ),
            s(
                "ghost",
                "127.0.3.90",
                [{"servicePort": 80, "targetPort": 80}],
                waypoint=WAYPOINT_SVC,
            ),
            s("lb", "127.0.3.100", [{"servicePort": 80, "targetPort": 8000}]),
            s("remote-only", "127.0.3.110", [{"servicePort": 80, "targetPort": 80}]),
            s("epwp", "127.0.3.120", [{"servicePort": 80, "targetPort": 7070}]),
            s(
                "vipwp",
                "127.0.3.130",
                [{"servicePort": 80, "targetPort": 80}],
                waypoint={"address": {"address": "127.0.3.40"}},
            ),
        ],
        "policies": [
            {
                "name": "allow-sleep",
                "namespace": "default",
                "scope": "WORKLOAD_SELECTOR",
                "rules": [
                    {
                        "clauses": [
                            {"matches": [{"principals": ["cluster.local/ns/default/sa/sleep"]}]}
                        ]
                    }
                ],
            },
            {
                "name": "deny-blocked",
                "namespace": "istio-system",
                "scope": "GLOBAL",
                "action": "DENY",
                "rules": [{"clauses": [{"matches": [{"namespaces": ["blocked"]}]}]}],
            },
        ],
    }
)
STATE = MeshState.from_config(MESH)
PROXY_IP = ipaddress.ip_address("127.0.0.100")


def ident(sa: str, ns: str = "default") -> SpiffeId:
    return SpiffeId(trust_domain="cluster.local", namespace=ns, service_account=sa)


# (id, src, dst, port, kind, target, authority, destination workload uid, expected SAs, waypoint)
OUTBOUND: list[
    tuple[
        str,
        str,
        str,
        int,
        PlanKind,
        tuple[str, int],
        str | None,
        str | None,
        tuple[str, ...],
        str | None,
    ]
] = [
    (
        "svc vip -> hbone endpoint, workload port mapping",
        "127.0.1.10",
        "127.0.3.10",
        80,
        PlanKind.HBONE,
        ("127.0.2.10", 15008),
        "127.0.2.10:8080",
        "echo",
        ("echo",),
        None,
    ),
    (
        "svc vip undeclared port",
        "127.0.1.10",
        "127.0.3.10",
        81,
        PlanKind.REJECT,
        ("127.0.3.10", 81),
        None,
        None,
        (),
        None,
    ),
    (
        "svc vip -> non-hbone endpoint is direct",
        "127.0.1.10",
        "127.0.3.20",
        80,
        PlanKind.DIRECT,
        ("127.0.2.20", 9090),
        None,
        "legacy",
        (),
        None,
    ),
    (
        "svc with waypoint hostname",
        "127.0.1.10",
        "127.0.3.30",
        9080,
        PlanKind.HBONE,
        ("127.0.4.10", 15008),
        "127.0.3.30:9080",
        None,
        ("wp",),
        "wp",
    ),
    (
        "svc with waypoint VIP address",
        "127.0.1.10",
        "127.0.3.130",
        80,
        PlanKind.HBONE,
        ("127.0.4.10", 15008),
        "127.0.3.130:80",
        None,
        ("wp",),
        "wp",
    ),
    (
        "waypoint's own traffic skips it",
        "127.0.4.10",
        "127.0.3.30",
        9080,
        PlanKind.HBONE,
        ("127.0.2.30", 15008),
        "127.0.2.30:9080",
        "reviews",
        ("reviews",),
        None,
    ),
    (
        "svc without endpoints",
        "127.0.1.10",
        "127.0.3.50",
        80,
        PlanKind.NO_ENDPOINTS,
        ("127.0.3.50", 80),
        None,
        None,
        (),
        None,
    ),
    (
        "svc with only unhealthy endpoints",
        "127.0.1.10",
        "127.0.3.60",
        80,
        PlanKind.NO_ENDPOINTS,
        ("127.0.3.60", 80),
        None,
        None,
        (),
        None,
    ),
    (
        "ALLOW_ALL health policy picks unhealthy",
        "127.0.1.10",
        "127.0.3.61",
        80,
        PlanKind.HBONE,
        ("127.0.2.11", 15008),
        "127.0.2.11:80",
        "echo-sick",
        ("echo-sick",),
        None,
    ),
    (
        "no target port anywhere",
        "127.0.1.10",
        "127.0.3.70",
        81,
        PlanKind.NO_ENDPOINTS,
        ("127.0.3.70", 81),
        None,
        None,
        (),
        None,
    ),
    (
        "waypoint that does not resolve",
        "127.0.1.10",
        "127.0.3.80",
        80,
        PlanKind.NO_ENDPOINTS,
        ("127.0.3.80", 80),
        None,
        None,
        (),
        None,
    ),
    (
        "endpoints on another network unusable",
        "127.0.1.10",
        "127.0.3.110",
        80,
        PlanKind.NO_ENDPOINTS,
        ("127.0.3.110", 80),
        None,
        None,
        (),
        None,
    ),
    (
        "endpoint's own waypoint used",
        "127.0.1.10",
        "127.0.3.120",
        80,
        PlanKind.HBONE,
        ("127.0.4.10", 15008),
        "127.0.2.70:7070",
        "ep-guarded",
        ("wp",),
        "wp",
    ),
    (
        "workload ip hbone",
        "127.0.1.10",
        "127.0.2.10",
        8080,
        PlanKind.HBONE,
        ("127.0.2.10", 15008),
        "127.0.2.10:8080",
        "echo",
        ("echo",),
        None,
    ),
    (
        "unhealthy workload ip still direct",
        "127.0.1.10",
        "127.0.2.11",
        80,
        PlanKind.HBONE,
        ("127.0.2.11", 15008),
        "127.0.2.11:80",
        "echo-sick",
        ("echo-sick",),
        None,
    ),
    (
        "workload ip with waypoint",
        "127.0.1.10",
        "127.0.2.40",
        8080,
        PlanKind.HBONE,
        ("127.0.4.10", 15008),
        "127.0.2.40:8080",
        "guarded",
        ("wp",),
        "wp",
    ),
    (
        "workload ip no tunnel -> passthrough",
        "127.0.1.10",
        "127.0.2.20",
        9090,
        PlanKind.PASSTHROUGH,
        ("127.0.2.20", 9090),
        None,
        "legacy",
        (),
        None,
    ),
    (
        "unknown ip -> passthrough",
        "127.0.1.10",
        "10.1.2.3",
        443,
        PlanKind.PASSTHROUGH,
        ("10.1.2.3", 443),
        None,
        None,
        (),
        None,
    ),
    (
        "plaintext local source still planned",
        "127.0.1.11",
        "127.0.2.10",
        8080,
        PlanKind.HBONE,
        ("127.0.2.10", 15008),
        "127.0.2.10:8080",
        "echo",
        ("echo",),
        None,
    ),
    (
        "source on other node",
        "127.0.2.10",
        "127.0.3.10",
        80,
        PlanKind.REJECT,
        ("127.0.3.10", 80),
        None,
        None,
        (),
        None,
    ),
    (
        "unknown source",
        "127.0.9.9",
        "127.0.3.10",
        80,
        PlanKind.REJECT,
        ("127.0.3.10", 80),
        None,
        None,
        (),
        None,
    ),
    (
        "self-call 15008",
        "127.0.1.10",
        "127.0.0.100",
        15008,
        PlanKind.REJECT,
        ("127.0.0.100", 15008),
        None,
        None,
        (),
        None,
    ),
    (
        "self-call 15001",
        "127.0.1.10",
        "127.0.0.100",
        15001,
        PlanKind.REJECT,
        ("127.0.0.100", 15001),
        None,
        None,
        (),
        None,
    ),
    (
        "self-call 15006",
        "127.0.1.10",
        "127.0.0.100",
        15006,
        PlanKind.REJECT,
        ("127.0.0.100", 15006),
        None,
        None,
        (),
        None,
    ),
    (
        "proxy address other port passthrough",
        "127.0.1.10",
        "127.0.0.100",
        15000,
        PlanKind.PASSTHROUGH,
        ("127.0.0.100", 15000),
        None,
        None,
        (),
        None,
    ),
    (
        "ipv6 authority bracketed",
        "127.0.1.10",
        "fd00::10",
        80,
        PlanKind.HBONE,
        ("fd00::10", 15008),
        "[fd00::10]:80",
        "v6b",
        ("v6b",),
        None,
    ),
]


@pytest.mark.parametrize("row", [pytest.param(row[1:], id=row[0]) for row in OUTBOUND])
def test_plan_outbound(
    row: tuple[
        str,
        str,
        int,
        PlanKind,
        tuple[str, int],
        str | None,
        str | None,
        tuple[str, ...],
        str | None,
    ],
) -> None:
    """`row`: src, dst, port; expected kind, target, authority, destination uid, identities,
    waypoint uid."""
    src, dst, port, kind, target, authority, dest, sas, waypoint = row
    plan = plan_outbound(
        STATE,
        PlanScope(
            node="node-a" if not src.startswith("127.0.4.") else "node-b",
            rng=random.Random(7),
            node_proxy_ips=(PROXY_IP,),
        ),
        src_ip=src,
        dst_ip=dst,
        dst_port=port,
    )
    assert plan.kind is kind, plan.reason
    assert plan.target_addr == target
    assert plan.authority == authority
    assert (plan.destination_workload.uid if plan.destination_workload else None) == dest
    assert plan.expected_identities == tuple(ident(sa) for sa in sas)
    assert (plan.waypoint.uid if plan.waypoint else None) == waypoint
    assert plan.reason
    assert plan.refused is (kind in (PlanKind.NO_ENDPOINTS, PlanKind.REJECT))
    assert plan.response_flags == ("NR" if kind is PlanKind.NO_ENDPOINTS else "-")
    if "unknown source" in plan.reason or "self-call" in plan.reason:
        assert kind is PlanKind.REJECT
        assert plan.source is None
    else:
        assert plan.source is not None
        assert str(plan.source.addresses[0]) == src
        assert plan.source_identity == plan.source.identity


def test_outbound_service_is_reported() -> None:
    plan = plan_outbound(
        STATE,
        PlanScope(node="node-a", rng=random.Random(1)),
        src_ip="127.0.1.10",
        dst_ip="127.0.3.30",
        dst_port=9080,
    )
    assert plan.service is not None
    assert plan.service.name == "reviews"
    plan = plan_outbound(
        STATE,
        PlanScope(node="node-a", rng=random.Random(1)),
        src_ip="127.0.1.10",
        dst_ip="127.0.3.50",
        dst_port=80,
    )
    assert plan.service is not None
    assert plan.service.name == "empty"
    assert "no healthy endpoint" in plan.reason


def test_outbound_reasons() -> None:
    def reason(**kw: Any) -> str:
        args: dict[str, Any] = {"src_ip": "127.0.1.10", "dst_port": 80}
        args.update(kw)
        return plan_outbound(STATE, PlanScope(node="node-a", rng=random.Random(0)), **args).reason

    assert "unknown source" in reason(src_ip="127.0.9.9", dst_ip="127.0.3.10")
    assert "has no port 81" in reason(dst_ip="127.0.3.10", dst_port=81)
    assert "waypoint" in reason(dst_ip="127.0.3.80")
    assert "not in the mesh" in reason(dst_ip="8.8.8.8")


def test_outbound_random_endpoint_uses_rng() -> None:
    picks: Counter[str] = Counter()
    for seed in range(200):
        plan = plan_outbound(
            STATE,
            PlanScope(node="node-a", rng=random.Random(seed)),
            src_ip="127.0.1.10",
            dst_ip="127.0.3.100",
            dst_port=80,
        )
        assert plan.kind is PlanKind.HBONE
        assert plan.destination_workload is not None
        assert plan.authority == f"{plan.destination_workload.addresses[0]}:8000"
        picks[plan.destination_workload.uid] += 1
    assert set(picks) == {"lb-1", "lb-2"}
    assert min(picks.values()) > 50
    # deterministic for a given seed
    a = plan_outbound(
        STATE,
        PlanScope(node="node-a", rng=random.Random(3)),
        src_ip="127.0.1.10",
        dst_ip="127.0.3.100",
        dst_port=80,
    )
    b = plan_outbound(
        STATE,
        PlanScope(node="node-a", rng=random.Random(3)),
        src_ip="127.0.1.10",
        dst_ip="127.0.3.100",
        dst_port=80,
    )
    assert a == b


def test_outbound_never_picks_unhealthy_waypoint() -> None:
    for seed in range(50):
        plan = plan_outbound(
            STATE,
            PlanScope(node="node-a", rng=random.Random(seed)),
            src_ip="127.0.1.10",
            dst_ip="127.0.3.30",
            dst_port=9080,
        )
        assert plan.waypoint is not None
        assert plan.waypoint.uid == "wp"


def test_outbound_network_scoping() -> None:
    plan = plan_outbound(
        STATE,
        PlanScope(node="node-a", rng=random.Random(0), network="remote"),
        src_ip="127.0.1.10",
        dst_ip="127.0.3.10",
        dst_port=80,
    )
    assert plan.kind is PlanKind.REJECT
    assert "unknown source" in plan.reason


def test_outbound_with_updated_state() -> None:
    # Once echo becomes unhealthy the service has no endpoint.
    echo = STATE.workload("echo")
    assert echo is not None
    sick = dataclasses.replace(echo, status=WorkloadStatus.UNHEALTHY)
    state = STATE.with_updates([sick])
    plan = plan_outbound(
        state,
        PlanScope(node="node-a", rng=random.Random(0)),
        src_ip="127.0.1.10",
        dst_ip="127.0.3.10",
        dst_port=80,
    )
    assert plan.kind is PlanKind.NO_ENDPOINTS


def test_format_authority() -> None:
    assert format_authority(ipaddress.ip_address("10.0.0.1"), 80) == "10.0.0.1:80"
    assert format_authority(ipaddress.ip_address("::1"), 443) == "[::1]:443"


def test_planning_leaves_nothing_for_the_cyclic_gc() -> None:
    """Issue 14: a plan leaves no reference cycle behind, so reference counting frees all of
    it. Compiled by mypyc, closures over `plan_outbound`'s locals were a cycle per connection
    (their shared environment object refers to them and they to it): every branch of the
    table once."""
    calls = [
        (
            PlanScope(
                node="node-b" if src.startswith("127.0.4.") else "node-a",
                rng=random.Random(7),
                node_proxy_ips=(PROXY_IP,),
            ),
            src,
            dst,
            port,
        )
        for _, src, dst, port, *_ in OUTBOUND
    ]
    for scope, src, dst, port in calls:  # memoised lookups filled first
        plan_outbound(STATE, scope, src_ip=src, dst_ip=dst, dst_port=port)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for scope, src, dst, port in calls:
            plan_outbound(STATE, scope, src_ip=src, dst_ip=dst, dst_port=port)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


# --- inbound -------------------------------------------------------------------------------------

SLEEP, OTHER, BLOCKED = ident("sleep"), ident("other"), ident("x", ns="blocked")

# (id, dst, port, src identity, conn dst, node, expected: InboundPlan fields or error class, detail)
INBOUND: list[tuple[str, str, int, SpiffeId | None, str, str | None, Any, str]] = [
    (
        "allowed by selector policy",
        "127.0.2.10",
        8080,
        SLEEP,
        "127.0.2.10",
        "node-b",
        ("127.0.2.10", 8080, "echo", None, False),
        "default/allow-sleep",
    ),
    (
        "denied: other identity",
        "127.0.2.10",
        8080,
        OTHER,
        "127.0.2.10",
        None,
        Unauthorized,
        "no ALLOW policy matched",
    ),
    (
        "denied: plaintext",
        "127.0.2.10",
        8080,
        None,
        "127.0.2.10",
        None,
        Unauthorized,
        "no ALLOW policy matched",
    ),
    (
        "denied: global DENY beats allow",
        "127.0.2.10",
        8080,
        BLOCKED,
        "127.0.2.10",
        None,
        Unauthorized,
        "istio-system/deny-blocked",
    ),
    (
        "global DENY applies without local policies",
        "127.0.2.30",
        9080,
        BLOCKED,
        "127.0.2.30",
        None,
        Unauthorized,
        "deny-blocked",
    ),
    (
        "no policy: anyone allowed",
        "127.0.2.30",
        9080,
        OTHER,
        "127.0.2.30",
        None,
        ("127.0.2.30", 9080, "reviews", None, False),
        "no ALLOW policy applies",
    ),
    (
        "no policy: plaintext allowed",
        "127.0.2.30",
        9080,
        None,
        "127.0.2.30",
        None,
        ("127.0.2.30", 9080, "reviews", None, False),
        "",
    ),
    (
        "unknown destination",
        "127.0.9.9",
        80,
        SLEEP,
        "127.0.9.9",
        None,
        BadRequest,
        "unknown destination",
    ),
    (
        "reserved port 15008",
        "127.0.2.10",
        15008,
        SLEEP,
        "127.0.2.10",
        None,
        BadRequest,
        "self-call",
    ),
    (
        "reserved port 15001",
        "127.0.2.10",
        15001,
        SLEEP,
        "127.0.2.10",
        None,
        BadRequest,
        "self-call",
    ),
    ("bad port", "127.0.2.10", 0, SLEEP, "127.0.2.10", None, BadRequest, "bad port"),
    ("bad ip", "not-an-ip", 80, SLEEP, "127.0.2.10", None, BadRequest, "bad address"),
    (
        "target != conn dst",
        "127.0.2.30",
        9080,
        SLEEP,
        "127.0.2.10",
        None,
        BadRequest,
        "does not match",
    ),
    (
        "vip to non-waypoint",
        "127.0.3.10",
        80,
        SLEEP,
        "127.0.2.10",
        None,
        BadRequest,
        "does not match",
    ),
    ("wrong node", "127.0.2.10", 8080, SLEEP, "127.0.2.10", "node-a", BadRequest, "not on node"),
    (
        "service vip at its waypoint",
        "127.0.3.30",
        9080,
        SLEEP,
        "127.0.4.10",
        "node-b",
        ("127.0.3.30", 9080, "wp", "reviews", True),
        "",
    ),
    (
        "service vip at unhealthy waypoint replica",
        "127.0.3.30",
        9080,
        SLEEP,
        "127.0.4.11",
        None,
        ("127.0.3.30", 9080, "wp2", "reviews", True),
        "",
    ),
    (
        "workload at its waypoint",
        "127.0.2.40",
        8080,
        SLEEP,
        "127.0.4.10",
        None,
        ("127.0.2.40", 8080, "wp", None, True),
        "",
    ),
    (
        "service at a waypoint, but not its own",
        "127.0.3.10",
        80,
        SLEEP,
        "127.0.4.10",
        None,
        BadRequest,
        "does not match",
    ),
    (
        "service at waypoint without endpoints",
        "127.0.3.90",
        80,
        SLEEP,
        "127.0.4.10",
        None,
        UpstreamUnavailable,
        "no usable endpoint",
    ),
    (
        "service at waypoint, undeclared port",
        "127.0.3.30",
        1234,
        SLEEP,
        "127.0.4.10",
        None,
        UpstreamUnavailable,
        "no usable endpoint",
    ),
    (
        "denied at the waypoint",
        "127.0.3.30",
        9080,
        BLOCKED,
        "127.0.4.10",
        None,
        Unauthorized,
        "deny-blocked",
    ),
    (
        "ipv6 target spelled otherwise is the connection's destination",
        "FD00:0:0::10",
        8080,
        SLEEP,
        "fd00::10",
        "node-b",
        ("fd00::10", 8080, "v6b", None, False),
        "",
    ),
    (
        "ipv4-mapped target is not the ipv4 destination",
        "::ffff:127.0.2.10",
        8080,
        SLEEP,
        "127.0.2.10",
        None,
        BadRequest,
        "CONNECT target ::ffff:7f00:20a does not match connection destination 127.0.2.10",
    ),
]


@pytest.mark.parametrize("row", [pytest.param(row[1:], id=row[0]) for row in INBOUND])
def test_plan_inbound(row: tuple[str, int, SpiffeId | None, str, str | None, Any, str]) -> None:
    """`row`: dst, port, source identity, the connection's destination, node; expected (target
    ip, port, receiver, service, via waypoint) or an error class; a detail of the reason."""
    dst, port, src_identity, conn_dst, node, expected, detail = row

    def run() -> InboundPlan:
        return plan_inbound(
            STATE,
            InboundConnect(
                dst_ip=dst,
                dst_port=port,
                src_identity=src_identity,
                src_ip="127.0.1.10",
                conn_dst_ip=conn_dst,
            ),
            node=node,
        )

    if isinstance(expected, type):
        with pytest.raises(expected) as ei:
            run()
        assert detail in str(ei.value)
        return
    plan = run()
    target_ip, target_port, receiver, service, via = expected
    assert plan.target_addr == (target_ip, target_port)
    assert plan.destination_workload.uid == receiver
    assert (plan.service.name if plan.service else None) == service
    assert plan.via_waypoint is via
    assert plan.decision.allowed
    assert detail in (plan.decision.policy or "") + plan.decision.reason


def test_an_inbound_plan_is_immutable() -> None:
    """`InboundPlan` is a plain class (a native constructor in the compiled build, issue 14)
    whose attributes are `Final`: mypy refuses an assignment, and so does the compiled build."""
    plan = plan_inbound(
        STATE,
        InboundConnect(
            dst_ip="127.0.2.10",
            dst_port=8080,
            src_identity=SLEEP,
            src_ip="127.0.1.10",
            conn_dst_ip="127.0.2.10",
        ),
    )
    if native.select() != "compiled":
        pytest.skip("the pure-Python fallback relies on mypy for Final attributes")
    with pytest.raises(AttributeError):
        plan.target_addr = ("127.0.0.1", 1)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "status"), [(BadRequest, 400), (Unauthorized, 401), (UpstreamUnavailable, 503)]
)
def test_inbound_errors_carry_hbone_status(cls: type[HboneError], status: int) -> None:
    assert cls.status == status
    cases: dict[type[HboneError], dict[str, Any]] = {
        BadRequest: {"dst_ip": "127.0.9.9", "conn_dst_ip": "127.0.9.9", "src_identity": SLEEP},
        Unauthorized: {"dst_ip": "127.0.2.10", "conn_dst_ip": "127.0.2.10", "src_identity": None},
        UpstreamUnavailable: {
            "dst_ip": "127.0.3.90",
            "conn_dst_ip": "127.0.4.10",
            "src_identity": SLEEP,
        },
    }
    with pytest.raises(HboneError) as ei:
        plan_inbound(
            STATE,
            InboundConnect(
                dst_port=80 if cls is not Unauthorized else 8080, src_ip="127.0.1.10", **cases[cls]
            ),
        )
    assert type(ei.value) is cls
    assert ei.value.status == status


def test_outbound_then_inbound_agree() -> None:
    """The outbound plan's HBONE target and authority are accepted by the inbound side."""
    out = plan_outbound(
        STATE,
        PlanScope(node="node-a", rng=random.Random(0)),
        src_ip="127.0.1.10",
        dst_ip="127.0.3.10",
        dst_port=80,
    )
    assert out.kind is PlanKind.HBONE
    assert out.authority is not None
    host, _, port = out.authority.rpartition(":")
    inbound = plan_inbound(
        STATE,
        InboundConnect(
            dst_ip=host,
            dst_port=int(port),
            src_identity=out.source_identity,
            src_ip="127.0.1.10",
            conn_dst_ip=out.target_addr[0],
        ),
        node="node-b",
    )
    assert inbound.target_addr == ("127.0.2.10", 8080)
    assert inbound.destination_workload.identity in out.expected_identities


@pytest.mark.parametrize(
    ("case", "dst", "src_sa", "addressed", "allowed"),
    [
        ("workload bound to a waypoint, direct from a client", "127.0.2.40", "sleep", None, False),
        ("workload bound to a waypoint, from the waypoint", "127.0.2.40", "wp", None, True),
        ("workload bound to a waypoint, plaintext", "127.0.2.40", None, None, False),
        (
            "service bound to a waypoint, bypassed",
            "127.0.2.30",
            "sleep",
            "default/reviews.default.svc",
            False,
        ),
        (
            "service bound to a waypoint, via a replica",
            "127.0.2.30",
            "wp2",
            "default/reviews.default.svc",
            True,
        ),
        ("service waypoint, pod addressed directly", "127.0.2.30", "sleep", None, True),
        (
            "service without waypoint",
            "127.0.2.30",
            "sleep",
            "default/ghost-backed.default.svc",
            True,
        ),
    ],
)
def test_inbound_refuses_waypoint_bypass(
    case: str, dst: str, src_sa: str | None, addressed: str | None, allowed: bool
) -> None:
    """Traffic that must pass a waypoint only arrives from that waypoint (401 otherwise)."""
    kwargs: dict[str, Any] = {
        "dst_ip": dst,
        "dst_port": 8080,
        "src_identity": ident(src_sa) if src_sa else None,
        "src_ip": "127.0.1.10",
        "conn_dst_ip": dst,
        "addressed_service": addressed,
    }
    if allowed:
        plan = plan_inbound(STATE, InboundConnect(**kwargs))
        assert str(plan.destination_workload.addresses[0]) == dst
    else:
        with pytest.raises(Unauthorized, match="waypoint"):
            plan_inbound(STATE, InboundConnect(**kwargs))
