"""Local rate limiting (pure): HTTPLocalRateLimitPolicy parsing and token buckets."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshcore.config.findings import check_object
from meshcore.config.objects import parse_objects
from meshcore.config.ratelimit import RateLimitPolicy, parse_rate_limit
from meshcore.errors import ConfigError
from waypoint.protocol import ratelimit
from waypoint.protocol.ratelimit import RateLimiter, applies

POLICY = """
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: rl, namespace: default}
spec:
  targetRef: {kind: Service, name: reviews}
  total: {requestsPerSecond: 10}
  identity: {requestsPerSecond: 4}
  overrides:
  - requestsPerSecond: 6
    clientRefs: [{kind: ServiceAccount, name: bot}]
"""

SLEEP = ("default", "sleep")
SVC = {"kind": "Service", "name": "x"}


def policy(text: str = POLICY) -> RateLimitPolicy:
    cfg = parse_objects(list(yaml.safe_load_all(text)))
    assert cfg.findings == (), cfg.findings
    (p,) = cfg.rate_limits
    return p


def test_parse_is_linkerds_shape_and_every_field_is_in_the_table() -> None:
    # main: the kind was not read at all (no limit anywhere).
    p = policy()
    assert (p.target_kind, p.target_name, p.total, p.identity) == ("Service", "reviews", 10, 4)
    assert p.overrides[0].rps == 6
    assert p.overrides[0].clients == (("default", "bot"),)
    assert check_object("HTTPLocalRateLimitPolicy", yaml.safe_load(POLICY)) == []


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"targetRef": {"kind": "Server", "name": "x"}, "total": {"requestsPerSecond": 1}}, "kind"),
        ({"targetRef": {"kind": "Service", "name": "x"}}, "no limit"),
        ({"targetRef": SVC, "total": {"requestsPerSecond": 0}}, ">= 1"),
        ({"targetRef": SVC, "total": {"requestsPerSecond": "9"}}, ">= 1"),
        (
            {
                "targetRef": {"kind": "Service", "name": "x", "namespace": "other"},
                "total": {"requestsPerSecond": 1},
            },
            "namespace",
        ),
        (
            {
                "targetRef": {"kind": "Service", "name": "x"},
                "overrides": [
                    {"requestsPerSecond": 1, "clientRefs": [{"kind": "Pod", "name": "p"}]}
                ],
            },
            "ServiceAccount",
        ),
    ],
)
def test_bad_policies_are_refused(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_rate_limit(spec, "default", "rl")


def test_unknown_field_leaves_the_policy_out_and_reports_it() -> None:
    cfg = parse_objects(list(yaml.safe_load_all(POLICY.replace("total:", "totl:"))))
    assert cfg.rate_limits == ()
    assert any(f.code == "AMB0201" for _r, f in cfg.findings)


def test_total_identity_and_override_buckets() -> None:
    rl = RateLimiter()
    p = policy()
    rl.sync([p], 0.0)
    # identity 4 per client: sleep gets 4, then 429 with Envoy's headers.
    got = [rl.take([p], SLEEP, 0.0).allowed for _ in range(5)]
    assert got == [True] * 4 + [False]
    denied = rl.take([p], SLEEP, 0.0)
    assert denied.headers == (
        ("x-ratelimit-limit", "4"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "1"),
    )
    # the override: bot has 6 of its own, but the total (10, 4 used) leaves 6 -> all 6 pass
    assert [rl.take([p], ("default", "bot"), 0.0).allowed for _ in range(7)] == [True] * 6 + [False]
    # total exhausted: anyone else is refused, by the total bucket
    v = rl.take([p], ("default", "other"), 0.0)
    assert not v.allowed
    assert v.limit == 10
    # refill: 0.25 s later the identity bucket (4/s) has one token, the total 2.5
    assert rl.take([p], SLEEP, 0.25).allowed
    assert not rl.take([p], SLEEP, 0.25).allowed
    # clients without identity share one bucket
    rl2 = RateLimiter()
    rl2.sync([p], 0.0)
    assert sum(rl2.take([p], None, 0.0).allowed for _ in range(10)) == 4


def test_refused_requests_take_no_tokens_and_sync_keeps_unchanged_buckets() -> None:
    rl = RateLimiter()
    p = policy()
    rl.sync([p], 0.0)
    for _ in range(100):
        rl.take([p], SLEEP, 0.0)  # 4 admitted, 96 refused
    # the refused ones did not drain the total: 6 left for others
    assert sum(rl.take([p], ("default", f"c{i}"), 0.0).allowed for i in range(20)) == 6
    rl.sync([p], 1.0)  # same policy: buckets kept (no free burst on a config push)
    assert not rl.take([p], ("default", "c0"), 0.0).allowed
    changed = policy(POLICY.replace("requestsPerSecond: 10", "requestsPerSecond: 11"))
    rl.sync([changed], 0.0)
    assert rl.take([changed], ("default", "c0"), 0.0).allowed


def test_per_client_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_CLIENTS", 50)
    rl = RateLimiter()
    p = policy(POLICY.replace("  total: {requestsPerSecond: 10}\n", ""))
    rl.sync([p], 0.0)
    for i in range(1000):
        rl.take([p], ("ns", f"sa{i}"), 0.0)
    assert len(rl._state[p.key].clients) <= 50


def test_applicability() -> None:
    svc = policy()
    route = policy(
        POLICY.replace(
            "{kind: Service, name: reviews}", "{kind: HTTPRoute, name: r, sectionName: slow}"
        )
    )
    gw = policy(POLICY.replace("{kind: Service, name: reviews}", "{kind: Gateway, name: wp}"))
    kw: dict[str, Any] = {
        "waypoint": ("default", "wp"),
        "service": ("default", "reviews"),
        "route_source": "HTTPRoute default/r",
        "route_name": "slow",
    }
    assert applies(svc, **kw)
    assert applies(route, **kw)
    assert applies(gw, **kw)
    other = {
        **kw,
        "service": ("default", "ratings"),
        "route_name": "fast",
        "waypoint": ("default", "other"),
    }
    assert not applies(svc, **other)
    assert not applies(route, **other)
    assert not applies(gw, **other)
