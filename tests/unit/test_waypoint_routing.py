"""L7 config parsing and pure routing decisions (tables)."""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter

import pytest
import yaml

from meshcore.config.authorization import PolicyAction
from meshcore.config.objects import parse_objects
from meshcore.config.reader import parse_duration, resolve_host
from meshcore.config.routes import DEFAULT_RETRY, LbPolicy
from meshcore.errors import ConfigError
from tests.waypoint_fixtures import SEED_VS, destination_rule, virtual_service
from waypoint.protocol.hygiene import normalize_path
from waypoint.protocol.route import (
    CompiledConfig,
    RequestInfo,
    RouteChoice,
    pick_destination,
    redirect_location,
    rewrite_target,
    select_route,
)
from waypoint.protocol.trace import trace_hop

HOST = "reviews.default.svc.cluster.local"


def compiled(*texts: str) -> CompiledConfig:
    return CompiledConfig(parse_objects([d for t in texts for d in yaml.safe_load_all(t)]))


def req(path: str = "/", **kw: object) -> RequestInfo:
    base: dict[str, object] = {
        "method": "GET",
        "path": path,
        "authority": "reviews:9080",
        "port": 9080,
    }
    base.update(kw)
    return RequestInfo(**base)  # type: ignore[arg-type]


def test_seed_parses_exactly_as_written() -> None:
    cfg = compiled(SEED_VS)
    assert not cfg.config.warnings
    routes = cfg.routes_for(HOST)
    assert len(routes) == 2
    beta = select_route(routes, req(headers=(("user-type", "beta-tester"),)))
    assert beta is not None
    assert [d.subset for d in beta.route.destinations] == ["v2"]
    other = select_route(routes, req(headers=(("user-type", "beta-testerX"),)))
    assert other is not None
    assert [(d.subset, d.weight) for d in other.route.destinations] == [("v1", 90), ("v2", 10)]
    assert other.route.retries == DEFAULT_RETRY
    rng = random.Random(1)
    picks = Counter(pick_destination(other.route.destinations, rng).subset for _ in range(10000))
    assert abs(picks["v2"] - 1000) < 4 * (10000 * 0.09) ** 0.5


@pytest.mark.parametrize(
    ("host", "ns", "want"),
    [
        ("reviews", "default", "reviews.default.svc.cluster.local"),
        ("reviews.prod", "default", "reviews.prod.svc.cluster.local"),
        ("reviews.prod.svc", "default", "reviews.prod.svc.cluster.local"),
        ("Reviews.Prod.svc.cluster.local.", "x", "reviews.prod.svc.cluster.local"),
        ("*.example.com", "x", "*.example.com"),
        ("api.example.com", "x", "api.example.com"),
    ],
)
def test_host_resolution(host: str, ns: str, want: str) -> None:
    assert resolve_host(host, ns) == want


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("0.5s", 0.5), ("250ms", 0.25), ("1m30s", 90.0), ("2h", 7200.0), (3, 3.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("bad", ["", "1", "s", "1x", "-1s", "1s2"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad, "spec.timeout")


MATCHES = virtual_service(
    """
- name: exact
  match: [{uri: {exact: /exact}}]
  route: [{destination: {host: reviews, subset: a}}]
- name: regex-method
  match: [{uri: {regex: "/items/[0-9]+"}, method: {exact: DELETE}}]
  route: [{destination: {host: reviews, subset: b}}]
- name: query
  match: [{queryParams: {debug: {exact: "1"}}}]
  route: [{destination: {host: reviews, subset: c}}]
- name: without
  match: [{uri: {prefix: /api}, withoutHeaders: {x-legacy: {}}}]
  rewrite: {uri: /v2/api}
  route: [{destination: {host: reviews, subset: d}}]
- name: source
  match: [{sourceLabels: {app: sleep}, uri: {prefix: /src}}]
  route: [{destination: {host: reviews, subset: e}}]
- name: ci
  match: [{uri: {prefix: /CASE}, ignoreUriCase: true}]
  route: [{destination: {host: reviews, subset: f}}]
- name: fallback
  route: [{destination: {host: reviews, subset: z}}]
""",
    name="m",
)


@pytest.mark.parametrize(
    ("request_", "route"),
    [
        (req("/exact"), "exact"),
        (req("/exact/more"), "fallback"),
        (req("/items/42", method="DELETE"), "regex-method"),
        (req("/items/42", method="GET"), "fallback"),
        (req("/items/42x", method="DELETE"), "fallback"),  # regex is a full match
        (req("/x?a=2&debug=1"), "query"),
        (req("/x?debug=10"), "fallback"),
        (req("/api/a"), "without"),
        (req("/api/a", headers=(("x-legacy", "1"),)), "fallback"),
        (req("/src/1", source_labels={"app": "sleep"}), "source"),
        (req("/src/1", source_labels={"app": "other"}), "fallback"),
        (req("/case/x"), "ci"),
    ],
)
def test_match_table(request_: RequestInfo, route: str) -> None:
    choice = select_route(compiled(MATCHES).routes_for(HOST), request_)
    assert choice is not None
    assert choice.route.name == route


def test_rewrite_of_matched_prefix_keeps_rest_and_query() -> None:
    routes = compiled(MATCHES).routes_for(HOST)
    r = req("/api/users?x=1")
    choice = select_route(routes, r)
    assert choice is not None
    assert rewrite_target(choice, r.path) == "/v2/api/users?x=1"


@pytest.mark.parametrize(
    ("target", "want"),
    [
        ("/a/../b", "/b"),
        ("/a/./b/", "/a/b/"),
        ("/../../etc", "/etc"),
        ("/a/b/..", "/a/"),
        ("/p?x=../y", "/p?x=../y"),  # the query is not a path
        ("//double//slash", "//double//slash"),
    ],
)
def test_path_normalisation(target: str, want: str) -> None:
    assert normalize_path(target) == want


def test_no_route_when_nothing_matches_and_no_catch_all() -> None:
    text = MATCHES.replace(
        "  - name: fallback\n    route: [{destination: {host: reviews, subset: z}}]\n", ""
    )
    assert select_route(compiled(text).routes_for(HOST), req("/nothing")) is None


def test_invalid_objects_are_left_out_with_a_warning() -> None:
    bad = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad, namespace: default}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}], tiemout: 1s}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: regex, namespace: default}
