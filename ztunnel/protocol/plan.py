"""Pure connection planning for the node proxy: decide first, then the proxy carries it out.

Owns: `plan_outbound` (a captured connection from a local workload -> where and how to send it)
and `plan_inbound` (an HBONE CONNECT arriving at this node -> check it, authorize it, say where
to connect), with what they are given: `PlanScope` (the planning proxy: node, network, own
addresses, rng; built once per proxy) and `InboundConnect` (one CONNECT's addresses and peer;
it and the plans themselves are data in `ztunnel.protocol.plantypes`).
Both are pure functions of a `MeshState` snapshot and the connection's addresses; randomness is
injected (`PlanScope.rng`) so tests are deterministic. Also owns the two plan caches (issue 14),
each valid for one snapshot only (a new snapshot is planned on afresh, by the next connection):
`OutboundPlanCache` (`PlanScope.plans`: what `plan_outbound` planned for a VIP; random picks
still drawn per connection) and `InboundPlanCache` (`plan_inbound`'s allowed plans, the
authorization decision included; a refusal is decided anew each time).

Behaviour follows istio/ztunnel's outbound ``build_request`` / inbound handling (2026), in short:
- Outbound. A destination port in {15001, 15006, 15008} on one of the node proxy's own addresses
  is a self-call and refused (ztunnel refuses these ports on loopback; our demo runs every
  workload on 127.0.0.0/8, so the proxy's addresses are passed in instead). The source IP must
  be a workload of this node, else REJECT "unknown source". A service VIP: the service must
  declare the port; if the service has a waypoint -> HBONE to the waypoint's HBONE port with
  :authority ``VIP:port``; else pick a random usable endpoint (HEALTHY unless the service's
  health policy is ALLOW_ALL, same network, with a resolvable target port) and map the service
  port to the endpoint's target port; none -> NO_ENDPOINTS (response_flags NR). A workload IP:
  via its waypoint if it has one, else HBONE to ``(ip, 15008)`` with :authority ``ip:port`` if it
  uses HBONE, else PASSTHROUGH. Unknown IP -> PASSTHROUGH. A chosen endpoint with its own
  waypoint (and no service waypoint) is reached via that waypoint, as in ztunnel. Traffic whose
  source is one of the waypoint's own workloads skips that waypoint (no loop).
- Expected server identity: the destination workload's, or the waypoint workload's when going
  through a waypoint. A waypoint (GatewayAddress) resolves to a workload by its address (a
  workload IP, or a service VIP whose endpoint is picked) or by hostname (a service key).
- Inbound (docs/reference/ambient-facts.md, "Server checks that the CONNECT target IP equals the
  connection's destination (pod) IP, except for waypoint/service-hostname cases"): reserved target
  ports -> 400; receiving workload unknown or on another node -> 400; target != connection
  destination unless the receiving workload is the waypoint of the target service/workload -> 400;
  authorization (meshcore.authz over `MeshState.policies_for(receiving workload)`) denies -> 401; a
  service target with no usable endpoint -> 503.

Deviations: no locality-aware or STRICT/FAILOVER routing preference yet (uniform random over
usable endpoints); no network gateways (endpoints on other networks are not usable); service
``subject_alt_names`` are not added to the expected identities.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final

from meshcore.authz import ConnectionInfo, evaluate
from meshcore.errors import BadRequest, Unauthorized, UpstreamUnavailable
from meshcore.identity import SpiffeId
from meshcore.model import (
    HBONE_PORT,
    GatewayAddress,
    HealthPolicy,
    IPAddress,
    Port,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from meshcore.state import Endpoint, MeshState, address_key, address_texts
from ztunnel.protocol.plantypes import InboundConnect, InboundPlan, OutboundPlan, PlanKind

RESERVED_PORTS = frozenset({15001, 15006, 15008})
"""Node-proxy listener ports that clients may not target (self-call)."""


class _Choice:
    """A random pick among `len(self)` options (each a plan or another pick), made per
    connection with the scope's rng: `rng.choice(self)` (`_resolve`), the draw the planner
    would have made over the same options. Each option is built on first use and kept by its
    index (`_build`), not all of them on the first connection after a snapshot swap (issue 14:
    a 60-endpoint service cost 189 us eagerly). `count`: the plans it may come to hold (what
    `OutboundPlanCache` counts). This base class is the empty pick (`_OVERFLOW`)."""

    __slots__ = ("_memo", "count")

    def __init__(self, size: int, count: int) -> None:
        self._memo: list[OutboundPlan | _Choice | None] = [None] * size
        self.count: Final = count

    def __len__(self) -> int:
        return len(self._memo)

    def __getitem__(self, index: int) -> OutboundPlan | _Choice:
        option = self._memo[index]
        if option is None:
            option = self._memo[index] = self._build(index)
        return option

    def _build(self, index: int) -> OutboundPlan | _Choice:
        raise IndexError(index)


class _EndpointChoice(_Choice):
    """A random one of a service's usable endpoints (`_OutboundPlanner.to_endpoint`)."""

    __slots__ = ("_planner", "_svc", "_usable")

    def __init__(
        self,
        planner: _OutboundPlanner,
        usable: list[tuple[Endpoint, IPAddress, int]],
        svc: Service,
        count: int,
    ) -> None:
        super().__init__(len(usable), count)
        self._planner = planner
        self._usable = usable
        self._svc = svc

    def _build(self, index: int) -> OutboundPlan | _Choice:
        ep, ip, port = self._usable[index]
        return self._planner.to_workload(ep.workload, ip, port, self._svc)


