"""waypoint.protocol: what the waypoint needs to understand HTTP, without any I/O.

Owns: the HTTP/1.1 codec (`http1`), request hygiene (`hygiene`: path normalisation, request
checks, XFCC, trailer filter), the pure route selection (`route`), request authentication
(`jwt`), L7 authorization (`authz`), CORS decisions (`cors`), local rate-limit token buckets
(`ratelimit`), outlier detection / connection-pool accounting and load balancing (`cluster`),
protocol detection of a tunnel's first bytes (`sniff`) and W3C trace context (`trace`). The
configuration these read is parsed by `meshcore.config` (shared with the control plane and
``ambientctl``).

Invariant: every module here is pure (no sockets, no clock reads, injected randomness); the
asyncio edges are the modules of `waypoint` itself.
"""
