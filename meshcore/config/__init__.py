"""Istio / Kubernetes / Gateway API configuration as users write it, read one way by every
process (control plane, node agent, waypoint, ``ambientctl``).

Modules: `labels` (labels, selectors, ambient enrollment), `fields` (the field table: what is
implemented, refused or warned, and the findings), `authorization` (the one AuthorizationPolicy
and RequestAuthentication parser, with its L4 and L7 views).
Invariant: pure; no I/O.
"""