class _WaypointChoice(_Choice):
    """A random one of a waypoint's usable workloads (`_OutboundPlanner.via_waypoint`)."""

    __slots__ = ("_authority", "_gw", "_planner", "_svc", "_usable", "_wl")

    def __init__(
        self,
        planner: _OutboundPlanner,
        usable: list[tuple[Workload, IPAddress]],
        via: tuple[GatewayAddress, str, Workload | None, Service | None],
    ) -> None:
        super().__init__(len(usable), len(usable))
        self._planner = planner
        self._usable = usable
        self._gw, self._authority, self._wl, self._svc = via

    def _build(self, index: int) -> OutboundPlan | _Choice:
        picked = self._usable[index]
        return self._planner._via(self._gw, self._authority, self._wl, self._svc, picked)


def _what(wl: Workload | None, svc: Service | None) -> str:
    """What a waypoint is in front of, for a plan's reason."""
    return f"workload {wl.uid}" if wl is not None else f"service {svc.key if svc else ''}"


_OVERFLOW: Final = _Choice(0, 1)
"""What an eager pick past the budget returns (the planner's `overflow` says so; never
resolved: the caller plans again lazily)."""


MAX_PLANS_PER_OUTCOME: Final = 64
"""Plans one cached outcome may hold (its picks' options, all levels): a destination with more
alternatives is planned per connection, uncached."""


MAX_CACHED_PLANS: Final = 4096
"""Plans `OutboundPlanCache` holds at most (all outcomes' plans; the oldest outcomes leave
first). What it keeps is bounded by the state anyway (local sources x declared VIP ports)."""


