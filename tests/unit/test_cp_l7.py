"""Control plane -> waypoint config: raw objects kept, L7 resources served, waypoint Gateway ->
Service fronting the waypoint pods, the waypoint's xDS apply (per-resource NACK), and the
parsed config equal to what static mode parses from the same YAML."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import yaml
from google.protobuf import any_pb2

from controlplane.l7 import l7_resources
from controlplane.objects import parse_object
from controlplane.store import ConfigStore
from controlplane.translate import TranslateOptions
from controlplane.translator import Translator
from controlplane.xds import XdsServer
from meshcore.config.objects import parse_objects
from meshcore.config.pathnorm import PathPolicy
from meshcore.model import Workload
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto.l7res import L7_TYPE, L7Resource, MeshSettings, pack_l7, unpack_l7
from meshcore.state import MeshState
from tests.waypoint_fixtures import SEED_VS
from waypoint.xds import L7Store

AMBIENT_NS = {
    "kind": "Namespace",
    "metadata": {
        "name": "default",
        "labels": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"},
    },
}
GATEWAY: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "namespace": "default"},
    "spec": {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    },
}
DENY = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-private", "namespace": "default"},
    "spec": {
        "targetRefs": [
            {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
        ],
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/private*"]}}]}],
    },
}


def pod(name: str, ip: str, labels: dict[str, str], sa: str = "") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": "node-a", "serviceAccountName": sa or name},
        "status": {"podIP": ip},
    }


REVIEWS_SVC = {
    "kind": "Service",
    "metadata": {"name": "reviews", "namespace": "default"},
    "spec": {
        "clusterIP": "10.96.0.20",
        "selector": {"app": "reviews"},
        "ports": [{"name": "http", "port": 9080, "targetPort": 9080}],
    },
}
WP_POD = pod(
    "waypoint-waypoint",
    "10.0.0.9",
    {"gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"},
    sa="waypoint",
)


def snapshot(*docs: Any) -> Any:
    store = ConfigStore()
    store.replace_source("test", [parse_object(d) for d in docs])
    return store.snapshot


def objects() -> list[Any]:
    return [
        AMBIENT_NS,
        GATEWAY,
        REVIEWS_SVC,
        WP_POD,
        DENY,
        *yaml.safe_load_all(SEED_VS),
        pod("reviews-v1", "10.0.0.1", {"app": "reviews", "version": "v1", "tier": "a"}),
        pod("reviews-v2", "10.0.0.2", {"app": "reviews", "version": "v2"}),
    ]


def test_waypoint_gateway_becomes_a_service_fronting_its_pods_and_binds_the_namespace() -> None:
    t = Translator(TranslateOptions())
    t.update(snapshot(*objects()))
    state = MeshState.empty().with_updates(t.records(), ())
    wp_key = "default/waypoint.default.svc.cluster.local"
    assert state.service(wp_key) is not None
    eps = state.endpoints(wp_key)
    assert [e.workload.name for e in eps] == ["waypoint-waypoint"]
    reviews = state.service("default/reviews.default.svc.cluster.local")
    assert reviews is not None
    assert reviews.waypoint is not None
    assert reviews.waypoint.hostname is not None
    assert reviews.waypoint.hostname.key == wp_key
    # The waypoint's own workload is never bound to a waypoint and is not captured.
    wp = next(r for r in t.records() if isinstance(r, Workload) and r.name == "waypoint-waypoint")
    assert wp.waypoint is None
    assert wp.tunnel_protocol.name == "NONE"
    # Its node may obtain its certificate (the CA's impersonation rule).
    from meshcore.identity import SpiffeId

    sid = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="waypoint")
    assert t.may_impersonate("node-a", sid)
    assert not t.may_impersonate("node-b", sid)


def test_gateway_of_another_class_gets_no_service() -> None:
    other = json.loads(json.dumps(GATEWAY))
    other["spec"]["gatewayClassName"] = "istio"
    t = Translator(TranslateOptions())
    t.update(snapshot(other))
    assert not any(getattr(r, "hostname", "").startswith("waypoint.") for r in t.records())


def test_l7_resources_carry_the_objects_as_written_and_pod_labels() -> None:
    res = l7_resources(snapshot(*objects()), TranslateOptions())
    assert set(res) == {
        "VirtualService/default/reviews-route",
        "AuthorizationPolicy/default/deny-private",
        "WorkloadLabels/default/pods",
    }
    vs = res["VirtualService/default/reviews-route"].document()
    assert vs["spec"] == yaml.safe_load(SEED_VS)["spec"]
    assert vs["metadata"]["namespace"] == "default"  # filled in: the seed has none
    labels = json.loads(res["WorkloadLabels/default/pods"].json)["labels"]
    assert labels["Kubernetes//Pod/default/reviews-v1"]["tier"] == "a"
    # Same config as static mode parses from the same YAML.
    store = L7Store()
    resp = dpb.DeltaDiscoveryResponse(type_url=L7_TYPE, nonce="1")
    for name, r in res.items():
        resp.resources.add(name=name, version="1", resource=pack_l7(r))
    assert store.apply(resp) == []
    cfg = store.config()
    static = parse_objects([*yaml.safe_load_all(SEED_VS), DENY])
    assert [t.name for t in cfg.route_tables] == [t.name for t in static.route_tables]
    assert cfg.route_tables[0].routes == static.route_tables[0].routes
    assert [p.key for p in cfg.policies] == [p.key for p in static.policies]
    assert dict(dict(cfg.workload_labels)["Kubernetes//Pod/default/reviews-v1"])["tier"] == "a"


def test_l7_versions_change_only_with_the_object() -> None:
    a = l7_resources(snapshot(*objects()), TranslateOptions())
    b = l7_resources(snapshot(*reversed(objects())), TranslateOptions())
    assert a == b
    changed = yaml.safe_load(SEED_VS)
    changed["spec"]["http"][1]["route"][0]["weight"] = 50
    changed["spec"]["http"][1]["route"][1]["weight"] = 50
    c = l7_resources(
        snapshot(*[o for o in objects() if o.get("kind") != "VirtualService"], changed),
        TranslateOptions(),
    )
    key = "VirtualService/default/reviews-route"
    assert c[key] != a[key]
    assert (
        c["AuthorizationPolicy/default/deny-private"]
        == a["AuthorizationPolicy/default/deny-private"]
    )


def test_xds_publish_set_sends_changes_and_removals_only() -> None:
    server = XdsServer()
    res = l7_resources(snapshot(*objects()), TranslateOptions())
    server.publish_set(L7_TYPE, {k: pack_l7(r) for k, r in res.items()})
    table = server.table.types[L7_TYPE]
    assert set(table) == set(res)
    v0 = server.table.version
    server.publish_set(L7_TYPE, {k: pack_l7(r) for k, r in res.items()})
    assert server.table.version == v0  # nothing changed, nothing pushed
    del res["AuthorizationPolicy/default/deny-private"]
    server.publish_set(L7_TYPE, {k: pack_l7(r) for k, r in res.items()})
    assert "AuthorizationPolicy/default/deny-private" not in table
    assert server.table.version == v0 + 1


def test_waypoint_store_nacks_a_bad_resource_alone_and_applies_removals() -> None:
    store = L7Store()
    good = L7Resource(
        kind="VirtualService",
        namespace="default",
        name="reviews-route",
        json=json.dumps(yaml.safe_load(SEED_VS)),
    )
    bad_kind = L7Resource(kind="Secret", namespace="default", name="x", json="{}")
    wrong = any_pb2.Any(type_url="type.googleapis.com/other", value=b"")
    resp = dpb.DeltaDiscoveryResponse(type_url=L7_TYPE, nonce="1")
    resp.resources.add(name=good.key, version="1", resource=pack_l7(good))
    resp.resources.add(name="Secret/default/x", version="1", resource=pack_l7(bad_kind))
    resp.resources.add(name="other", version="1", resource=wrong)
    errors = store.apply(resp)
    assert [n for n, _ in errors] == ["Secret/default/x", "other"]
    assert list(store.resources) == [good.key]
    assert len(store.config().route_tables) == 1
    rm = dpb.DeltaDiscoveryResponse(type_url=L7_TYPE, nonce="2", removed_resources=[good.key])
    assert store.apply(rm) == []
    assert store.config().route_tables == ()


def test_unpack_checks_json_kind() -> None:
    r = L7Resource(kind="VirtualService", namespace="d", name="n", json='{"kind": "HTTPRoute"}')
    with pytest.raises(Exception, match="HTTPRoute"):
        unpack_l7(r.key, pack_l7(r))


BAD_ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad, namespace: default}
spec:
  parentRefs: [{kind: Service, name: reviews, sectionName: http}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
"""


