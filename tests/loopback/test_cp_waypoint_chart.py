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
        {"apiGroups": ["apps"], "resources": ["deployments"],
         "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["services", "serviceaccounts", "configmaps"],
         "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways/status"],
         "verbs": ["update", "patch"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways/finalizers"],
         "verbs": ["update"]},
    ]  # fmt: skip
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