class OutboundPlanCache:
    """`plan_outbound`'s outcomes by (source address, service VIP, declared port), for ONE state
    snapshot (issue 14: the same few pairs open every connection; a plan took ~5 us). A plan is
    a pure function of the snapshot, the scope and those three, so an outcome is reused only
    while `state` is the very snapshot it was planned on: any other snapshot (a workload
    removed, a service or waypoint changed) empties the cache first, and the next connection is
    planned on it. Random picks stay per connection: an outcome keeps every option of a pick
    (`_Choice`, each built on first use) and `_resolve` draws with the scope's rng, the same
    draws in the same order as planning each time. Bounded by the state: only a known local
    source to a port a VIP declares is kept (a workload IP's port or an address outside the mesh
    is the client's pick: planned per connection, never kept); and `MAX_CACHED_PLANS` plans in
    all (the oldest leave first), `MAX_PLANS_PER_OUTCOME` per outcome (more alternatives:
    planned per connection). Holds its snapshot, so a snapshot's identity is not reused while
    cached."""

    __slots__ = ("_entries", "_plans", "_state")

    def __init__(self) -> None:
        self._state: MeshState | None = None
        self._entries: dict[tuple[IPAddress | str, IPAddress | str, int], OutboundPlan | _Choice]
        self._entries = {}
        self._plans = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def plans(self) -> int:
        """Plans held (the bound is on these)."""
        return self._plans

    def get(
        self, state: MeshState, key: tuple[IPAddress | str, IPAddress | str, int]
    ) -> OutboundPlan | _Choice | None:
        if state is not self._state:
            self._entries.clear()
            self._plans = 0
            self._state = state
            return None
        return self._entries.get(key)

    def put(
        self, key: tuple[IPAddress | str, IPAddress | str, int], outcome: OutboundPlan | _Choice
    ) -> None:
        """Keep `outcome` for `key` (planned on the snapshot of the last `get`)."""
        count = _plan_count(outcome)
        entries = self._entries
        while entries and self._plans + count > MAX_CACHED_PLANS:  # the oldest go first
            self._plans -= _plan_count(entries.pop(next(iter(entries))))
        entries[key] = outcome
        self._plans += count


def _plan_count(outcome: OutboundPlan | _Choice) -> int:
    """What `outcome` counts against `MAX_CACHED_PLANS`: the plans it may come to hold, built
    or not (`_OVERFLOW`, none: 1)."""
    return outcome.count if isinstance(outcome, _Choice) else 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanScope:
    """The node proxy outbound connections are planned for; built once per proxy
    (`ztunnel.proxy.context.ProxyContext.plan_scope`), never per connection."""

    node: str
    """This proxy's node: an outbound source must be a workload on it."""
    rng: random.Random
    """Endpoint and waypoint picks."""
    network: str = ""
    node_proxy_ips: Collection[IPAddress] = ()
    """The proxy's own addresses (the self-call check)."""
    plans: OutboundPlanCache = field(
        init=False, default_factory=OutboundPlanCache, compare=False, repr=False
    )
    """`plan_outbound`'s outcomes on the current snapshot (this scope's only mutable part). Not
    an init field: `dataclasses.replace` (another node, network or own addresses) makes a
    scope with a cache of its own, never one sharing outcomes planned for the other."""


def format_authority(ip: IPAddress, port: int) -> str:
    """``host:port`` for :authority, IPv6 in brackets (RFC 9110 §7.2, RFC 3986 §3.2.2). The
    address's text is `_ip_text`'s (memoised); the port, which the client picks, keys no memo."""
    text = _ip_text(ip)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _ip(value: IPAddress | str) -> IPAddress:
    # `address_texts`: the state's bounded memo, subscripted directly (a C-level dict hit).
    return address_texts[value][0] if isinstance(value, str) else value


def _address_on(workload: Workload, network: str) -> IPAddress | None:
    """The workload's first address if it is reachable on `network`."""
    if workload.network != network or not workload.addresses:
        return None
    return workload.addresses[0]


def _usable_endpoints(
    state: MeshState, service: Service, port: Port, network: str
) -> list[tuple[Endpoint, IPAddress, int]]:
    lb = service.load_balancing
    allow_unhealthy = lb is not None and lb.health_policy is HealthPolicy.ALLOW_ALL
    out: list[tuple[Endpoint, IPAddress, int]] = []
    for ep in state.endpoints(service.key):
        if not (ep.healthy or allow_unhealthy):
            continue
        addr = _address_on(ep.workload, network)
        target = ep.target_port(port)
        if addr is None or target is None:
            continue
        out.append((ep, addr, target))
    return out


