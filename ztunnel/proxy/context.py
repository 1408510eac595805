"""Runtime context shared by the node proxy's listeners.

Owns: the current `MeshState` snapshot (swapped by one assignment: readers never see half an
update), the certificate manager and TLS context cache, the HBONE pool, telemetry, and the set of
live connections (for drain), and, with on-demand xDS, the lookup of an address the state does
not hold yet (`ensure_address`). Listeners hold a reference to one `ProxyContext`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from meshcore.certs import CertificateManager, WorkloadCertificate
from meshcore.hbone.aio import HboneProtocol
from meshcore.hbone.control import SERVER_MAX_STREAMS
from meshcore.hbone.pool import HbonePool
from meshcore.identity import SpiffeId
from meshcore.model import IPAddress, TunnelProtocol, Workload
from meshcore.sockets import can_bind_without_privilege
from meshcore.state import MeshState
from meshcore.telemetry import DEFAULT_CLUSTER_ID
from meshcore.tls import ContextCache
from meshcore.tracing import Sampler
from ztunnel.metrics import ConnectionTracker, ProxyMetrics
from ztunnel.protocol.plan import InboundPlanCache, PlanScope
from ztunnel.proxy.slots import ConnectSlots


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """Settings of one node proxy process (parsed once from flags/env by `ztunnel.app`)."""

    node: str
    """Kubernetes node name this proxy serves; only its workloads' identities are used."""
    node_ip: str = "0.0.0.0"
    """Address the admin/metrics/readiness listeners bind (admin: localhost unless loopback)."""
    trust_domain: str = "cluster.local"
    network: str = ""
    capture: str = "bind"
    """"bind": listeners bind explicit/derived addresses (loopback, no privileges).
    "transparent": 15001/15006/15008 bind 0.0.0.0 with IP_TRANSPARENT (eBPF sk_assign)."""
    outbound_listen: tuple[tuple[str, int], ...] = ()
    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    hbone_port: int = 15008
    admin_port: int = 15000
    admin_address: str | None = None
    """Admin (config_dump, quitquitquit) address; None: see `admin_host`."""
    metrics_port: int = 15020
    readiness_port: int = 15021
    original_source: bool = True
    """Open upstream/HBONE connections from the source workload's IP (needs IP_TRANSPARENT
    outside loopback)."""
    drain_timeout: float = 30.0
    handover_socket: str | None = None
    """Unix socket path of the listener hand-over (`ztunnel.handover`); None: no hand-over."""
    ready_file: str | None = None
    """A file created when this process is ready (after any hand-over), removed on drain: a
    per-pod readiness signal where the readiness port is shared with a predecessor."""
    handover_drain_timeout: float = 0.0
    """After handing the listeners to a successor, cap on serving what this process has;
    0: no deadline (each connection ends on its own)."""
    connect_timeout: float = 5.0
    hbone_max_streams: int = SERVER_MAX_STREAMS
    """SETTINGS_MAX_CONCURRENT_STREAMS advertised on inbound HBONE connections."""
    tunnels_per_peer: int = 16_384
    """Inbound tunnels (upstream sockets, connecting or open) one peer IP may hold at once, over
    all its HBONE connections; more CONNECTs get 503 (`meshcore.hbone.peers.PeerTable`)."""
    max_pending_connects: int = 1024
    """Upstream connects in flight in this process (the excess waits)."""
    http3: bool = False
    """Also serve HBONE over HTTP/3 on 15008/udp (bind capture; see ztunnel.proxy.inbound_h3)."""
    http3_peers: tuple[str, ...] = ()
    """Bind capture: nodes whose proxies we reach over HTTP/3 first ("*" = every node), besides
    destinations whose HTTP/3 endpoint the control plane publishes (`ProxyContext.h3_target`);
    any other destination, e.g. an Istio ztunnel, keeps HTTP/2. Needs `http3`."""
    cluster_id: str = DEFAULT_CLUSTER_ID
    """This cluster's id (telemetry ``*_cluster`` of peers whose workload names none)."""
    tracing_address: str | None = None
    """OTLP gRPC collector for one span per connection; None = no tracing."""
    tracing_sampler: Sampler = field(default_factory=Sampler)
    """Which connections' spans are sampled (parent-based: an inbound CONNECT's traceparent
    keeps its flag; new traces by ratio, Istio's ``tracing.sampling``)."""

    @property
    def admin_host(self) -> str:
        """Where admin listens: localhost of the node (never the network), except on a
        loopback test host, where each proxy has its own 127.x node address."""
        if self.admin_address:
            return self.admin_address
        return self.node_ip if self.node_ip.startswith("127.") else "127.0.0.1"


