"""ztunnel: the node proxy (one per node): HBONE mTLS tunnels, L4 authorization, telemetry.

`protocol/` holds the pure decisions (`protocol.plan`: outbound/inbound planning, over the
shared `meshcore.state` and `meshcore.authz`); `proxy/` the data path that carries them out
(accept loops, outbound 15001, inbound 15008 HBONE and 15006 plaintext, the relay); `app` is the
process (listeners, workers, drain, reload), started from the settings `flags` parses;
`handover` the listener hand-over of a zero-drop upgrade (`udp_relay` its HTTP/3 UDP part: the
predecessor's QUIC connections relayed by the successor); `admin` and `metrics` the operator
endpoints; `promlib` how the process loads prometheus_client.

Importing this package has a process-wide side effect: `ztunnel.promlib.defer_package_init()`
puts prometheus_client in `sys.modules` with its package `__init__` deferred to the first
package-level name (for every later importer in the process, tests included; a no-op when
prometheus_client is already imported).
"""

import meshcore  # noqa: F401  (first: chooses compiled or pure-Python hot modules, ztunnel.proxy.relay too)
from ztunnel.promlib import defer_package_init

defer_package_init()  # before any metric module: no prometheus_client.exposition in a worker
