"""The field table (meshcore.config.fields): the generated docs are current, every kind's
table is consistent, and the checker reports unknown / refused / warned fields by path."""

from __future__ import annotations

import pytest

from meshcore.config.fielddoc import DOC_PATH, render_markdown
from meshcore.config.fields import FIELDS
from meshcore.config.findings import KIND, REFUSED, UNKNOWN, WARNED, check_object


def test_generated_doc_is_current() -> None:
    # Regenerate with: python -m meshcore.config.fielddoc
    assert DOC_PATH.read_text() == render_markdown()


def test_every_row_has_its_parent() -> None:
    for kind, table in FIELDS.items():
        for path in table:
            parent = path.rsplit(".", 1)[0].removesuffix("[]")
            if "." in path:
                assert parent in table, f"{kind}: {path} has no row for {parent}"


def test_check_object_reports_by_path() -> None:
    obj = {
        "kind": "HTTPRoute",
        "spec": {
            "parentRefs": [{"name": "reviews", "kind": "Service", "sectionName": "http"}],
            "hostnames": ["x"],
            "rules": [{"sessionPersistence": {}, "backendRefs": [{"name": "r", "fliters": []}]}],
        },
    }
    got = {(f.code, f.path) for f in check_object("HTTPRoute", obj)}
    assert got == {
        (REFUSED, "spec.parentRefs[0].sectionName"),
        (WARNED, "spec.hostnames"),
        (WARNED, "spec.rules[0].sessionPersistence"),
        (UNKNOWN, "spec.rules[0].backendRefs[0].fliters"),
    }


def test_unimplemented_kinds_are_reported() -> None:
    for kind in ("ServiceEntry", "Telemetry"):
        (f,) = check_object(kind, {"kind": kind, "spec": {}})
        assert f.code == KIND
        assert f.level == "Warning"
    # RequestAuthentication is implemented (JWT at the waypoint, tests/unit/test_jwt.py).
    assert check_object("RequestAuthentication", {"spec": {"jwtRules": [{"issuer": "x"}]}}) == []
    istio_gw = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "spec": {}}
    assert check_object("Gateway", istio_gw)[0].code == KIND
    ingress = {"apiVersion": "gateway.networking.k8s.io/v1", "spec": {"gatewayClassName": "x"}}
    assert check_object("Gateway", ingress)[0].code == KIND
    waypoint = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "spec": {"gatewayClassName": "istio-waypoint"},
    }
    assert check_object("Gateway", waypoint) == []


def test_http_route_retry_is_implemented() -> None:
    # main: rules[].retry was silently ignored (the mesh default applied).
    import yaml

    from meshcore.config.objects import parse_objects

    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
    - backendRefs: [{name: reviews, port: 9080}]
      retry: {attempts: 5, codes: [502, 503], backoff: 100ms}
"""
    cfg = parse_objects(list(yaml.safe_load_all(text)))
    (table,) = cfg.route_tables
    retry = table.routes[0].retries
    assert retry.attempts == 5
    assert retry.status_codes == frozenset({502, 503})
    assert "retriable-status-codes" in retry.retry_on
    assert "connect-failure" in retry.retry_on
    assert retry.backoff_base == 0.1
    assert cfg.warnings == ()


def test_http_route_parent_port_restricts_the_route() -> None:
    # main: parentRefs[].port was ignored, so the route applied to every port of the Service.
    import yaml

    from meshcore.config.objects import parse_objects

    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
"""
    cfg = parse_objects(list(yaml.safe_load_all(text)))
    (table,) = cfg.route_tables
    assert all(m.port == 9080 for r in table.routes for m in r.matches)


def test_control_plane_reports_unimplemented_kinds_in_a_manifest_directory() -> None:
    # main: ServiceEntry, Telemetry, ... in a manifest directory were dropped with no word.
    from controlplane.sources.files import parse_manifest_text

    text = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: demo}
spec: {hosts: [example.com]}
---
apiVersion: networking.istio.io/v1
kind: Telemetry
metadata: {name: t, namespace: demo}
spec: {}
"""
    parsed = parse_manifest_text(text, "m.yaml")
    assert dict(parsed.warnings) == {
        "ServiceEntry demo/ext": (
            "[AMB0204] ServiceEntry is not implemented by ambient-mesh: ignored"
        ),
        "Telemetry demo/t": "[AMB0204] Telemetry is not implemented by ambient-mesh: ignored "
        "(standard metrics are kept)",
    }


def test_label_values_outside_the_allowed_set_are_reported() -> None:
    from meshcore.config.findings import INVALID, check_labels

    (f,) = check_labels("Gateway", {"istio.io/waypoint-for": "services"})
    assert f.code == INVALID
    assert f.path == "metadata.labels[istio.io/waypoint-for]"
    assert check_labels("Gateway", {"istio.io/waypoint-for": "all"}) == []


# Issue 10 item 7: each silently ignored field is now implemented or reported.
ITEM_7 = [
    ("HTTPRoute", "spec.rules[0].sessionPersistence", {"rules": [{"sessionPersistence": {}}]}),
    (
        "HTTPRoute",
        "spec.rules[0].backendRefs[0].filters",
        {"rules": [{"backendRefs": [{"name": "a", "filters": []}]}]},
    ),
    (
        "HTTPRoute",
        "spec.parentRefs[0].sectionName",
        {"parentRefs": [{"name": "a", "sectionName": "x"}]},
    ),
    ("VirtualService", "spec.http[0].retries.backoff", {"http": [{"retries": {"backoff": "1s"}}]}),
    (
        "VirtualService",
        "spec.http[0].retries.retryIgnorePreviousHosts",
        {"http": [{"retries": {"retryIgnorePreviousHosts": True}}]},
    ),
    (
        "VirtualService",
        "spec.http[0].redirect.derivePort",
        {"http": [{"redirect": {"derivePort": "FROM_PROTOCOL_DEFAULT"}}]},
    ),
    ("VirtualService", "spec.exportTo", {"exportTo": ["."]}),
    (
        "DestinationRule",
        "spec.trafficPolicy.connectionPool.http.maxRetries",
        {"trafficPolicy": {"connectionPool": {"http": {"maxRetries": 3}}}},
    ),
    (
        "DestinationRule",
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
        {"trafficPolicy": {"connectionPool": {"tcp": {"tcpKeepalive": {}}}}},
    ),
    (
        "DestinationRule",
        "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration",
        {"trafficPolicy": {"connectionPool": {"tcp": {"maxConnectionDuration": "1h"}}}},
    ),
    (
        "DestinationRule",
        "spec.trafficPolicy.outlierDetection.minHealthPercent",
        {"trafficPolicy": {"outlierDetection": {"minHealthPercent": 50}}},
    ),
    (
        "DestinationRule",
        "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
        {"trafficPolicy": {"outlierDetection": {"splitExternalLocalOriginErrors": True}}},
    ),
]


@pytest.mark.parametrize(("kind", "path", "spec"), ITEM_7, ids=[p for _, p, _ in ITEM_7])
def test_formerly_ignored_fields_are_reported(
    kind: str, path: str, spec: dict[str, object]
) -> None:
    found = check_object(kind, {"kind": kind, "spec": spec})
    assert [(f.path, f.code in (REFUSED, WARNED)) for f in found] == [(path, True)]
