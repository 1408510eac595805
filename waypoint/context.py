"""Runtime context of one waypoint process.

Owns: `WaypointSettings` (parsed once from flags), and `WaypointContext`: the current mesh
state and compiled L7 config (each swapped by one assignment; readers see old or new, never
half), the waypoint's certificate manager and HBONE pool (the WAYPOINT's identity is the one
presented upstream), telemetry, the clusters (LB / outlier / pool counters) and the lookups the
handler needs (which services this waypoint serves, service by hostname, subset endpoints).

Invariants:
- The state and config change only through `set_state` / `set_config`, each of which moves
  `generation`: the one key of everything derived from them (clusters here, the handler's
  `waypoint.derived` caches).
- Clusters are rebuilt lazily when the generation changes; their counters survive for endpoints
  that stay.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from meshcore.certs import CertificateManager
from meshcore.config.labels import selector_matches
from meshcore.config.pathnorm import PathPolicy
from meshcore.config.routes import DestinationPolicy, TrafficPolicy, WaypointConfig
from meshcore.hbone.pool import HbonePool
from meshcore.identity import SpiffeId
from meshcore.model import GatewayAddress, Service, Workload
from meshcore.state import MeshState
from meshcore.tls import ContextCache
from waypoint.errors import NoHealthyUpstream, Overflow
from waypoint.jwks import JwksCache
from waypoint.metrics import WaypointMetrics
from waypoint.protocol.authz import WaypointIdentity
from waypoint.protocol.cluster import Cluster, EndpointSpec, Origin
from waypoint.protocol.ratelimit import RateLimiter
from waypoint.protocol.route import CompiledConfig, labels_of

MAX_WORKLOAD_CLUSTERS = 1024
"""Most (workload, port) clusters kept for workload-addressed traffic (`workload_cluster`). The
port is the client's (a pod declares none: any port of a workload bound to the waypoint may be
addressed, as Envoy's original-destination cluster adds hosts on demand and cleans out unused
ones), so past the bound an idle one is dropped; all in use: `Overflow` (503 UO)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointSettings:
    """Settings of one waypoint process."""

    name: str
    """The waypoint Gateway's name (policy targetRefs, labels)."""
    namespace: str
    """The waypoint's namespace (and its identity's)."""
    service_account: str
    """Service account of the waypoint's identity."""
    workload_uid: str = ""
    """The waypoint's own workload in the mesh state (its address, which services bind it).
    Empty: found by address among `listen` addresses."""
    trust_domain: str = "cluster.local"
    network: str = ""
    domain_suffix: str = "cluster.local"
    listen: tuple[tuple[str, int], ...] = ()
    """HBONE listeners (ip, 15008)."""
    admin: tuple[str, int] | None = None
    """Metrics/debug/readiness HTTP listener; None = off."""
    body_buffer: int = 64 * 1024
    """Request bytes kept for retries and mirrors (Envoy's per-request buffer limit idea)."""
    max_h2_streams: int = 100
    """Upstream HTTP/2 streams per tunnel before another tunnel is opened."""
    idle_timeout: float = 60.0
    """Idle upstream HTTP/1.1 connections are closed after this."""
    connect_timeout: float = 5.0
    access_log: bool = True
    path_policy: PathPolicy = field(default_factory=PathPolicy)
    """Mesh setting: Istio meshConfig ``pathNormalization`` and Envoy's
    ``path_with_escaped_slashes_action`` (`waypoint.protocol.hygiene`)."""
    path_override: tuple[str, str] = ("", "")
    """(--path-normalization, --escaped-slashes-action) as given ("" = not given): they win
    over the control plane's mesh settings (`waypoint.xds.L7Store.path_policy`)."""
    accept_http_10: bool = False
    """Serve HTTP/1.0 requests (Envoy's ``accept_http_10``, Istio's PILOT_HTTP10); off: 426."""
    protocol_detection_timeout: float = 1.0
    """A tunnel to a port without a declared HTTP protocol whose client sends nothing for this
    long is carried as TCP (server-first protocols); see `waypoint.protocol.sniff`."""
    request_head_timeout: float = 30.0
    """An HTTP/1.1 request head must be complete this long after its first byte arrived, else
    408 and the connection closes (`waypoint.http1`): a head trickled a byte per read is
    otherwise bounded only by its size. Envoy's ``request_headers_timeout`` (timer from the
    first byte to the last of the headers; off by default), nginx's ``client_header_timeout``
    (60 s, then 408). Not armed while a keep-alive connection waits with nothing received."""

    _derived: tuple[SpiffeId, str, WaypointIdentity] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    """(identity, its URI, waypoint identity): built once, read by every request."""

    def __post_init__(self) -> None:
        ident = SpiffeId(
            trust_domain=self.trust_domain,
            namespace=self.namespace,
            service_account=self.service_account,
        )
        wp = WaypointIdentity(
            name=self.name,
            namespace=self.namespace,
            labels=(
                ("gateway.networking.k8s.io/gateway-name", self.name),
                ("istio.io/gateway-name", self.name),
            ),
        )
        object.__setattr__(self, "_derived", (ident, str(ident), wp))

    @property
    def identity(self) -> SpiffeId:
        assert self._derived is not None
        return self._derived[0]

    @property
    def identity_uri(self) -> str:
        """``spiffe://`` URI of `identity` (the XFCC ``By`` of every request)."""
        assert self._derived is not None
        return self._derived[1]

    @property
    def waypoint(self) -> WaypointIdentity:
        assert self._derived is not None
        return self._derived[2]


