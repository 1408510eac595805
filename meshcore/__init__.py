"""meshcore: the shared core the processes (node proxy, waypoint, control plane, node agent,
CLI) build on. No import runs back up into a process package.

Owns: workload identity (SPIFFE), the mesh CA and workload certificates, mTLS contexts and peer
verification, the HBONE tunnel protocol (sans-I/O core, asyncio edge, pool), the mesh state
model (workloads, services, authorization policies) and its pure evaluation (L4 authorization,
outbound/inbound planning), the waypoint's pure HTTP/L7 logic (`l7`), and the clients and small
servers several processes share: delta-xDS client (`xds`), CA client (`caclient`), Kubernetes
API client and reflector (`kubeapi`, `reflector`), the operator HTTP server (`opshttp`), the
one retry backoff (`backoff`) and the process lifecycle pieces (`runtime`).

Invariant: exactly these modules open sockets: `hbone.aio`, `hbone.h3aio` (HBONE over HTTP/3,
UDP), `hbone.pool` (through `hbone.aio` and `hbone.h3aio`), `sockets`, `xds`, `caclient`,
`kubeapi`, `reflector` and `opshttp` (checked by tests/unit/test_layout.py). No other module
does network I/O; their decisions take the clock and randomness as parameters
(`certs.CertificateManager.run()` is the one timer loop among them).
"""
