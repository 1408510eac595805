"""Translation (pure): enrollment, workloads, services, waypoints, AuthorizationPolicy and
PeerAuthentication rules, the incremental Translator, and the store."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.objects import ObjectKey, parse_object
from controlplane.sources.files import parse_manifest_text
from controlplane.store import ConfigStore
from controlplane.translate import STATIC_STRICT, TranslateOptions
from controlplane.translator import Translator
from meshcore.authz import ConnectionInfo, evaluate
from meshcore.errors import ConfigError
from meshcore.identity import SpiffeId
from meshcore.model import Action, Authorization, Scope, Service, TunnelProtocol, Workload
from meshcore.proto.convert import workload_from_pb, workload_pb
from meshcore.state import MeshState

NS = {"kind": "Namespace", "metadata": {"name": "default"}}
AMBIENT_NS = {
    "kind": "Namespace",
    "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}},
}


def pod(name: str, ip: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {"app": name}},
        "spec": {"nodeName": "node-a", "serviceAccountName": name, **spec},
        "status": {"podIP": ip},
    }


def translate(*docs: dict[str, Any]) -> tuple[Translator, dict[str, Any]]:
    store = ConfigStore()
    store.replace_source("test", [parse_object(d) for d in docs])
    t = Translator(TranslateOptions())
    t.update(store.snapshot)
    recs: dict[str, Any] = {}
    for r in t.records():
        recs[r.uid if isinstance(r, Workload) else r.key] = r
    return t, recs


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("ns_label", "pod_label", "expected"),
    [
        (None, None, TunnelProtocol.NONE),
        ("ambient", None, TunnelProtocol.HBONE),
        ("ambient", "none", TunnelProtocol.NONE),
        (None, "ambient", TunnelProtocol.HBONE),
    ],
)
def test_enrollment(ns_label: str | None, pod_label: str | None, expected: TunnelProtocol) -> None:
    ns = {"kind": "Namespace", "metadata": {"name": "default", "labels": {}}}
    if ns_label:
        ns["metadata"]["labels"]["istio.io/dataplane-mode"] = ns_label  # type: ignore[index]
    labels = {"app": "a"}
    if pod_label:
        labels["istio.io/dataplane-mode"] = pod_label
    _, recs = translate(ns, pod("a", "10.0.0.1", labels))
    assert recs["Kubernetes//Pod/default/a"].tunnel_protocol is expected


def test_workload_and_service_records() -> None:
    docs = [
        AMBIENT_NS,
        pod(
            "web",
            "10.0.0.1",
            containers=[{"name": "c", "ports": [{"name": "http", "containerPort": 9090}]}],
        ),
        pod("other", "10.0.0.2"),
        {"kind": "Pod", "metadata": {"name": "noip", "namespace": "default"}, "spec": {}},
        {
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.1",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http"},
                    {"name": "grpc", "port": 81, "targetPort": 7070},
                ],
            },
        },
    ]
    _, recs = translate(*docs)
    w: Workload = recs["Kubernetes//Pod/default/web"]
    assert str(w.identity) == "spiffe://cluster.local/ns/default/sa/web"
    assert w.node == "node-a"
    assert [str(a) for a in w.addresses] == ["10.0.0.1"]
    ports = w.services_map["default/web.default.svc.cluster.local"]
    assert [(p.service_port, p.target_port) for p in ports] == [(80, 9090), (81, 7070)]
    assert recs["Kubernetes//Pod/default/other"].services == ()
    assert "Kubernetes//Pod/default/noip" not in recs
    svc: Service = recs["default/web.default.svc.cluster.local"]
    assert [str(a.address) for a in svc.addresses] == ["10.96.0.1"]
    assert [(p.service_port, p.target_port) for p in svc.ports] == [(80, 0), (81, 7070)]


def test_waypoint_binding_and_waypoint_for() -> None:
    ns = {
        "kind": "Namespace",
        "metadata": {
            "name": "default",
            "labels": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"},
        },
    }
    gw = {"kind": "Gateway", "metadata": {"name": "wp", "namespace": "default"}}
    gw_all = {
        "kind": "Gateway",
        "metadata": {
            "name": "wp-all",
            "namespace": "default",
            "labels": {"istio.io/waypoint-for": "all"},
        },
    }
    svc = {
        "kind": "Service",
        "metadata": {"name": "s", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 80}]},
    }
    sa = {
        "kind": "ServiceAccount",
        "metadata": {
            "name": "b",
            "namespace": "default",
            "labels": {"istio.io/use-waypoint": "wp-all"},
        },
    }
    t, recs = translate(
        ns,
        gw,
        gw_all,
        svc,
        sa,
        pod("a", "10.0.0.1"),
        pod("b", "10.0.0.2"),
        pod("c", "10.0.0.3", {"app": "c", "istio.io/use-waypoint": "wp"}),
    )
    # Namespace binding to a service waypoint: services get it, workloads do not.
    assert recs["default/s.default.svc.cluster.local"].waypoint.hostname.hostname == (
        "wp.default.svc.cluster.local"
    )
    assert recs["Kubernetes//Pod/default/a"].waypoint is None
    # Per-service-account waypoint (waypoint-for all) binds the workload.
    assert recs["Kubernetes//Pod/default/b"].waypoint.hostname.hostname == (
        "wp-all.default.svc.cluster.local"
    )
    # Explicit pod binding to a service-only waypoint: ignored with a warning.
    assert recs["Kubernetes//Pod/default/c"].waypoint is None
    assert any(w.ref == "Pod default/c" and "not workload" in w.message for w in t.warnings())


def _conn(sa: str | None, port: int = 8080) -> ConnectionInfo:
    ident = (
        SpiffeId(trust_domain="cluster.local", namespace="default", service_account=sa)
        if sa
        else None
    )
    import ipaddress

    return ConnectionInfo(
        src_identity=ident,
        src_ip=ipaddress.ip_address("10.0.0.9"),
        dst_ip=ipaddress.ip_address("10.0.0.1"),
        dst_port=port,
    )


def _decide(recs: dict[str, Any], conn: ConnectionInfo) -> bool:
    state = MeshState.build(
        workloads=[r for r in recs.values() if isinstance(r, Workload)],
        services=[r for r in recs.values() if isinstance(r, Service)],
        policies=[r for r in recs.values() if isinstance(r, Authorization)],
    )
    w = state.workload("Kubernetes//Pod/default/web")
    assert w is not None
    return evaluate(state.policies_for(w), conn).allowed


def test_allow_rule_with_l7_attribute_is_dropped_never_widens() -> None:
    ap = policy(
        "allow",
        {
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [
                {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]},
                {"to": [{"operation": {"methods": ["GET"]}}]},  # L7: would allow everyone
            ],
        },
    )
    t, recs = translate(AMBIENT_NS, pod("web", "10.0.0.1"), ap)
    auth: Authorization = recs["default/allow"]
    assert auth.scope is Scope.WORKLOAD_SELECTOR
    assert len(auth.rules) == 1
    assert _decide(recs, _conn("sleep"))
    assert not _decide(recs, _conn("other")), "the L7 rule must not allow other callers"
    assert any("to.operation.methods" in w.message and "dropped" in w.message for w in t.warnings())


def test_deny_rule_with_l7_attribute_denies_on_l4_part() -> None:
    ap = policy(
        "deny",
        {
            "action": "DENY",
            "rules": [
                {
                    "from": [{"source": {"requestPrincipals": ["*"]}}],
                    "to": [{"operation": {"ports": ["8080"], "paths": ["/admin"]}}],
                }
            ],
        },
    )
    t, recs = translate(AMBIENT_NS, pod("web", "10.0.0.1"), ap)
    assert recs["default/deny"].scope is Scope.NAMESPACE
    assert not _decide(recs, _conn("sleep", 8080)), "denied on the L4 part (port 8080)"
    assert _decide(recs, _conn("sleep", 9090))
    assert any("denies more" in w.message for w in t.warnings())


def test_malformed_policy_fails_closed() -> None:
    ap = policy(
        "broken",
        {
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [{"from": [{"source": {"ipBlocks": ["nope"]}}]}],
        },
    )
    t, recs = translate(AMBIENT_NS, pod("web", "10.0.0.1"), ap)
    assert recs["default/broken"].action is Action.ALLOW
    assert recs["default/broken"].rules == ()
    assert not _decide(recs, _conn("sleep"))
    assert any("fail-closed" in w.message and "ipBlocks" in w.message for w in t.warnings())


def test_peer_authentication_scopes_and_port_levels() -> None:
    mesh_strict = {
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    web_port = {
        "kind": "PeerAuthentication",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}},
        },
    }
    _, recs = translate(
        AMBIENT_NS, pod("web", "10.0.0.1"), pod("db", "10.0.0.2"), mesh_strict, web_port
    )
    assert (
        f"istio-system/{STATIC_STRICT}" in recs["Kubernetes//Pod/default/db"].authorization_policies
    )
    assert not _decide(recs, _conn(None, 8080)), "plaintext denied under STRICT"
    assert _decide(recs, _conn(None, 9090)), "port-level PERMISSIVE"
    assert _decide(recs, _conn("sleep", 8080)), "mTLS allowed"
    # Namespace PERMISSIVE overrides mesh STRICT.
    ns_perm = {
        "kind": "PeerAuthentication",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"mtls": {"mode": "PERMISSIVE"}},
    }
    _, recs = translate(AMBIENT_NS, pod("web", "10.0.0.1"), mesh_strict, ns_perm)
    assert _decide(recs, _conn(None, 8080))


def test_malformed_peer_authentication_fails_closed_as_strict() -> None:
    # main: a PeerAuthentication with a typo was skipped, so plaintext stayed allowed.
    typo = {
        "kind": "PeerAuthentication",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mod": "STRICT"}},
    }
    t, recs = translate(AMBIENT_NS, pod("web", "10.0.0.1"), typo)
    assert not _decide(recs, _conn(None, 8080)), "plaintext denied: enforced as STRICT"
    assert _decide(recs, _conn("sleep", 8080))
    assert any("fail-closed as STRICT" in w.message and "mod" in w.message for w in t.warnings())


def test_translator_is_incremental_and_reports_deltas() -> None:
    store = ConfigStore()
    store.replace_source("t", [parse_object(AMBIENT_NS), parse_object(pod("a", "10.0.0.1"))])
    store.apply("t", [parse_object({**NS, "metadata": {"name": "other"}})])
    t = Translator(TranslateOptions())
    first = t.update(store.snapshot)
    assert {getattr(r, "uid", None) for r in first.upserts} >= {"Kubernetes//Pod/default/a"}
    assert not t.update(store.snapshot), "no change, no delta"
    store.apply("t", [parse_object(pod("b", "10.0.0.2"))])
    d = t.update(store.snapshot)
    assert [r.uid for r in d.upserts if isinstance(r, Workload)] == ["Kubernetes//Pod/default/b"]
    store.apply("t", [], [ObjectKey(kind="Pod", namespace="default", name="a")])
    d = t.update(store.snapshot)
    assert d.removed_addresses == ("Kubernetes//Pod/default/a",)
    assert not d.upserts
    ident = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="b")
    assert t.may_impersonate("node-a", ident)
    assert not t.may_impersonate("node-b", ident)


def test_manifest_parse_errors_name_object_and_field() -> None:
    text = """
