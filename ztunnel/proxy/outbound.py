"""Outbound: a local workload's captured TCP connection -> HBONE (or passthrough).

Owns: the 15001 listener's per-connection flow. The original destination is the accepted socket's
local address (`getsockname()`): with transparent capture the kernel keeps it, and on loopback the
listener is bound to the destination itself. The decision is
`ztunnel.protocol.plan.plan_outbound` (pure); this module only carries it out: HBONE with the
SOURCE workload's certificate through the pool, or a plain TCP splice.

Per new connection (issue 14): HBONE on a pooled HTTP/2 connection with room runs without a
task (`OutboundConnection.begin`: the CONNECT leaves at once, the response future's callback
opens the tunnel); only what must wait (an on-demand lookup, a dial, a retried stream, the
same-node path, a passthrough connect) runs in a task. Every path ends the same way: the
connection's record opened, or failed (recorded, logged at debug, the client's socket aborted).
It is counted opened right before its tunnel or upstream is attached, and only if the client is
still there: a client gone first (its reset, the drain's abort) has its CONNECT reset at once,
whether sent without a task or by the pool in one (`_pending`; a dial still in flight: as soon
as its CONNECT is sent), or its upstream closed, and is recorded failed; one gone during the
on-demand lookup gets no dial nor CONNECT at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Coroutine
from typing import Any, Final

from meshcore.address import parse_authority
from meshcore.errors import HboneError, PeerVerificationError, StreamRefused, response_flag
from meshcore.hbone.aio import HboneStream
from meshcore.hbone.frames import ErrorCode
from meshcore.hbone.pool import DIAL_ATTEMPTS, PoolKey
from meshcore.identity import SpiffeId
from meshcore.model import Workload
from meshcore.sockets import connect_tcp
from ztunnel.metrics import ConnectionRecord
from ztunnel.protocol.plan import plan_inbound, plan_outbound
from ztunnel.protocol.plantypes import InboundConnect, OutboundPlan, PlanKind
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.inbound import connect_upstream
from ztunnel.proxy.relay import TcpSide, splice

log = logging.getLogger("ztunnel.outbound")


_WORKLOAD_KINDS: Final = {"DEPLOYMENT": "deployment", "JOB": "job", "CRONJOB": "cronjob"}
MAX_SOURCE_CACHE: Final = 4096
_source_cache: dict[int, tuple[Workload, str, str]] = {}
"""id(source workload) -> (it, its baggage, its principal): the same few workloads open every
connection (issue 14). An entry holds its workload, so the id is not reused while it exists."""


def _source_texts(src: Workload) -> tuple[Workload, str, str]:
    """(`src`, W3C baggage with Istio's keys (docs/reference/ambient-facts.md HBONE headers),
    its SPIFFE ID's text), built once per workload record."""
    cached = _source_cache.get(id(src))
    if cached is not None and cached[0] is src:
        return cached
    kind = _WORKLOAD_KINDS.get(
        src.workload_type.name if hasattr(src.workload_type, "name") else "", "pod"
    )
    items = [
        f"k8s.cluster.name={src.cluster_id or 'Kubernetes'}",
        f"k8s.namespace.name={src.namespace}",
        f"k8s.{kind}.name={src.workload_name or src.name}",
        f"service.name={src.canonical_name or src.name}",
        f"service.version={src.canonical_revision or 'latest'}",
    ]
    if len(_source_cache) >= MAX_SOURCE_CACHE:
        _source_cache.clear()
    entry = _source_cache[id(src)] = (src, ",".join(items), str(src.identity))
    return entry


def _baggage(plan: OutboundPlan) -> str:
    src = plan.source
    return "" if src is None else _source_texts(src)[1]


MAX_POOL_KEYS: Final = 4096
_pool_keys: dict[tuple[object, ...], PoolKey] = {}
"""The pool's keys by their fields: one `PoolKey` object per destination and source, so building
one (a frozen dataclass: microseconds) and the equality check of the pool's lookup (a dict hit
on the same object compares identity) happen once, not per connection (issue 14)."""


def _pool_key(
    source: SpiffeId,
    expected: tuple[SpiffeId, ...],
    address: tuple[str, int],
    source_ip: str | None,
    transparent: bool,
) -> PoolKey:
    fields = (source, expected, address, source_ip, transparent)
    key = _pool_keys.get(fields)
    if key is None:
        if len(_pool_keys) >= MAX_POOL_KEYS:
            _pool_keys.clear()
        key = _pool_keys[fields] = PoolKey(
            source=source,
            expected=expected,
            address=address,
            source_ip=source_ip,
            transparent=transparent,
        )
    return key


_tasks: set[asyncio.Task[None]] = set()
"""Tasks `_spawn` started (asyncio holds tasks weakly); each leaves the set when done."""


def _spawn(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _traceparent(ctx: ProxyContext, rec: ConnectionRecord) -> str:
    """A new W3C trace context (version 00) for this connection, recorded in `rec`: sampled
    (flag 01) when this proxy exports spans and the sampler picks the trace, so the
    destination's span joins the trace (and skips it when not sampled)."""
    rng = ctx.rng
    rec.trace_id = f"{rng.getrandbits(128) or 1:032x}"
    rec.span_id = f"{rng.getrandbits(64) or 1:016x}"
    tracker = ctx.tracker
    rec.sampled = tracker.tracer is not None and tracker.sampler.sampled(rec.trace_id, None)
    return f"00-{rec.trace_id}-{rec.span_id}-{'01' if rec.sampled else '00'}"


_CLIENT_GONE: Final = "client connection closed before the tunnel opened"


class OutboundConnection(TcpSide):
    """A local client's connection. It is counted opened only if the client is still there when
    its tunnel (or upstream) is attached: a client gone before (its reset, the drain's abort)
    makes the stream reset, the upstream closed and the connection recorded failed, so nothing
    stays open on either node (no stream against the pooled connection's limit, no tunnel
    against node B's per-peer limit)."""

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(on_done=self._record_close)
        self.ctx = ctx
        self.record: ConnectionRecord | None = None
        self._pending: HboneStream | None = None
        """The CONNECT sent and not answered yet (`begin`'s until `_answered`; the pool's
        `_started` until `open_stream` returns)."""
        self._peer_reset: str | None = None
        """Why the stream or its HBONE connection was reset before the tunnel opened (the
        peer's RST_STREAM, e.g. right after its 200 in the same read; the connection lost; our
        reset for a peer error or our GOAWAY): the record's error, not `_CLIENT_GONE`."""

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._finished:
            self._reset_pending()
        super().connection_lost(exc)

    def _reset_pending(self) -> None:
        """The client is gone before the CONNECT's answer: RST_STREAM(CONNECT_ERROR) now, as
        for a reset after it (RFC 9113 §8.5), and whoever waits for the answer (`_answered`,
        or the pool's `open_stream` in a task) records the connection failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.reset(ErrorCode.CONNECT_ERROR)
            response = pending.response
            if response is not None and not response.done():
                response.set_exception(ConnectionResetError(_CLIENT_GONE))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.ctx.connections.add(self.transport)

    def tunnel_reset(self, code: int, remote: bool) -> None:
        if self.record is None and not self._finished:
            # Not only the peer's RST_STREAM: the connection lost and our GOAWAY say so too
            # (`remote` does not tell them apart), hence no "by peer".
            self._peer_reset = (
                f"HBONE stream or connection reset (code {code}) before the tunnel opened"
            )
        super().tunnel_reset(code, remote)

    def _record_close(self, _side: TcpSide, error: str | None) -> None:
        if self.transport is not None:
            self.ctx.connections.discard(self.transport)
        rec = self.record
        if rec is not None:
            rec.bytes_recv, rec.bytes_sent = self.received, self.sent
            rec.error = rec.error or error
            self.ctx.tracker.closed(rec)

    def begin(self) -> Coroutine[Any, Any, None] | None:
        """Plan and carry out the connection. HBONE on a pooled HTTP/2 connection with room,
        the common case, runs without a task: the CONNECT leaves now and `_answered` (the
        response future's callback) finishes it (issue 14). What must wait (an on-demand
        lookup, a dial, the same-node path, a passthrough connect) returns a coroutine for the
        listener's task."""
        if self.ctx.demand is not None:
            return self.start()  # the on-demand lookup is awaited
        planned = self._plan()
        if planned is None:
            return None
        plan, rec, src_ip, src_port = planned
        if plan.kind is PlanKind.HBONE and not self._is_local(plan):
            key, headers = self._hbone_request(plan, rec, src_ip, src_port)
            assert plan.authority is not None
            stream = self.ctx.pool.start_stream(key, plan.authority, headers, self)
            if stream is not None:
                assert stream.response is not None
                answered = functools.partial(self._answered, stream, rec, key, headers)
                stream.response.add_done_callback(answered)
                self._pending = stream
                return None
            return self._carry_out(self._hbone_pooled(key, plan.authority, headers, rec), rec)
        return self._carry_out(self._other(plan, rec, src_ip, src_port), rec)

    async def start(self) -> None:
        assert self.transport is not None
        ctx = self.ctx
        dst_ip = self.transport.get_extra_info("sockname")[0]
        if ctx.demand is not None and not await ctx.ensure_address(dst_ip):  # on-demand xDS
            log.warning("outbound to %s refused: on-demand lookup not answered", dst_ip)
            self.abort()
            return
        planned = self._plan()
        if planned is None:
            return
        plan, rec, src_ip, src_port = planned
        if self._finished:  # the client went during the lookup: no dial, no CONNECT for it
            self._failed(rec, ConnectionResetError(_CLIENT_GONE))
            return
        if plan.kind is PlanKind.HBONE and not self._is_local(plan):
            key, headers = self._hbone_request(plan, rec, src_ip, src_port)
            assert plan.authority is not None
            await self._carry_out(self._hbone_pooled(key, plan.authority, headers, rec), rec)
        else:
            await self._carry_out(self._other(plan, rec, src_ip, src_port), rec)

    def _plan(self) -> tuple[OutboundPlan, ConnectionRecord, str, int] | None:
        """The plan and the connection's record; None when refused (recorded, aborted)."""
        assert self.transport is not None
        ctx = self.ctx
        src_ip, src_port = self.transport.get_extra_info("peername")[:2]
        dst_ip, dst_port = self.transport.get_extra_info("sockname")[:2]
        plan = plan_outbound(
            ctx.state, ctx.plan_scope, src_ip=src_ip, dst_ip=dst_ip, dst_port=dst_port
        )
        rec = ConnectionRecord(
            direction="outbound",
            reporter="source",
            src_addr=f"{src_ip}:{src_port}",
            dst_addr=f"{dst_ip}:{dst_port}",
        )
        src = rec.source = plan.source
        rec.source_principal = None if src is None else _source_texts(src)[2]
        rec.destination = plan.destination_workload
        if plan.service is not None:
            rec.destination_service = plan.service.hostname
            rec.destination_service_name = plan.service.name
            rec.destination_service_namespace = plan.service.namespace
        rec.response_flags = plan.response_flags
        if plan.refused:
            rec.error = plan.reason
            ctx.tracker.failed(rec)
            self.abort()
            return None
        return plan, rec, src_ip, src_port

    async def _carry_out(self, work: Coroutine[Any, Any, None], rec: ConnectionRecord) -> None:
        """Run `work`, which counts the connection opened right before it attaches the tunnel
        or upstream (no await in between: the client cannot go unnoticed after the check), or
        raises (the client gone included): recorded failed."""
        try:
            await work
        except (TimeoutError, HboneError, PeerVerificationError, OSError) as err:
            self._failed(rec, err)

    async def _other(
        self, plan: OutboundPlan, rec: ConnectionRecord, src_ip: str, src_port: int
    ) -> None:
        if plan.kind is PlanKind.HBONE:
            await self._local(plan, rec, src_ip, src_port)
        else:
            await self._plain(plan, rec, src_ip)

    def _opened(self, rec: ConnectionRecord) -> None:
        self.record = rec
        self.ctx.tracker.opened(rec, lambda: (self.received, self.sent))

    def _failed(self, rec: ConnectionRecord, err: BaseException) -> None:
        rec.response_flags = response_flag(err)
        rec.error = str(err) or type(err).__name__
        self.ctx.tracker.failed(rec)
        log.debug("outbound %s -> %s failed: %s", rec.src_addr, rec.dst_addr, rec.error)
        self.abort()

    def _hbone_request(
        self, plan: OutboundPlan, rec: ConnectionRecord, src_ip: str, src_port: int
    ) -> tuple[PoolKey, list[tuple[str, str]]]:
        """The pool key and the CONNECT's headers (records the trace context and address)."""
        ctx = self.ctx
        source = plan.source_identity
        assert source is not None
        assert plan.authority is not None
        source_ip, transparent = ctx.source_binding(src_ip)
        key = _pool_key(source, plan.expected_identities, plan.target_addr, source_ip, transparent)
        h3 = ctx.h3_target(
            plan.destination_workload if plan.waypoint is None else None, plan.target_addr
        )
        if h3 is not None:
            key = dataclasses.replace(key, transport="h3", h3_address=h3[0], server_name=h3[1])
        headers = [("forwarded", f'for="{src_ip}:{src_port}"')]
        if plan.service is not None:
            headers[0] = ("forwarded", f'for="{src_ip}:{src_port}";host={plan.service.hostname}')
        baggage = _baggage(plan)
        if baggage:
            headers.append(("baggage", baggage))
        headers.append(("traceparent", _traceparent(ctx, rec)))
        rec.hbone_addr = plan.authority
        return key, headers

    async def _hbone_pooled(
        self,
        key: PoolKey,
        authority: str,
        headers: list[tuple[str, str]],
        rec: ConnectionRecord,
        attempts: int = DIAL_ATTEMPTS,
    ) -> None:
        """The CONNECT through the pool (which may dial, or retry a refused stream). Each
        stream is `_pending` from its sending on (`_started`), as on the taskless path."""
        try:
            stream = await self.ctx.pool.open_stream(
                key, authority, headers, self, attempts=attempts, on_started=self._started
            )
        finally:
            self._pending = None
        self._tunnel(stream, rec)

    def _started(self, stream: HboneStream) -> None:
        """A CONNECT the pool just sent for this connection (after a dial, on HTTP/3, or a
        retried one): reset at once if the client is gone already (it went during the dial),
        else when it goes (`connection_lost`) before the answer."""
        self._pending = stream
        if self._finished:
            self._reset_pending()

    def _answered(
        self,
        stream: HboneStream,
        rec: ConnectionRecord,
        key: PoolKey,
        headers: list[tuple[str, str]],
        response: asyncio.Future[int],
    ) -> None:
        """The response to a CONNECT `begin` sent without a task: 200 opens the tunnel."""
        self._pending = None
        if response.cancelled():
            self._failed(rec, ConnectionResetError("HBONE connection closed"))
            return
        err = response.exception()
        if err is None:
            status = response.result()
            if status == 200:
                try:
                    self._tunnel(stream, rec)
                except ConnectionResetError as gone:
                    self._failed(rec, gone)
                return
            err = HboneError.for_status(status, f"CONNECT {stream.authority} refused with {status}")
        elif isinstance(err, StreamRefused):
            if self._finished:  # the client went after the refusal: the cause, not the peer
                err = ConnectionResetError(_CLIENT_GONE)
            else:
                # Not processed by the peer (RFC 9113 §8.7): the pool retries it elsewhere,
                # as `open_stream` would have, with the attempts left.
                self.ctx.pool.streams_retried += 1
                work = self._hbone_pooled(key, stream.authority, headers, rec, DIAL_ATTEMPTS - 1)
                _spawn(self._carry_out(work, rec))
                return
        self._failed(rec, err)

    def _tunnel(self, stream: HboneStream, rec: ConnectionRecord) -> None:
        """Count the connection opened, then attach the answered stream (opened first: early
        data and END_STREAM may finish the connection inside `attach`, which counts it closed).
        Raises ConnectionResetError, the stream reset, when the connection is finished already:
        the client gone, or the peer's reset of the stream delivered with its 200."""
        if self._finished:
            stream.reset(ErrorCode.CONNECT_ERROR)
            raise ConnectionResetError(self._peer_reset or _CLIENT_GONE)
        rec.mtls = True
        rec.transport = stream.transport
        rec.destination_principal = str(stream.peer_identity) if stream.peer_identity else None
        self._opened(rec)
        self.attach(stream)

    def _is_local(self, plan: OutboundPlan) -> bool:
        """The HBONE target runs on this node (and no waypoint is in between)."""
        dst = plan.destination_workload
        return plan.waypoint is None and dst is not None and dst.node == self.ctx.settings.node

    async def _local(
        self, plan: OutboundPlan, rec: ConnectionRecord, src_ip: str, src_port: int
    ) -> None:
        """Same-node fast path: the inbound half runs in-process instead of over a loopback
        HBONE connection (with eBPF capture, a connection from the node to a local pod's :15008
        is not redirected back to us). Authorization is evaluated exactly as for HBONE, with
        the source workload's identity, which this proxy itself vouches for."""
        ctx = self.ctx
        assert plan.authority is not None
        assert plan.destination_workload is not None
        dst_ip, dst_port = parse_authority(plan.authority)
        dest_rec = ConnectionRecord(
            direction="inbound",
            reporter="destination",
            src_addr=f"{src_ip}:{src_port}",
            dst_addr=plan.authority,
        )
        dest_rec.source = plan.source
        dest_rec.source_principal = rec.source_principal
        dest_rec.destination = plan.destination_workload
        dest_rec.destination_principal = str(plan.destination_workload.identity)
        dest_rec.destination_service = rec.destination_service
        dest_rec.destination_service_name = rec.destination_service_name
        dest_rec.destination_service_namespace = rec.destination_service_namespace
        dest_rec.mtls = True
        try:
            connect = InboundConnect(
                dst_ip=dst_ip,
                dst_port=dst_port,
                src_identity=plan.source_identity,
                src_ip=src_ip,
                conn_dst_ip=dst_ip,
            )
            inbound = plan_inbound(
                ctx.state, connect, network=ctx.settings.network, node=ctx.settings.node
            )
            upstream = await connect_upstream(ctx, inbound, dest_rec, src_ip)
        except HboneError as err:
            dest_rec.response_flags = err.response_flag
            dest_rec.error = str(err)
            ctx.tracker.failed(dest_rec)
            raise
        ctx.tracker.opened(dest_rec, lambda: (upstream.sent, upstream.received))
        if self._finished:  # the client went while we connected: the upstream goes too
            dest_rec.error = _CLIENT_GONE
            upstream.abort()  # its close counts `dest_rec` closed
            raise ConnectionResetError(_CLIENT_GONE)
        rec.mtls = True
        rec.destination_principal = dest_rec.destination_principal
        self._opened(rec)
        splice(self, upstream)

    async def _plain(self, plan: OutboundPlan, rec: ConnectionRecord, src_ip: str) -> None:
        host, port = plan.target_addr
        source_ip, transparent = self.ctx.source_binding(src_ip)
        if plan.kind is PlanKind.PASSTHROUGH and transparent:
            # The original destination may be a VIP that netfilter DNATs on this node: its
            # replies would come back from the endpoint's address, which no socket of ours
            # matches, so the eBPF established lookup could not steer them back. Leave from
            # the node's own address instead (like an SNAT).
            source_ip, transparent = None, False
        sock = await connect_tcp(
            host,
            port,
            source_ip=source_ip,
            transparent=transparent,
            timeout=self.ctx.settings.connect_timeout,
        )
        _, upstream = await asyncio.get_running_loop().create_connection(TcpSide, sock=sock)
        if self._finished:  # the client went while we connected
            upstream.abort()
            raise ConnectionResetError(_CLIENT_GONE)
        self._opened(rec)
        splice(self, upstream)
