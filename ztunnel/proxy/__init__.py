"""ztunnel.proxy: the node proxy's data path.

`outbound` (15001: carries out `plan_outbound` over a pooled HBONE connection), `inbound` (15008
accept + TLS + CONNECT, 15006 plaintext), `relay` (TCP <-> tunnel and TCP <-> TCP splice with
FIN/RST mapping) and `context` (the runtime state they share).
"""
