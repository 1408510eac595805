"""Local rate limiting: the hook between route selection and the rest of the request.

Owns: `check_rate_limit`: the `HTTPLocalRateLimitPolicy` objects that apply to this request
(the waypoint, the destination service, the selected HTTPRoute rule), one draw from their
buckets (`waypoint.protocol.ratelimit.RateLimiter`, kept on the context and synced when the config
changes), and `RateLimited` (429, response flag RL, ``local_rate_limited`` and the
``x-ratelimit-*`` headers, as Envoy's local_ratelimit filter answers).

Invariant: the limiter's clock is the context's `ratelimit_clock` (monotonic; tests inject it).
"""

from __future__ import annotations

from meshcore.config.routes import HttpRoute
from meshcore.identity import SpiffeId
from meshcore.model import Service
from waypoint.context import WaypointContext
from waypoint.errors import RateLimited
from waypoint.protocol.ratelimit import applies


def check_rate_limit(
    ctx: WaypointContext, svc: Service | None, route: HttpRoute, peer: SpiffeId | None
) -> None:
    policies = ctx.config.config.rate_limits
    if not policies:
        return
    now = ctx.ratelimit_clock()
    if ctx.ratelimit_config is not ctx.config:
        ctx.ratelimiter.sync(policies, now)
        ctx.ratelimit_config = ctx.config
    s = ctx.settings
    mine = [
        p
        for p in policies
        if applies(
            p,
            waypoint=(s.namespace, s.name),
            service=(svc.namespace, svc.name) if svc is not None else None,
            route_source=route.source,
            route_name=route.section,
        )
    ]
    if not mine:
        return
    client = (peer.namespace, peer.service_account) if peer is not None else None
    verdict = ctx.ratelimiter.take(mine, client, now)
    if not verdict.allowed:
        raise RateLimited(verdict.policy, verdict.headers)