def _waypoint_candidates(
    state: MeshState, gw: GatewayAddress
) -> tuple[Service | None, tuple[Workload, ...]]:
    """The waypoint's workloads (any health), and the service fronting them if any."""
    svc: Service | None = None
    if gw.hostname is not None:
        svc = state.service(gw.hostname.key)
    elif gw.address is not None:
        wl = state.workload_by_address(gw.address.address, gw.address.network)
        if wl is not None:
            return None, (wl,)
        svc = state.service_by_vip(gw.address.address, gw.address.network)
    if svc is None:
        return None, ()
    return svc, tuple(ep.workload for ep in state.endpoints(svc.key))


def _usable_waypoints(
    state: MeshState, gw: GatewayAddress, network: str
) -> list[tuple[Workload, IPAddress]]:
    """The waypoint workloads to send to, one picked at random: the addressed workload itself,
    or the HEALTHY endpoints of the waypoint's service."""
    svc, candidates = _waypoint_candidates(state, gw)
    usable: list[tuple[Workload, IPAddress]] = []
    for wl in candidates:
        addr = _address_on(wl, network)
        if addr is not None and (svc is None or wl.status is WorkloadStatus.HEALTHY):
            usable.append((wl, addr))
    return usable


def _is_waypoint_member(state: MeshState, gw: GatewayAddress, wl: Workload, network: str) -> bool:
    _, candidates = _waypoint_candidates(state, gw)
    return any(c.uid == wl.uid for c in candidates)


@functools.lru_cache(maxsize=4096)
def _ip_text(ip: IPAddress) -> str:
    """`str()` of an address, memoised (issue 14: `str()` of an `ipaddress` object costs more
    than the rest of a plan). Called only with addresses the state holds (a workload's, a
    waypoint's, a known VIP), never with a peer's text: bounded by the state."""
    return str(ip)


def _unforwarded(
    kind: PlanKind,
    reason: str,
    original: tuple[str, int],
    source: Workload | None = None,
    to: Workload | Service | None = None,
) -> OutboundPlan:
    """The one builder of a plan that opens no tunnel and picks no endpoint: a refusal
    (REJECT, NO_ENDPOINTS) or a PASSTHROUGH to a destination outside the mesh. Its target is
    the original destination; `to` is the workload or service it was addressed to, if known."""
    return OutboundPlan(
        kind=kind,
        target_addr=original,
        authority=None,
        source=source,
        destination_workload=to if isinstance(to, Workload) else None,
        service=to if isinstance(to, Service) else None,
        expected_identities=(),
        reason=reason,
    )


def _address_text(value: IPAddress | str) -> str:
    """The canonical text of an address; a text one through the state's (bounded) memo of
    address texts (keyed by hashing a `str`, in C, not an `ipaddress` object)."""
    return address_texts[value][2] if isinstance(value, str) else _ip_text(value)


def _resolve(outcome: OutboundPlan | _Choice, rng: random.Random) -> OutboundPlan:
    """The plan of one connection: the picks of `outcome` made with `rng`, outermost first
    (the order in which the planner draws them: endpoint, then that endpoint's waypoint);
    `rng.choice` over a `_Choice` draws as over the list of its options."""
    while isinstance(outcome, _Choice):
        outcome = rng.choice(outcome)
    return outcome


