"""ztunnel.proxy: the node proxy's data path (the asyncio edge of `ztunnel.protocol`).

`accept` (the accept loops of 15001/15006/15008 and the per-peer-IP bounds), `outbound` (15001:
carries out `plan_outbound` over a pooled HBONE connection), `inbound` (15008 accept + TLS +
CONNECT, 15006 plaintext), `inbound_h3` (15008/udp, HBONE over HTTP/3), `relay` (TCP <-> tunnel
and TCP <-> TCP splice with FIN/RST mapping) and `context` (the runtime state they share).
"""
