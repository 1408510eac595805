"""The chart's part of the in-cluster waypoint controller (helm template; helm as test_chart.py
finds it, skipping without it): the control plane's --waypoint-image and its write access, only
to what the controller touches, and only when the controller can run (Kubernetes source, no
manifest ConfigMap, TokenReview auth)."""

from __future__ import annotations

import pytest

import tests.loopback.test_chart as chart
from controlplane.app import parse_args


@pytest.fixture(scope="module", autouse=True)
def _helm() -> None:
    chart.HELM = chart.helm_binary()


ROLE = "ambient-controlplane-waypoints-istio-system"


def cp_args(docs: list[dict[str, object]]) -> list[str]:
    dep = chart.find(docs, "Deployment", "ambient-controlplane")
    return list(dep["spec"]["template"]["spec"]["containers"][0]["args"])


def test_default_runs_the_controller_with_exact_rbac() -> None:
    _, docs = chart.render(["global.tag=1.2.3", "waypoints.extraArgs={--drain-timeout=9}"])
    args = cp_args(docs)
    assert "--waypoint-image=ghcr.io/ambient-mesh/waypoint:1.2.3" in args
    assert "--waypoint-arg=--drain-timeout=9" in args
    role = chart.find(docs, "ClusterRole", ROLE)
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "verbs": ["create", "get", "list", "watch", "patch", "delete"],
        },
        {
            "apiGroups": [""],
            "resources": ["services", "serviceaccounts", "configmaps"],
            "verbs": ["create", "get", "list", "watch", "patch", "delete"],
        },
        {
            "apiGroups": ["gateway.networking.k8s.io"],
            "resources": ["gateways/status"],
            "verbs": ["update", "patch"],
        },
        {
            "apiGroups": ["gateway.networking.k8s.io"],
            "resources": ["gateways/finalizers"],
            "verbs": ["update"],
        },
    ]
    binding = chart.find(docs, "ClusterRoleBinding", ROLE)
    assert binding["roleRef"]["name"] == ROLE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ambient-controlplane", "namespace": "istio-system"}
    ]
    # the rendered arguments are ones the control plane accepts
    settings = parse_args(
        [a.replace("$(POD_NAMESPACE)", "istio-system") for a in args if "ca-dir" not in a]
        + ["--ca-dir", "/nonexistent"]
    )
    assert settings.waypoints is not None
    assert settings.waypoints.image == "ghcr.io/ambient-mesh/waypoint:1.2.3"
    assert settings.waypoints.token_audience == settings.token_audiences[0]


@pytest.mark.parametrize(
    "sets",
    [
        ["waypoints.enabled=false"],
        ["auth.mode=nodeCredentials"],
        ["controlplane.manifestConfigMap=cfg"],
        ["controlplane.kubernetes=false", "controlplane.manifestConfigMap=cfg"],
    ],
)
def test_off_without_the_conditions(sets: list[str]) -> None:
    _, docs = chart.render(sets)
    assert not [a for a in cp_args(docs) if a.startswith("--waypoint")]
    assert not [d for d in docs if d["metadata"]["name"] == ROLE]


def test_tracing_and_cluster_id_reach_node_proxies_and_the_waypoints_created() -> None:
    """values tracing.{address,sampling} and clusterId: the node proxy's flags, the control
    plane's flags, and from there the CLUSTER_ID and OpenTelemetry variables of every waypoint
    Deployment the controller creates; each parsed by the component that reads it."""
    from controlplane.waypoints import desired_objects
    from meshcore.tracing import Sampler, sampler_from_env
    from ztunnel.flags import parse_args as ztunnel_args

    sets = ["tracing.address=otel.observability:4317", "tracing.sampling=2.5", "clusterId=east"]
    _, docs = chart.render(sets)
    node = chart.container(chart.find(docs, "DaemonSet", "ztunnel"), "ztunnel")["args"]
    assert "--tracing-address=otel.observability:4317" in node
    assert "--tracing-sampling=2.5" in node
    zt, _ = ztunnel_args(
        [a.replace("$(NODE_NAME)", "n1").replace("$(NODE_IP)", "10.0.0.1") for a in node]
    )
    assert zt.tracing_address == "otel.observability:4317"
    assert zt.tracing_sampler == Sampler(ratio=0.025)
    assert zt.cluster_id == "east"
    settings = parse_args(
        [a.replace("$(POD_NAMESPACE)", "istio-system") for a in cp_args(docs) if "ca-dir" not in a]
        + ["--ca-dir", "/nonexistent"]
    )
    assert settings.waypoints is not None
    gw = {
        "metadata": {"name": "wp", "namespace": "shop", "uid": "u"},
        "spec": {"gatewayClassName": "istio-waypoint"},
    }
    dep = desired_objects(gw, settings.waypoints).deployment
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CLUSTER_ID"] == "east"
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "otel.observability:4317"
    assert sampler_from_env({k: v for k, v in env.items() if v}) == Sampler(ratio=0.025)
    assert c["args"][c["args"].index("--workload-uid") + 1].startswith("east//Pod/")
    # Default: no tracing anywhere, the cluster id still passed.
    _, docs = chart.render([])
    node = chart.container(chart.find(docs, "DaemonSet", "ztunnel"), "ztunnel")["args"]
    assert not [a for a in node + cp_args(docs) if a.startswith("--tracing")]


@pytest.mark.parametrize(
    ("sets", "error"),
    [
        (["tracing.sampling=101"], "tracing.sampling"),
        (["tracing.address=no port"], "tracing.address"),
    ],
)
def test_bad_tracing_values_are_refused(sets: list[str], error: str) -> None:
    chart.test_bad_values_are_refused(sets, error)
