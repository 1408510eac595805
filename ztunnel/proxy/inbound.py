"""Inbound: HBONE (15008) and plaintext (15006) connections arriving for local workloads.

Owns: accepting a TCP connection, choosing the DESTINATION workload's certificate from the
connection's destination address (the HBONE client sends no SNI), the TLS handshake and peer
verification (in `meshcore.hbone.aio`), and per CONNECT: `ztunnel.protocol.plan.plan_inbound`
(target checks + L4 authorization, pure), the upstream connect, then the response: 200 only
after both succeeded, else 400/401/503 (docs/reference/ambient-facts.md). No upstream connect
happens for a denied request.

Bounded work (issue 9): a CONNECT's work (`InboundTunnel`, callbacks: no task per stream, issue
14) is the stream's, cancelled when the client resets the stream or the connection is lost (no
socket is created for a stream already gone); upstream connects in flight are capped per HBONE
connection and per node proxy (`ConnectSlots`: `ProxyContext.upstream_slots`), the excess
waits; accepting pauses while file descriptors run short (`ztunnel.proxy.accept`). Every stream
the HTTP/2 layer refuses and every connection it closes for a protocol error leaves a log line
and a counter.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Final

from mypy_extensions import mypyc_attr

from meshcore.address import parse_authority
from meshcore.aiostep import step_coroutine
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
from meshcore.sockets import PendingConnect, connect_tcp, retry_bind, start_connect
from meshcore.telemetry import guess_inbound_service
from meshcore.tracing import parse_traceparent
from ztunnel.metrics import ConnectionRecord
from ztunnel.protocol.plan import plan_inbound
from ztunnel.protocol.plantypes import InboundConnect, InboundPlan
from ztunnel.proxy.accept import AcceptLoop
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.relay import TcpSide, splice
from ztunnel.proxy.slots import ConnectSlots

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
        raise UpstreamUnavailable(f"upstream {host}:{port}: {str(err) or 'timeout'}") from err
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


# `InboundTunnel`'s states (Final: compiled to constants).
_PENDING: Final[int] = 0
"""Its first step scheduled."""
_SLOTS: Final[int] = 1
"""Waiting for a connect slot."""
_CONNECTING: Final[int] = 2
"""connect(2) in flight."""
_WRAPPING: Final[int] = 3
"""The transport being made."""
_OVER: Final[int] = 4
"""Answered or cancelled."""


class InboundTunnel:
    """One CONNECT on an HBONE connection, from the request to its answer, driven by callbacks:
    no task and no coroutine chain per stream (issue 14, bench/README.md "Session 8"). Steps:
    `_begin` (scheduled with `call_soon` when the request arrives, so a RST_STREAM in the same
    read cancels it before it opens anything: CVE-2023-44487), the plan and L4 authorization,
    the peer's tunnel bound, a connect slot of the connection then of the process (the excess
    waits, `ConnectSlots`), the non-blocking connect (`start_connect`; in progress: a writer
    callback and the loop's shared connect deadline, `PendingConnect`), the transport (`_wrap`),
    then 200 and the splice. Any `HboneError` answers with its status, an access-log line and a
    counter; a connect failure is 503 (`UpstreamUnavailable`).

    Invariants: `cancel` (the stream was reset, its connection lost, or it was answered) leaves
    nothing behind at any step: the scheduled step, a waiting or held slot, the connecting
    socket with its writer and deadline, the peer's tunnel count; a transport made after it is
    aborted. Slots are held from the grant to the transport made or the failure. Exactly one of
    answered (200 or a refusal) or cancelled (no access-log line, as a cancelled task had none).
    """

    __slots__ = (
        "_attempt",
        "_deadline",
        "_handle",
        "_held",
        "_loop",
        "_pending",
        "_plan",
        "_sock",
        "_source_ip",
        "_state",
        "_transparent",
        "_tunnel_open",
        "conn_dst_ip",
        "ctx",
        "peer_ip",
        "peers",
        "rec",
        "slots",
        "src_ip",
        "stream",
    )

    def __init__(
        self,
        listener: HboneListener,
        stream: HboneStream,
        conn_dst_ip: str,
        peer_ip: str,
        slots: ConnectSlots,
    ) -> None:
        self.ctx = listener.ctx
        self.peers = listener.peers
        self.stream = stream
        self.conn_dst_ip = conn_dst_ip
        self.peer_ip = peer_ip
        self.slots = slots
        self.src_ip = peer_ip
        self.rec: ConnectionRecord | None = None
        self._plan: InboundPlan | None = None
        self._state = _PENDING
        self._held = 0  # connect slots held: 1 = the connection's, 2 = also the process's
        self._tunnel_open = False  # counted in the peer's tunnels (`PeerTable.open_tunnel`)
        self._sock: socket.socket | None = None
        self._pending: PendingConnect | None = None
        self._attempt = 0
        self._deadline = 0.0
        self._source_ip: str | None = None
        self._transparent = False
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.Handle | None = self._loop.call_soon(self._step, self._begin)

    # ---- entry points from the loop: each guarded -------------------------------------------

    def _step(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as err:
            self._internal_error(err)

    def _on_connected(self, err: BaseException | None) -> None:
        try:
            self._connected(err)
        except Exception as exc:
            self._internal_error(exc)

    def _on_made(
        self, made: tuple[asyncio.BaseTransport, _Upstream] | None, err: BaseException | None
    ) -> None:
        try:
            self._made(made, err)
        except Exception as exc:
            self._internal_error(exc)

    def _internal_error(self, err: Exception) -> None:
        """A step raised what no step expects (a bug, not the peer): one log line, then the
        CONNECT is answered 503 and counted like any refusal and everything it held released,
        instead of asyncio's "Exception in callback" traceback and a stream left holding its
        slots (the task-based code unwound them)."""
        log.error(
            "inbound CONNECT %s from %s: internal error: %r",
            self.stream.authority,
            self.peer_ip,
            err,
        )
        log.debug("internal error in an inbound CONNECT", exc_info=err)
        if self._state == _OVER:  # answered already (or gone): nothing left to answer
            self._end()
        elif self.rec is None:
            self._end()
            self.stream.respond(503)
        else:
            self._refuse(UpstreamUnavailable(f"internal error: {err!r}"))

    # ---- steps -------------------------------------------------------------------------------

    def _begin(self) -> None:
        self._handle = None
        ctx, stream = self.ctx, self.stream
        rec = self.rec = ConnectionRecord(
            direction="inbound",
            reporter="destination",
            src_addr=self.peer_ip,
            dst_addr=stream.authority,
        )
        rec.source_principal = str(stream.peer_identity) if stream.peer_identity else None
        rec.mtls = True
        rec.hbone_addr = stream.authority
        rec.transport = stream.transport
        try:
            src_ip = self.src_ip = tunnel_source_ip(ctx, stream, self.peer_ip)
            rec.src_addr = src_ip
            rec.source = ctx.state.workload_by_address(src_ip, ctx.settings.network)
            if ctx.tracker.tracer is not None:  # else no span is recorded: nothing reads these
                self._trace(rec)
            dst_ip, dst_port = parse_authority(stream.authority)
            service_key = forwarded_service_key(stream.headers)
            connect = InboundConnect(
                dst_ip=dst_ip,
                dst_port=dst_port,
                src_identity=stream.peer_identity,
                src_ip=src_ip,
                conn_dst_ip=self.conn_dst_ip,
                addressed_service=service_key,
            )
            plan = self._plan = plan_inbound(
                ctx.state,
                connect,
                network=ctx.settings.network,
                node=ctx.settings.node,
                cache=ctx.inbound_plans,
            )
            rec.destination = plan.destination_workload
            rec.destination_principal = str(plan.destination_workload.identity)
            service = (
                plan.service
                or addressed_service(ctx, service_key, plan)
                or guess_inbound_service(plan.destination_workload, dst_port, ctx.state.service)
            )
            _set_service(rec, service)
            if not self.peers.open_tunnel(self.peer_ip):
                raise PeerOverLimit(
                    f"peer {self.peer_ip} has {self.peers.max_tunnels} tunnels open"
                )
        except HboneError as err:
            self._refuse(err)
            return
        self._tunnel_open = True
        self._source_ip, self._transparent = ctx.source_binding(src_ip)
        self._state = _SLOTS
        self._acquire()

    def _trace(self, rec: ConnectionRecord) -> None:
        ctx = self.ctx
        caller = parse_traceparent(
            next((v for k, v in self.stream.headers if k == "traceparent"), None)
        )
        if caller is not None:  # this connection's span continues the caller's trace
            rec.trace_id, rec.parent_span_id = caller.trace_id, caller.parent_id
            rec.span_id = f"{ctx.rng.getrandbits(64) or 1:016x}"
            rec.sampled = ctx.tracker.sampler.sampled(caller.trace_id, caller)

    def _acquire(self) -> None:
        """The connection's connect slot, then the process's (`async with slots, upstream_slots`
        before): waiting for either leaves this tunnel in that one's queue."""
        self._handle = None
        if self._held == 0:
            if not self.slots.acquire(self):
                return
            self._held = 1
        if self._held == 1:
            if not self.ctx.upstream_slots.acquire(self):
                return
            self._held = 2
        self._state = _CONNECTING
        self._deadline = self._loop.time() + self.ctx.settings.connect_timeout
        self._connect()

    def slot_granted(self) -> None:
        """`ConnectSlots.release` handed us the slot we waited for; go on in a loop callback of
        our own (not inside the releasing tunnel's)."""
        self._held += 1
        self._handle = self._loop.call_soon(self._step, self._acquire)

    def _connect(self) -> None:
        assert self._plan is not None
        self._attempt += 1
        try:
            sock, done = start_connect(self._plan.target_addr, self._source_ip, self._transparent)
        except OSError as err:
            self._connect_failed(err)
            return
        if done:
            self._wrap(sock)
        else:
            self._sock = sock
            self._pending = PendingConnect(self._loop, sock, self._deadline, self._on_connected)

    def _connected(self, err: BaseException | None) -> None:
        sock, self._sock, self._pending = self._sock, None, None
        assert sock is not None
        if err is None:
            self._wrap(sock)
            return
        sock.close()
        self._connect_failed(err)

    def _connect_failed(self, err: BaseException) -> None:
        if isinstance(err, OSError) and retry_bind(err, self._source_ip, self._attempt):
            self._connect()  # a fresh socket and source port (`BIND_ATTEMPTS` in all)
            return
        self._upstream_unavailable(err)

    def _wrap(self, sock: socket.socket) -> None:
        """The connected socket becomes the upstream's transport: the loop's
        `create_connection(sock=...)`, run without a task (`step_coroutine`)."""
        assert self.rec is not None
        self._state = _WRAPPING
        upstream = _Upstream(self.ctx, self.rec)
        step_coroutine(self._loop.create_connection(lambda: upstream, sock=sock), self._on_made)

    def _made(
        self, made: tuple[asyncio.BaseTransport, _Upstream] | None, err: BaseException | None
    ) -> None:
        if made is None:  # no transport (the loop closed the socket)
            self._upstream_unavailable(err or ConnectionError("no transport"))
        else:
            self._opened(made[1])

    def _opened(self, upstream: _Upstream) -> None:
        if self._state == _OVER:  # cancelled while the transport was being made
            upstream._on_done = None  # never opened: no access-log line, no gauge
            upstream.abort()
            return
        self._release_slots()
        self._state = _OVER
        self._tunnel_open = False  # the upstream owns the peer's tunnel count from here
        peers, peer_ip = self.peers, self.peer_ip
        upstream.on_closed = lambda: peers.close_tunnel(peer_ip)
        stream, rec = self.stream, self.rec
        assert rec is not None
        stream.work = None  # over: no stream <-> tunnel cycle left
        stream.respond(200)
        self.ctx.tracker.opened(rec, lambda: (upstream.sent, upstream.received))
        upstream.attach(stream)

    # ---- endings -----------------------------------------------------------------------------

    def _upstream_unavailable(self, err: BaseException) -> None:
        if self._state == _OVER:  # cancelled meanwhile: the stream is gone, nothing to answer
            return
        assert self._plan is not None
        host, port = self._plan.target_addr
        self._refuse(UpstreamUnavailable(f"upstream {host}:{port}: {str(err) or 'timeout'}"))

    def _refuse(self, err: HboneError) -> None:
        """Answer the CONNECT with `err`'s status, log and count it."""
        self._end()
        rec = self.rec
        assert rec is not None
        rec.response_flags = err.response_flag
        rec.error = str(err)
        self.stream.respond(err.status)  # -> forget -> cancel(): a no-op now
        self.ctx.tracker.failed(rec)

    def cancel(self) -> None:
        """The stream went away (reset, connection lost): stop, leaving nothing behind."""
        if self._state != _OVER:
            self._end()

    def _end(self) -> None:
        self._state = _OVER
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.slots.cancel(self)
        self.ctx.upstream_slots.cancel(self)
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._release_slots()
        if self._tunnel_open:
            self._tunnel_open = False
            self.peers.close_tunnel(self.peer_ip)
        self.stream.work = None

    def _release_slots(self) -> None:
        held, self._held = self._held, 0
        if held == 2:
            self.ctx.upstream_slots.release()
        if held >= 1:
            self.slots.release()


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
        slots = ConnectSlots(PENDING_CONNECTS_PER_CONNECTION)
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
        self, stream: HboneStream, conn_dst_ip: str, peer_ip: str, slots: ConnectSlots
    ) -> None:
        # The stream owns its work: a RST_STREAM in the same read cancels it before it runs.
        stream.work = InboundTunnel(self, stream, conn_dst_ip, peer_ip, slots)

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
