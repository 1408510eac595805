"""L7 authorization (pure): applicability at a waypoint and DENY/ALLOW/CUSTOM evaluation."""

from __future__ import annotations

import pytest
import yaml

from meshcore.config.authorization import AuthzPolicy
from meshcore.config.objects import parse_objects
from waypoint.protocol.authz import WaypointIdentity, applicable, evaluate
from waypoint.protocol.route import RequestInfo

WAYPOINT = WaypointIdentity(
    name="waypoint", namespace="default", labels=(("istio.io/gateway-name", "waypoint"),)
)


def policies(text: str) -> tuple[AuthzPolicy, ...]:
    return parse_objects(list(yaml.safe_load_all(text))).policies


def info(**kw: object) -> RequestInfo:
    base: dict[str, object] = {
        "method": "GET",
        "path": "/",
        "authority": "reviews.default:9080",
        "port": 9080,
        "source_principal": "cluster.local/ns/default/sa/sleep",
        "source_namespace": "default",
        "source_ip": "10.0.0.5",
    }
    base.update(kw)
    return RequestInfo(**base)  # type: ignore[arg-type]


TARGETS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: default}
spec: {targetRefs: [{kind: Gateway, name: waypoint}], rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: svc, namespace: default}
spec: {targetRefs: [{kind: Service, name: reviews}], rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-gw, namespace: default}
spec: {targetRefs: [{kind: Gateway, name: another}], rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: class, namespace: istio-system}
spec: {targetRefs: [{kind: GatewayClass, name: istio-waypoint}], rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selector, namespace: default}
spec: {selector: {matchLabels: {istio.io/gateway-name: waypoint}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: workload-selector, namespace: default}
spec: {selector: {matchLabels: {app: reviews}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: namespace-wide, namespace: default}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: svc-elsewhere, namespace: prod}
spec: {targetRefs: [{kind: Service, name: reviews}], rules: [{}]}
"""


def test_applicability() -> None:
    got = applicable(policies(TARGETS), WAYPOINT, "reviews", "default")
    assert sorted(p.name for p in got) == ["class", "gw", "selector", "svc"]
    other_service = applicable(policies(TARGETS), WAYPOINT, "ratings", "default")
    assert sorted(p.name for p in other_service) == ["class", "gw", "selector"]


RULES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: default}
spec:
  targetRefs: [{kind: Gateway, name: waypoint}]
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [default, trusted]}}]
  - to: [{operation: {paths: ["/admin/*"], notMethods: [GET]}}]
  - from: [{source: {ipBlocks: ["192.168.0.0/16"]}}]
  - when: [{key: "request.headers[x-block]", values: ["yes", "true*"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec:
  targetRefs: [{kind: Gateway, name: waypoint}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["*/sa/sleep", "cluster.local/ns/trusted/*"]}}]
    to: [{operation: {methods: [GET, POST], hosts: ["reviews*"], ports: ["9080"]}}]
  - to: [{operation: {paths: ["/healthz", "*.css", "/api/{*}/items/{**}"]}}]
  - when:
    - {key: source.principal, values: ["cluster.local/ns/ops/sa/admin"]}
    - {key: destination.port, values: ["9080"]}
"""


@pytest.mark.parametrize(
    ("request_", "allowed", "decider"),
    [
        (info(), True, "default/allow"),
        (info(method="DELETE"), False, "default/allow"),  # no ALLOW rule matches
        (
            info(source_namespace="other", source_principal="cluster.local/ns/other/sa/sleep"),
            False,
            "default/deny",
        ),  # notNamespaces
        (
            info(source_namespace="trusted", source_principal="cluster.local/ns/trusted/sa/x"),
            True,
            "default/allow",
        ),
        (info(path="/admin/x", method="POST"), False, "default/deny"),
        (info(path="/admin/x"), True, "default/allow"),  # GET is excluded from the deny
        (info(source_ip="192.168.3.4"), False, "default/deny"),
        (info(headers=(("x-block", "truely"),)), False, "default/deny"),
        (info(authority="ratings:9080"), False, "default/allow"),  # hosts
        (info(port=8080, authority="reviews:8080"), False, "default/allow"),  # ports
        (
            info(source_principal="cluster.local/ns/default/sa/other", path="/healthz"),
            True,
            "default/allow",
        ),
        (
            info(source_principal="cluster.local/ns/default/sa/other", path="/static/a.css"),
            True,
            "default/allow",
        ),
        (
            info(source_principal="cluster.local/ns/default/sa/other", path="/api/v1/items/a/b"),
            True,
            "default/allow",
        ),
        (
            info(source_principal="cluster.local/ns/default/sa/other", path="/api/v1/x/items/a"),
            False,
            "default/allow",
        ),  # {*} is exactly one segment
        (
            info(source_principal="cluster.local/ns/default/sa/other", path="/healthz?x=1"),
            True,
            "default/allow",
        ),  # paths match without the query
        (
            info(
                source_principal="cluster.local/ns/ops/sa/admin",
                source_namespace="default",
                method="PATCH",
            ),
            True,
            "default/allow",
        ),  # when: source.principal + port
        (info(source_principal=None, source_namespace=None), False, "default/deny"),
    ],
)
def test_evaluation_table(request_: RequestInfo, allowed: bool, decider: str) -> None:
    d = evaluate(policies(RULES), request_)
    assert d.allowed is allowed
    assert decider in d.policy


def test_no_policy_allows_and_empty_allow_denies_everything() -> None:
    assert evaluate((), info()).allowed
    allow_nothing = policies(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nothing, namespace: default}
spec: {targetRefs: [{kind: Gateway, name: waypoint}]}
"""
    )
    assert not evaluate(allow_nothing, info()).allowed


def test_custom_denies_what_it_matches() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec:
  targetRefs: [{kind: Gateway, name: waypoint}]
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ["/secure/*"]}}]}]
"""
    ps = policies(text)
    assert not evaluate(ps, info(path="/secure/a")).allowed
    assert "CUSTOM" in evaluate(ps, info(path="/secure/a")).reason
    assert evaluate(ps, info(path="/open")).allowed
