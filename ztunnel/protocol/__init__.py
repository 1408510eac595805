"""ztunnel.protocol: the node proxy's pure decisions, without any I/O.

Owns: connection planning (`plan`: `plan_outbound`, `plan_inbound`), built on the shared
`meshcore.state` and `meshcore.authz`.

Invariant: every module here is pure (functions of state and addresses; no sockets, no clock
reads, randomness injected); `ztunnel.proxy` carries the decisions out.
"""
