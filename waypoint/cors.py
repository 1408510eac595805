"""CORS hook: after route selection, answer an allowed preflight or decorate the response.

Owns: `apply_cors` (a `DecoratedDownstream` adds the CORS response headers to whatever
response goes out: upstream, local reply or error), with the decisions of `waypoint.protocol.cors`.
"""

from __future__ import annotations

from meshcore.config.routes import CorsPolicy
from waypoint.body import DecoratedDownstream, Downstream, Request
from waypoint.protocol.cors import (
    allowed_origin,
    is_preflight,
    preflight_headers,
    response_headers,
)

_CORS_NAMES = frozenset(
    (
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-expose-headers",
    )
)


async def apply_cors(
    policy: CorsPolicy | None, req: Request, down: Downstream
) -> tuple[Downstream, int | None]:
    """(the downstream to use, the status if the waypoint answered a preflight itself)."""
    if policy is None:
        return down, None
    origin = allowed_origin(policy, req.headers)
    if is_preflight(req.method, req.headers):
        if origin is not None:
            await down.send_head(
                200,
                [*preflight_headers(policy, origin), ("server", "waypoint")],
                content_length=0,
                end=True,
            )
            return down, 200
        if not policy.forward_unmatched_preflights:
            await down.send_head(200, [("server", "waypoint")], content_length=0, end=True)
            return down, 200
        return down, None
    if origin is None:
        return down, None
    return DecoratedDownstream(down, response_headers(policy, origin), _CORS_NAMES), None
