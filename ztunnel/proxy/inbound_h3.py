"""Inbound HBONE over HTTP/3: the UDP listener (15008/udp) beside the TCP one (15008/tcp).

Owns: one `H3Endpoint` per listening UDP socket, the server certificate choice (the socket's
address names the local destination workload, as for TCP: HBONE clients send no SNI) and the
TLS_FAILURE record of refused peers. Every CONNECT is served exactly as over HTTP/2, by
`HboneListener._serve` (plan, authorization, upstream connect, then 200/400/401/503), so both
transports share one implementation of the inbound semantics.

UDP port: 15008, the HBONE port, on UDP (a different protocol number: no clash with 15008/tcp).
Bind capture only: the listener binds each local workload's address. Under transparent capture,
node-to-node UDP is not redirected by eBPF (it captures TCP only), so there is no HTTP/3
listener and peers fall back to HTTP/2 (see `meshcore.hbone.pool`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref

from meshcore.certs import WorkloadCertificate
from meshcore.errors import PeerVerificationError
from meshcore.hbone.h3aio import Address, H3Endpoint, H3Protocol, H3Stream
from ztunnel.metrics import ConnectionRecord
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.inbound import PENDING_CONNECTS_PER_CONNECTION, HboneListener

log = logging.getLogger("ztunnel.inbound")


class H3Listener(HboneListener):
    """HBONE over HTTP/3 on one bound UDP socket."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket) -> None:
        super().__init__(ctx, sock)
        self.local_ip = sock.getsockname()[0]
        self.endpoint: H3Endpoint | None = None
        # Upstream connects in flight per QUIC connection, as per TLS connection over TCP.
        self._slots: weakref.WeakKeyDictionary[H3Protocol, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def start(self) -> None:
        ctx = self.ctx
        workload = ctx.state.workload_by_address(self.local_ip, ctx.settings.network)

        async def certificate() -> WorkloadCertificate:
            if workload is None or workload.node != ctx.settings.node:
                raise PeerVerificationError(f"no local workload at {self.local_ip}")
            return await ctx.certs.get(workload.identity)

        def refused(addr: Address, err: PeerVerificationError) -> None:
            ctx.tracker.failed(
                ConnectionRecord(
                    direction="inbound",
                    reporter="destination",
                    src_addr=addr[0],
                    dst_addr=self.local_ip,
                    destination=workload,
                    response_flags="TLS_FAILURE",
                    error=str(err),
                    transport="h3",
                )
            )

        self.endpoint = H3Endpoint(
            certificate,
            trust_domain=ctx.settings.trust_domain,
            on_request=self._on_h3_request,
            on_refused=refused,
        )
        self.endpoint.start(self.sock)

    def _on_h3_request(self, stream: H3Stream, peer: Address) -> None:
        proto = stream._h3
        slots = self._slots.get(proto)
        if slots is None:
            slots = self._slots[proto] = asyncio.Semaphore(PENDING_CONNECTS_PER_CONNECTION)
        self._on_request(stream, self.local_ip, peer[0], slots)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()

    def abort(self) -> None:
        if self.endpoint is not None:
            self.endpoint.abort_all()
        else:
            self.sock.close()

    @property
    def live_connections(self) -> int:
        return 0 if self.endpoint is None else len(self.endpoint.connections)
