"""Tests for meshcore.state: snapshot indexes, policy selection, incremental updates, dump."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from meshcore.errors import ConfigError
from meshcore.model import Port, Workload
from meshcore.proto.yamlform import (
    load_mesh_config,
    parse_authorization,
    parse_mesh_config,
    parse_service,
    parse_workload,
)
from meshcore.state import Endpoint, MeshState

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "static" / "mesh.yaml"
ECHO = "default/echo.default.svc.cluster.local"


def wl(name: str, ip: str, **over: Any) -> Workload:
    d: dict[str, Any] = {
        "uid": name,
        "name": name,
        "namespace": "default",
        "addresses": [ip],
        "tunnelProtocol": "HBONE",
        "node": "node-a",
    }
    d.update(over)
    return parse_workload(d)


def policy(name: str, ns: str, scope: str) -> Any:
    return parse_authorization({"name": name, "namespace": ns, "scope": scope})


@pytest.fixture
def example() -> MeshState:
    return MeshState.from_config(load_mesh_config(EXAMPLE))


def test_example_indexes(example: MeshState) -> None:
    client = example.workload_by_address("127.0.1.10")
    server = example.workload_by_address(ipaddress.ip_address("127.0.2.10"))
    assert client is not None
    assert client.name == "client"
    assert server is not None
    assert server.name == "server"
    assert example.workload_by_address("127.0.1.10", network="other") is None
    assert example.workload_by_address("127.0.3.10") is None  # a VIP, not a workload
    svc = example.service_by_vip("127.0.3.10")
    assert svc is not None
    assert svc.key == ECHO
    assert example.service(ECHO) is svc
    assert example.service_by_vip("127.0.2.10") is None
    assert example.workload("Kubernetes//Pod/default/server") is server
    assert [w.name for w in example.local_workloads("node-a")] == ["client"]
    assert [w.name for w in example.local_workloads("node-b")] == ["server"]
    assert example.local_workloads("node-z") == ()
    (ep,) = example.endpoints(ECHO)
    assert ep.workload is server
    assert ep.target_port(svc.ports[0]) == 8080
    assert example.endpoints("default/none") == ()
    assert example.services_for(server) == (svc,)
    assert example.services_for(client) == ()


def test_policies_for_example(example: MeshState) -> None:
    server = example.workload_by_address("127.0.2.10")
    client = example.workload_by_address("127.0.1.10")
    assert server is not None
    assert client is not None
    assert [p.key for p in example.policies_for(server)] == ["default/allow-sleep-to-echo"]
    assert example.policies_for(client) == ()


def test_policies_for_scopes() -> None:
    state = MeshState.build(
        workloads=[
            wl(
                "a", "10.0.0.1", authorizationPolicies=["default/sel", "default/ns", "default/gone"]
            ),
            wl("b", "10.0.0.2", namespace="other"),
        ],
        policies=[
            policy("global", "istio-system", "GLOBAL"),
            policy("ns", "default", "NAMESPACE"),
            policy("ns", "other", "NAMESPACE"),
            policy("sel", "default", "WORKLOAD_SELECTOR"),
            policy("sel2", "default", "WORKLOAD_SELECTOR"),
        ],
    )
    a, b = state.workload("a"), state.workload("b")
    assert a is not None
    assert b is not None
    # GLOBAL everywhere; NAMESPACE by namespace; selector only when listed; unknown key ignored;
    # a listed NAMESPACE policy is not duplicated.
    assert [p.key for p in state.policies_for(a)] == [
        "default/ns",
        "default/sel",
        "istio-system/global",
    ]
    assert [p.key for p in state.policies_for(b)] == ["istio-system/global", "other/ns"]


def test_policies_for_is_computed_once_per_snapshot() -> None:
    """Issue 14: `policies_for` scans every policy, so a snapshot remembers it per (namespace,
    listed policies) instead of per connection; the next snapshot computes it afresh."""
    state = MeshState.build(
        workloads=[wl("a", "10.0.0.1"), wl("b", "10.0.0.2")],
        policies=[policy("ns", "default", "NAMESPACE")],
    )
    a, b = state.workload("a"), state.workload("b")
    assert a is not None
    assert b is not None
    first = state.policies_for(a)
    assert state.policies_for(b) is first  # same namespace, nothing listed: one computation
    updated = state.with_updates([policy("global", "istio-system", "GLOBAL")])
    assert [p.key for p in updated.policies_for(a)] == ["default/ns", "istio-system/global"]
    assert [p.key for p in state.policies_for(a)] == ["default/ns"]  # the old snapshot's
    removed = updated.with_updates(policy_removals=["default/ns"])
    assert [p.key for p in removed.policies_for(a)] == ["istio-system/global"]


def test_endpoints_target_port_rules() -> None:
    svc = parse_service(
        {
            "name": "s",
            "namespace": "default",
            "hostname": "s.svc",
            "addresses": [{"address": "10.9.0.1"}],
            "ports": [
                {"servicePort": 80, "targetPort": 8080},
                {"servicePort": 81},
            ],
        }
    )
    override = wl(
        "override",
        "10.0.0.1",
        services={"default/s.svc": {"ports": [{"servicePort": 80, "targetPort": 9000}]}},
    )
    plain = wl("plain", "10.0.0.2", services={"default/s.svc": {}})
    zero = wl(
        "zero",
        "10.0.0.3",
        services={"default/s.svc": {"ports": [{"servicePort": 80, "targetPort": 0}]}},
    )
    state = MeshState.build(workloads=[zero, plain, override], services=[svc])
    eps = {e.workload.uid: e for e in state.endpoints("default/s.svc")}
    assert [e.workload.uid for e in state.endpoints("default/s.svc")] == [
        "override",
        "plain",
        "zero",
    ]
    p80, p81 = svc.ports
    assert eps["override"].target_port(p80) == 9000  # workload mapping wins
    assert eps["plain"].target_port(p80) == 8080  # falls back to the service
    assert eps["zero"].target_port(p80) == 8080  # 0 = unset
    assert eps["plain"].target_port(p81) is None  # neither set
    assert Endpoint(workload=plain, ports=()).healthy


def test_endpoints_for_unknown_service_key_are_still_indexed() -> None:
    # xDS may deliver the workload before its service.
    state = MeshState.build(workloads=[wl("a", "10.0.0.1", services={"default/later.svc": {}})])
    assert [e.workload.uid for e in state.endpoints("default/later.svc")] == ["a"]


def test_build_rejects_duplicates() -> None:
    with pytest.raises(ConfigError, match="already used"):
        MeshState.build(workloads=[wl("a", "10.0.0.1"), wl("b", "10.0.0.1")])
    with pytest.raises(ConfigError, match="duplicate uid"):
        MeshState.build(workloads=[wl("a", "10.0.0.1"), wl("a", "10.0.0.2")])


def test_snapshot_is_immutable(example: MeshState) -> None:
    with pytest.raises(AttributeError):
        example._workloads = {}  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        example.foo = 1
    with pytest.raises(TypeError):
        example._workloads["x"] = wl("x", "10.0.0.1")  # type: ignore[index]


def test_with_updates_returns_new_snapshot_and_keeps_old(example: MeshState) -> None:
    new = wl("new", "127.0.1.20", node="node-a")
    updated = example.with_updates([new])
    assert updated is not example
    assert updated.workload_by_address("127.0.1.20") == new
    assert example.workload_by_address("127.0.1.20") is None
    assert [w.name for w in updated.local_workloads("node-a")] == ["client", "new"]
    assert [w.name for w in example.local_workloads("node-a")] == ["client"]


def test_with_updates_replace_moves_address(example: MeshState) -> None:
    old = example.workload("Kubernetes//Pod/default/client")
    assert old is not None
    moved = parse_workload({**old.to_dict(), "addresses": ["127.0.1.99"], "node": "node-b"})
    s = example.with_updates([moved])
    assert s.workload_by_address("127.0.1.10") is None
    assert s.workload_by_address("127.0.1.99") == moved
    assert s.local_workloads("node-a") == ()


def test_with_updates_removals(example: MeshState) -> None:
    s = example.with_updates(
        removals=["Kubernetes//Pod/default/server", ECHO, "no/such"],
        policy_removals=["default/allow-sleep-to-echo"],
    )
    assert s.workload_by_address("127.0.2.10") is None
    assert s.service_by_vip("127.0.3.10") is None
    assert s.service(ECHO) is None
    assert s.endpoints(ECHO) == ()
    assert s.policies == ()
    assert len(s.workloads) == 1


def test_with_updates_removing_service_keeps_endpoints_of_workloads(example: MeshState) -> None:
    s = example.with_updates(removals=[ECHO])
    # the workload still claims the service; it shows up again when the service is re-added
    assert [e.workload.name for e in s.endpoints(ECHO)] == ["server"]
    svc = example.service(ECHO)
    assert svc is not None
    again = s.with_updates([svc])
    assert again.service_by_vip("127.0.3.10") == svc


def test_with_updates_last_upsert_wins_address() -> None:
    s = MeshState.build(workloads=[wl("old-pod", "10.0.0.1")])
    s2 = s.with_updates([wl("new-pod", "10.0.0.1")])
    found = s2.workload_by_address("10.0.0.1")
    assert found is not None
    assert found.uid == "new-pod"
    # an unrelated later update does not hand the address back to the old pod
    s3 = s2.with_updates([wl("other", "10.0.0.2")])
    found = s3.workload_by_address("10.0.0.1")
    assert found is not None
    assert found.uid == "new-pod"
    # once the new pod goes, the old one (still present) owns it again
    s4 = s3.with_updates(removals=["new-pod"])
    found = s4.workload_by_address("10.0.0.1")
    assert found is not None
    assert found.uid == "old-pod"


def test_with_updates_policy_upsert_changes_selection(example: MeshState) -> None:
    server = example.workload_by_address("127.0.2.10")
    assert server is not None
    p = parse_authorization(
        {"name": "deny", "namespace": "istio-system", "scope": "GLOBAL", "action": "DENY"}
    )
    s = example.with_updates([p])
    assert [x.key for x in s.policies_for(server)] == [
        "default/allow-sleep-to-echo",
        "istio-system/deny",
    ]


def test_to_dump_round_trips(example: MeshState) -> None:
    dump = example.to_dump()
    assert set(dump) == {"workloads", "services", "policies"}
    assert [w["name"] for w in dump["workloads"]] == ["client", "server"]
    again = MeshState.from_config(parse_mesh_config(dump))
    assert again.to_dump() == dump


def test_empty_and_repr() -> None:
    e = MeshState.empty()
    assert e.workloads == ()
    assert e.services == ()
    assert e.policies == ()
    assert e.to_dump() == {"workloads": [], "services": [], "policies": []}
    assert repr(e) == "MeshState(workloads=0, services=0, policies=0)"
    assert e.workload_by_address("1.2.3.4") is None


def test_ports_in_endpoint_are_the_workloads(example: MeshState) -> None:
    (ep,) = example.endpoints(ECHO)
    assert ep.ports == (Port(service_port=80, target_port=8080),)
