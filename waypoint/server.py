"""The waypoint's HBONE server: accept mTLS on 15008, take CONNECT tunnels, dispatch HTTP.

Owns: the accept loop (sockets we create, like the node proxy's), the TLS handshake with the
WAYPOINT's certificate and verification of the SOURCE's (`meshcore.hbone.aio.accept_tls`: chain
+ trust domain; the peer identity is what L7 policy sees), and per CONNECT stream:
- the target (``:authority`` = service VIP:port, or a workload IP:port) must be a service or
  workload bound to this waypoint, else 400 (nothing is forwarded); a service port it does not
  declare -> 400;
- then 200, and the first bytes decide the protocol: the HTTP/2 connection preface
  (RFC 9113 §3.4, prior knowledge: h2c, gRPC) -> `waypoint.http2`; otherwise HTTP/1.1 ->
  `waypoint.http1`; on a port that does not declare HTTP/HTTP2/gRPC, bytes that are not HTTP
  (`waypoint.protocol.sniff.classify`), or none within `protocol_detection_timeout` (server-first
  protocols), -> `waypoint.tcp` (L4: L4 policy, TCPRoute/TLSRoute, TCP metrics).

Invariant: nothing reaches an upstream before the tunnel's target was checked and, per
request, L7 policy allowed it (in the handler).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import socket
from collections.abc import Coroutine
from typing import Any

from meshcore.address import parse_authority
from meshcore.errors import BadRequest
from meshcore.hbone.aio import HboneHooks, HboneProtocol, HboneSettings, HboneStream, accept_tls
from meshcore.hbone.streams import Role
from meshcore.model import AppProtocol
from waypoint.context import WaypointContext
from waypoint.handler import Handler
from waypoint.http1 import serve_h1
from waypoint.protocol.sniff import classify
from waypoint.tcp import TcpProxy
from waypoint.tunnel import Tunnel, TunnelIO

log = logging.getLogger("waypoint.server")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _peer_cert_hash(proto: HboneProtocol) -> str:
    """SHA-256 hex of the verified peer certificate (DER), for X-Forwarded-Client-Cert's Hash."""
    ssl_object = proto.transport.get_extra_info("ssl_object") if proto.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return hashlib.sha256(der).hexdigest() if der else ""


class WaypointServer:
    def __init__(self, ctx: WaypointContext, handler: Handler, tcp: TcpProxy | None = None) -> None:
        self.ctx = ctx
        self.handler = handler
        self.tcp = tcp
        self._accepts: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.socks: list[socket.socket] = []
        self.protocols: set[HboneProtocol] = set()
        self.refused = 0
        self.hbone = HboneSettings(trust_domain=ctx.settings.trust_domain)
        """Shared by every HBONE connection accepted."""

    def start(self, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        self.socks = socks
        for sock in socks:
            self._accepts.append(loop.create_task(self._accept_loop(sock)))

    def close(self) -> None:
        for t in self._accepts:
            t.cancel()
        for s in self.socks:
            s.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as err:
                log.warning("accept failed: %s", err)
                await asyncio.sleep(0.1)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._handshake(conn))

    async def _handshake(self, conn: socket.socket) -> None:
        ctx = self.ctx
        peer_ip = conn.getpeername()[0]
        try:
            tls = await ctx.server_context()
        except Exception as err:
            log.warning("no certificate for %s: %s", ctx.settings.identity, err)
            conn.close()
            return
        hooks = HboneHooks(
            on_request=lambda stream: self._spawn(self._tunnel(stream, peer_ip, proto)),
            on_close=self.protocols.discard,
        )
        proto = HboneProtocol(Role.SERVER, self.hbone, hooks)
        try:
            await accept_tls(conn, tls, proto)
        except Exception as err:
            log.info("HBONE handshake from %s failed: %s", peer_ip, err)
            return
        self.protocols.add(proto)

    def _target(self, authority: str) -> Tunnel | str:
        """The tunnel's target, or why it is refused."""
        ctx = self.ctx
        try:
            ip, port = parse_authority(authority)
        except BadRequest:
            return f"bad :authority {authority!r}"
        net = ctx.settings.network
        svc = ctx.state.service_by_vip(ip, net)
        if svc is not None:
            if not ctx.is_me(svc.waypoint):
                return f"service {svc.key} is not bound to this waypoint"
            if svc.port(port) is None:
                return f"service {svc.key} has no port {port}"
            return Tunnel(
                peer_identity=None,
                peer_ip="",
                target_ip=ip,
                target_port=port,
                service=svc,
                workload=None,
            )
        wl = ctx.state.workload_by_address(ip, net)
        if wl is not None and ctx.is_me(wl.waypoint):
            return Tunnel(
                peer_identity=None,
                peer_ip="",
                target_ip=ip,
                target_port=port,
                service=None,
                workload=wl,
            )
        return f"{ip}:{port} is not a service or workload served by this waypoint"

    async def _detect(self, io: TunnelIO, target: Tunnel) -> tuple[str, bytes]:
        """(``http`` | ``tcp``, the bytes read). Ports declaring HTTP/HTTP2/gRPC are HTTP."""
        svc = target.service
        port = svc.port(target.target_port) if svc is not None else None
        declared = port is not None and port.app_protocol is not AppProtocol.UNKNOWN
        if declared or self.tcp is None:
            return "http", await io.read()
        first = b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.settings.protocol_detection_timeout
        while True:
            kind = classify(first)
            if kind is not None:
                return kind, first
            try:
                async with asyncio.timeout_at(deadline):
                    more = await io.read()
            except TimeoutError:
                # Nothing (server-first protocol) or a partial token: TCP only when nothing
                # came; a partial request line goes to the HTTP parser (its 4xx).
                return ("tcp" if not first else "http"), first
            if not more:
                return "http", first
            first += more

    async def _tunnel(self, stream: HboneStream, peer_ip: str, proto: HboneProtocol) -> None:
        target = self._target(stream.authority)
        if isinstance(target, str):
            self.refused += 1
            log.info("CONNECT %s from %s refused: %s", stream.authority, peer_ip, target)
            stream.respond(400)
            return
        target = dataclasses.replace(
            target,
            peer_identity=stream.peer_identity,
            peer_ip=peer_ip,
            peer_cert_hash=_peer_cert_hash(proto),
        )
        io = TunnelIO()
        io.bind(stream)
        stream.respond(200)
        try:
            kind, first = await self._detect(io, target)
            if kind == "tcp" and self.tcp is not None:
                await self.tcp.serve(io, target, first, self.handler._source(target))
                return
            if not first:
                io.write_eof()
                return
            while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
                more = await io.read()
                if not more:
                    break
                first += more
            if first.startswith(H2_PREFACE):
                from waypoint.http2 import serve_h2

                await serve_h2(self.handler, io, target, first)
            else:
                await serve_h1(self.handler, io, target, first)
        except ConnectionError:
            io.reset()
        except Exception:
            log.exception("tunnel %s failed", stream.authority)
            io.reset()
