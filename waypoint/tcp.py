"""TCP through the waypoint: a tunnel that does not carry HTTP is proxied L4.

Owns: `TcpProxy.serve` (one tunnel: L4 authorization, TCPRoute/TLSRoute selection, endpoint
pick, an HBONE stream to the endpoint with the waypoint's identity that verifies the
DESTINATION's identity, bytes pumped both ways with half-close), `TcpMetrics` (Istio's
``istio_tcp_*`` metrics, reporter="waypoint") and its access-log line.

Semantics (Istio ambient waypoints; istio.io "Layer 4 authorization policy", Gateway API
TCPRoute/TLSRoute):
- Authorization: the AuthorizationPolicies that apply at this waypoint (same applicability as
  HTTP), read as L4 policies (`meshcore.config.authorization.to_l4`): HTTP-only fields follow
  Istio's ztunnel rule (an ALLOW rule using one matches nothing; a DENY rule is enforced on its
  L4 attributes alone), so carrying a connection as TCP never widens access. Denied: the tunnel
  is reset before any byte goes upstream (flag RBAC).
- Routing: a TLSRoute whose hostnames match the ClientHello's SNI (read, never terminated), else
  a TCPRoute for the service (and port), else the addressed service / workload itself.
- No endpoint: reset (UH); the upstream connect fails: reset (UF).

Bounds: the SNI peek reads at most `waypoint.protocol.sniff.MAX_HELLO` bytes within
`SNI_TIMEOUT`; a connection idle both ways for `IDLE_TIMEOUT` (Envoy tcp_proxy's 1 h default)
is closed; flow control is the tunnels' own (`waypoint.tunnel.TunnelIO`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from meshcore.authz import ConnectionInfo
from meshcore.authz import evaluate as evaluate_l4
from meshcore.config.authorization import to_l4
from meshcore.config.routes import Destination, L4Route
from meshcore.errors import HboneError, PeerVerificationError
from meshcore.hbone.pool import PoolKey
from meshcore.identity import SpiffeId
from meshcore.model import Service, Workload
from meshcore.telemetry import TCP_LABELS, Traffic, peer_labels, service_labels
from waypoint.context import WaypointContext
from waypoint.protocol.authz import applicable
from waypoint.protocol.route import pick_destination
from waypoint.protocol.sniff import MAX_HELLO, client_hello_sni
from waypoint.tunnel import Tunnel, TunnelIO
from waypoint.upstream import HBONE_PORT, UpstreamPool

log = logging.getLogger("waypoint.tcp")
access_log = logging.getLogger("waypoint.access")

IDLE_TIMEOUT = 3600.0
SNI_TIMEOUT = 5.0


class TcpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=r
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=r
        )
        self.received = Counter(
            "istio_tcp_received_bytes",
            "Bytes received from the client side",
            TCP_LABELS,
            registry=r,
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent to the client side", TCP_LABELS, registry=r
        )


@dataclass(slots=True)
class TcpRecord:
    start: float
    source_ip: str
    source_principal: str
    source: Workload | None = None
    service: Service | None = None
    destination: Workload | None = None
    destination_principal: str = ""
    upstream: str = ""
    route: str = ""
    policy: str = ""
    flags: str = "-"
    error: str = ""
    received: int = 0
    sent: int = 0
    sni: str = ""
    labels: tuple[str, ...] = field(default_factory=tuple)


def _labels(rec: TcpRecord, cluster_id: str) -> tuple[str, ...]:
    """Values in `TCP_LABELS` order, from the one workload-to-label mapping the node proxy uses
    too (`meshcore.telemetry`)."""
    return Traffic(
        reporter="waypoint",
        source=peer_labels(rec.source, cluster_id),
        source_principal=rec.source_principal,
        destination=peer_labels(rec.destination, cluster_id),
        destination_principal=rec.destination_principal,
        service=service_labels(rec.service),
        mtls=True,
    ).tcp_values(rec.flags)


class TcpProxy:
    def __init__(self, ctx: WaypointContext, upstream: UpstreamPool) -> None:
        self.ctx = ctx
        self.upstream = upstream
        self._metrics: TcpMetrics | None = None
        self.active = 0

    @property
    def metrics(self) -> TcpMetrics:
        if self._metrics is None:
            self._metrics = TcpMetrics(self.ctx.metrics.registry)
        return self._metrics

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # ---- decisions -------------------------------------------------------------------------

    def _authorize(self, t: Tunnel) -> tuple[bool, str]:
        ctx = self.ctx
        svc = t.service
        pols = applicable(
            ctx.config.config.policies,
            ctx.settings.waypoint,
            svc.name if svc else None,
            svc.namespace if svc else None,
        )
        l4 = []
        for p in pols:
            if p.kind == "RequestAuthentication" and not p.fail_closed_l7:
                continue  # no token on a TCP connection: it passes unauthenticated
            auth, _warnings = to_l4(p, waypoint=True)
            if auth is not None:
                l4.append(auth)
        if not l4:
            return True, ""
        conn = ConnectionInfo(
            src_identity=t.peer_identity,
            src_ip=ipaddress.ip_address(t.peer_ip),
            dst_ip=ipaddress.ip_address(t.target_ip),
            dst_port=t.target_port,
        )
        d = evaluate_l4(l4, conn)
        return d.allowed, d.policy or d.reason

    def _routes(self, svc: Service | None, port: int) -> list[L4Route]:
        if svc is None:
            return []
        return [
            r
            for r in self.ctx.config.config.l4_routes
            if svc.hostname in r.hosts and (r.port is None or r.port == port)
        ]

    def _endpoint(
        self, t: Tunnel, dest: Destination | None
    ) -> tuple[Service | None, str, int, SpiffeId, Workload | None, Any] | None:
        """(service, ip, target port, identity, workload, endpoint stats) or None (no
        healthy endpoint)."""
        ctx = self.ctx
        if dest is None and t.service is None:
            wl = t.workload
            if wl is None or not wl.addresses:
                return None
            return None, str(wl.addresses[0]), t.target_port, wl.identity, wl, None
        port = t.target_port
        svc = t.service
        subset = ""
        if dest is not None:
            svc = ctx.service_by_host(dest.host)
            if svc is None:
                return None
            port = dest.port or port
            if dest.port is None and svc.port(port) is None and len(svc.ports) == 1:
                port = svc.ports[0].service_port
            subset = dest.subset
        assert svc is not None
        cluster = ctx.cluster(svc, subset, port)
        ep = cluster.pick(self._now(), ctx.rng)
        if ep is None:
            return None
        return svc, ep.ip, ep.port, ep.identity, ctx.state.workload(ep.uid), ep

    # ---- I/O -------------------------------------------------------------------------------

    async def _peek_sni(self, io: TunnelIO, first: bytes) -> tuple[str | None, bytes]:
        data = first
        try:
            async with asyncio.timeout(SNI_TIMEOUT):
                while (sni := client_hello_sni(data)) is False and len(data) <= MAX_HELLO * 2:
                    more = await io.read()
                    if not more:
                        break
                    data += more
        except TimeoutError:
            return None, data
        return (sni if isinstance(sni, str) else None), data

    async def serve(self, io: TunnelIO, t: Tunnel, first: bytes, source: Workload | None) -> None:
        ctx = self.ctx
        rec = TcpRecord(
            start=self._now(),
            source_ip=t.peer_ip,
            source_principal=t.peer_uri,
            source=source,
            service=t.service,
        )
        up: TunnelIO | None = None
        ep_stats: Any = None
        try:
            allowed, rec.policy = self._authorize(t)
            if not allowed:
                rec.flags, rec.error = "RBAC", f"denied: {rec.policy}"
                io.reset()
                return
            routes = self._routes(t.service, t.target_port)
            dest: Destination | None = None
            if routes:
                if any(r.kind == "TLSRoute" for r in routes):
                    sni, first = await self._peek_sni(io, first)
                    rec.sni = sni or ""
                    routes = [r for r in routes if r.kind == "TCPRoute" or r.sni_matches(sni)]
                    # A TLSRoute with hostnames is more specific than a TCPRoute.
                    routes.sort(key=lambda r: (r.kind != "TLSRoute" or not r.sni, r.source))
                route = routes[0] if routes else None
                if route is not None:
                    rec.route = route.source
                    live = [d for d in route.backends if d.weight > 0]
                    if not live:
                        rec.flags, rec.error = "UH", f"{route.source}: no backend with weight"
                        io.reset()
                        return
                    dest = pick_destination(live, ctx.rng)
                elif rec.sni or any(
                    r.kind == "TLSRoute" for r in self._routes(t.service, t.target_port)
                ):
                    rec.flags, rec.error = "NR", f"no TLSRoute matches SNI {rec.sni or '(none)'}"
                    io.reset()
                    return
            picked = self._endpoint(t, dest)
            if picked is None:
                rec.flags, rec.error = "UH", "no healthy endpoint"
                io.reset()
                return
            svc, ip, port, identity, wl, ep_stats = picked
            rec.service = svc or rec.service
            rec.destination, rec.destination_principal = wl, str(identity)
            rec.upstream = f"{ip}:{port}"
            if ep_stats is not None:
                ep_stats.active += 1
            up = await self._connect(ip, port, identity, rec)
            if up is None:
                io.reset()
                return
            rec.labels = _labels(rec, self.ctx.metrics.cluster_id)
            self.metrics.opened.labels(*rec.labels).inc()
            self.active += 1
            try:
                await self._pump(io, up, first, rec)
            finally:
                self.active -= 1
        except Exception as err:  # a bug must not take the waypoint down; reset this tunnel
            log.exception("TCP tunnel failed")
            rec.flags, rec.error = "DPE" if rec.flags == "-" else rec.flags, f"internal: {err}"
            io.reset()
            if up is not None:
                up.reset()
        finally:
            if ep_stats is not None:
                ep_stats.active = max(0, ep_stats.active - 1)
            self._record(rec)

    async def _connect(
        self, ip: str, port: int, identity: SpiffeId, rec: TcpRecord
    ) -> TunnelIO | None:
        ctx = self.ctx
        up = TunnelIO()
        pk = PoolKey(
            source=ctx.settings.identity,
            expected=(identity,),
            address=(ip, HBONE_PORT),
            source_ip=self.upstream.source_ip,
        )
        authority = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        try:
            async with asyncio.timeout(ctx.settings.connect_timeout):
                up.stream = await ctx.pool.open_stream(pk, authority, (), up)
        except (
            HboneError,
            OSError,
            ConnectionError,
            TimeoutError,
            PeerVerificationError,
            ssl.SSLError,
        ) as err:
            rec.flags, rec.error = "UF", f"CONNECT {authority}: {err or type(err).__name__}"
            return None
        return up

    async def _pump(self, down: TunnelIO, up: TunnelIO, first: bytes, rec: TcpRecord) -> None:
        last = [self._now()]

        async def copy(src: TunnelIO, dst: TunnelIO, upstream: bool) -> None:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        data = await src.read()
                except TimeoutError:
                    if self._now() - last[0] >= IDLE_TIMEOUT:
                        raise
                    continue
                last[0] = self._now()
                if not data:
                    dst.write_eof()  # half-close (RFC 9293 §3.6: FIN in one direction)
                    return
                dst.write(data)
                if upstream:
                    rec.received += len(data)
                else:
                    rec.sent += len(data)
                await dst.drain()

        if first:
            up.write(first)
            rec.received += len(first)
        a = asyncio.ensure_future(copy(down, up, True))
        b = asyncio.ensure_future(copy(up, down, False))
        try:
            done, _pending = await asyncio.wait((a, b), return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    raise exc
            await asyncio.gather(a, b)
        except (ConnectionError, TimeoutError) as err:
            rec.error = rec.error or f"{type(err).__name__}: {err}"
            rec.flags = "UC" if up.was_reset else "DC" if down.was_reset else "-"
            down.reset()
            up.reset()
        finally:
            for task in (a, b):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    def _record(self, rec: TcpRecord) -> None:
        if rec.labels:
            m = self.metrics
            m.closed.labels(*rec.labels).inc()
            m.received.labels(*rec.labels).inc(rec.received)
            m.sent.labels(*rec.labels).inc(rec.sent)
        if self.ctx.metrics.log_enabled:
            entry: dict[str, object] = {
                "src.addr": rec.source_ip,
                "src.identity": rec.source_principal,
                "dst.service": rec.service.hostname if rec.service else "",
                "dst.addr": rec.upstream,
                "dst.identity": rec.destination_principal,
                "protocol": "tcp",
                "response_flags": rec.flags,
                "route": rec.route,
                "policy": rec.policy,
                "sni": rec.sni,
                "bytes_recv": rec.received,
                "bytes_sent": rec.sent,
                "duration": round((self._now() - rec.start) * 1000, 3),
                "error": rec.error,
            }
            access_log.info(json.dumps(entry, separators=(",", ":")))
