"""Istio / Kubernetes / Gateway API configuration as users write it, read one way by every
process (control plane, node agent, waypoint, ``ambientctl``).

Modules: `labels` (labels, selectors, ambient enrollment), `fields` (the field table: what is
implemented, refused or warned, and the findings), `authorization` (the one AuthorizationPolicy
and RequestAuthentication parser, with its L4 and L7 views), `objects` (dispatch of routing
objects and policies into one `routes.WaypointConfig`), `istio` (VirtualService,
DestinationRule), `gatewayapi` (HTTPRoute), `routes` (the records), `matchers` (routing string
matchers), `reader` (typed accessors naming the field path, durations, host names),
`pathnorm` (the mesh's path normalisation settings, read by the control plane and the waypoint).
Invariant: pure; no I/O.
"""
