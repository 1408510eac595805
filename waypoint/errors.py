"""The waypoint's exception tree: every error carries the HTTP status the client receives and
the Envoy-style response flag recorded in telemetry.

Translation to the wire happens at exactly one place (`waypoint.handler.Handler.serve`): an
error raised before the response head went out becomes that status with a short text body
(Envoy's wording where clients may parse it, e.g. ``RBAC: access denied``); after the head went
out the downstream stream is reset instead.
"""

from __future__ import annotations

from meshcore.errors import MeshError


class WaypointError(MeshError):
    """Base: a request the waypoint answers itself."""

    status = 500
    flag = "-"
    body = "internal error"
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers of the local reply."""

    def __init__(self, message: str = "", *, body: str | None = None) -> None:
        super().__init__(message or self.body)
        if body is not None:
            self.body = body


class BadRequest(WaypointError):
    """A request refused by request hygiene (`waypoint.protocol.hygiene`): 400, or 431 for too many
    or too large header fields; flag DPE as Envoy's downstream protocol errors."""

    status = 400
    flag = "DPE"
    body = "bad request"

    def __init__(self, message: str = "", *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        if status == 431:
            self.body = "request header fields too large"


class Forbidden(WaypointError):
    """L7 authorization denied the request (RBAC)."""

    status = 403
    flag = "RBAC"
    body = "RBAC: access denied"


class Unauthenticated(WaypointError):
    """A RequestAuthentication rejected the request's JWT (Envoy jwt_authn: 401 with
    ``www-authenticate: Bearer realm=..., error="invalid_token"``, RFC 6750 §3)."""

    status = 401
    body = "Jwt verification fails"

    def __init__(self, reason: str, realm: str) -> None:
        super().__init__(reason, body=reason)
        self.headers = (("www-authenticate", f'Bearer realm="{realm}", error="invalid_token"'),)


class RateLimited(WaypointError):
    """A local rate limit refused the request (Envoy local_ratelimit: 429, flag RL)."""

    status = 429
    flag = "RL"
    body = "local_rate_limited"

    def __init__(self, policy: str, headers: tuple[tuple[str, str], ...]) -> None:
        super().__init__(f"rate limited by HTTPLocalRateLimitPolicy {policy}")
        # Envoy's local_ratelimit sets x-envoy-ratelimited on the 429 it sends.
        self.headers = (*headers, ("x-envoy-ratelimited", "true"))


class NoRoute(WaypointError):
    status = 404
    flag = "NR"
    body = "no matching route"


class FaultAbort(WaypointError):
    """A VirtualService fault abort (the status comes from the config)."""

    flag = "FI"
    body = "fault filter abort"

    def __init__(self, status: int) -> None:
        super().__init__(f"fault abort {status}")
        self.status = status


class NoHealthyUpstream(WaypointError):
    status = 503
    flag = "UH"
    body = "no healthy upstream"


class Overflow(WaypointError):
    """connectionPool limits exceeded (circuit breaking)."""

    status = 503
    flag = "UO"
    body = "upstream connect error or disconnect/reset before headers. reset reason: overflow"


class UpstreamConnectError(WaypointError):
    status = 503
    flag = "UF"
    body = (
        "upstream connect error or disconnect/reset before headers. "
        "reset reason: connection failure"
    )


class UpstreamReset(WaypointError):
    status = 503
    flag = "UR"
    body = "upstream connect error or disconnect/reset before headers. reset reason: remote reset"


class UpstreamProtocolError(WaypointError):
    status = 502
    flag = "UPE"
    body = "upstream sent a malformed response"


class UpstreamTimeout(WaypointError):
    status = 504
    flag = "UT"
    body = "upstream request timeout"


class NotBound(WaypointError):
    """The tunnel's target is not a service/workload this waypoint serves (CONNECT 400)."""

    status = 400
    flag = "NR"
    body = "destination not served by this waypoint"
