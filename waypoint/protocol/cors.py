"""CORS at the waypoint (Fetch standard "CORS protocol"), with Envoy's CORS filter behaviour,
which Istio's VirtualService ``corsPolicy`` and Gateway API's HTTPRoute ``CORS`` filter use.

Owns (the record is `meshcore.config.routes.CorsPolicy`): `allowed_origin`, `is_preflight`,
`preflight_headers` and `response_headers`.

Semantics (Envoy cors filter; istio.io VirtualService CorsPolicy; Gateway API HTTPCORSFilter):
- Only requests with an ``Origin`` are CORS requests; an origin no ``allowOrigins`` entry
  matches gets no CORS headers (the browser then refuses the response).
- Preflight = ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``. An allowed
  origin's preflight is answered by the waypoint (200, never forwarded) with
  ``access-control-allow-origin`` (the request's origin), ``-allow-methods``, ``-allow-headers``,
  ``-max-age``, ``-allow-credentials``. A preflight from an origin not allowed is forwarded
  (Istio ``unmatchedPreflights: FORWARD``, the default) or answered without CORS headers
  (``IGNORE``).
- Other requests from an allowed origin get ``access-control-allow-origin``,
  ``-allow-credentials`` and ``-expose-headers`` on the response.

Invariants: pure; header names lower-case.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshcore.config.routes import CorsPolicy


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k == name), None)


def allowed_origin(policy: CorsPolicy, headers: Sequence[tuple[str, str]]) -> str | None:
    origin = _header(headers, "origin")
    if origin is None or not any(m.matches(origin) for m in policy.allow_origins):
        return None
    return origin


def is_preflight(method: str, headers: Sequence[tuple[str, str]]) -> bool:
    return (
        method == "OPTIONS"
        and _header(headers, "origin") is not None
        and _header(headers, "access-control-request-method") is not None
    )


def preflight_headers(policy: CorsPolicy, origin: str) -> list[tuple[str, str]]:
    out = [("access-control-allow-origin", origin)]
    if policy.allow_methods:
        out.append(("access-control-allow-methods", ",".join(policy.allow_methods)))
    if policy.allow_headers:
        out.append(("access-control-allow-headers", ",".join(policy.allow_headers)))
    if policy.max_age is not None:
        out.append(("access-control-max-age", str(policy.max_age)))
    if policy.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    return out


def response_headers(policy: CorsPolicy, origin: str) -> list[tuple[str, str]]:
    out = [("access-control-allow-origin", origin)]
    if policy.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    if policy.expose_headers:
        out.append(("access-control-expose-headers", ",".join(policy.expose_headers)))
    return out