class _OutboundPlanner:
    """One `plan_outbound` call past its source check: what it was given, and its steps as
    methods. Not closures over the function's locals: compiled by mypyc, closures share an
    environment object that refers to them and they to it, a reference cycle per connection
    that only the cyclic GC frees (bench/README.md, issue 14).

    For the cache (`rng` None): every random pick becomes a `_Choice` over every option (each
    built on first use), so the outcome can be cached and resolved per connection; no draw is
    made while planning. Past `MAX_PLANS_PER_OUTCOME` plans (counted as if every option were
    built: the same bound as building them all) it sets `overflow` and the caller plans per
    connection (with `rng`: each pick drawn as it comes, nothing kept)."""

    def __init__(
        self,
        state: MeshState,
        scope: PlanScope,
        source: Workload,
        original: tuple[str, int],
        rng: random.Random | None,
    ) -> None:
        self.state = state
        self.scope = scope
        self.source = source
        self.original = original
        self.rng = rng
        self.budget = MAX_PLANS_PER_OUTCOME
        self.overflow = False
        self.counted = False
        """The outcome is planned and within the budget: its picks' options, built later
        (`_Choice._build`), were counted already."""

    def _options(self, count: int) -> bool:
        """Whether a pick among `count` options stays within the budget."""
        if self.counted:
            return True
        if count > self.budget:
            self.overflow = True
            return False
        self.budget -= count
        return True

    def refuse(
        self, kind: PlanKind, reason: str, to: Workload | Service | None = None
    ) -> OutboundPlan:
        return _unforwarded(kind, reason, self.original, self.source, to)

    def via_waypoint(
        self, gw: GatewayAddress, authority: str, wl: Workload | None, svc: Service | None
    ) -> OutboundPlan | _Choice:
        """Through the waypoint `gw` of the workload `wl`, else of the service `svc`."""
        usable = _usable_waypoints(self.state, gw, self.scope.network)
        if not usable:
            return self.refuse(
                PlanKind.NO_ENDPOINTS, f"waypoint of {_what(wl, svc)} has no usable workload", wl
            )
        rng = self.rng
        if rng is not None:
            return self._via(gw, authority, wl, svc, rng.choice(usable))
        if not self._options(len(usable)):
            return _OVERFLOW
        return _WaypointChoice(self, usable, (gw, authority, wl, svc))

    def _via(
        self,
        gw: GatewayAddress,
        authority: str,
        wl: Workload | None,
        svc: Service | None,
        picked: tuple[Workload, IPAddress],
    ) -> OutboundPlan:
        wp, wp_ip = picked
        return OutboundPlan(
            kind=PlanKind.HBONE,
            target_addr=(_ip_text(wp_ip), gw.hbone_mtls_port),
            authority=authority,
            source=self.source,
            destination_workload=wl,
            service=svc,
            expected_identities=(wp.identity,),
            reason=f"{_what(wl, svc)} via waypoint {wp.uid}",
            waypoint=wp,
        )

    def to_endpoint(
        self, usable: list[tuple[Endpoint, IPAddress, int]], svc: Service
    ) -> OutboundPlan | _Choice:
        """A random one of a service's usable endpoints (`usable`: not empty)."""
        rng = self.rng
        if rng is not None:
            ep, ep_ip, target_port = rng.choice(usable)
            return self.to_workload(ep.workload, ep_ip, target_port, svc)
        if not self._options(len(usable)):
            return _OVERFLOW
        count = 0
        for ep, _, _ in usable:  # the budget and count as if built now (`_options`)
            wps = self._waypoints_of(ep.workload)
            if wps:
                if not self._options(wps):
                    return _OVERFLOW
                count += wps
            else:
                count += 1
        return _EndpointChoice(self, usable, svc, count)

    def _waypoints_of(self, wl: Workload) -> int:
        """How many waypoint workloads `to_workload(wl, ...)` would pick among (0: none, it
        goes straight to `wl` or is refused)."""
        gw = wl.waypoint
        if gw is None or _is_waypoint_member(self.state, gw, self.source, self.scope.network):
            return 0
        return len(_usable_waypoints(self.state, gw, self.scope.network))

    def to_workload(
        self, wl: Workload, ip: IPAddress, port: int, svc: Service | None
    ) -> OutboundPlan | _Choice:
        authority = format_authority(ip, port)
        if wl.waypoint is not None and not _is_waypoint_member(
            self.state, wl.waypoint, self.source, self.scope.network
        ):
            return self.via_waypoint(wl.waypoint, authority, wl, svc)
        if wl.tunnel_protocol is TunnelProtocol.HBONE:
            return OutboundPlan(
                kind=PlanKind.HBONE,
                target_addr=(_ip_text(ip), HBONE_PORT),
                authority=authority,
                source=self.source,
                destination_workload=wl,
                service=svc,
                expected_identities=(wl.identity,),
                reason=f"workload {wl.uid} uses HBONE",
            )
        return OutboundPlan(
            kind=PlanKind.DIRECT if svc is not None else PlanKind.PASSTHROUGH,
            target_addr=(_ip_text(ip), port),
            authority=None,
            source=self.source,
            destination_workload=wl,
            service=svc,
            expected_identities=(),
            reason=f"workload {wl.uid} does not use HBONE",
        )


