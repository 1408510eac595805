"""ztunnel: the node proxy (one per node): HBONE mTLS tunnels, L4 authorization, telemetry.

`app` is the process (flags, listeners, workers, drain, reload), `proxy/` the data path
(outbound 15001, inbound 15008 HBONE and 15006 plaintext, the relay), `admin` and `metrics` the
operator endpoints. Decisions come from the shared core (`meshcore.plan`, `meshcore.authz`).
"""