@dataclass(slots=True)
class WaypointContext:
    settings: WaypointSettings
    state: MeshState
    config: CompiledConfig
    certs: CertificateManager
    pool: HbonePool
    metrics: WaypointMetrics
    contexts: ContextCache = field(default_factory=ContextCache)
    rng: random.Random = field(default_factory=random.Random)
    generation: int = 0
    clusters: dict[tuple[str, str, int], tuple[int, Cluster]] = field(default_factory=dict)
    workload_clusters: dict[tuple[str, int], Cluster] = field(default_factory=dict)
    """Clusters of workload-addressed traffic by (workload uid, port), at most
    `MAX_WORKLOAD_CLUSTERS` (`workload_cluster`)."""
    warned: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    _svc_by_host: dict[str, Service] = field(default_factory=dict)
    _svc_gen: int = -1
    connections: set[asyncio.Transport] = field(default_factory=set)
    draining: bool = False
    jwks: JwksCache = field(default_factory=JwksCache)
    """Keys of RequestAuthentication ``jwksUri`` rules."""
    ratelimiter: RateLimiter = field(default_factory=RateLimiter)
    ratelimit_clock: Callable[[], float] = time.monotonic
    ratelimit_config: CompiledConfig | None = None
    """The config the limiter's buckets were synced with."""

    # ---- updates ---------------------------------------------------------------------------

    def set_state(self, state: MeshState) -> None:
        self.state = state
        self.generation += 1

    def set_config(self, config: WaypointConfig) -> None:
        self.config = CompiledConfig(config)
        self.generation += 1

    # ---- TLS -------------------------------------------------------------------------------

    async def server_context(self) -> ssl.SSLContext:
        return self.contexts.server(await self.certs.get(self.settings.identity))

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return self.contexts.client(await self.certs.get(identity))

    # ---- lookups ---------------------------------------------------------------------------

    def warn_once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            self.warnings.append(message)

    @property
    def me(self) -> Workload | None:
        s = self.settings
        if s.workload_uid:
            return self.state.workload(s.workload_uid)
        for host, _ in s.listen:
            wl = self.state.workload_by_address(host, s.network)
            if wl is not None:
                return wl
        return None

    def is_me(self, gw: GatewayAddress | None) -> bool:
        """Whether a service's/workload's waypoint binding names this waypoint."""
        if gw is None:
            return False
        me = self.me
        if me is None:
            return False
        if gw.address is not None:
            if gw.address.address in me.addresses:
                return True
            svc = self.state.service_by_vip(gw.address.address, gw.address.network)
        elif gw.hostname is not None:
            svc = self.state.service(gw.hostname.key)
        else:
            return False
        return svc is not None and any(
            ep.workload.uid == me.uid for ep in self.state.endpoints(svc.key)
        )

    def origin(self) -> Origin:
        """This waypoint's locality, network and labels (locality load balancing)."""
        me = self.me
        if me is None:
            return Origin(network=self.settings.network)
        return Origin(
            locality=_locality(me), network=me.network, labels=tuple(self.labels(me).items())
        )

    def service_by_host(self, host: str) -> Service | None:
        if self._svc_gen != self.generation:
            self._svc_by_host = {s.hostname: s for s in self.state.services}
            self._svc_gen = self.generation
        return self._svc_by_host.get(host)

    def labels(self, wl: Workload) -> Mapping[str, str]:
        return labels_of(wl.uid, wl.canonical_name, wl.canonical_revision, self.config)

    def cluster(self, svc: Service, subset: str, port: int) -> Cluster:
        """The cluster for (service, subset, service port), refreshed for the current
        generation. Unknown subset: ``version: <subset>`` (warned once)."""
        key = (svc.key, subset, port)
        cur = self.clusters.get(key)
        if cur is not None and cur[0] == self.generation:
            return cur[1]
        dr: DestinationPolicy | None = self.config.destination_rule(svc.hostname)
        policy = dr.policy_for(subset, port) if dr is not None else TrafficPolicy()
        selector: tuple[tuple[str, str], ...] = ()
        if subset:
            sub = dr.subset(subset) if dr is not None else None
            if sub is None:
                self.warn_once(
                    f"no DestinationRule defines subset {subset!r} of {svc.hostname}: "
                    f"selecting version={subset}"
                )
                selector = (("version", subset),)
            else:
                selector = sub.labels
        specs = []
        svc_port = svc.port(port)
        if svc_port is not None:
            for ep in self.state.endpoints(svc.key):
                wl = ep.workload
                if not ep.healthy or wl.network != self.settings.network or not wl.addresses:
                    continue
                target = ep.target_port(svc_port)
                if target is None:
                    continue
                if selector and not selector_matches(selector, self.labels(wl)):
                    continue
                specs.append(
                    EndpointSpec(
                        uid=wl.uid,
                        ip=str(wl.addresses[0]),
                        port=target,
                        identity=wl.identity,
                        locality=_locality(wl),
                        network=wl.network,
                        labels=tuple(self.labels(wl).items())
                        if policy.locality.failover_priority
                        else (),
                    )
                )
        cluster = (
            cur[1]
            if cur is not None
            else Cluster(name=f"{svc.hostname}|{subset}|{port}", policy=policy)
        )
        cluster.update(specs, policy, self.origin())
        self.clusters[key] = (self.generation, cluster)
        return cluster

    def workload_cluster(self, wl: Workload | None, port: int) -> Cluster:
        """The cluster of a workload-addressed destination: the workload at `port` (the
        tunnel's, chosen by the client). Bounded: past `MAX_WORKLOAD_CLUSTERS` an idle one
        (no request active or queued) is dropped (it holds only counters; its endpoint's
        pooled connections are the pool's); none idle raises `Overflow`."""
        if wl is None or not wl.addresses:
            raise NoHealthyUpstream("no destination workload")
        key = (wl.uid, port)
        table = self.workload_clusters
        cluster = table.get(key)
        if cluster is None:
            if len(table) >= MAX_WORKLOAD_CLUSTERS:
                idle = next((k for k, c in table.items() if not c.active and not c.pending), None)
                if idle is None:
                    raise Overflow(f"{MAX_WORKLOAD_CLUSTERS} workload clusters in use")
                del table[idle]
            cluster = Cluster(name=f"{wl.uid}|{port}", policy=TrafficPolicy())
            table[key] = cluster
        cluster.update(
            [EndpointSpec(uid=wl.uid, ip=str(wl.addresses[0]), port=port, identity=wl.identity)],
            cluster.policy,
        )
        return cluster


def _locality(wl: Workload) -> tuple[str, str, str]:
    loc = wl.locality
    return (loc.region, loc.zone, loc.subzone) if loc is not None else ("", "", "")