def test_control_plane_reports_and_waypoint_nacks_a_bad_object() -> None:
    # main: an object with a refused field was dropped by the waypoint with a log line only;
    # the control plane said nothing and the waypoint ACKed.
    from controlplane.l7 import l7_findings

    objs = [*objects(), yaml.safe_load(BAD_ROUTE)]
    res = l7_resources(snapshot(*objs), TranslateOptions())
    findings = l7_findings(res)
    (f,) = findings["HTTPRoute default/bad"]
    assert f.code == "AMB0202"
    assert f.path == "spec.parentRefs[0].sectionName"
    store = L7Store()
    resp = dpb.DeltaDiscoveryResponse(type_url=L7_TYPE, nonce="1")
    for name, r in res.items():
        resp.resources.add(name=name, version="1", resource=pack_l7(r))
    assert store.apply(resp) == []
    cfg = store.config()
    nacks = store.nacks(cfg, [r.name for r in resp.resources])
    assert [n for n, _ in nacks] == ["HTTPRoute/default/bad"]
    assert "spec.parentRefs[0].sectionName" in nacks[0][1]
    assert [t.name for t in cfg.route_tables] == ["reviews-route"]  # the bad one left out


def test_gateway_field_findings() -> None:
    from controlplane.l7 import gateway_findings

    gw = {**GATEWAY, "spec": {**GATEWAY["spec"], "addresses": [{"value": "10.0.0.9"}]}}
    found = gateway_findings(snapshot(gw))
    (f,) = found["Gateway default/waypoint"]
    assert f.code == "AMB0202"
    assert f.path == "spec.addresses"


