"""meshcore.l7: what the waypoint needs to understand HTTP, without any I/O.

Owns: the HTTP/1.1 codec (`http1`), the pure route selection (`route`), L7 authorization
(`authz`), outlier detection / connection-pool accounting and load balancing (`cluster`), and
W3C trace context (`trace`). The configuration these read is parsed by `meshcore.config`
(shared with the control plane and ``ambientctl``).

Invariant: every module here is pure (no sockets, no clock reads, injected randomness); the
asyncio edges live in `waypoint/`.
"""
