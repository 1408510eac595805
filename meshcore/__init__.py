"""meshcore: what the node proxy (ztunnel) and the waypoint share.

Owns: workload identity (SPIFFE), the mesh CA and workload certificates, mTLS contexts and peer
verification, the HBONE tunnel protocol (sans-I/O), the mesh state model (workloads, services,
authorization policies) and its pure evaluation (L4 authorization, outbound planning).
Invariant: nothing in this package opens a socket except the thin asyncio edges in
`meshcore.hbone.aio`.
"""
