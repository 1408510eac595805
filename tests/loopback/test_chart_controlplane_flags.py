"""The chart starts the control plane with flags it accepts (issue 10, item 5): node
authentication in every auth mode (the control plane refuses to start without it), the debug
views on loopback only, metrics on the pod IP where the pod's Prometheus annotations point.
helm as test_chart.py finds it."""

from __future__ import annotations

import pytest

import tests.loopback.test_chart as chart
from controlplane.app import check_listeners, check_node_auth, parse_args


@pytest.fixture(scope="module", autouse=True)
def _helm() -> None:
    chart.HELM = chart.helm_binary()


@pytest.mark.parametrize(
    "sets", [[], ["auth.mode=nodeCredentials"]], ids=["tokenReview", "nodeCredentials"]
)
def test_chart_flags_pass_the_control_planes_own_checks(sets: list[str]) -> None:
    _, docs = chart.render(sets)
    dep = chart.find(docs, "Deployment", "ambient-controlplane")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    args = [
        a.replace("$(POD_NAMESPACE)", "istio-system").replace("$(POD_IP)", "10.4.0.7")
        for a in c["args"]
    ]
    settings = parse_args(args)
    check_node_auth(settings)  # raises if the chart started it without node authentication
    check_listeners(settings)
    assert settings.node_credentials is not None or settings.token_review_accounts
    assert not settings.insecure_no_node_auth
    assert settings.debug_listen == "127.0.0.1:15014"
    assert settings.metrics_listen == "10.4.0.7:15014"
    ann = pod["metadata"]["annotations"]
    assert (ann["prometheus.io/port"], ann["prometheus.io/path"]) == ("15014", "/metrics")
    assert {"name": "http-monitoring", "containerPort": 15014, "protocol": "TCP"} in c["ports"]
