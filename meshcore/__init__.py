"""meshcore: the shared core the processes (node proxy, waypoint, control plane, node agent,
CLI) build on. No import runs back up into a process package. Code only one process uses lives
with that process (the waypoint's HTTP logic in `waypoint.protocol`, the node proxy's planning in
`ztunnel.protocol`), not here.

Owns: workload identity (SPIFFE, `identity`), the mesh CA and workload certificates (`ca`, `certs`;
`certhelper`: their X.509 work in helper processes, for the node proxy), mTLS contexts and peer
verification (`tls`), JOSE signature checks (`jose`), the HBONE tunnel protocol (`hbone`: sans-I/O
cores, asyncio edges, pool), the mesh state model and its codecs (`model`, `state` over `pmap`,
`proto`), L4 authorization evaluation (`authz`), the configuration objects users write (`config`),
the one exception tree (`errors`), telemetry labels, the /metrics text exposition (`telemetry`:
`text_exposition`, the one renderer of the Prometheus text format) and tracing (`tracing`), and
the clients and small servers several processes share: sockets (`sockets`), `host:port` parsing
(`address`), our gRPC client over the HBONE HTTP/2 core (`grpcwire`: sans-I/O framing and status;
`grpcclient`: its asyncio edge), delta-xDS client (`xds`), CA client (`caclient`), the proxies'
control-plane bootstrap (`bootstrap`), Kubernetes API client and reflector (`kubeapi`,
`reflector`), the operator HTTP server (`opshttp`), the one retry backoff (`backoff`) and the
process lifecycle pieces (`runtime`).
`native` chooses, before any of them is imported, between the compiled (mypyc) build of the hot
modules and their pure-Python sources (`nativecache`: that build's cache in the user's cache
directory).

Invariant: exactly these modules open sockets: `hbone.aio`, `hbone.h3aio` (HBONE over HTTP/3,
UDP), `hbone.pool` (through `hbone.aio` and `hbone.h3aio`), `sockets`, `grpcclient`, `xds` and
`caclient` (through `grpcclient`), `kubeapi`, `reflector`, `opshttp` and `tracing` (OTLP span
export through opentelemetry-sdk's gRPC exporter, on the SDK's export thread) (checked by
tests/unit/test_layout.py). No other
module does network I/O; their decisions take the clock and randomness as parameters
(`certs.CertificateManager.run()` is the one timer loop among them).
"""

from meshcore.native import select as _select_build

_select_build()  # compiled (mypyc) hot modules, or their pure-Python sources: meshcore.native