kind: Pod
metadata: {name: ok, namespace: default}
status: {podIP: 10.0.0.1}
---
kind: Pod
metadata: {name: bad, namespace: default}
spec: {serviceAccountName: [x]}
---
kind: Deployment
metadata: {name: ignored}
---
kind: AuthorisationPolicy
metadata: {name: typo}
"""
    parsed = parse_manifest_text(text, "f.yaml")
    assert [o.name for o in parsed.objects] == ["ok"]
    refs = dict(parsed.warnings)
    assert "spec.serviceAccountName" in refs["Pod default/bad"]
    assert any("AuthorisationPolicy" in m for m in refs.values())
    with pytest.raises(ConfigError, match=r"Service default/s: spec.ports\[0\].port"):
        parse_object(
            {"kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 0}]}}
        )
    assert parse_manifest_text("a: [", "x.yaml").warnings[0][1].startswith("invalid YAML")


def test_http3_annotation_publishes_the_node_endpoint_in_our_extension() -> None:
    """issue 16: ``ambient-mesh.io/hbone-http3`` -> Workload.http3 (the node's address from
    status.hostIP); a value we cannot honour publishes nothing (peers keep HTTP/2) and warns."""

    def annotated(name: str, value: str | None, host_ip: str | None = "192.168.0.2") -> Any:
        doc = pod(name, "10.0.0.9")
        if value is not None:
            doc["metadata"]["annotations"] = {"ambient-mesh.io/hbone-http3": value}
        if host_ip is not None:
            doc["status"]["hostIP"] = host_ip
        return doc

    t, recs = translate(
        AMBIENT_NS,
        annotated("on", "true"),
        annotated("port", "15010"),
        annotated("off", None),
        annotated("bad", "yes please"),
        annotated("nohost", "true", host_ip=None),
    )
    got = {n: recs[f"Kubernetes//Pod/default/{n}"].http3 for n in ("on", "port", "off", "bad")}
    assert {n: (str(h.address), h.port) if h else None for n, h in got.items()} == {
        "on": ("192.168.0.2", 15008),
        "port": ("192.168.0.2", 15010),
        "off": None,
        "bad": None,
    }
    assert recs["Kubernetes//Pod/default/nohost"].http3 is None
    warned = " ".join(w.message for w in t.warnings())
    assert "'yes please'" in warned
    assert "no status.hostIP" in warned
    # Over the wire: our extension round-trips; an Istio-shaped workload carries none.
    on = recs["Kubernetes//Pod/default/on"]
    assert workload_from_pb(workload_pb(on), "w") == on
    assert not workload_pb(recs["Kubernetes//Pod/default/off"]).extensions


def test_malformed_http3_extension_is_refused_and_foreign_extensions_ignored() -> None:
    _, recs = translate(AMBIENT_NS, pod("w", "10.0.0.9"))
    msg = workload_pb(recs["Kubernetes//Pod/default/w"])
    msg.extensions.add(name="example.com/other").config.Pack(msg)  # someone else's: skipped
    assert workload_from_pb(msg, "w").http3 is None
    ours = msg.extensions.add(name="ambient-mesh.io/hbone-http3")
    ours.config.Pack(msg)  # wrong message type in our extension
    with pytest.raises(ConfigError, match="Http3Endpoint"):
        workload_from_pb(msg, "w")


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "labels": labels}}


def test_workload_locality_comes_from_its_nodes_topology_labels() -> None:
    # main: Nodes were ignored, so no workload ever had a locality (locality LB had nothing).
    zone_a = node(
        "node-a",
        **{
            "topology.kubernetes.io/region": "r1",
            "topology.kubernetes.io/zone": "z1",
            "topology.istio.io/subzone": "rack4",
            "other": "x",
        },
    )
    store = ConfigStore()
    store.replace_source(
        "test",
        [
            parse_object(d)
            for d in (
                AMBIENT_NS,
                zone_a,
                node("node-b"),
                pod("web", "10.1.0.1"),
                pod("db", "10.1.0.2", nodeName="node-b"),
            )
        ],
    )
    t = Translator(TranslateOptions())
    t.update(store.snapshot)
    by_uid = {r.uid: r for r in t.records() if isinstance(r, Workload)}
    web = by_uid["Kubernetes//Pod/default/web"]
    assert web.locality is not None
    assert (web.locality.region, web.locality.zone, web.locality.subzone) == ("r1", "z1", "rack4")
    assert by_uid["Kubernetes//Pod/default/db"].locality is None  # a node without labels
    # Relabelling the node re-translates its pods (another namespace's input).
    moved = node(
        "node-a", **{"topology.kubernetes.io/region": "r2", "topology.kubernetes.io/zone": "z9"}
    )
    store.apply("test", [parse_object(moved)])
    delta = t.update(store.snapshot)
    changed = [r for r in delta.upserts if isinstance(r, Workload)]
    assert [w.uid for w in changed] == ["Kubernetes//Pod/default/web"]
    assert changed[0].locality is not None
    assert (changed[0].locality.region, changed[0].locality.zone) == ("r2", "z9")
