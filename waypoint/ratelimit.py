"""Local rate limiting: the hook between route selection and the rest of the request.

Owns: `check_rate_limit`: the `HTTPLocalRateLimitPolicy` objects that apply to this request
(the waypoint, the destination service, the selected HTTPRoute rule), one draw from their
buckets (`waypoint.protocol.ratelimit.RateLimiter`, kept on the context and synced when the config
changes), and `RateLimited` (429, response flag RL, ``local_rate_limited``,
``x-envoy-ratelimited`` and the ``x-ratelimit-*`` headers, as Envoy's local_ratelimit filter
answers). An admitted request's response carries the ``x-ratelimit-*`` headers too (Envoy's
``enable_x_ratelimit_headers: DRAFT_VERSION_03`` adds them to every response of a request the
filter checked), via `limited_downstream`; a request no policy applies to is untouched.

Invariant: the limiter's clock is the context's `ratelimit_clock` (monotonic; tests inject it).
"""

from __future__ import annotations

from meshcore.config.routes import HttpRoute
from meshcore.identity import SpiffeId
from meshcore.model import Service
from waypoint.body import DecoratedDownstream, Downstream
from waypoint.context import WaypointContext
from waypoint.errors import RateLimited
from waypoint.protocol.ratelimit import applies

RATELIMIT_HEADERS = frozenset(("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"))


def check_rate_limit(
    ctx: WaypointContext, svc: Service | None, route: HttpRoute, peer: SpiffeId | None
) -> tuple[tuple[str, str], ...]:
    """Raises `RateLimited`; else the ``x-ratelimit-*`` fields for the response (empty when no
    policy applies)."""
    policies = ctx.config.config.rate_limits
    if not policies:
        return ()
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
        return ()
    client = (peer.namespace, peer.service_account) if peer is not None else None
    verdict = ctx.ratelimiter.take(mine, client, now)
    if not verdict.allowed:
        raise RateLimited(verdict.policy, verdict.headers)
    return verdict.headers


def limited_downstream(down: Downstream, headers: tuple[tuple[str, str], ...]) -> Downstream:
    """`down`, adding an admitted request's ``x-ratelimit-*`` fields to its response (the
    app's own fields of those names are replaced, as Envoy sets rather than appends them)."""
    return DecoratedDownstream(down, headers, RATELIMIT_HEADERS) if headers else down
