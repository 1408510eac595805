"""GRPCRoute, TCPRoute and TLSRoute parsing; protocol detection and the ClientHello SNI."""

from __future__ import annotations

import ssl
from contextlib import suppress

import pytest
import yaml

from meshcore.config.findings import check_object
from meshcore.config.objects import parse_objects
from tests.waypoint_fixtures import gateway_route
from waypoint.protocol.route import CompiledConfig, RequestInfo, select_route
from waypoint.protocol.sniff import classify, client_hello_sni

GRPC_ROUTE = gateway_route(
    "GRPCRoute",
    """
parentRefs: [{group: "", kind: Service, name: grpc, port: 50051}]
rules:
- matches: [{method: {service: pkg.Echo, method: Fail}}]
  backendRefs: [{name: grpc-v2, port: 50051}]
- matches: [{method: {service: pkg.Admin}}]
  backendRefs: [{name: grpc-admin, port: 50051}]
- matches: [{method: {method: Health}, headers: [{name: x-canary, value: "1"}]}]
  backendRefs: [{name: grpc-canary, port: 50051}]
- matches: [{method: {type: RegularExpression, service: "pkg\\\\.E.*", method: "M[a-z]+"}}]
  backendRefs: [{name: grpc-regex, port: 50051}]
- backendRefs: [{name: grpc, port: 50051}]
""",
    name="echo",
)


def pick(cfg: CompiledConfig, path: str, **headers: str) -> str:
    req = RequestInfo(
        method="POST", path=path, authority="grpc:50051", port=50051, headers=tuple(headers.items())
    )
    choice = select_route(cfg.routes_for("grpc.default.svc.cluster.local"), req)
    assert choice is not None
    return choice.route.destinations[0].host.split(".")[0]


def test_grpc_route_matches_service_and_method() -> None:
    # main: GRPCRoute was reported as not implemented and ignored.
    docs = list(yaml.safe_load_all(GRPC_ROUTE))
    cfg = parse_objects(docs)
    assert cfg.findings == ()
    assert check_object("GRPCRoute", docs[0]) == []
    c = CompiledConfig(cfg)
    assert pick(c, "/pkg.Echo/Fail") == "grpc-v2"
    assert pick(c, "/pkg.Echo/Say") == "grpc"
    assert pick(c, "/pkg.Admin/Anything") == "grpc-admin"
    assert pick(c, "/pkg.Adminx/Anything") == "grpc"  # a service, not a name prefix
    assert pick(c, "/any.Svc/Health", **{"x-canary": "1"}) == "grpc-canary"
    assert pick(c, "/any.Svc/Health") == "grpc"
    assert pick(c, "/pkg.Echo/Many") == "grpc-regex"
    route = c.routes_for("grpc.default.svc.cluster.local")[0]
    assert route.source == "GRPCRoute default/echo"


def test_grpc_route_refusals() -> None:
    bad = GRPC_ROUTE.replace("{method: {service: pkg.Admin}}", "{method: {type: Prefix}}")
    cfg = parse_objects(list(yaml.safe_load_all(bad)))
    assert cfg.route_tables == ()
    assert cfg.findings
    ext = GRPC_ROUTE.replace(
        "backendRefs: [{name: grpc, port: 50051}]",
        "filters: [{type: ExtensionRef, extensionRef: {name: x}}]",
    )
    cfg = parse_objects(list(yaml.safe_load_all(ext)))
    assert cfg.route_tables == ()
    assert any(f.code == "AMB0202" for _r, f in cfg.findings)


def test_tcp_and_tls_routes() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: db, namespace: default}
spec:
  parentRefs: [{kind: Service, name: db, port: 7000}]
  rules: [{backendRefs: [{name: db-v2, port: 7000, weight: 3}, {name: db-v1, weight: 1}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: tls, namespace: default}
spec:
  parentRefs: [{kind: Service, name: db}]
  hostnames: ["*.example.com", api.example.org]
  rules: [{backendRefs: [{name: db-v2}]}]
"""
    cfg = parse_objects(list(yaml.safe_load_all(text)))
    assert cfg.findings == ()
    tcp, tls = cfg.l4_routes
    assert tcp.kind == "TCPRoute"
    assert tcp.port == 7000
    assert [b.weight for b in tcp.backends] == [3, 1]
    assert tls.sni_matches("a.example.com")
    assert tls.sni_matches("a.b.example.com")
    assert not tls.sni_matches("example.com")
    assert not tls.sni_matches(None)
    assert tls.sni_matches("api.example.org")
    assert not tls.sni_matches("x.api.example.org")
    two = text.replace(
        "rules: [{backendRefs: [{name: db-v2, port: 7000, weight: 3}",
        "rules: [{backendRefs: []}, {backendRefs: [{name: db-v2, port: 7000, weight: 3}",
    )
    assert len(parse_objects(list(yaml.safe_load_all(two))).l4_routes) == 1  # TCPRoute refused


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (b"GET / HTTP/1.1\r\n", "http"),
        (b"delete /x HTTP/1.1\r\n", "http"),  # the HTTP parser answers 400, not a TCP proxy
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http"),
        (b"PRI * HTTP/2.0", None),
        (b"GE", None),
        (b"\x00\x00\x00\x08\x04\xd2\x16/", "tcp"),  # PostgreSQL SSLRequest
        (b"*1\r\n$4\r\nPING\r\n", "tcp"),  # Redis
        (b"\x16\x03\x01\x02\x00", "tcp"),  # TLS
        (b" GET", "tcp"),
        (b"A" * 40, "tcp"),
    ],
)
def test_classify(first: bytes, kind: str | None) -> None:
    assert classify(first) == kind


def _hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    if name is None:
        ctx.check_hostname = False
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    with suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_client_hello_sni() -> None:
    hello = _hello("Api.Example.com")
    assert client_hello_sni(hello) == "api.example.com"
    assert client_hello_sni(_hello(None)) is None
    for cut in (3, 10, len(hello) - 1):
        assert client_hello_sni(hello[:cut]) is False
    assert client_hello_sni(b"GET / HTTP/1.1\r\n") is None
    # Hostile lengths never raise and never ask for more than a bounded amount.
    assert client_hello_sni(b"\x16\x03\x01\xff\xff" + b"\x01" * 10) is None
    assert client_hello_sni(hello[:5] + b"\x02" + hello[6:]) is None  # not a ClientHello
    for i in range(5, min(len(hello), 200)):
        mangled = hello[:i] + b"\xff" + hello[i + 1 :]
        assert client_hello_sni(mangled) in (None, False) or isinstance(
            client_hello_sni(mangled), str
        )
