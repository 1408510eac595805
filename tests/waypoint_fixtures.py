"""What the waypoint feature tests (tests/unit, tests/loopback) share: the seed's routing
objects, builders for the VirtualService / DestinationRule YAML each test varies, and the
client loops that count what a run of requests got.

Owns: `SEED_VS` and `REVIEWS_DR` (the Bookinfo-style reviews route and its subsets, as the lab
seed has them); `virtual_service`, `destination_rule`, `gateway_route` and
`authorization_policy` (one object's YAML around the part a test writes), `jwt_required`
(a RequestAuthentication and the policy that requires its tokens); `parsed` and
`dr_policy` (that YAML parsed as the waypoint parses it); `statuses` and `versions` (requests
through an aiohttp session, counted).

Invariants: pure builders (no I/O); the builders' output parses to the same objects as
the literal YAML the tests used to spell out (name, namespace, hosts default to ``reviews`` in
``default``); the client loops only read the responses and `dr_policy` checks only that
its object parsed: what a test asserts stays in the test.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import yaml

from meshcore.config.objects import parse_objects
from meshcore.config.routes import TrafficPolicy, WaypointConfig

if TYPE_CHECKING:
    from aiohttp import ClientSession

SEED_VS = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews-route
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        user-type:
          exact: beta-tester
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 90
    - destination:
        host: reviews
        subset: v2
      weight: 10
"""
"""examples/lab-waypoint/config/reviews-route.yaml: beta-tester -> v2, others 90/10 v1/v2."""

REVIEWS_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: default
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
  - name: v3
    labels: {version: v3}
"""
"""The reviews subsets v1..v3 by the pods' ``version`` label."""


def _block(text: str, indent: str) -> str:
    return textwrap.indent(textwrap.dedent(text).strip("\n"), indent) + "\n"


def _metadata(name: str, namespace: str | None) -> str:
    if namespace is None:
        return f"metadata: {{name: {name}}}\n"
    return f"metadata: {{name: {name}, namespace: {namespace}}}\n"


def virtual_service(
    http: str, *, name: str = "reviews", namespace: str | None = "default", hosts: str = "reviews"
) -> str:
    """A ``networking.istio.io/v1`` VirtualService for `hosts` (comma-separated) whose
    ``spec.http`` is the YAML list `http` (indentation free)."""
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        + _metadata(name, namespace)
        + f"spec:\n  hosts: [{hosts}]\n  http:\n"
        + _block(http, "  ")
    )


def destination_rule(
    spec: str, *, name: str = "reviews", namespace: str | None = "default", host: str = "reviews"
) -> str:
    """A ``networking.istio.io/v1`` DestinationRule for `host`; `spec` is the rest of its spec
    (trafficPolicy, subsets; indentation free)."""
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        + _metadata(name, namespace)
        + f"spec:\n  host: {host}\n"
        + _block(spec, "  ")
    )


def parsed(*texts: str) -> WaypointConfig:
    """The waypoint config of the YAML documents in `texts`."""
    return parse_objects([d for t in texts for d in yaml.safe_load_all(t)])


def dr_policy(traffic_policy: str) -> TrafficPolicy:
    """The traffic policy of a reviews DestinationRule whose ``spec.trafficPolicy`` is
    `traffic_policy` (flow or block YAML); it must parse without an Error finding."""
    cfg = parsed(destination_rule(f"trafficPolicy: {traffic_policy}", name="r"))
    assert [f for _r, f in cfg.findings if f.level == "Error"] == [], cfg.findings
    return cfg.destination_rules[0].policy


ROUTE_VERSIONS = {
    "HTTPRoute": "v1",
    "GRPCRoute": "v1",
    "TCPRoute": "v1alpha2",
    "TLSRoute": "v1alpha2",
}
"""The Gateway API version each route kind is served at (TCPRoute/TLSRoute: experimental)."""


def gateway_route(kind: str, spec: str, *, name: str, namespace: str = "default") -> str:
    """A Gateway API route of `kind` (HTTPRoute, GRPCRoute, TCPRoute, TLSRoute) whose
    ``spec`` is `spec` (parentRefs, rules; indentation free)."""
    return (
        f"apiVersion: gateway.networking.k8s.io/{ROUTE_VERSIONS[kind]}\nkind: {kind}\n"
        + _metadata(name, namespace)
        + "spec:\n"
        + _block(spec, "  ")
    )


def authorization_policy(spec: str, *, name: str, namespace: str = "default") -> str:
    """An Istio ``security.istio.io/v1`` AuthorizationPolicy whose ``spec`` is `spec`
    (targetRefs or selector, action, rules; indentation free)."""
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        + _metadata(name, namespace)
        + "spec:\n"
        + _block(spec, "  ")
    )


def jwt_required(jwt_rules: str, *, paths: str, name: str = "jwt", extra_rules: str = "") -> str:
    """A RequestAuthentication `name` for the reviews Service with `jwt_rules` (the YAML list
    of ``spec.jwtRules``) and the AuthorizationPolicy ``require-<name>`` that denies requests
    to `paths` (a YAML list) without a request principal, plus `extra_rules` (YAML list items)."""
    targets = "targetRefs: [{kind: Service, name: reviews}]\n"
    authn = (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        + _metadata(name, "default")
        + "spec:\n"
        + _block(targets + "jwtRules:\n" + _block(jwt_rules, "  "), "  ")
    )
    deny = (
        f"{targets}action: DENY\nrules:\n"
        '- from: [{source: {notRequestPrincipals: ["*"]}}]\n'
        f"  to: [{{operation: {{paths: {paths}}}}}]\n" + textwrap.dedent(extra_rules).strip("\n")
    )
    return authn + "---\n" + authorization_policy(deny, name=f"require-{name}")


async def statuses(
    session: ClientSession, url: str, n: int, headers: Mapping[str, str] | None = None
) -> list[int]:
    """The status of each of `n` GETs of `url`, one after the other."""
    out = []
    for _ in range(n):
        async with session.get(url, headers=headers) as r:
            out.append(r.status)
    return out


async def versions(
    session: ClientSession,
    urls: Iterable[str],
    headers: Mapping[str, str] | None = None,
    concurrency: int = 1,
) -> Counter[str]:
    """How many GETs of `urls` each backend version answered (its ``x-version``; the status
    code for a response no backend sent), at most `concurrency` at a time."""
    counts: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)

    async def one(url: str) -> None:
        async with sem, session.get(url, headers=headers) as r:
            await r.read()
            counts[r.headers.get("x-version", str(r.status))] += 1

    await asyncio.gather(*(one(u) for u in urls))
    return counts