def plan_outbound(
    state: MeshState,
    scope: PlanScope,
    *,
    src_ip: IPAddress | str,
    dst_ip: IPAddress | str,
    dst_port: int,
) -> OutboundPlan:
    """Plan a connection captured from `src_ip` to the original destination `dst_ip:dst_port`
    by the node proxy `scope` describes. A known local source to a port a service VIP declares
    goes through the scope's `OutboundPlanCache` (the outcome planned on this very snapshot, or
    planned now and kept), random picks drawn now; anything else is planned per connection."""
    cache = scope.plans
    key = (src_ip, dst_ip, dst_port)
    outcome = cache.get(state, key)
    if outcome is not None and outcome is not _OVERFLOW:
        return _resolve(outcome, scope.rng)
    svc = state.service_by_vip(dst_ip, scope.network)
    if outcome is None and svc is not None and svc.port(dst_port) is not None:
        outcome = _plan(state, scope, key, svc, None)
        if not (isinstance(outcome, OutboundPlan) and outcome.kind is PlanKind.REJECT):
            cache.put(key, outcome)  # bounded by the state: local sources x declared VIP ports
        if outcome is not _OVERFLOW:
            return _resolve(outcome, scope.rng)
    # Planned per connection, never kept: a workload IP's port or an address outside the mesh
    # (the client's pick: keeping them would let a local workload fill memory), or a VIP
    # with more alternatives than an outcome keeps (`_OVERFLOW`, kept as such).
    return _resolve(_plan(state, scope, key, svc, scope.rng), scope.rng)


def _plan(
    state: MeshState,
    scope: PlanScope,
    key: tuple[IPAddress | str, IPAddress | str, int],
    svc: Service | None,
    rng: random.Random | None,
) -> OutboundPlan | _Choice:
    """The outcome for one connection (`rng`: picks drawn now) or for every connection on this
    snapshot with these addresses (`rng` None: every option kept, `_OVERFLOW` past the budget).
    `key`: (source, original destination, port); `svc`: the service whose VIP that is, if any."""
    src_ip, dst_ip, dst_port = key
    node = scope.node
    network = scope.network
    # The state's lookups take the text as it came (their keys are memoised per text); an
    # `ipaddress` object is built only where one is needed.
    original = (_address_text(dst_ip), dst_port)

    if dst_port in RESERVED_PORTS and _ip(dst_ip) in scope.node_proxy_ips:
        return _unforwarded(PlanKind.REJECT, f"self-call to node proxy port {dst_port}", original)
    source = state.workload_by_address(src_ip, network)
    if source is None or source.node != node:
        return _unforwarded(
            PlanKind.REJECT, f"unknown source {_ip(src_ip)} on node {node!r}", original
        )
    planner = _OutboundPlanner(state, scope, source, original, rng)
    outcome = _plan_to(planner, svc, dst_ip, dst_port)
    if planner.overflow:
        return _OVERFLOW
    planner.counted = True
    return outcome


