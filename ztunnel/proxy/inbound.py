"""Inbound: HBONE (15008) and plaintext (15006) connections arriving for local workloads.

Owns: accepting a TCP connection, choosing the DESTINATION workload's certificate from the
connection's destination address (the HBONE client sends no SNI), the TLS handshake and peer
verification (in `meshcore.hbone.aio`), and per CONNECT: `ztunnel.protocol.plan.plan_inbound`
(target checks + L4 authorization, pure), the upstream connect, then the response: 200 only
after both succeeded, else 400/401/503 (docs/reference/ambient-facts.md). No upstream connect
happens for a denied request.

Bounded work (issue 9): the serve task of a CONNECT is the stream's task, cancelled when the
client resets the stream (no socket is created for a stream already gone); upstream connects in
flight are capped per HBONE connection and per node proxy (`ProxyContext.upstream_slots`), the
excess waits; accepting pauses while file descriptors run short (`ztunnel.proxy.accept`). Every
stream the HTTP/2 layer refuses and every connection it closes for a protocol error leaves a log
line and a counter.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from mypy_extensions import mypyc_attr

from meshcore.address import parse_authority
from meshcore.errors import HboneError, PeerOverLimit, Unauthorized, UpstreamUnavailable
from meshcore.hbone.aio import (
    HboneHooks,
    HboneProtocol,
    HboneSettings,
    HboneStream,
    accept_tls,
)
from meshcore.hbone.events import ConnectionTerminated, RequestRefused
from meshcore.hbone.frames import ErrorCode
from meshcore.hbone.peers import PeerTable
from meshcore.hbone.streams import Role
from meshcore.model import Service
from meshcore.sockets import connect_tcp
from meshcore.telemetry import guess_inbound_service
from meshcore.tracing import parse_traceparent
from ztunnel.metrics import ConnectionRecord
from ztunnel.protocol.plan import InboundConnect, InboundPlan, plan_inbound
from ztunnel.proxy.accept import AcceptLoop
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.relay import TcpSide, splice

log = logging.getLogger("ztunnel.inbound")

PENDING_CONNECTS_PER_CONNECTION = 64
"""Upstream connects in flight for one HBONE connection; more CONNECTs wait their turn."""


def _refusal_reason(ev: RequestRefused) -> str:
    """A bounded label for `ztunnel_hbone_streams_refused{reason}`."""
    if ev.status == 431:
        return "header_list_too_large"
    if ev.status == 400:
        return "not_connect"
    if ev.error_code == ErrorCode.REFUSED_STREAM:
        return "max_concurrent_streams"
    return "malformed"


class _Upstream(TcpSide):
    """The connection from the node proxy to the destination workload (server side)."""

    def __init__(self, ctx: ProxyContext, record: ConnectionRecord) -> None:
        super().__init__(on_done=self._record_close)
        self.ctx = ctx
        self.record = record
        self.on_closed: Callable[[], None] | None = None  # once, when the tunnel is over

    def _record_close(self, _side: TcpSide, error: str | None) -> None:
        rec = self.record
        # From the client's point of view: what we read upstream is what the client received.
        rec.bytes_sent, rec.bytes_recv = self.received, self.sent
        rec.error = rec.error or error
        self.ctx.tracker.closed(rec)
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed()


async def connect_upstream(
    ctx: ProxyContext, plan: InboundPlan, rec: ConnectionRecord, src_ip: str
) -> _Upstream:
    """Connect to the destination workload from the original client IP when possible.
    Raises UpstreamUnavailable (503) on failure."""
    loop = asyncio.get_running_loop()
    host, port = plan.target_addr
    source_ip, transparent = ctx.source_binding(src_ip)
    try:
        sock = await connect_tcp(
            host,
            port,
            source_ip=source_ip,
            transparent=transparent,
            timeout=ctx.settings.connect_timeout,
        )
        _, upstream = await loop.create_connection(lambda: _Upstream(ctx, rec), sock=sock)
    except (TimeoutError, OSError) as err:
        raise UpstreamUnavailable(f"upstream {host}:{port}: {err or 'timeout'}") from err
    return upstream


def forwarded_service_key(headers: list[tuple[str, str]]) -> str | None:
    """ "ns/hostname" of the service the client addressed, as the source proxy names it in
    `forwarded: for=...;host=<hostname>` (docs/reference/ambient-facts.md); Kubernetes hostnames are
    <name>.<namespace>.svc..."""
    forwarded = next((v for k, v in headers if k == "forwarded"), "")
    host = next(
        (p.strip()[5:].strip('"') for p in forwarded.split(";") if p.strip().startswith("host=")),
        "",
    )
    parts = host.split(".")
    return f"{parts[1]}/{host}" if len(parts) >= 2 else None


def forwarded_for_ip(headers: list[tuple[str, str]]) -> str | None:
    """The client IP of `forwarded: for="ip:port"` / `for="[v6]:port"` (RFC 7239 §6), or None."""
    forwarded = next((v for k, v in headers if k == "forwarded"), "")
    node = next(
        (p.strip()[4:].strip('"') for p in forwarded.split(";") if p.strip().startswith("for=")),
        "",
    )
    if node.startswith("["):
        return node[1 : node.find("]")] or None
    return node.rsplit(":", 1)[0] if ":" in node else node or None


def tunnel_source_ip(ctx: ProxyContext, stream: HboneStream, peer_ip: str) -> str:
    """The source workload's IP for a CONNECT from `peer_ip`. Over TCP the connection keeps the
    original source address (transparent capture), so it is the peer's. An HTTP/3 connection
    between node proxies comes from the source NODE's address (UDP replies to a pod address
    would not reach the proxy, see `ztunnel.proxy.inbound_h3`): the source proxy names the client
    in `forwarded: for=`, trusted only for a workload whose identity is the one the peer proved
    (a peer can only speak for its own identity's addresses). Raises Unauthorized otherwise."""
    if stream.transport != "h3":
        return peer_ip
    claimed = forwarded_for_ip(stream.headers)
    if claimed is None or claimed == peer_ip:
        return peer_ip
    try:
        source = ctx.state.workload_by_address(claimed, ctx.settings.network)
    except ValueError:
        source = None  # not an address: refused like any claim we cannot trust
    if source is None or source.identity != stream.peer_identity:
        raise Unauthorized(
            f"HTTP/3 peer {peer_ip} ({stream.peer_identity}) claims source {claimed}, "
            "not a workload of that identity"
        )
    return claimed


def addressed_service(ctx: ProxyContext, key: str | None, plan: InboundPlan) -> Service | None:
    """The addressed service for telemetry (`key`: as `forwarded_service_key` read it), trusted
    only if the destination workload really is an endpoint of it, so a peer cannot relabel
    metrics arbitrarily."""
    service = ctx.state.service(key) if key else None
    if service is None or plan.destination_workload.service_ports(service.key) is None:
        return None
    return service


def _set_service(rec: ConnectionRecord, service: Service | None) -> None:
    if service is not None:
        rec.destination_service = service.hostname
        rec.destination_service_name = service.name
        rec.destination_service_namespace = service.namespace


@mypyc_attr(allow_interpreted_subclasses=True)  # ztunnel.proxy.inbound_h3.H3Listener
class HboneListener:
    """Accept loop of one HBONE listening socket. Accepting by hand (not `create_server`) lets
    us pick the server certificate from the accepted socket's destination address before TLS."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket) -> None:
        self.ctx = ctx
        self.sock = sock
        self._accept = AcceptLoop("HBONE", sock, self._accepted, ctx.metrics)
        self.peers = PeerTable(tunnels=ctx.settings.tunnels_per_peer)
        self.settings = HboneSettings(
            trust_domain=ctx.settings.trust_domain,
            max_concurrent_streams=ctx.settings.hbone_max_streams,
        )
        """Shared by every connection this listener accepts."""
        self._handshakes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._accept.start()

    def close(self) -> None:
        self._accept.close()

    def _accepted(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.get_running_loop().create_task(self._handshake(conn))
        self._handshakes.add(task)  # keep a reference until done (asyncio holds weak refs)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        ctx = self.ctx
        local_ip = conn.getsockname()[0]
        peer_ip = conn.getpeername()[0]
        refused = self.peers.admit(peer_ip)
        if refused is not None:
            conn.close()
            self._refuse_connection(peer_ip, local_ip, refused)
            return
        released = False

        def release(proto: HboneProtocol | None = None) -> None:
            nonlocal released
            if proto is not None:
                self._closed(proto)
            if not released:
                released = True
                self.peers.closed(peer_ip)

        try:
            proto = await self._authenticate(conn, local_ip, peer_ip, release)
        finally:
            self.peers.handshake_done(peer_ip)
        if proto is None:
            release()
        elif proto.transport is not None and not proto.closed:
            ctx.connections.add(proto.transport)
            ctx.hbone_servers.add(proto)
            if ctx.draining:
                proto.close()  # accepted just before drain began: GOAWAY at once

    def _refuse_connection(self, peer_ip: str, local_ip: str, why: str) -> None:
        """A connection over the per-peer bounds: closed before TLS, logged and counted."""
        rec = ConnectionRecord(
            direction="inbound", reporter="destination", src_addr=peer_ip, dst_addr=local_ip
        )
        rec.response_flags, rec.error = "PEER_LIMIT", f"peer over its limit: {why}"
        self.ctx.tracker.failed(rec)

    async def _authenticate(
        self,
        conn: socket.socket,
        local_ip: str,
        peer_ip: str,
        on_close: Callable[[HboneProtocol], None],
    ) -> HboneProtocol | None:
        """TLS handshake + peer verification; the connection, or None (socket closed)."""
        ctx = self.ctx
        workload = ctx.state.workload_by_address(local_ip, ctx.settings.network)
        if workload is None or workload.node != ctx.settings.node:
            # We only ever present identities of workloads on our own node.
            log.warning("HBONE to %s: no local workload at that address", local_ip)
            conn.close()
            return None
        try:
            tls_ctx = await ctx.server_context(workload.identity)
        except Exception as err:
            log.warning("HBONE to %s: no certificate for %s: %s", local_ip, workload.identity, err)
            conn.close()
            return None
        slots = asyncio.Semaphore(PENDING_CONNECTS_PER_CONNECTION)
        hooks = HboneHooks(
            on_request=lambda stream: self._on_request(stream, local_ip, peer_ip, slots),
            on_close=on_close,
            on_refused=lambda p, ev: self._on_refused(p, ev, local_ip, peer_ip),
            on_error=lambda p, ev: self._on_error(ev, peer_ip),
        )
        proto = HboneProtocol(
            Role.SERVER, self.settings, hooks, peer_resets=self.peers.resets(peer_ip)
        )
        try:
            await accept_tls(conn, tls_ctx, proto)
        except Exception as err:
            rec = ConnectionRecord(
                direction="inbound", reporter="destination", src_addr=peer_ip, dst_addr=local_ip
            )
            rec.destination = workload
            rec.response_flags, rec.error = "TLS_FAILURE", str(err)
            ctx.tracker.failed(rec)
            return None
        return proto

    def _closed(self, proto: HboneProtocol) -> None:
        if proto.transport is not None:
            self.ctx.connections.discard(proto.transport)
        self.ctx.hbone_servers.discard(proto)

    def _on_request(
        self, stream: HboneStream, conn_dst_ip: str, peer_ip: str, slots: asyncio.Semaphore
    ) -> None:
        # The stream owns the task: a RST_STREAM in the same read cancels it before it runs.
        stream.task = asyncio.get_running_loop().create_task(
            self._serve(stream, conn_dst_ip, peer_ip, slots)
        )

    def _on_refused(
        self, proto: HboneProtocol, ev: RequestRefused, conn_dst_ip: str, peer_ip: str
    ) -> None:
        """A stream the HTTP/2 layer answered itself: access-log line and counters."""
        ctx = self.ctx
        reason = _refusal_reason(ev)
        ctx.metrics.hbone_refused.labels(reason).inc()
        authority = next((v for k, v in ev.headers if k == ":authority"), "")
        rec = ConnectionRecord(
            direction="inbound",
            reporter="destination",
            src_addr=peer_ip,
            dst_addr=authority or conn_dst_ip,
        )
        rec.source_principal = str(proto.peer_identity) if proto.peer_identity else None
        rec.mtls = True
        rec.hbone_addr = authority or None
        rec.response_flags = "CONNECT"
        rec.error = f"stream {ev.stream_id} refused: {ev.reason}" + (
            f" ({ev.status})" if ev.status else ""
        )
        ctx.tracker.failed(rec)

    def _on_error(self, ev: ConnectionTerminated, peer_ip: str) -> None:
        try:
            code = ErrorCode(ev.error_code).name
        except ValueError:
            code = str(ev.error_code)
        self.ctx.metrics.hbone_connection_errors.labels(code).inc()
        log.warning(
            "HBONE connection from %s closed with GOAWAY(%s): %s",
            peer_ip,
            code,
            ev.debug.decode("utf-8", "replace"),
        )

    async def _serve(
        self, stream: HboneStream, conn_dst_ip: str, peer_ip: str, slots: asyncio.Semaphore
    ) -> None:
        ctx = self.ctx
        rec = ConnectionRecord(
            direction="inbound", reporter="destination", src_addr=peer_ip, dst_addr=stream.authority
        )
        rec.source_principal = str(stream.peer_identity) if stream.peer_identity else None
        rec.mtls = True
        rec.hbone_addr = stream.authority
        rec.transport = stream.transport
        try:
            src_ip = tunnel_source_ip(ctx, stream, peer_ip)
        except Unauthorized as err:
            rec.response_flags, rec.error = err.response_flag, str(err)
            stream.respond(err.status)
            ctx.tracker.failed(rec)
            return
        rec.src_addr = src_ip
        rec.source = ctx.state.workload_by_address(src_ip, ctx.settings.network)
        if ctx.tracker.tracer is not None:  # else no span is recorded: nothing reads these
            caller = parse_traceparent(
                next((v for k, v in stream.headers if k == "traceparent"), None)
            )
            if caller is not None:  # this connection's span continues the caller's trace
                rec.trace_id, rec.parent_span_id = caller.trace_id, caller.parent_id
                rec.span_id = f"{ctx.rng.getrandbits(64) or 1:016x}"
                rec.sampled = ctx.tracker.sampler.sampled(caller.trace_id, caller)
        try:
            dst_ip, dst_port = parse_authority(stream.authority)
            service_key = forwarded_service_key(stream.headers)
            connect = InboundConnect(
                dst_ip=dst_ip,
                dst_port=dst_port,
                src_identity=stream.peer_identity,
                src_ip=src_ip,
                conn_dst_ip=conn_dst_ip,
                addressed_service=service_key,
            )
            plan = plan_inbound(
                ctx.state, connect, network=ctx.settings.network, node=ctx.settings.node
            )
            rec.destination = plan.destination_workload
            rec.destination_principal = str(plan.destination_workload.identity)
            service = (
                plan.service
                or addressed_service(ctx, service_key, plan)
                or guess_inbound_service(plan.destination_workload, dst_port, ctx.state.service)
            )
            _set_service(rec, service)
            if not self.peers.open_tunnel(peer_ip):
                raise PeerOverLimit(f"peer {peer_ip} has {self.peers.max_tunnels} tunnels open")
            try:
                async with slots, ctx.upstream_slots:
                    upstream = await connect_upstream(ctx, plan, rec, src_ip)
            except BaseException:
                self.peers.close_tunnel(peer_ip)
                raise
            upstream.on_closed = lambda: self.peers.close_tunnel(peer_ip)
        except HboneError as err:
            rec.response_flags = err.response_flag
            rec.error = str(err)
            stream.respond(err.status)
            ctx.tracker.failed(rec)
            return
        if stream.closed:  # the client gave up while we were connecting
            upstream.abort()
            return
        stream.respond(200)
        ctx.tracker.opened(rec, lambda: (upstream.sent, upstream.received))
        upstream.attach(stream)


class PlaintextInbound(TcpSide):
    """15006: a non-mesh client's connection captured on its way to a local workload."""

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(on_done=self._record_close)
        self.ctx = ctx
        self.record: ConnectionRecord | None = None

    def _record_close(self, _side: TcpSide, error: str | None) -> None:
        if self.record is not None:
            self.record.bytes_recv, self.record.bytes_sent = self.received, self.sent
            self.record.error = self.record.error or error
            self.ctx.tracker.closed(self.record)

    async def start(self) -> None:
        assert self.transport is not None
        ctx = self.ctx
        src_ip, src_port = self.transport.get_extra_info("peername")[:2]
        dst_ip, dst_port = self.transport.get_extra_info("sockname")[:2]
        rec = ConnectionRecord(
            direction="inbound",
            reporter="destination",
            src_addr=f"{src_ip}:{src_port}",
            dst_addr=f"{dst_ip}:{dst_port}",
        )
        try:
            connect = InboundConnect(
                dst_ip=dst_ip,
                dst_port=dst_port,
                src_identity=None,
                src_ip=src_ip,
                conn_dst_ip=dst_ip,
            )
            plan = plan_inbound(
                ctx.state, connect, network=ctx.settings.network, node=ctx.settings.node
            )
            rec.destination = plan.destination_workload
            _set_service(rec, guess_inbound_service(rec.destination, dst_port, ctx.state.service))
            upstream = await connect_upstream(ctx, plan, rec, src_ip)
        except HboneError as err:
            rec.response_flags = err.response_flag
            rec.error = str(err)
            ctx.tracker.failed(rec)
            self.abort()
            return
        upstream._on_done = None  # this side records the connection
        self.record = rec
        ctx.tracker.opened(rec, lambda: (self.received, self.sent))
        splice(self, upstream)
