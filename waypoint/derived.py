"""What the waypoint's request handler derives once per (state, config, settings) instead of
once per request.

Owns: `Derived`, the handler's bounded caches of facts that depend only on the current
`MeshState`, `CompiledConfig` and `WaypointSettings` (and the key they are kept by):
  - `Derived.peer`: a tunnel's `Peer` (verified identity, its URI and principal, the source
    workload at the peer address and its labels), by peer address;
  - `Derived.applicable`: the L7 authorization policies that apply to an addressed service
    (`waypoint.protocol.authz.applicable`), by service (name, namespace);
  - `Derived.cluster`: a route destination's service cluster (`WaypointContext.cluster`: the
    service of the destination host, its port, the subset's endpoints), by (host, subset,
    port, the tunnel's target port), and `Derived.workload`: an endpoint's workload by uid
    (the answering endpoint's telemetry labels). An unknown host is not kept (raised each
    time, `NoHealthyUpstream`), nor a port the service does not have.

Invariants:
- Every cache is valid for one (`WaypointContext.generation`, settings) pair: the generation
  moves on every `set_state` / `set_config` (the only ways the state and config change; the
  same key `WaypointContext.cluster` keeps its clusters by, so the two cannot drift), and
  settings are replaced, never mutated (compared by identity); a change of either starts every
  cache over before the next lookup (`Derived.fresh`, called by every lookup).
- Bounded whatever the traffic: at most `MAX_PEERS` peers, `MAX_POLICY_SERVICES` services,
  `MAX_DESTINATIONS` destinations and endpoint workloads; past the bound a cache starts over (a
  miss only costs the derivation again).
- A kept cluster is `WaypointContext.cluster`'s own object for the same state and config (whose
  `generation` moves exactly when either is replaced): the handler's view of endpoints, their
  counters and outlier state is the one every other caller sees.
- A source workload is only the one at the peer address whose identity IS the verified peer
  identity (an address alone proves nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from meshcore.config.authorization import AuthzPolicy
from meshcore.config.routes import Destination
from meshcore.identity import SpiffeId
from meshcore.model import Service, Workload
from waypoint.context import WaypointContext, WaypointSettings
from waypoint.errors import NoHealthyUpstream
from waypoint.protocol.authz import applicable
from waypoint.protocol.cluster import Cluster
from waypoint.tunnel import Tunnel

MAX_PEERS = 4096
"""Peer addresses whose source workload the handler keeps (`Derived.peer`); more: it starts
over (bounded whatever the number of clients)."""
MAX_POLICY_SERVICES = 4096
"""Services whose applicable authorization policies the handler keeps (`Derived.applicable`);
more: it starts over (bounded whatever the number of services addressed)."""
MAX_DESTINATIONS = 4096
"""Destinations whose cluster, and endpoints whose workload, the handler keeps
(`Derived.cluster`, `Derived.workload`); more: it starts over."""


class Peer(NamedTuple):
    """What requests learn from a tunnel's verified peer, for one (state, config): the same for
    every request from that peer address and identity, so looked up once (`Derived.peer`)."""

    identity: SpiffeId | None
    uri: str
    """`Tunnel.peer_uri`: the identity's URI ("" for none), for telemetry and XFCC."""
    principal: str | None
    """The identity without ``spiffe://`` (``cluster.local/ns/x/sa/y``), as policy sees it."""
    source: Workload | None
    """The workload at the peer address, only if its identity is the verified peer identity
    (an address alone proves nothing)."""
    labels: Mapping[str, str]
    """The source workload's labels (empty without one)."""