def _plan_to(
    planner: _OutboundPlanner, svc: Service | None, dst_ip: IPAddress | str, dst_port: int
) -> OutboundPlan | _Choice:
    state = planner.state
    network = planner.scope.network
    if svc is not None:
        port = svc.port(dst_port)
        if port is None:
            return planner.refuse(PlanKind.REJECT, f"service {svc.key} has no port {dst_port}", svc)
        if svc.waypoint is not None and not _is_waypoint_member(
            state, svc.waypoint, planner.source, network
        ):
            authority = format_authority(_ip(dst_ip), dst_port)
            return planner.via_waypoint(svc.waypoint, authority, None, svc)
        usable = _usable_endpoints(state, svc, port, network)
        if not usable:
            return planner.refuse(
                PlanKind.NO_ENDPOINTS,
                f"service {svc.key} has no healthy endpoint for port {dst_port}",
                svc,
            )
        return planner.to_endpoint(usable, svc)

    wl = state.workload_by_address(dst_ip, network)
    if wl is None:
        original = planner.original
        return _unforwarded(
            PlanKind.PASSTHROUGH, f"{original[0]} is not in the mesh", original, planner.source
        )
    return planner.to_workload(wl, _ip(dst_ip), dst_port, None)


def _check_no_waypoint_bypass(
    state: MeshState,
    receiver: Workload,
    src_identity: SpiffeId | None,
    addressed_service: str | None,
    network: str,
) -> None:
    """Traffic that must pass a waypoint may only arrive FROM that waypoint
    (docs/reference/ambient-facts.md "What users complain about": waypoint bypass). Applies to a
    workload bound to a waypoint, and to traffic addressed to a service bound to one. Raises
    Unauthorized (401)."""
    gateways: list[tuple[str, GatewayAddress]] = []
    if receiver.waypoint is not None:
        gateways.append((f"workload {receiver.uid}", receiver.waypoint))
    if addressed_service is not None:
        svc = state.service(addressed_service)
        if svc is not None and svc.waypoint is not None:
            gateways.append((f"service {svc.key}", svc.waypoint))
    for what, gw in gateways:
        _, members = _waypoint_candidates(state, gw)
        if src_identity is None or all(m.identity != src_identity for m in members):
            raise Unauthorized(
                f"{what} is bound to a waypoint; traffic from "
                f"{src_identity or 'a plaintext client'} did not come through it"
            )


MAX_CACHED_INBOUND: Final = 256
"""Allowed inbound plans `InboundPlanCache` keeps at most (the oldest leave first): its keys
are partly the peer's picks (the target port), so the bound is a constant (~80 KB)."""


class InboundPlanCache:
    """`plan_inbound`'s ALLOWED plans by every field of the CONNECT (its addresses as parsed, and
    the network and node planned for), for ONE state snapshot (issue 14: the same few clients
    open every connection). The plan, authorization decision included, is a pure function of
    the snapshot and those fields, so a plan is reused only while `state` is the very snapshot
    it was made on: another snapshot (a policy added or changed, a workload removed) empties
    the cache first and the next CONNECT is checked and authorized on it, as without a cache. A
    refusal is never kept (each one is decided, logged and counted anew), nor a plan whose
    addressed service (the peer's text) the snapshot does not know. Bounded:
    `MAX_CACHED_INBOUND` plans. Holds its snapshot, so its identity is not reused."""

    __slots__ = ("_entries", "_state")

    def __init__(self) -> None:
        self._state: MeshState | None = None
        self._entries: dict[tuple[object, ...], InboundPlan] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, state: MeshState, key: tuple[object, ...]) -> InboundPlan | None:
        if state is not self._state:
            self._entries.clear()
            self._state = state
            return None
        return self._entries.get(key)

    def put(self, key: tuple[object, ...], plan: InboundPlan) -> None:
        """Keep `plan` for `key` (planned on the snapshot of the last `get`)."""
        entries = self._entries
        if len(entries) >= MAX_CACHED_INBOUND:
            del entries[next(iter(entries))]  # the oldest
        entries[key] = plan


