"""RequestAuthentication at the waypoint: the hook between the request and L7 authorization.

Owns: `authenticate_request`: picks the applicable RequestAuthentications' JWT rules, fetches
``jwksUri`` keys through the context's cache only when a token is present, runs the pure
validation (`waypoint.protocol.jwt.authenticate`) and applies its outcome: the request headers sent
upstream (token removed, payload/claim headers set) and the `RequestInfo` policy evaluates
(``request.auth.*``, ``requestPrincipals``). A bad token raises `Unauthenticated` (401); the
request and its body never go upstream.

Invariant: the wall clock is read here (token times are absolute), nowhere in the logic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from meshcore.config.authorization import AuthzPolicy
from meshcore.errors import JoseError
from meshcore.jose import Jwk
from waypoint.body import Request
from waypoint.context import WaypointContext
from waypoint.errors import Unauthenticated
from waypoint.protocol.jwt import authenticate, extract, keys_needed
from waypoint.protocol.route import RequestInfo

log = logging.getLogger("waypoint")


async def authenticate_request(
    ctx: WaypointContext, policies: Sequence[AuthzPolicy], req: Request, info: RequestInfo
) -> RequestInfo:
    rules = [
        r
        for p in policies
        if p.kind == "RequestAuthentication" and not p.fail_closed_l7
        for r in p.jwt_rules
    ]
    if not rules:
        return info
    query = info.query
    keys: dict[str, tuple[Jwk, ...] | None] = {}
    for rule in keys_needed(rules, extract(rules, req.headers, query)):
        if rule.jwks_uri not in keys:
            keys[rule.jwks_uri] = await ctx.jwks.get(
                rule.jwks_uri, rule.timeout, issuer=rule.issuer if rule.discovery else None
            )
    try:
        result = authenticate(rules, req.headers, query, keys, time.time())
    except JoseError as exc:
        log.info("JWT rejected (%s) for %s %s", exc, req.method, info.path_only)
        raise Unauthenticated(str(exc), f"{req.scheme}://{req.authority}{info.path_only}") from None
    req.headers = list(result.headers)
    return info._replace(headers=tuple(result.headers), auth=result.auth)