def reserved(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def test_reserved_policy_names_are_findings_merged_with_field_findings() -> None:
    """A policy node proxies enforce fail-closed for its reserved name is an Error finding on
    ``metadata.name`` (so the status writer and analyze report it, not only the translator's
    log); merged with the same object's field findings, neither replaces the other (a dict
    merge would keep the last map's list only). targetRef and AUDIT policies have no L4 record
    under that name: nothing to say."""
    from controlplane.l7 import l7_findings, merge_findings, reserved_name_findings

    bad_field = {"from": [{"source": {"principal": ["x"]}}]}
    snap = snapshot(
        reserved("istio_converted_allow", rules=[bad_field]),
        reserved("istio_requestauthn_deny", action="DENY", rules=[{}]),
        reserved("istio_converted_waypoint", targetRefs=[{"kind": "Service", "name": "web"}]),
        reserved("istio_converted_audit", action="AUDIT", rules=[{}]),
        reserved("converted_not_reserved", rules=[{}]),
    )
    found = reserved_name_findings(snap)
    assert sorted(found) == [
        "AuthorizationPolicy default/istio_converted_allow",
        "AuthorizationPolicy default/istio_requestauthn_deny",
    ]
    (allow,) = found["AuthorizationPolicy default/istio_converted_allow"]
    assert (allow.code, allow.level, allow.path) == ("AMB0205", "Error", "metadata.name")
    assert "allows nothing" in allow.message
    assert "'istio_converted_rejected_istio_converted_allow'" in allow.message
    (deny,) = found["AuthorizationPolicy default/istio_requestauthn_deny"]
    assert "'istio_requestauthn_'" in deny.message
    assert "denies everything" in deny.message
    fields = l7_findings(l7_resources(snap, TranslateOptions()))
    merged = merge_findings(fields, found)
    codes = [f.code for f in merged["AuthorizationPolicy default/istio_converted_allow"]]
    assert codes == ["AMB0201", "AMB0205"]


def test_memoised_l7_resources_and_findings_equal_uncached() -> None:
    """The control plane's caches (issue 14) only memoise: after every store change the cached
    resources and findings equal a from-scratch derivation, and an unchanged namespace's
    resources are reused (same objects)."""
    from controlplane.l7 import FindingsCache, NamespaceCache, l7_findings

    opts = TranslateOptions()
    store = ConfigStore()
    ns_cache: NamespaceCache = {}
    f_cache: FindingsCache = {}
    bad_vs = {
        **yaml.safe_load(SEED_VS),
        "metadata": {"name": "bad", "namespace": "other"},
        "spec": {"hosts": ["x"], "bogus": 1},
    }
    steps: list[list[Any]] = [
        [AMBIENT_NS, yaml.safe_load(SEED_VS), bad_vs],
        [
            {
                "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default", "labels": {"a": "1"}},
                "status": {"podIP": "10.0.0.1"},
            }
        ],
        [
            {
                "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default", "labels": {"a": "2"}},
                "status": {"podIP": "10.0.0.1"},
            }
        ],
        [{**bad_vs, "spec": {"hosts": ["x"]}}],
    ]
    found = []
    for i, docs in enumerate(steps):
        previous = dict(ns_cache)
        store.apply("t", [parse_object(d) for d in docs])
        cached = l7_resources(store.snapshot, opts, ns_cache)
        assert cached == l7_resources(store.snapshot, opts)
        findings = l7_findings(cached, f_cache)
        assert findings == l7_findings(cached)
        found.append(sorted(findings))
        if i in (1, 2):  # a pod of "default" changed: "other" was not derived again
            assert ns_cache["other"][1] is previous["other"][1]
            assert cached["VirtualService/other/bad"] is previous["other"][1][0]
    assert found == [["VirtualService other/bad"]] * 3 + [[]]  # reported, then fixed