@dataclass(slots=True)
class ProxyContext:
    settings: ProxySettings
    state: MeshState
    certs: CertificateManager
    metrics: ProxyMetrics
    tracker: ConnectionTracker
    pool: HbonePool
    contexts: ContextCache = field(default_factory=ContextCache)
    rng: random.Random = field(default_factory=random.Random)
    connections: set[asyncio.Transport] = field(default_factory=set)
    hbone_servers: set[HboneProtocol] = field(default_factory=set)
    """Inbound HBONE connections (drain sends each a GOAWAY)."""
    upstream_slots: ConnectSlots = field(init=False)
    """Upstream connects in flight in this process (`ztunnel.proxy.inbound.InboundTunnel`)."""
    node_proxy_ips: tuple[IPAddress, ...] = field(init=False)
    """This proxy's own addresses (the self-call check of `plan_outbound`), parsed once."""
    plan_scope: PlanScope = field(init=False)
    """What `plan_outbound` is told about this proxy (node, network, own addresses, rng),
    built once: the settings' node and network do not change after construction."""
    inbound_plans: InboundPlanCache = field(default_factory=InboundPlanCache)
    """`plan_inbound`'s allowed plans on the current snapshot (HBONE CONNECTs, 15008)."""
    draining: bool = False
    demand: Callable[[str, float], Awaitable[bool]] | None = None
    """On-demand xDS (`meshcore.xds.XdsClient.demand`); None: the state holds everything."""

    async def ensure_address(self, ip: str) -> bool:
        """Before deciding about destination `ip`: with on-demand xDS, an address the state
        does not hold is asked for (``network/IP``, Istio ztunnel's fetch on demand) and waited
        for until the answer is applied. False if it was not answered in time (control plane
        unreachable): the caller refuses the connection rather than decide on partial state
        (a mesh pod would otherwise be reached in plaintext, as "unknown")."""
        if self.demand is None:
            return True
        net = self.settings.network
        st = self.state
        if st.service_by_vip(ip, net) is not None or st.workload_by_address(ip, net) is not None:
            return True
        return await self.demand(f"{net}/{ip}", self.settings.connect_timeout)

    def __post_init__(self) -> None:
        self.upstream_slots = ConnectSlots(self.settings.max_pending_connects)
        self.node_proxy_ips = (ipaddress.ip_address(self.settings.node_ip),)
        self.plan_scope = PlanScope(
            node=self.settings.node,
            rng=self.rng,
            network=self.settings.network,
            node_proxy_ips=self.node_proxy_ips,
        )

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return self.contexts.client(await self.certs.get(identity))

    async def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return self.contexts.server(await self.certs.get(identity))

    def h3_target(
        self, workload: Workload | None, target: tuple[str, int]
    ) -> tuple[tuple[str, int], str] | None:
        """Where to try HBONE over HTTP/3 toward destination `workload` reached at `target`, and
        the server name naming it (`meshcore.hbone.h3.server_name_for`); None: HTTP/2 (issue
        16). From configuration: the workload's published HTTP/3 endpoint (its node's address,
        `Workload.http3`); else, bind capture only, the `http3_peers` flag naming its node
        (UDP to the workload's own address). Never without `http3` (our UDP sockets), never
        for a workload we know nothing about (e.g. behind a waypoint) or an Istio peer (which
        publishes no endpoint)."""
        s = self.settings
        if not s.http3 or workload is None:
            return None
        from meshcore.hbone.h3 import server_name_for  # here: aioquic loads with --http3 only

        name = server_name_for(target[0])
        if workload.http3 is not None:
            return (str(workload.http3.address), workload.http3.port), name
        peers = s.http3_peers
        if s.capture == "bind" and ("*" in peers or workload.node in peers):
            return target, name
        return None

    def source_binding(self, src_ip: str) -> tuple[str | None, bool]:
        """(source IP to bind, needs IP_TRANSPARENT) for connections made on behalf of `src_ip`.

        Transparent capture keeps the original client IP (the destination sees the real client,
        and the eBPF established lookup steers replies back to us). In bind mode only loopback
        addresses can be kept (they are all local); otherwise the node's own address is used."""
        if not self.settings.original_source:
            return None, False
        if self.settings.capture == "transparent":
            return src_ip, True
        return (src_ip, False) if can_bind_without_privilege(src_ip) else (None, False)

    def on_rotate(self, cert: WorkloadCertificate) -> None:
        """New certificate: new connections use it; pooled ones with the old one drain."""
        self.contexts.invalidate(cert.identity)
        self.pool.retire(cert.identity)

    def sync_local_identities(self) -> None:
        """Manage certificates for exactly the service accounts with a workload on this node."""
        wanted = {
            w.identity
            for w in self.state.local_workloads(self.settings.node)
            if w.tunnel_protocol is TunnelProtocol.HBONE  # non-mesh pods get no certificate
        }
        for identity in self.certs.identities():
            if identity not in wanted:
                self.certs.remove(identity)
        for identity in wanted:
            self.certs.add(identity)
