"""HTTPRoute RequestMirror ``fraction`` (Gateway API): numerator/denominator as the mirrored
percentage; exclusive with ``percent``; out-of-range values refused."""

from __future__ import annotations

import pytest
import yaml

from meshcore.config.objects import parse_objects


def route(mirror: str) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews, port: 9080}}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: shadow, port: 9080}}, {mirror}}}
    backendRefs: [{{name: reviews, port: 9080}}]
"""


@pytest.mark.parametrize(
    ("mirror", "percent"),
    [("fraction: {numerator: 1, denominator: 8}", 12.5), ("fraction: {numerator: 30}", 30.0)],
)
def test_fraction_is_a_percentage(mirror: str, percent: float) -> None:
    # main: fraction was refused (the route was not applied).
    cfg = parse_objects(list(yaml.safe_load_all(route(mirror))))
    assert [f for _r, f in cfg.findings if f.level == "Error"] == []
    (table,) = cfg.route_tables
    assert [m.percent for m in table.routes[0].mirrors] == [percent]


@pytest.mark.parametrize(
    ("mirror", "error"),
    [
        ("fraction: {numerator: 3, denominator: 2}", "numerator"),
        ("fraction: {numerator: 1, denominator: 0}", "denominator"),
        ("percent: 5, fraction: {numerator: 1}", "exclusive"),
    ],
)
def test_bad_fractions_are_refused(mirror: str, error: str) -> None:
    cfg = parse_objects(list(yaml.safe_load_all(route(mirror))))
    assert cfg.route_tables == ()
    assert any(error in f.render() for _r, f in cfg.findings), cfg.findings
