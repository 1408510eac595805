"""Desired objects and status of the in-cluster waypoint controller (controlplane/waypoints.py)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from controlplane.waypoints import (
    GATEWAY_NAME,
    MANAGED_BY,
    WaypointSettings,
    desired_objects,
    gateway_status,
    is_waypoint,
    merge,
    needs_patch,
)
from meshcore.config.findings import Finding

SETTINGS = WaypointSettings(
    image="reg.example/waypoint:1.2", xds_address="cp.istio-system.svc:15012", roots_pem="PEM"
)
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def gw(name: str = "waypoint", cls: str = "istio-waypoint", **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": "u-1",
            "generation": 3,
            "annotations": annotations,
        },
        "spec": {
            "gatewayClassName": cls,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def test_class_filter() -> None:
    assert is_waypoint(gw())
    assert not is_waypoint(gw(cls="istio"))
    assert not is_waypoint({"metadata": {"name": "x"}})


def test_deployment_spec() -> None:
    objs = desired_objects(gw(), SETTINGS)
    dep = objs.deployment
    assert dep["kind"] == "Deployment"
    assert dep["apiVersion"] == "apps/v1"
    assert dep["metadata"]["name"] == "waypoint"
    assert dep["metadata"]["namespace"] == "shop"
    assert dep["metadata"]["labels"] == {
        GATEWAY_NAME: "waypoint",
        MANAGED_BY: "ambient-controlplane",
    }
    owner = dep["metadata"]["ownerReferences"]
    assert owner == [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "name": "waypoint",
            "uid": "u-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"] == {
        GATEWAY_NAME: "waypoint",
        "istio.io/dataplane-mode": "none",
    }
    assert dep["spec"]["selector"]["matchLabels"] == {GATEWAY_NAME: "waypoint"}
    (c,) = tmpl["spec"]["containers"]
    assert c["image"] == "reg.example/waypoint:1.2"
    assert c["command"] == ["waypoint"]
    args = c["args"]
    assert args[args.index("--xds-address") + 1] == "cp.istio-system.svc:15012"
    assert args[args.index("--service-account") + 1] == "waypoint"
    assert args[args.index("--node") + 1] == "$(NODE_NAME)"
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15020}
    assert args[args.index("--admin") + 1] == "0.0.0.0:15020"
    assert tmpl["spec"]["serviceAccountName"] == "waypoint"
    token = tmpl["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == SETTINGS.token_audience


def test_service_and_account() -> None:
    objs = desired_objects(gw(), SETTINGS)
    assert objs.service["spec"]["ports"][0]["port"] == 15008
    assert objs.service["spec"]["selector"] == {GATEWAY_NAME: "waypoint"}
    assert objs.service_account is not None
    assert objs.service_account["metadata"]["name"] == "waypoint"
    assert objs.service_account["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_named_service_account_not_created() -> None:
    objs = desired_objects(gw(**{"gateway.istio.io/service-account": "reviews"}), SETTINGS)
    assert objs.service_account is None
    assert objs.service_account_name == "reviews"
    assert objs.deployment["spec"]["template"]["spec"]["serviceAccountName"] == "reviews"


def test_plaintext_has_no_roots() -> None:
    objs = desired_objects(gw(), WaypointSettings(roots_pem=""))
    args = objs.deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--controlplane-roots" not in args
    assert objs.roots is None
    tls = desired_objects(gw(), SETTINGS)
    assert (
        "--controlplane-roots"
        in tls.deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert tls.roots is not None
    assert tls.roots["metadata"]["name"] == "waypoint-controlplane-roots"
    assert tls.roots["data"] == {"root-cert.pem": "PEM"}
    volumes = tls.deployment["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "controlplane-roots",
        "configMap": {"name": "waypoint-controlplane-roots"},
    } in volumes


def test_status_programmed_and_transitions() -> None:
    pending = gateway_status(gw(), available=0, domain_suffix="cluster.local", now=NOW)
    assert pending["addresses"] == [
        {"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"}
    ]
    cond = {c["type"]: c for c in pending["conditions"]}
    assert cond["Accepted"]["status"] == "True"
    assert cond["Programmed"]["status"] == "False"
    assert cond["Programmed"]["reason"] == "Pending"
    assert cond["Programmed"]["observedGeneration"] == 3
    later = datetime(2026, 1, 2, 4, 0, 0, tzinfo=UTC)
    g = {**gw(), "status": pending}
    ready = gateway_status(g, available=1, domain_suffix="cluster.local", now=later)
    rc = {c["type"]: c for c in ready["conditions"]}
    assert rc["Programmed"]["status"] == "True"
    assert rc["Programmed"]["lastTransitionTime"] == "2026-01-02T04:00:00Z"
    # unchanged status keeps its transition time: idempotent
    assert rc["Accepted"]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    again = gateway_status(
        {**gw(), "status": ready},
        available=1,
        domain_suffix="cluster.local",
        now=datetime(2026, 1, 3, tzinfo=UTC),
    )
    assert again == ready


def test_status_with_field_findings() -> None:
    """The controller writes the control plane's findings into the Gateway's conditions:
    an Error makes Accepted and Programmed False (Gateway API reasons), a warning is named."""
    refused = Finding(
        code="AMB0202",
        level="Error",
        path="spec.addresses",
        message="not supported: waypoints get their address from their Service",
    )
    warned = Finding(
        code="AMB0203",
        level="Warning",
        path="spec.listeners[0].hostname",
        message="ignored: not used by waypoints",
    )
    bad = gateway_status(
        gw(), available=1, domain_suffix="cluster.local", now=NOW, findings=[refused]
    )
    cond = {c["type"]: c for c in bad["conditions"]}
    assert (cond["Accepted"]["status"], cond["Accepted"]["reason"]) == (
        "False",
        "UnsupportedAddress",
    )
    assert (cond["Programmed"]["status"], cond["Programmed"]["reason"]) == ("False", "Invalid")
    assert "[AMB0202] spec.addresses" in cond["Accepted"]["message"]
    ok = gateway_status(
        gw(), available=1, domain_suffix="cluster.local", now=NOW, findings=[warned]
    )
    cond = {c["type"]: c for c in ok["conditions"]}
    assert cond["Accepted"]["status"] == "True"
    assert cond["Programmed"]["status"] == "True"
    assert "[AMB0203] spec.listeners[0].hostname" in cond["Accepted"]["message"]


def test_merge_patch_rfc7386() -> None:
    # RFC 7386 appendix A examples
    assert merge({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge({"a": "b"}, {"a": None}) == {}
    assert merge({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}) == {"a": {"b": "d"}}
    live = {"metadata": {"name": "x", "resourceVersion": "7"}, "spec": {"a": 1}}
    assert not needs_patch(live, {"metadata": {"name": "x"}, "spec": {"a": 1}})
    assert needs_patch(live, {"spec": {"a": 2}})


def test_flags() -> None:
    from controlplane.app import parse_args

    base = ["--kubernetes", "--ca-dir", "/nonexistent", "--namespace", "mesh"]
    assert parse_args(base).waypoints is None
    s = parse_args(
        [
            *base,
            "--waypoint-image",
            "img:1",
            "--token-audience",
            "aud",
            "--waypoint-arg=--drain-timeout=3",
        ]
    )
    assert s.waypoints == WaypointSettings(
        image="img:1",
        xds_address="ambient-controlplane.mesh.svc:15012",
        controlplane_server_name="ambient-controlplane.mesh.svc",
        token_audience="aud",
        extra_args=("--drain-timeout=3",),
    )


def test_server_defaults_are_not_drift() -> None:
    dep = desired_objects(gw(), SETTINGS).deployment
    live = merge(copy.deepcopy(dep), {"metadata": {"uid": "x", "resourceVersion": "9"}})
    c = live["spec"]["template"]["spec"]["containers"][0]
    c["terminationMessagePath"] = "/dev/termination-log"  # a default the API server adds
    live["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = "TCP"
    assert not needs_patch(live, dep)
    c["image"] = "other"
    assert needs_patch(live, dep)
    c["image"] = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    c["args"] = c["args"][:-1]  # a list shortened is drift
    assert needs_patch(live, dep)


def test_cluster_id_and_tracing_env() -> None:
    """The waypoint pods get the control plane's cluster id (metrics' *_cluster labels, the
    workload uid) and, only when tracing is configured, the OpenTelemetry variables."""
    (c,) = desired_objects(gw(), SETTINGS).deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CLUSTER_ID"] == "Kubernetes"
    assert not [k for k in env if k.startswith("OTEL_")]
    traced = WaypointSettings(cluster_id="west", tracing_address="otel:4317", tracing_sampling=0)
    (c,) = desired_objects(gw(), traced).deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CLUSTER_ID"] == "west"
    assert (
        c["args"][c["args"].index("--workload-uid") + 1] == "west//Pod/$(POD_NAMESPACE)/$(POD_NAME)"
    )
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "otel:4317"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0"