def plan_inbound(
    state: MeshState,
    connect: InboundConnect,
    *,
    network: str = "",
    node: str | None = None,
    cache: InboundPlanCache | None = None,
) -> InboundPlan:
    """Check and authorize the HBONE CONNECT `connect`, received on `network`; through `cache`
    (the node proxy's, `InboundPlanCache`) if given.

    Raises BadRequest (400), Unauthorized (401) or UpstreamUnavailable (503). If `node` is
    given, the receiving workload must run on it."""
    if cache is None:
        return _plan_inbound(state, connect, network, node)
    key = (
        connect.dst_ip,
        connect.dst_port,
        connect.src_identity,
        connect.src_ip,
        connect.conn_dst_ip,
        connect.addressed_service,
        network,
        node,
    )
    plan = cache.get(state, key)
    if plan is not None:
        return plan
    try:
        # Kept under the addresses' canonical texts (as parsed: "FD00:0::1" is "fd00::1", an
        # IPv6 scope stays, IPv4-mapped IPv6 stays apart from IPv4), so every spelling of one
        # address shares one plan; a CONNECT spelled so is looked up as typed first (above).
        canonical = (
            _address_text(connect.dst_ip),
            connect.dst_port,
            connect.src_identity,
            _address_text(connect.src_ip),
            _address_text(connect.conn_dst_ip),
            connect.addressed_service,
            network,
            node,
        )
    except ValueError:
        return _plan_inbound(state, connect, network, node)  # raises BadRequest: not kept
    if canonical != key:
        plan = cache.get(state, canonical)
        if plan is not None:
            return plan
    plan = _plan_inbound(state, connect, network, node)  # raises: nothing kept
    addressed = connect.addressed_service
    if addressed is None or state.service(addressed) is not None:
        cache.put(canonical, plan)
    return plan


def _plan_inbound(
    state: MeshState, connect: InboundConnect, network: str, node: str | None
) -> InboundPlan:
    dst_port = connect.dst_port
    src_identity = connect.src_identity
    try:
        conn_dst, src = _ip(connect.conn_dst_ip), _ip(connect.src_ip)
        dst_key = address_key(connect.dst_ip, network)
        conn_dst_key = address_key(connect.conn_dst_ip, network)
    except ValueError as exc:
        raise BadRequest(f"bad address: {exc}") from None
    if not 0 < dst_port < 65536:
        raise BadRequest(f"bad port {dst_port}")
    if dst_port in RESERVED_PORTS:
        raise BadRequest(f"self-call: port {dst_port} is reserved for the node proxy")
    receiver = state.workload_by_address(connect.conn_dst_ip, network)
    if receiver is None:
        raise BadRequest(f"unknown destination {conn_dst}")
    if node is not None and receiver.node != node:
        raise BadRequest(f"destination {receiver.uid} is not on node {node!r}")

    service: Service | None = None
    # Address keys compare as the `ipaddress` objects do (version, value, IPv6 scope).
    via_waypoint = dst_key != conn_dst_key
    dst = connect.dst_ip
    if via_waypoint:
        # The one exception to "CONNECT target == connection destination": the receiver is the
        # waypoint of the addressed service or workload.
        service = state.service_by_vip(dst, network)
        target_wl = state.workload_by_address(dst, network)
        gw = (
            service.waypoint
            if service is not None
            else target_wl.waypoint
            if target_wl is not None
            else None
        )
        if gw is None or not _is_waypoint_member(state, gw, receiver, network):
            raise BadRequest(
                f"CONNECT target {_address_text(dst)} does not match connection destination "
                f"{conn_dst}"
            )

    else:
        _check_no_waypoint_bypass(state, receiver, src_identity, connect.addressed_service, network)

    decision = evaluate(
        state.policies_for(receiver),
        ConnectionInfo(src_identity=src_identity, src_ip=src, dst_ip=conn_dst, dst_port=dst_port),
    )
    if not decision.allowed:
        raise Unauthorized(decision.reason)

    if service is not None:
        port = service.port(dst_port)
        if port is None or not _usable_endpoints(state, service, port, network):
            raise UpstreamUnavailable(f"service {service.key} has no usable endpoint on {dst_port}")
    return InboundPlan(
        target_addr=(_address_text(dst), dst_port),
        destination_workload=receiver,
        service=service,
        decision=decision,
        via_waypoint=via_waypoint,
    )
