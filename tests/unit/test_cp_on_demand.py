"""On-demand Address scope (controlplane.xds.ResourceTable.scope / lookup): what a node proxy
must hold to decide without partial state (issue 14). Pure: records -> table -> names."""

from __future__ import annotations

from typing import Any

from controlplane.translator import Delta
from controlplane.xds import ResourceTable
from meshcore.proto.yamlform import parse_service, parse_workload

WP_SVC = "default/wp.default.svc.cluster.local"
APP_SVC = "default/app.default.svc.cluster.local"
OTHER_SVC = "default/other.default.svc.cluster.local"


def wl(name: str, node: str, ip: str, services: tuple[str, ...] = (), **over: Any) -> Any:
    d: dict[str, Any] = {
        "uid": name,
        "name": name,
        "namespace": "default",
        "addresses": [ip],
        "node": node,
        "services": {k: {"ports": [{"servicePort": 80, "targetPort": 8080}]} for k in services},
    }
    d.update(over)
    return parse_workload(d)


def svc(name: str, vip: str, **over: Any) -> Any:
    d: dict[str, Any] = {
        "name": name,
        "namespace": "default",
        "hostname": f"{name}.default.svc.cluster.local",
        "addresses": [{"address": vip}],
        "ports": [{"servicePort": 80, "targetPort": 8080}],
    }
    d.update(over)
    return parse_service(d)


def table() -> ResourceTable:
    t = ResourceTable()
    wp_ref = {"hostname": {"namespace": "default", "hostname": "wp.default.svc.cluster.local"}}
    t.apply(
        Delta(
            upserts=(
                svc("wp", "10.96.0.1"),
                wl("wp-1", "n-wp", "10.0.9.1", (WP_SVC,)),
                svc("app", "10.96.0.2", waypoint=wp_ref),
                wl("app-1", "n1", "10.0.1.1", (APP_SVC,)),
                wl("app-2", "n2", "10.0.2.1", (APP_SVC,)),
                svc("other", "10.96.0.3"),
                wl("other-1", "n3", "10.0.3.1", (OTHER_SVC,)),
                wl("solo", "n3", "10.0.3.2", waypoint={"address": {"address": "10.0.9.1"}}),
            )
        )
    )
    return t


def test_vip_lookup_brings_service_all_endpoints_and_waypoint() -> None:
    t = table()
    assert t.lookup(["/10.96.0.2"]) == {APP_SVC}
    assert t.scope(t.lookup(["/10.96.0.2"])) == {APP_SVC, "app-1", "app-2", WP_SVC, "wp-1"}
    assert t.lookup(["/10.99.0.1"]) == set()


def test_pod_lookup_brings_its_waypoint_not_its_services() -> None:
    t = table()
    assert t.scope(t.lookup(["/10.0.3.2"])) == {"solo", "wp-1"}
    assert t.scope(t.lookup(["/10.0.3.1"])) == {"other-1"}


def test_node_local_scope() -> None:
    t = table()
    # A local pod brings its services (with every endpoint) and their waypoint.
    assert t.scope((), t.by_node["n1"]) == {"app-1", APP_SVC, "app-2", WP_SVC, "wp-1"}
    # The node running the waypoint gets what is bound to it (service- or address-bound).
    assert t.scope((), t.by_node["n-wp"]) >= {"wp-1", WP_SVC, APP_SVC, "app-1", "app-2", "solo"}
    assert "other-1" not in t.scope((), t.by_node["n-wp"])
    # Nothing of other nodes' unrelated pods.
    assert t.scope((), t.by_node["n3"]) == {"other-1", OTHER_SVC, "solo", "wp-1"}


def test_indexes_follow_updates_and_removals() -> None:
    t = table()
    t.apply(Delta(upserts=(wl("app-2", "n2", "10.0.2.9", ()),), removed_addresses=("app-1",)))
    assert t.lookup(["/10.0.2.1"]) == set()
    assert t.lookup(["/10.0.2.9"]) == {"app-2"}
    assert t.scope(t.lookup(["/10.96.0.2"])) == {APP_SVC, WP_SVC, "wp-1"}
    assert "n1" not in t.by_node


def test_subscriptions_bounded_and_policies_always_wildcard(monkeypatch: Any) -> None:
    from controlplane import xds as xds_mod
    from controlplane.xds import ProxyConnection, XdsServer
    from meshcore.proto import discovery_pb2 as dpb
    from meshcore.proto.convert import ADDRESS_TYPE, AUTHORIZATION_TYPE

    monkeypatch.setattr(xds_mod, "MAX_SUBSCRIPTIONS", 3)
    srv = XdsServer()
    conn = ProxyConnection(id=1, node="n1", peer="test", connected_at=0.0)

    def req(type_url: str, sub: list[str], unsub: list[str] = []) -> None:  # noqa: B006
        srv._handle_request(
            conn,
            dpb.DeltaDiscoveryRequest(
                type_url=type_url, resource_names_subscribe=sub, resource_names_unsubscribe=unsub
            ),
        )

    req(ADDRESS_TYPE, ["*"], ["*"])  # ztunnel's on-demand "subscribe to nothing"
    req(AUTHORIZATION_TYPE, ["*"], ["*"])  # refused for policies: always everything
    st = conn.types[ADDRESS_TYPE]
    assert not st.wildcard
    assert conn.types[AUTHORIZATION_TYPE].wildcard
    req(ADDRESS_TYPE, [f"/10.0.0.{i}" for i in range(10)])
    assert len(st.subs) == 3
    assert st.demanded == st.subs
    req(AUTHORIZATION_TYPE, [], ["*"])
    assert conn.types[AUTHORIZATION_TYPE].wildcard
    req(ADDRESS_TYPE, ["*"])  # back to wildcard: the whole table on the next push
    assert st.wildcard
    assert st.initial_pending