spec:
  hosts: [reviews]
  http: [{match: [{uri: {regex: "(["}}], route: [{destination: {host: reviews}}]}]
"""
    cfg = compiled(bad)
    assert cfg.routes_for(HOST) == ()
    assert any("spec.http[0].tiemout" in w for w in cfg.config.warnings)
    assert any("spec.http[0].match[0].uri.regex" in w for w in cfg.config.warnings)


def test_destination_rule_policy_precedence() -> None:
    dr = destination_rule(
        """
trafficPolicy:
  loadBalancer: {simple: RANDOM}
  connectionPool: {tcp: {maxConnections: 7}, http: {http1MaxPendingRequests: 3}}
  outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 10s}
  portLevelSettings:
  - port: {number: 8080}
    loadBalancer: {simple: ROUND_ROBIN}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}
- name: v2
  labels: {version: v2}
""",
        name="r",
    )
    rule = compiled(dr).destination_rule(HOST)
    assert rule is not None
    assert rule.policy_for("", 9080).lb is LbPolicy.RANDOM
    assert rule.policy_for("", 8080).lb is LbPolicy.ROUND_ROBIN
    assert rule.policy_for("v1", 9080).lb is LbPolicy.LEAST_REQUEST
    pol = rule.policy_for("v2", 9080)
    assert pol.pool.max_connections == 7
    assert pol.pool.max_pending == 3
    assert pol.outlier is not None
    assert pol.outlier.consecutive_5xx == 2
    assert pol.outlier.base_ejection_time == 10.0


def test_http_route_precedence_and_filters() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /a/b}}]
    backendRefs: [{name: other, port: 80}]
  - matches: [{path: {type: Exact, value: /a/b}}]
    timeouts: {request: 2s}
    backendRefs: [{name: exact, port: 80}]
"""
    routes = compiled(text).routes_for(HOST)

    def pick(path: str) -> RouteChoice | None:
        return select_route(routes, req(path))

    exact = pick("/a/b")
    assert exact is not None
    assert exact.route.destinations[0].host.startswith("exact.")
    assert exact.route.timeout == 2.0
    longer = pick("/a/b/c")
    assert longer is not None
    assert longer.route.destinations[0].host.startswith("other.")
    # PathPrefix matches whole segments: /abc is not under /a.
    assert pick("/abc") is None


def test_redirect_location() -> None:
    text = virtual_service(
        """
- match: [{uri: {prefix: /old}}]
  redirect: {uri: /new, authority: example.com, redirectCode: 308}
""",
        name="r",
    )
    routes = compiled(text).routes_for(HOST)
    r = req("/old/x?q=1", authority="reviews:9080")
    choice = select_route(routes, r)
    assert choice is not None
    assert choice.route.redirect is not None
    assert choice.route.redirect.code == 308
    assert redirect_location(choice.route.redirect, choice, r) == "http://example.com:9080/new"


