"""Istio / Kubernetes / Gateway API configuration as users write it, read one way by every
process (control plane, node agent, waypoint, ``ambientctl``).

Modules: `labels` (labels, selectors, ambient enrollment), `fields` (the field table: what is
implemented, refused or warned), `findings` (objects checked against it, the AMB02xx codes),
`fielddoc` (the table rendered as docs/config-fields.md), `authorization` (the one
AuthorizationPolicy parser, with its L4 and L7 views), `requestauthn` (RequestAuthentication
``jwtRules``), `objects` (dispatch of routing objects and policies into one
`routes.WaypointConfig`), `istio` (VirtualService, DestinationRule), `gatewayapi` (HTTPRoute),
`l4routes` (TCPRoute, TLSRoute), `ratelimit` (HTTPLocalRateLimitPolicy), `routes` (the
records), `matchers` (routing string matchers), `reader` (typed accessors naming the field
path, durations, host names), `pathnorm` (the mesh's path normalisation settings, read by the
control plane and the waypoint).
Invariant: pure; no I/O.
"""
