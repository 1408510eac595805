"""What a connection plan is: the node proxy's planning inputs and outcomes, as data
(`ztunnel.protocol.plan` decides them).

Owns: `InboundConnect` (one HBONE CONNECT's addresses and peer, what `plan_inbound` checks),
`PlanKind` and `OutboundPlan` (what `plan_outbound` decided for a captured connection),
`InboundPlan` (what `plan_inbound` allowed).

Invariants: every value is immutable (frozen dataclasses; `InboundPlan`'s attributes `Final`)
and holds no I/O; a plan is a pure function of the snapshot and the connection it was made for,
so the plan caches (`ztunnel.protocol.plan`) may hand one plan to many connections.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from meshcore.authz import Decision
from meshcore.identity import SpiffeId
from meshcore.model import IPAddress, Service, Workload


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundConnect:
    """What `plan_inbound` checks: an HBONE CONNECT to `dst_ip:dst_port` (its :authority) that
    arrived on a connection addressed to `conn_dst_ip`, from `src_ip` presenting
    `src_identity` (None: a plaintext connection)."""

    dst_ip: IPAddress | str
    dst_port: int
    src_identity: SpiffeId | None
    src_ip: IPAddress | str
    conn_dst_ip: IPAddress | str
    addressed_service: str | None = None
    """The service the client addressed ("ns/hostname"), as named by the source proxy
    (forwarded host=), for the waypoint-bypass check."""


class PlanKind(enum.Enum):
    """What the proxy does with an outbound connection."""

    HBONE = "HBONE"
    """mTLS + HTTP/2 CONNECT to `target_addr` with `authority`."""
    DIRECT = "DIRECT"
    """Plain TCP to a chosen mesh endpoint that does not speak HBONE."""
    PASSTHROUGH = "PASSTHROUGH"
    """Plain TCP to the original destination (not in the mesh)."""
    NO_ENDPOINTS = "NO_ENDPOINTS"
    """Refuse: service (or waypoint) without usable endpoint. response_flags NR."""
    REJECT = "REJECT"
    """Refuse: unknown source, self-call or undeclared service port."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundPlan:
    """The outcome of `plan_outbound`."""

    kind: PlanKind
    """What to do."""
    target_addr: tuple[str, int]
    """Where to open the TCP connection (for refusals: the original destination)."""
    authority: str | None
    """HBONE CONNECT :authority (``ip:port``); None unless kind is HBONE."""
    source: Workload | None
    """Source workload (None only when it is unknown)."""
    destination_workload: Workload | None
    """Final destination workload if known (None for a service behind a waypoint)."""
    service: Service | None
    """Service addressed by VIP, if any."""
    expected_identities: tuple[SpiffeId, ...]
    """Identities the HBONE server may present (HBONE only)."""
    reason: str
    """Why this plan, for logs and access logs."""
    waypoint: Workload | None = None
    """The waypoint workload the connection goes through, if any."""

    @property
    def refused(self) -> bool:
        """Whether the proxy must close the client connection instead of forwarding."""
        return self.kind in (PlanKind.NO_ENDPOINTS, PlanKind.REJECT)

    @property
    def response_flags(self) -> str:
        """Telemetry response_flags for this plan: NR when no endpoint, else ``-``."""
        return "NR" if self.kind is PlanKind.NO_ENDPOINTS else "-"

    @property
    def source_identity(self) -> SpiffeId | None:
        """Identity whose certificate the proxy presents (the source workload's)."""
        return self.source.identity if self.source is not None else None


class InboundPlan:
    """The outcome of `plan_inbound` (errors are raised instead). Immutable (`Final`: mypy
    refuses assignment, the compiled build too). A plain class, not a frozen dataclass: one is
    built per connection, and mypyc leaves a dataclass its stdlib-generated, interpreted
    ``__init__`` (a frozen one sets every field through ``object.__setattr__``: ~0.7 us
    against ~0.04 us for a native constructor; bench/README.md "Per new connection,
    session 6")."""

    __slots__ = ("decision", "destination_workload", "service", "target_addr", "via_waypoint")

    def __init__(
        self,
        *,
        target_addr: tuple[str, int],
        destination_workload: Workload,
        service: Service | None,
        decision: Decision,
        via_waypoint: bool,
    ) -> None:
        self.target_addr: Final = target_addr
        """Where to open the upstream TCP connection."""
        self.destination_workload: Final = destination_workload
        """The workload receiving the connection (the waypoint in the waypoint case)."""
        self.service: Final = service
        """The service addressed by the CONNECT target (waypoint case)."""
        self.decision: Final = decision
        """The (allowing) authorization decision."""
        self.via_waypoint: Final = via_waypoint
        """True when the CONNECT target differs from the receiving workload (waypoint case)."""

    def __repr__(self) -> str:
        return (
            f"InboundPlan(target_addr={self.target_addr!r}, "
            f"destination_workload={self.destination_workload.uid!r}, "
            f"via_waypoint={self.via_waypoint})"
        )