def test_authorization_policy_parsing_fail_closed_and_unsupported() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: default}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["not-an-ip"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: default}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"""
    cfg = compiled(text).config
    broken = next(p for p in cfg.policies if p.name == "broken")
    # An unreadable DENY stays a DENY that matches everything for its targets (fail closed).
    assert broken.action is PolicyAction.DENY
    assert broken.fail_closed_l7
    assert broken.error
    assert [t.name for t in broken.targets] == ["reviews"]
    jwt = next(p for p in cfg.policies if p.name == "jwt")
    # requestPrincipals is evaluated by the waypoint (JWT, tests/unit/test_jwt.py).
    assert jwt.action is PolicyAction.ALLOW
    assert not jwt.fail_closed_l7


@pytest.mark.parametrize(
    ("incoming", "keeps_trace"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        ("garbage", False),
        (None, False),
    ],
)
def test_traceparent(incoming: str | None, keeps_trace: bool) -> None:
    out, trace, span, _parent, _sampled, _rid = trace_hop(incoming, random.Random(3))
    version, t, parent, flags = out.split("-")
    assert version == "00"
    assert parent == span
    assert len(parent) == 16
    assert len(t) == 32
    if keeps_trace:
        assert incoming is not None
        assert t == incoming.split("-")[1]
        assert flags == incoming.split("-")[3]
        assert parent != incoming.split("-")[2]
    else:
        assert t == trace
        assert flags == "01"


class _Draws(random.Random):
    """A seeded rng that counts its draws and can hand out fixed values first."""

    def __init__(self, seed: int, first: tuple[int, ...] = ()) -> None:
        super().__init__(seed)
        self.draws = 0
        self.first = list(first)

    def getrandbits(self, k: int, /) -> int:
        self.draws += 1
        return self.first.pop(0) if self.first else super().getrandbits(k)


@pytest.mark.parametrize(
    "incoming", [None, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]
)
def test_trace_and_request_ids_come_from_one_draw_in_their_formats(incoming: str | None) -> None:
    rng = _Draws(7)
    hop = trace_hop(incoming, rng)
    assert rng.draws == 1  # span, trace and request id: one draw per hop, not one per id
    assert re.fullmatch(r"[0-9a-f]{16}", hop.span_id)
    assert int(hop.span_id, 16)
    assert re.fullmatch(r"[0-9a-f]{32}", hop.trace_id)
    assert int(hop.trace_id, 16)
    # x-request-id: 128 random bits in UUID text form, as str(uuid.UUID(...)).
    assert hop.request_id == str(uuid.UUID(hex=hop.request_id.replace("-", "")))
    # Deterministic under the injected rng; distinct ids per hop.
    assert trace_hop(incoming, random.Random(7)) == hop
    other = trace_hop(incoming, rng)
    assert other.span_id != hop.span_id
    assert other.request_id != hop.request_id


def test_an_all_zero_span_or_trace_id_is_drawn_again() -> None:
    # W3C trace-context §3.2.2.3/§3.2.2.4: all-zero trace and parent ids are invalid.
    # 320 bits = span (top 64) | trace (next 128) | request id (low 128).
    zero_span = 5 << 128  # span digits all zero, trace non-zero
    zero_trace = 9 << 256  # trace digits all zero, span non-zero
    rng = _Draws(1, (zero_span, zero_trace))
    hop = trace_hop(None, rng)
    assert rng.draws == 3
    assert int(hop.span_id, 16)
    assert int(hop.trace_id, 16)
    assert hop.span_id != "0" * 16
    assert hop.trace_id != "0" * 32


def test_a_fixed_draw_gives_exact_span_trace_and_request_ids() -> None:
    """The 320-bit split pinned: span = top 64 bits, trace = next 128, request id = low 128 in
    UUID text form; the request id is never the trace id (sliced from the same digits, an
    off-by-one or a copy of the trace slice still passes the format checks above)."""
    span, trace, rid = (
        "0123456789abcdef",
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00112233445566778899aabbccddeeff",
    )
    rng = _Draws(1, (int(span + trace + rid, 16),))
    hop = trace_hop(None, rng)
    assert rng.draws == 1
    assert hop.span_id == span
    assert hop.trace_id == trace
    assert hop.traceparent == f"00-{trace}-{span}-01"
    assert hop.request_id == "00112233-4455-6677-8899-aabbccddeeff"
    # With an incoming trace the new trace digits are unused; the span and request id are not.
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    hop = trace_hop(incoming, _Draws(1, (int(span + trace + rid, 16),)))
    assert (hop.trace_id, hop.span_id, hop.parent_span_id) == (
        "0af7651916cd43dd8448eb211c80319c",
        span,
        "b7ad6b7169203331",
    )
    assert hop.request_id == "00112233-4455-6677-8899-aabbccddeeff"


@pytest.mark.parametrize("seed", range(20))
def test_the_request_id_is_not_the_trace_id(seed: int) -> None:
    hop = trace_hop(None, random.Random(seed))
    assert hop.request_id.replace("-", "") != hop.trace_id
