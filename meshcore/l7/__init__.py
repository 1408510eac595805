"""meshcore.l7: what the waypoint needs to understand HTTP, without any I/O.

Owns: the HTTP/1.1 codec (`http1`), the L7 configuration records parsed from the objects users
write (`config`: VirtualService, DestinationRule, HTTPRoute, AuthorizationPolicy), the pure route
selection (`route`), L7 authorization (`authz`), outlier detection / connection-pool accounting
and load balancing (`upstream`), and W3C trace context (`trace`).

Invariant: every module here is pure (no sockets, no clock reads, injected randomness); the
asyncio edges live in `waypoint/`.
"""
