"""Inbound HBONE over HTTP/3: the UDP listener (15008/udp) beside the TCP one (15008/tcp).

Owns: one `H3Endpoint` per listening UDP socket, the server certificate choice and the
TLS_FAILURE record of refused peers. The certificate is the local destination workload's, named
by the SNI the client sent (`meshcore.hbone.h3.server_name_for`: node proxies dial a peer node's
shared socket), else by the socket's address (bind capture: one socket per workload address,
as for TCP, where HBONE clients send no SNI). A name that is not a local mesh workload's address
gets no certificate: the handshake is dropped and recorded. Every CONNECT is served exactly as
over HTTP/2, by `ztunnel.proxy.inbound.InboundTunnel` (plan, authorization, upstream connect, then
200/400/401/503), so both transports share one implementation of the inbound semantics.

UDP port: 15008, the HBONE port, on UDP (a different protocol number: no clash with 15008/tcp).
Bind capture: the listener binds each local workload's address. Transparent capture: one plain
socket on the node's own address (node-to-node UDP; the eBPF programs capture pods' TCP only and
pods are never addressed over UDP); peers reach it through the destination workload's HTTP/3
endpoint published by the control plane (`meshcore.model.Workload.http3`), and name the
workload by SNI; the source workload is named by `forwarded: for=` and checked against the
peer's identity (`ztunnel.proxy.inbound.tunnel_source_ip`).
"""

from __future__ import annotations

import logging
import socket
import weakref

from meshcore.certs import WorkloadCertificate
from meshcore.errors import PeerVerificationError
from meshcore.hbone.h3 import address_from_server_name
from meshcore.hbone.h3aio import Address, H3Endpoint, H3Protocol, H3Stream
from meshcore.model import TunnelProtocol
from ztunnel.metrics import ConnectionRecord
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.inbound import PENDING_CONNECTS_PER_CONNECTION, HboneListener
from ztunnel.proxy.slots import ConnectSlots

log = logging.getLogger("ztunnel.inbound")


class H3Listener(HboneListener):
    """HBONE over HTTP/3 on one bound UDP socket."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket) -> None:
        super().__init__(ctx, sock)
        self.local_ip = sock.getsockname()[0]
        self.endpoint: H3Endpoint | None = None
        # Upstream connects in flight per QUIC connection, as per TLS connection over TCP.
        self._slots: weakref.WeakKeyDictionary[H3Protocol, ConnectSlots] = (
            weakref.WeakKeyDictionary()
        )

    def start(self, *, reading: bool = True) -> None:
        """`reading=False`: a socket handed over by a predecessor, read once it stopped
        (`H3Endpoint.resume_reading`, see `ztunnel.udp_relay`)."""
        ctx = self.ctx
        workload = ctx.state.workload_by_address(self.local_ip, ctx.settings.network)

        async def certificate(server_name: str | None) -> WorkloadCertificate:
            target = workload
            if server_name is not None:
                ip = address_from_server_name(server_name)
                if ip is None:
                    raise PeerVerificationError(f"server name {server_name!r} names no address")
                target = ctx.state.workload_by_address(ip, ctx.settings.network)
            if (
                target is None
                or target.node != ctx.settings.node
                or target.tunnel_protocol is not TunnelProtocol.HBONE
            ):
                raise PeerVerificationError(
                    f"no local mesh workload at {server_name or self.local_ip}"
                )
            return await ctx.certs.get(target.identity)

        def refused(addr: Address, err: PeerVerificationError) -> None:
            rec = ConnectionRecord(
                direction="inbound",
                reporter="destination",
                src_addr=addr[0],
                dst_addr=self.local_ip,
            )
            rec.destination = workload
            rec.response_flags, rec.error, rec.transport = "TLS_FAILURE", str(err), "h3"
            ctx.tracker.failed(rec)

        self.endpoint = H3Endpoint(
            certificate,
            self.settings,
            on_request=self._on_h3_request,
            on_refused=refused,
            peers=self.peers,  # handshakes, connections and tunnels: one table per listener
        )
        self.endpoint.on_reset = ctx.metrics.stateless_resets.inc
        self.endpoint.start(self.sock, reading=reading)

    def _on_h3_request(self, stream: H3Stream, peer: Address) -> None:
        proto = stream._h3
        slots = self._slots.get(proto)
        if slots is None:
            slots = self._slots[proto] = ConnectSlots(PENDING_CONNECTS_PER_CONNECTION)
        named = None if proto.server_name is None else address_from_server_name(proto.server_name)
        self._on_request(stream, named or self.local_ip, peer[0], slots)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()

    def reopen(self) -> None:
        """Accept new QUIC connections again (a take-back after `close`)."""
        if self.endpoint is not None:
            self.endpoint.closing = False

    def abort(self) -> None:
        if self.endpoint is not None:
            self.endpoint.abort_all()
        else:
            self.sock.close()

    @property
    def live_connections(self) -> int:
        return 0 if self.endpoint is None else len(self.endpoint.connections)