class Derived:
    """The handler's per-(state, config, settings) caches (see the module docstring)."""

    def __init__(self, ctx: WaypointContext) -> None:
        self.ctx = ctx
        self._of: tuple[int, WaypointSettings] | None = None
        """The `WaypointContext.generation` (its state and config) and the settings every cache
        below was derived from."""
        self._peers: dict[str, Peer] = {}
        """`Peer` by peer address, at most `MAX_PEERS`."""
        self._policies: dict[tuple[str | None, str | None], tuple[AuthzPolicy, ...]] = {}
        """The authorization policies applicable to a service (name, namespace), at most
        `MAX_POLICY_SERVICES` of them."""
        self._clusters: dict[tuple[str, str, int | None, int], Cluster] = {}
        """A destination's cluster by (host, subset, port, target port)."""
        self._workloads: dict[str, Workload | None] = {}
        """An endpoint's workload by uid (None: not in the state)."""

    def fresh(self) -> None:
        """Forget what was derived from an older state, config or settings."""
        ctx = self.ctx
        of = self._of
        if of is None or of[0] != ctx.generation or of[1] is not ctx.settings:
            self._peers.clear()
            self._policies.clear()
            self._clusters.clear()
            self._workloads.clear()
            self._of = (ctx.generation, ctx.settings)

    def applicable(self, svc: Service | None) -> tuple[AuthzPolicy, ...]:
        """`authz.applicable` for the addressed service under the current config and settings,
        derived once per service (not per request)."""
        self.fresh()
        key = (svc.name, svc.namespace) if svc is not None else (None, None)
        hit = self._policies.get(key)
        if hit is not None:
            return hit
        ctx = self.ctx
        policies = applicable(ctx.config.policies, ctx.settings.waypoint, key[0], key[1])
        if len(self._policies) >= MAX_POLICY_SERVICES:
            self._policies.clear()
        self._policies[key] = policies
        return policies

    def peer(self, tunnel: Tunnel) -> Peer:
        """The tunnel's `Peer`, derived once per peer address and identity for the current
        state, config and settings."""
        self.fresh()
        ctx = self.ctx
        ident = tunnel.peer_identity
        peer = self._peers.get(tunnel.peer_ip)
        if peer is not None and (peer.identity is ident or peer.identity == ident):
            return peer
        src = ctx.state.workload_by_address(tunnel.peer_ip, ctx.settings.network)
        if src is None or ident is None or src.identity != ident:
            src = None
        uri = tunnel.peer_uri
        peer = Peer(
            identity=ident,
            uri=uri,
            principal=uri.removeprefix("spiffe://") if ident is not None else None,
            source=src,
            labels=ctx.labels(src) if src is not None else {},
        )
        if len(self._peers) >= MAX_PEERS:
            self._peers.clear()
        self._peers[tunnel.peer_ip] = peer
        return peer

    def cluster(self, dest: Destination, target_port: int) -> Cluster:
        """The cluster of a destination with a host (raises `NoHealthyUpstream` for a host the
        state does not know), resolved once per destination and target port for the current
        state and config. `target_port`: the tunnel's, the port when the destination names
        none (a service with one port: that port)."""
        self.fresh()
        key = (dest.host, dest.subset, dest.port, target_port)
        hit = self._clusters.get(key)
        if hit is not None:
            return hit
        ctx = self.ctx
        svc = ctx.service_by_host(dest.host)
        if svc is None:
            raise NoHealthyUpstream(f"unknown destination host {dest.host}")
        port = dest.port or target_port
        if dest.port is None and svc.port(port) is None and len(svc.ports) == 1:
            port = svc.ports[0].service_port
        if svc.port(port) is None:
            # No such service port (Envoy: no `outbound|port|subset|host` cluster): refused
            # before a cluster is built, so a client-chosen target port (a workload-addressed
            # tunnel's) cannot add clusters to `WaypointContext.clusters`.
            raise NoHealthyUpstream(f"{dest.host} has no port {port}")
        cluster = ctx.cluster(svc, dest.subset, port)
        if len(self._clusters) >= MAX_DESTINATIONS:
            self._clusters.clear()
        self._clusters[key] = cluster
        return cluster

    def workload(self, uid: str) -> Workload | None:
        """The state's workload `uid` (an endpoint's), looked up once per uid and state."""
        self.fresh()
        if uid in self._workloads:
            return self._workloads[uid]
        wl = self.ctx.state.workload(uid)
        if len(self._workloads) >= MAX_DESTINATIONS:
            self._workloads.clear()
        self._workloads[uid] = wl
        return wl
