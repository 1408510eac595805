"""waypoint: the L7 proxy for the services and workloads bound to it (docs/waypoint.md).

Two layers, as in hypercorn (``protocol/`` and ``asyncio/``):

- `waypoint.protocol`: the pure, sans-I/O decisions (HTTP/1.1 codec, hygiene, routing, L7
  authorization, JWT, CORS, rate-limit buckets, cluster accounting, protocol sniffing, trace
  context). No sockets, no clock reads, randomness injected.
- the asyncio edge, this package's top level: `app` is the process; `server` accepts HBONE on
  15008 and dispatches the HTTP/1.1 (`http1`), HTTP/2 (`http2`) or TCP (`tcp`) inside each
  tunnel (`tunnel`, `body`, `upgrade` for WebSocket); `handler` routes, authorizes and retries
  each request with the hooks `authn` (+ `jwks`, the JWKS fetch), `cors` and `ratelimit`;
  `upstream` opens the onward connections; `context` is the process's runtime state; `xds` takes
  config from the control plane; `metrics` is Istio's HTTP telemetry; `errors` carries status and
  response flag.

Where a name exists in both layers, the top-level module is the edge (the hook) and
`waypoint.protocol.<name>` the decisions it carries out: `waypoint.http1` (keep-alive loop) over
`waypoint.protocol.http1` (codec), `waypoint.cors` over `waypoint.protocol.cors`,
`waypoint.ratelimit` over `waypoint.protocol.ratelimit`. Imports always spell the full path.
"""

import meshcore  # noqa: F401  (first: chooses compiled or pure-Python hot modules, these too)