def test_publish_set_skips_identical_objects_and_removes_missing() -> None:
    srv = XdsServer()
    a = pack_l7(
        L7Resource(
            kind="VirtualService", namespace="d", name="a", json='{"kind":"VirtualService","x":1}'
        )
    )
    b = pack_l7(
        L7Resource(
            kind="VirtualService", namespace="d", name="b", json='{"kind":"VirtualService","x":2}'
        )
    )
    srv.publish_set(L7_TYPE, {"a": a, "b": b})
    v = srv.table.version
    srv.publish_set(L7_TYPE, {"a": a, "b": b})  # the same objects: nothing to do
    assert srv.table.version == v
    b2 = pack_l7(
        L7Resource(
            kind="VirtualService", namespace="d", name="b", json='{"kind":"VirtualService","x":3}'
        )
    )
    srv.publish_set(L7_TYPE, {"b": b2})  # a removed, b changed
    assert srv.table.version == v + 1
    assert set(srv.table.types[L7_TYPE]) == {"b"}
    assert srv.table.types[L7_TYPE]["b"].version != ""
    srv.publish_set(L7_TYPE, {"b": pack_l7(unpack_l7("b", b2))})  # equal content, new object
    assert srv.table.version == v + 1


def test_mesh_settings_resource_flags_override_and_bad_values_nacked() -> None:
    """The MeshSettings resource round-trips; each waypoint flag given wins over its mesh
    setting; a value that is not a setting name is NACKed by name; removal -> defaults."""
    mesh = MeshSettings(path_normalization="MERGE_SLASHES", escaped_slashes_action="REJECT_REQUEST")
    res = mesh.resource()
    assert res.key == "MeshSettings//mesh"
    assert unpack_l7(res.key, pack_l7(res)) == res
    store = L7Store()
    resp = dpb.DeltaDiscoveryResponse(type_url=L7_TYPE, nonce="1")
    resp.resources.add(name=res.key, version="1", resource=pack_l7(res))
    assert store.apply(resp) == []
    assert store.config().route_tables == ()
    assert store.path_policy(("", "")) == PathPolicy.parse("MERGE_SLASHES", "REJECT_REQUEST")
    assert store.path_policy(("NONE", "")) == PathPolicy.parse("NONE", "REJECT_REQUEST")
    bad = MeshSettings(path_normalization="MERGE").resource()
    resp = dpb.DeltaDiscoveryResponse(type_url=L7_TYPE, nonce="2")
    resp.resources.add(name=bad.key, version="2", resource=pack_l7(bad))
    assert [n for n, _ in store.apply(resp)] == ["MeshSettings//mesh"]
    rm = dpb.DeltaDiscoveryResponse(type_url=L7_TYPE, nonce="3", removed_resources=[res.key])
    assert store.apply(rm) == []
    assert store.path_policy(("", "")) == PathPolicy()


def test_control_plane_serves_mesh_settings_only_when_set(tmp_path: Any) -> None:
    from controlplane.app import ControlPlane, parse_args

    args = ["--manifest-dir", str(tmp_path), "--ca-dir", str(tmp_path / "ca")]
    assert parse_args(args).mesh == MeshSettings()
    settings = parse_args([*args, "--path-normalization", "decode_and_merge_slashes"])
    assert settings.mesh == MeshSettings(path_normalization="DECODE_AND_MERGE_SLASHES")
    for mesh, served in ((MeshSettings(), False), (settings.mesh, True)):
        cp = ControlPlane(
            replace(settings, listen="127.0.0.1:0", insecure_no_node_auth=True, mesh=mesh)
        )
        cp.translate_now()
        assert ("MeshSettings//mesh" in cp.xds.table.types.get(L7_TYPE, {})) is served
