"""Per-peer-IP bounds of an HBONE server, over TCP (`ztunnel.proxy.inbound.HboneListener`) and
over QUIC (`meshcore.hbone.h3aio.H3Endpoint`): one implementation and the same limits for both
transports (each listener has its table).

Owns: `PeerTable`, the count per peer IP of handshakes in progress, connections (handshaking or
established) and tunnels, and the stream-reset budget shared by a peer's connections.
Invariants: a peer over a limit is refused before any state is created for it; memory is one
small entry per peer with a connection or tunnel plus `PEERS_REMEMBERED` idle ones (least
recently used dropped first), so closing every connection does not refill the reset budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from meshcore.hbone.budget import BUDGET_WINDOW, PEER_RESET_BUDGET, RateBudget

HANDSHAKES_PER_PEER = 64
"""TLS handshakes in progress (not yet authenticated) from one peer IP; more are closed at once."""
CONNECTIONS_PER_PEER = 512
"""HBONE connections (handshaking or established) from one peer IP; more are closed at once.
The same bounds for HTTP/3 (`meshcore.hbone.h3aio`)."""
PEERS_REMEMBERED = 16_384
"""Reset budgets kept for peers with no connection left (least recently used dropped first)."""


@dataclass(slots=True)
class _Peer:
    resets: RateBudget
    handshakes: int = 0
    connections: int = 0
    tunnels: int = 0


class PeerTable:
    """Per-peer-IP bounds on an HBONE listener (issue 9, "per connection and per peer"): TLS
    handshakes in progress, connections, tunnels (upstream sockets: 200 streams on each of
    512 connections would otherwise let one peer take every descriptor), and one stream-reset
    budget shared by all connections
    of the peer (`HboneConnection(peer_resets=...)`). A peer is its source IP: before the
    handshake nothing else is known, and the identity a peer presents is chosen by the peer.
    Memory: one small entry per peer with a connection, plus `PEERS_REMEMBERED` idle ones, so
    closing every connection does not refill the reset budget."""

    def __init__(
        self,
        handshakes: int = HANDSHAKES_PER_PEER,
        connections: int = CONNECTIONS_PER_PEER,
        resets: int = PEER_RESET_BUDGET,
        tunnels: int = 16_384,
    ) -> None:
        self.max_tunnels = tunnels
        self.max_handshakes = handshakes
        self.max_connections = connections
        self.reset_limit = resets
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def _peer(self, ip: str) -> _Peer:
        peer = self._peers.get(ip)
        if peer is None:
            peer = self._peers[ip] = _Peer(RateBudget(self.reset_limit, BUDGET_WINDOW))
            self._forget_idle()
        else:
            self._peers.move_to_end(ip)
        return peer

    def _forget_idle(self) -> None:
        if len(self._peers) <= PEERS_REMEMBERED:
            return
        for ip, peer in list(self._peers.items()):
            if len(self._peers) <= PEERS_REMEMBERED:
                break
            if peer.connections == 0 and peer.tunnels == 0:
                del self._peers[ip]

    def admit(self, ip: str) -> str | None:
        """Count a new connection (handshaking) from `ip`; the reason it is refused, or None."""
        peer = self._peer(ip)
        if peer.handshakes >= self.max_handshakes:
            return f"{peer.handshakes} TLS handshakes in progress"
        if peer.connections >= self.max_connections:
            return f"{peer.connections} connections"
        peer.handshakes += 1
        peer.connections += 1
        return None

    def connections(self, ip: str) -> int:
        """Connections (handshaking or established) from `ip` now."""
        peer = self._peers.get(ip)
        return 0 if peer is None else peer.connections

    def handshakes(self, ip: str) -> int:
        """TLS/QUIC handshakes in progress from `ip` now."""
        peer = self._peers.get(ip)
        return 0 if peer is None else peer.handshakes

    def tunnels(self, ip: str) -> int:
        """Tunnels (upstream sockets, connecting or open) of `ip` now."""
        peer = self._peers.get(ip)
        return 0 if peer is None else peer.tunnels

    def handshake_done(self, ip: str) -> None:
        self._peers[ip].handshakes -= 1

    def closed(self, ip: str) -> None:
        self._peers[ip].connections -= 1

    def open_tunnel(self, ip: str) -> bool:
        """Count a tunnel (upstream socket) for `ip`; False (not counted) when at the limit."""
        peer = self._peer(ip)
        if peer.tunnels >= self.max_tunnels:
            return False
        peer.tunnels += 1
        return True

    def close_tunnel(self, ip: str) -> None:
        self._peers[ip].tunnels -= 1

    def resets(self, ip: str) -> RateBudget:
        return self._peer(ip).resets
