"""CORS (VirtualService corsPolicy, HTTPRoute CORS filter): parsing and the decisions."""

from __future__ import annotations

import yaml

from meshcore.config.objects import parse_objects
from tests.waypoint_fixtures import gateway_route, virtual_service
from waypoint.protocol.cors import allowed_origin, is_preflight, preflight_headers, response_headers
from waypoint.protocol.route import CompiledConfig

VS = virtual_service(
    """
- corsPolicy:
    allowOrigins: [{exact: "https://app.example"}, {regex: "https://.*[.]dev[.]example"}]
    allowMethods: [GET, POST]
    allowHeaders: [x-a]
    exposeHeaders: [x-b]
    maxAge: 24h
    allowCredentials: true
  route: [{destination: {host: reviews}}]
""",
    name="r",
)

ROUTE = gateway_route(
    "HTTPRoute",
    """
parentRefs: [{kind: Service, name: reviews}]
rules:
- filters:
  - type: CORS
    cors: {allowOrigins: ["https://*.example.com"], allowMethods: [PUT]}
  backendRefs: [{name: reviews, port: 9080}]
""",
    name="r",
)


def policy(text: str):  # type: ignore[no-untyped-def]
    cfg = parse_objects(list(yaml.safe_load_all(text)))
    assert cfg.findings == (), cfg.findings
    (route,) = CompiledConfig(cfg).routes_for("reviews.default.svc.cluster.local")
    assert route.cors is not None
    return route.cors


def test_virtual_service_cors_policy() -> None:
    # main: corsPolicy was accepted with a warning and ignored.
    p = policy(VS)
    pre = [("origin", "https://app.example"), ("access-control-request-method", "POST")]
    assert is_preflight("OPTIONS", pre)
    assert not is_preflight("GET", pre)
    origin = allowed_origin(p, pre)
    assert origin == "https://app.example"
    assert dict(preflight_headers(p, origin)) == {
        "access-control-allow-origin": "https://app.example",
        "access-control-allow-methods": "GET,POST",
        "access-control-allow-headers": "x-a",
        "access-control-max-age": "86400",
        "access-control-allow-credentials": "true",
    }
    assert allowed_origin(p, [("origin", "https://x.dev.example")]) == "https://x.dev.example"
    assert allowed_origin(p, [("origin", "https://evil.example")]) is None
    assert allowed_origin(p, []) is None
    assert ("access-control-expose-headers", "x-b") in response_headers(p, origin)


def test_http_route_cors_filter() -> None:
    p = policy(ROUTE)
    assert allowed_origin(p, [("origin", "https://a.example.com")]) is not None
    assert allowed_origin(p, [("origin", "https://example.com")]) is None
    assert allowed_origin(p, [("origin", "http://a.example.com")]) is None
    assert p.max_age == 5
    assert p.allow_methods == ("PUT",)
