"""Local rate limits: Linkerd's ``HTTPLocalRateLimitPolicy`` (policy.linkerd.io/v1alpha1) as parsed.

Owns: `RateLimitPolicy`, `parse_rate_limit`.

Why this shape: Istio has no rate-limit API of its own (its documentation configures Envoy's
local_ratelimit filter through EnvoyFilter, which is Envoy's config, not a mesh API), while
Linkerd's HTTPLocalRateLimitPolicy is a small, documented CRD users already write:
``total.requestsPerSecond`` (one bucket for all clients), ``identity.requestsPerSecond`` (one
bucket per client identity; clients without a verified identity share one) and ``overrides``
(``requestsPerSecond`` for the ServiceAccounts in ``clientRefs``, each with its own bucket,
instead of ``identity``). Linkerd attaches it to a ``Server``; ambient has no Server, so
``targetRef`` names what a waypoint serves, in Gateway API policy-attachment style:
- ``kind: Service``: every request to the service through the waypoint (per workload/service);
- ``kind: HTTPRoute`` (optional ``sectionName`` = a rule ``name``): requests that route selects;
- ``kind: Gateway``: every request through the waypoint.
Buckets hold ``requestsPerSecond`` tokens (a one-second burst) and refill continuously.

Invariants: pure; rates are positive integers (Linkerd: int32 >= 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshcore.errors import ConfigError

KIND = "HTTPLocalRateLimitPolicy"
TARGET_KINDS = ("Service", "HTTPRoute", "Gateway")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateOverride:
    rps: int
    clients: tuple[tuple[str, str], ...]
    """(namespace, service account)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy:
    namespace: str
    name: str
    target_kind: str
    target_name: str
    section: str = ""
    total: int | None = None
    identity: int | None = None
    overrides: tuple[RateOverride, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _map(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected an object, got {type(value).__name__}")
    return value


def _text(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a non-empty string, got {value!r}")
    return value


def _rps(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise ConfigError(path, f"expected an integer >= 1, got {value!r}")
    return value


def _limit(spec: Mapping[str, Any], key: str) -> int | None:
    if spec.get(key) is None:
        return None
    return _rps(
        _map(spec[key], f"spec.{key}").get("requestsPerSecond"), f"spec.{key}.requestsPerSecond"
    )


def parse_rate_limit(spec: Mapping[str, Any], namespace: str, name: str) -> RateLimitPolicy:
    """``spec`` of an HTTPLocalRateLimitPolicy -> policy. Raises ConfigError naming the field."""
    ref = _map(spec.get("targetRef"), "spec.targetRef")
    kind = _text(ref.get("kind"), "spec.targetRef.kind")
    if kind not in TARGET_KINDS:
        raise ConfigError(
            "spec.targetRef.kind", f"{kind!r} is not one of {', '.join(TARGET_KINDS)}"
        )
    target_ns = ref.get("namespace", namespace)
    if target_ns != namespace:
        raise ConfigError("spec.targetRef.namespace", "must be the policy's namespace")
    section = ref.get("sectionName", "")
    if section and kind != "HTTPRoute":
        raise ConfigError("spec.targetRef.sectionName", "only for kind HTTPRoute (a rule name)")
    overrides = []
    raw = spec.get("overrides") or []
    if not isinstance(raw, list):
        raise ConfigError("spec.overrides", "expected a list")
    for i, o in enumerate(raw):
        op = f"spec.overrides[{i}]"
        om = _map(o, op)
        clients = []
        refs = om.get("clientRefs")
        if not isinstance(refs, list) or not refs:
            raise ConfigError(f"{op}.clientRefs", "expected a non-empty list")
        for j, c in enumerate(refs):
            cp = f"{op}.clientRefs[{j}]"
            cm = _map(c, cp)
            if cm.get("kind") != "ServiceAccount":
                raise ConfigError(f"{cp}.kind", "only ServiceAccount clients are supported")
            clients.append(
                (str(cm.get("namespace") or namespace), _text(cm.get("name"), f"{cp}.name"))
            )
        rps = _rps(om.get("requestsPerSecond"), f"{op}.requestsPerSecond")
        overrides.append(RateOverride(rps=rps, clients=tuple(clients)))
    pol = RateLimitPolicy(
        namespace=namespace,
        name=name,
        target_kind=kind,
        target_name=_text(ref.get("name"), "spec.targetRef.name"),
        section=_text(section, "spec.targetRef.sectionName") if section else "",
        total=_limit(spec, "total"),
        identity=_limit(spec, "identity"),
        overrides=tuple(overrides),
    )
    if pol.total is None and pol.identity is None and not pol.overrides:
        raise ConfigError("spec", "no limit: set total, identity or overrides")
    return pol
