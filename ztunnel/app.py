"""The `ztunnel` process: the per-node L4 proxy.

Owns: the process around the `ProxyContext` (built by `ztunnel.contexts` from the settings
`ztunnel.flags` parsed): binding listeners, workers, readiness, and graceful drain on SIGTERM.

Listeners are created from sockets we make ourselves (`meshcore.sockets.make_listener`), never by
address inside asyncio, so a zero-drop upgrade hands the very same listening sockets (data path
and operator ports) to a new process (`ztunnel.handover`, --handover-socket): the successor takes
them over and turns ready only after the hand-over; the predecessor then serves only what it has,
keeping copies of the listeners: if the successor dies after READY (no RELEASE), a single-worker
predecessor takes them back and serves again (`NodeProxy.resume`, docs/upgrade.md).
Event loop, stop signals, housekeeping sweep and drain wait: `meshcore.runtime`.
Workers (`--workers N`): static mode binds, then forks; control-plane mode forks first and hands
the listeners over once its first state is there (`ztunnel.workers`). gRPC and the xDS/CA
clients are imported by control-plane mode only, aioquic by --http3 only, `cryptography` by
no worker over TCP (`meshcore.certhelper`'s helper processes do its X.509 work; --http3 loads
it with aioquic): a worker's RSS.

Ports (docs/reference/ambient-facts.md): 15001 outbound, 15006 inbound plaintext, 15008 inbound
HBONE, 15000 admin (localhost), 15020 metrics, 15021 readiness; with --http3 also 15008/udp
(HBONE over HTTP/3, issue 16).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshcore.errors import ConfigError, HandoverError, MeshError
from meshcore.opshttp import require_loopback
from meshcore.proto.yamlform import load_mesh_config
from meshcore.runtime import every, select_event_loop, stop_on_signals, wait_idle
from meshcore.sockets import make_listener, make_udp_listener
from meshcore.state import MeshState
from ztunnel import udp_relay
from ztunnel.admin import (
    ADMIN_LOOPBACK_WHY,
    admin_routes,
    metrics_routes,
    readiness_routes,
    serve_http,
)
from ztunnel.contexts import controlplane_context, reload_static_config, static_context
from ztunnel.flags import parse_args
from ztunnel.proxy.accept import TcpListener
from ztunnel.proxy.context import ProxyContext, ProxySettings
from ztunnel.proxy.inbound import HboneListener, PlaintextInbound
from ztunnel.proxy.outbound import OutboundConnection
from ztunnel.proxy.relay import TcpSide

if TYPE_CHECKING:
    # Imported where used: protobuf and the xDS/CA clients by control-plane mode, aioquic by
    # --http3, so a static node proxy's worker does not carry them (bench/README.md, Memory);
    # likewise the hand-over (--handover-socket) and, with --workers > 1, the extra workers'
    # plumbing and their metrics directory (`shutil`, `tempfile`; "Session 8"). Here for the
    # annotations only: every function that calls `handover` (4) has its own
    # `from ztunnel import handover` (a no-op after the first), none reads it from the module.
    from ztunnel import handover
    from ztunnel.proxy.inbound_h3 import H3Listener

log = logging.getLogger("ztunnel")


@dataclass(frozen=True, slots=True)
class Listener:
    """A bound listening socket and what it serves. Created before any worker forks, so every
    worker accepts on the same sockets (and a successor process could inherit them)."""

    role: str  # "outbound" | "plaintext" | "hbone" | "hbone-udp"
    sock: socket.socket
    handed: bool = False
    """Taken over from a predecessor (a UDP one is read only after the hand-over's DONE)."""


def bind_listeners(
    settings: ProxySettings, state: MeshState, handed: handover.Handed | None = None
) -> list[Listener]:
    """The data-path listeners: taken over from a predecessor (`handed`) where it had the same
    role and address, bound fresh otherwise."""
    s = settings

    def listener(role: str, host: str, port: int, transparent: bool = False) -> Listener:
        sock = handed.take(role, host, port) if handed is not None else None
        return Listener(role, sock or make_listener(host, port, transparent=transparent))

    def udp_listener(host: str, port: int) -> Listener:
        sock = handed.take("hbone-udp", host, port) if handed is not None else None
        return Listener("hbone-udp", sock or make_udp_listener(host, port), sock is not None)

    if s.capture == "transparent":
        captured = [
            listener("outbound", "0.0.0.0", s.outbound_port, True),
            listener("plaintext", "0.0.0.0", s.inbound_plaintext_port, True),
            listener("hbone", "0.0.0.0", s.hbone_port, True),
        ]
        if s.http3:  # node-to-node UDP on the node's own address (ztunnel.proxy.inbound_h3)
            captured.append(udp_listener(s.node_ip, s.hbone_port))
        return captured
    specs = [("outbound", host, port) for host, port in s.outbound_listen]
    specs.append(("outbound", s.node_ip, s.outbound_port))
    specs.append(("plaintext", s.node_ip, s.inbound_plaintext_port))
    # Bind mode: the HBONE listener is bound on each local workload's address, so the accepted
    # socket's local address names the destination workload, as it does with capture.
    for wl in state.local_workloads(s.node):
        specs.extend(("hbone", str(ip), s.hbone_port) for ip in wl.addresses)
    listeners = [listener(role, host, port) for role, host, port in specs]
    # UDP (HTTP/3) sockets are handed over too; the predecessor's QUIC connections are
    # relayed to it (ztunnel.udp_relay).
    listeners.extend(
        udp_listener(host, port) for role, host, port in specs if role == "hbone" and s.http3
    )
    return listeners


class NodeProxy:
    """One running node proxy worker: listeners + context. `start()`, then `drain()`.

    `serve_admin` is False in the extra workers of a multi-worker proxy: only the first worker
    answers admin/metrics/readiness (metrics are aggregated across workers)."""

    def __init__(
        self,
        ctx: ProxyContext,
        listeners: list[Listener] | None = None,
        *,
        serve_admin: bool = True,
        handed: handover.Handed | None = None,
        take_back: bool = False,
    ) -> None:
        self.ctx = ctx
        self.listeners = listeners
        self.serve_admin = serve_admin
        self.handed = handed
        self.ops: list[Listener] = []
        self.handover: handover.HandoverServer | None = None
        self.handed_over = False
        self.take_back = take_back and serve_admin
        """Keep copies of the listeners after a hand-over and resume on them if the successor
        dies (`ztunnel.handover` version 2); single-worker proxies only. With HTTP/3 the UDP
        socket stays ours all along: the take-back reads it again (`udp_relay.Predecessor`)."""
        self._kept: list[Listener] = []
        self._resume = asyncio.Event()
        self._took_back = False
        self._terminating = False
        self._successor_wait: asyncio.TimerHandle | None = None
        self.predecessor: socket.socket | None = None
        """The hand-over connection to the process we took over from, held open while we
        serve: its EOF tells it we died; `handover.release` when we stop on purpose."""
        self._accepting = True
        self.servers: list[TcpListener] = []
        self.hbone_listeners: list[HboneListener] = []
        self._h3: list[H3Listener] = []  # those of hbone_listeners that serve HTTP/3
        self.admin_servers: list[asyncio.Server] = []
        self.ready = False
        self._relay: socket.socket | None = None  # successor: the relay end we were handed
        self._relay_pair: tuple[socket.socket, ...] = ()  # predecessor: (ours, offered)
        self._relayed: udp_relay.Predecessor | None = None  # predecessor: after READY
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        if ctx.settings.ready_file and self.serve_admin:
            # A ready file left by a predecessor that was killed (the kubelet restarts a
            # container in the same pod: its emptyDir /tmp keeps the file) must not make the
            # exec probe pass before we are ready (written in `_serve_operator`).
            with contextlib.suppress(FileNotFoundError):
                Path(ctx.settings.ready_file).unlink()
        if self.listeners is None:
            self.listeners = bind_listeners(ctx.settings, ctx.state)
        self._serve_listeners()
        s = ctx.settings
        if self.serve_admin:
            require_loopback(s.admin_host, "--admin-address", ADMIN_LOOPBACK_WHY)
            handed = self.handed
            for role, host, port in (
                ("admin", s.admin_host, s.admin_port),
                ("metrics", s.node_ip, s.metrics_port),
                ("readiness", s.node_ip, s.readiness_port),
            ):
                sock = handed.take(role, host, port) if handed is not None else None
                self.ops.append(Listener(role, sock or make_listener(host, port)))
            if handed is not None:
                self._relay = handed.take(udp_relay.ROLE, "", 0)
                handed.close_unused()
        ctx.certs.on_rotate(ctx.on_rotate)
        ctx.sync_local_identities()
        self._tasks.append(loop.create_task(ctx.certs.run()))
        self._tasks.append(loop.create_task(every(5, self._sweep(loop))))
        # Ready once every local identity has a certificate (inbound needs them at once).
        for identity in ctx.certs.identities():
            await ctx.certs.get(identity)
        if self.handed is not None:
            # We accept on the data path now; the predecessor stops accepting, then we answer
            # the operator ports (readiness included) and turn ready.
            from ztunnel import handover

            self.predecessor = await handover.commit(self.handed)
            self.handed = None
            self._take_udp_over()
        await self._serve_operator()

    def _serve_listeners(self) -> None:
        """Accept on the data-path listeners (at start, and again on a take-back)."""
        ctx = self.ctx
        assert self.listeners is not None
        factories: dict[str, Callable[[], TcpSide]] = {
            "outbound": lambda: OutboundConnection(ctx),
            "plaintext": lambda: PlaintextInbound(ctx),
        }
        for listener in self.listeners:
            if listener.role == "hbone-udp" and not self.serve_admin:
                # A UDP socket shared by forked workers would scatter one QUIC connection's
                # datagrams over all of them: HTTP/3 is served by the first worker only.
                listener.sock.close()
                continue
            if listener.role in ("hbone", "hbone-udp"):
                if listener.role == "hbone":
                    hbone = HboneListener(ctx, listener.sock)
                    hbone.start()
                else:
                    from ztunnel.proxy.inbound_h3 import H3Listener

                    hbone = h3 = H3Listener(ctx, listener.sock)
                    # A handed-over UDP socket is read after DONE (the predecessor reads it
                    # until READY): `_take_udp_over`.
                    h3.start(reading=not listener.handed)
                    self._h3.append(h3)
                self.hbone_listeners.append(hbone)
            else:
                # Our accept loop, not create_server: it pauses on fd shortage (accept.py).
                factory = factories[listener.role]
                tcp = TcpListener(listener.role, listener.sock, factory, ctx.metrics)
                tcp.start()
                self.servers.append(tcp)

    async def _serve_operator(self) -> None:
        """Admin/metrics/readiness, the hand-over socket, readiness (after start's hand-over,
        and again on a take-back)."""
        ctx = self.ctx
        s = ctx.settings
        if self.serve_admin:
            ops = {listener.role: listener.sock for listener in self.ops}
            self.admin_servers = [
                await serve_http(
                    s.admin_host, s.admin_port, admin_routes(ctx, self.stop), sock=ops["admin"]
                ),
                await serve_http(
                    s.node_ip, s.metrics_port, metrics_routes(ctx), sock=ops["metrics"]
                ),
                await serve_http(
                    s.node_ip,
                    s.readiness_port,
                    readiness_routes(lambda: self.ready),
                    sock=ops["readiness"],
                ),
            ]
            if s.handover_socket and self.handover is None:
                from ztunnel import handover

                counter = ctx.metrics.handovers
                self.handover = handover.HandoverServer(
                    Path(s.handover_socket),
                    self.offered_sockets,
                    self.hand_over,
                    on_result=lambda result: counter.labels(result).inc(),
                    take_back=handover.TakeBack(self._resume.set, self._drop_kept)
                    if self.take_back
                    else None,
                )
            if self.handover is not None:
                self.handover.start()
        self.ready = True
        if s.ready_file and self.serve_admin:
            Path(s.ready_file).write_text(f"{os.getpid()}\n")
        log.info(
            "node proxy %s worker %d ready: %d listeners, %d local workloads",
            s.node,
            os.getpid(),
            len(self.listeners or []),
            len(ctx.state.local_workloads(s.node)),
        )

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Housekeeping (every few seconds, `meshcore.runtime.every`): idle pooled connections
        are released, and memory freed by finished bulk transfers goes back to the OS (glibc
        keeps a heap's high-water mark otherwise; malloc_trim costs microseconds when there is
        nothing to return)."""
        trim = _malloc_trim()

        def step() -> None:
            self.ctx.pool.sweep(loop.time())
            if trim is not None:
                trim(0)

        return step

    def stop(self) -> None:
        self._stopping.set()

    def terminate(self) -> None:
        """SIGTERM / SIGINT: `stop()`, except in a process that took the listeners back from
        a dead successor (`resume`): it holds the only copies, and the successor's restart is
        on its way (the kubelet restarts the crashed container, whose pod the DaemonSet
        keeps; the SIGTERM is the old pod's deletion after the surge). Stopping now would
        close the listeners (connections refused until the restart binds fresh) and cut the
        connections it kept at --drain-timeout. So it keeps serving and offering the
        listeners for up to --drain-timeout, drains without deadline once a successor took
        them (`hand_over`), and stops as usual if none came."""
        self._terminating = True
        if self._took_back and not self.handed_over:
            self._await_successor()
        else:
            self.stop()

    def _await_successor(self) -> None:
        if self._successor_wait is not None:
            return
        wait = self.ctx.settings.drain_timeout
        log.warning(
            "stop requested after a take-back: serving until a successor takes the listeners "
            "over (at most %.0fs)",
            wait,
        )
        self._successor_wait = asyncio.get_running_loop().call_later(wait, self.stop)

    def _take_udp_over(self) -> None:
        """After DONE: divert the predecessor's QUIC peers to it (`ztunnel.udp_relay`), then
        read the handed-over UDP sockets ourselves."""
        endpoints = [x.endpoint for x in self._h3 if x.endpoint is not None]
        if self._relay is not None:
            udp_relay.Successor(self._relay, endpoints).start()
            self._relay = None
        for endpoint in endpoints:
            endpoint.resume_reading()

    def offered_sockets(self) -> list[tuple[str, socket.socket]]:
        """What a successor takes over: every data-path listener and the operator ports, and
        with HTTP/3 a relay for the QUIC connections we keep serving (`ztunnel.udp_relay`)."""
        offered = [(lst.role, lst.sock) for lst in [*(self.listeners or []), *self.ops]]
        if any(role == "hbone-udp" for role, _ in offered):
            for end in self._relay_pair:  # an earlier, failed hand-over's
                end.close()
            self._relay_pair = udp_relay.pair()
            offered.append((udp_relay.ROLE, self._relay_pair[1]))
        return offered

    def hand_over(self) -> None:
        """The successor accepts now: stop accepting at once, then drain what we have (no
        deadline unless --handover-drain-timeout). Our QUIC peers are named to the successor
        before it may read the UDP sockets (DONE follows this call). With take-back, copies of
        the listeners (the same kernel sockets, dup'ed) are kept until the successor RELEASEs
        them."""
        self.handed_over = True
        if self._successor_wait is not None:  # a successor came after a take-back (terminate)
            self._successor_wait.cancel()
            self._successor_wait = None
        if self.take_back:
            self._kept = [
                Listener(lst.role, lst.sock.dup())
                for lst in [*(self.listeners or []), *self.ops]
                if lst.role != "hbone-udp"  # not handed over (bind_listeners)
            ]
        self.stop_accepting()
        if self._relay_pair:
            ours, theirs = self._relay_pair
            theirs.close()  # the successor holds its own copy
            self._relay_pair = ()
            endpoints = [x.endpoint for x in self._h3 if x.endpoint is not None]
            self._relayed = udp_relay.Predecessor(ours, endpoints)
            self._relayed.start()
        self.stop()

    def _drop_kept(self) -> None:
        for lst in self._kept:
            lst.sock.close()
        self._kept = []

    async def resume(self) -> None:
        """Take-back: the successor died after READY. Accept again on our copies of the
        listeners (queued SYNs are accepted, not refused), turn ready again, and offer the
        sockets to the next successor; the drain stops, the connections we kept serving go on.
        With HTTP/3: the UDP sockets (never closed here) are read by us again, datagrams queued
        meanwhile included, and accept new QUIC connections; the relay is closed."""
        kept, self._kept = self._kept, []
        self._resume.clear()
        self._stopping.clear()
        self.handed_over = False
        self._accepting = True
        self.ctx.draining = False
        ops = ("admin", "metrics", "readiness")
        udp = [lst for lst in self.listeners or [] if lst.role == "hbone-udp"]
        self.listeners = [lst for lst in kept if lst.role not in ops]
        self.ops = [lst for lst in kept if lst.role in ops]
        self.servers = []
        h3 = self._h3
        self.hbone_listeners = []
        self._serve_listeners()
        self.listeners += udp  # never closed here: its QUIC connections live on it
        self.hbone_listeners += h3
        if self._relayed is not None:
            self._relayed.take_back()
            self._relayed = None
        for listener in h3:
            listener.reopen()
        await self._serve_operator()
        log.warning("took the listeners back from a dead successor: serving again")
        self._took_back = True
        if self._terminating:  # asked to stop before the successor died (terminate)
            self._await_successor()

    def handed_over_elsewhere(self) -> None:
        """An extra worker: the first worker handed the (shared) listeners over."""
        self.handed_over = True
        self.stop()

    def drain_timeout(self) -> float:
        """Seconds the drain may take; 0: until every connection ends (after a hand-over)."""
        s = self.ctx.settings
        return s.handover_drain_timeout if self.handed_over else s.drain_timeout

    def stop_accepting(self) -> None:
        """Not ready; listeners and operator ports closed in this process (a successor holding
        the same sockets keeps accepting on them); GOAWAY on every HBONE connection."""
        if not self._accepting:
            return
        self._accepting = False
        self.ready = False
        if self.ctx.settings.ready_file and self.serve_admin:
            with contextlib.suppress(FileNotFoundError):
                Path(self.ctx.settings.ready_file).unlink()
        self.ctx.draining = True
        for tcp in self.servers:
            tcp.close()
        for listener in self.hbone_listeners:
            listener.close()
        for server in self.admin_servers:
            server.close()
        for lst in [*(self.listeners or []), *self.ops]:
            if lst.role != "hbone-udp":  # HTTP/3 connections live on it until they end
                lst.sock.close()  # not yet served (e.g. stopped mid-start): release it too
        for proto in list(self.ctx.hbone_servers):
            proto.close()
        self.ctx.pool.close_all()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def drain(self) -> bool:
        """Graceful drain that hands over: not ready; listeners AND the admin/metrics/readiness
        ports released at once (a new node proxy can bind them while this one drains); a
        GOAWAY(NO_ERROR, last stream id) to every inbound HBONE connection and every pooled one
        (RFC 9113 §6.8: peers open new tunnels elsewhere, open ones finish); wait for live
        connections (bounded by drain_timeout; after a hand-over by handover_drain_timeout,
        0 = until each connection ends), then close what is left. True (nothing closed) when
        the successor died meanwhile and we took the listeners back: `resume()` next."""
        self.stop_accepting()
        if self.predecessor is not None:
            from ztunnel import handover

            handover.release(self.predecessor)  # we stop on purpose: no take-back for us
            self.predecessor = None
        if self.handover is not None and not self._kept:
            self.handover.close(unlink=not self.handed_over)
        loop = asyncio.get_running_loop()
        timeout = self.drain_timeout()
        deadline = loop.time() + timeout if timeout > 0 else float("inf")
        if self.handed_over:
            log.info(
                "handed over: serving %d connections until they end", len(self.ctx.connections)
            )
        h3 = self._h3
        # HTTP/3 connections (GOAWAY sent by listener.close) live on their UDP socket, which is
        # therefore held until they end or the drain times out.
        await wait_idle(
            lambda: (
                not self._resume.is_set()
                and bool(self.ctx.connections or any(x.live_connections for x in h3))
            ),
            deadline,
        )
        if self._resume.is_set():
            return True
        if self.handover is not None:
            self.handover.close(unlink=False)  # the successor owns the path
        self._drop_kept()
        for transport in list(self.ctx.connections):
            transport.abort()
        for listener in h3:
            listener.abort()
        for task in self._tasks:
            task.cancel()
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRole:
    """Which worker of the proxy process `run_worker` runs."""

    serve_admin: bool
    """The first worker: the admin endpoint, and signals forwarded to the others."""
    children: Sequence[int] = ()
    """The first worker's extra workers (pids), which it waits for."""
    handed: handover.Handed | None = None
    """The predecessor's listeners, taken over by the first worker."""


EXTRA_WORKER = WorkerRole(serve_admin=False)


async def run_worker(
    settings: ProxySettings,
    args: argparse.Namespace,
    listeners: list[Listener],
    role: WorkerRole,
    ctx: ProxyContext | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT (or /quitquitquit), then drain. The first worker
    also forwards the signal to the other workers and waits for them. `ctx`: a prepared
    context (control-plane mode); default: static mode from --mesh-config/--ca-dir."""
    ctx = ctx if ctx is not None else static_context(settings, args)
    serve_admin, children, handed = role.serve_admin, role.children, role.handed
    # Take-back (the successor dies after READY): single-worker proxies only; the extra workers
    # of a multi-worker proxy drain for good once told (SIGUSR1).
    proxy = NodeProxy(
        ctx, listeners, serve_admin=serve_admin, handed=handed, take_back=not children
    )
    loop = asyncio.get_running_loop()
    stop_on_signals(proxy.terminate, loop)
    if not serve_admin:
        # From the first worker: listeners handed to a successor (drain without deadline).
        loop.add_signal_handler(signal.SIGUSR1, proxy.handed_over_elsewhere)
    if args.mesh_config is not None and not getattr(args, "xds_address", None):

        def reload() -> None:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
            reload_static_config(ctx, args.mesh_config)

        loop.add_signal_handler(signal.SIGHUP, reload)
    lost: list[int] = []

    async def watch_children() -> None:
        # Polling, because uvloop reserves SIGCHLD for its own subprocess support.
        while not ctx.draining:
            for pid in children:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, -1
                if done and not ctx.draining:
                    # Fail fast: a proxy with a dead worker is restarted whole by its supervisor
                    # (kubelet) rather than limping on with fewer workers.
                    log.error("worker %d exited (status %d): stopping", pid, status)
                    lost.append(pid)
                    proxy.stop()
                    return
            await asyncio.sleep(0.5)

    watcher = loop.create_task(watch_children()) if children else None
    await proxy.start()
    tune_gc()
    timeout = await serve_until_drained(proxy, children)
    if watcher is not None:
        watcher.cancel()
    for pid in children:
        if pid not in lost:
            await _wait_child(pid, timeout + 5 if timeout else float("inf"))
    return 1 if lost else 0


async def serve_until_drained(proxy: NodeProxy, children: Sequence[int]) -> float:
    """Serve until stopped, then drain (telling the extra workers); again after a take-back.
    Returns the last drain's timeout."""
    while True:
        await proxy.wait_stopped()
        timeout = proxy.drain_timeout()
        log.info("draining (timeout %s)", f"{timeout:.0f}s" if timeout else "none")
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1 if proxy.handed_over else signal.SIGTERM)
        if not await proxy.drain():
            return timeout
        await proxy.resume()


async def _wait_child(pid: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim(3), or None where it does not exist (musl, other platforms)."""
    try:
        libc = ctypes.CDLL(None)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM): a worker never outlives the first worker."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG (linux/prctl.h)


def enable_multiprocess_metrics() -> str:
    """Counters of all workers go to per-process files that the first worker aggregates
    (prometheus-client's multiprocess mode). Must run before any metric is created."""
    import tempfile

    from prometheus_client import values

    directory = tempfile.mkdtemp(prefix="ztunnel-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return directory


async def run_controlplane_mode(
    settings: ProxySettings,
    args: argparse.Namespace,
    *,
    children: Sequence[int] = (),
    offer_to: Sequence[socket.socket] = (),
    listeners: list[Listener] | None = None,
) -> int:
    """Control-plane mode: wait for the full state over xDS (bind mode binds HBONE listeners
    on local workloads' IPs), then run like static mode. The xDS client keeps running and
    swaps the state on every update; while the control plane is down the proxy keeps serving
    the last good state. The first worker binds the listeners and offers them to the extra
    workers (`offer_to`, `ztunnel.workers`); an extra worker is given them (`listeners`)."""
    ctx, xds = controlplane_context(settings, args)
    task = asyncio.get_running_loop().create_task(xds.run())
    try:
        while not xds.synced.is_set():
            log.info("waiting for the full state from %s", args.xds_address)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(xds.synced.wait(), 5)
        if listeners is not None:
            return await run_worker(settings, args, listeners, EXTRA_WORKER, ctx)
        loop = asyncio.get_running_loop()
        handed = await loop.run_in_executor(None, take_over, settings)
        listeners = bind_listeners(settings, ctx.state, handed)
        if offer_to:
            from ztunnel import workers

            for conn in offer_to:
                workers.offer_listeners(conn, [(lst.role, lst.sock) for lst in listeners])
        role = WorkerRole(serve_admin=True, children=children, handed=handed)
        return await run_worker(settings, args, listeners, role, ctx)
    finally:
        task.cancel()


def serve_controlplane(settings: ProxySettings, args: argparse.Namespace) -> int:
    """Control-plane mode: fork `--workers - 1` more workers before any gRPC exists in the
    process (`ztunnel.workers`), then run the first one here."""
    if args.workers <= 1:
        return asyncio.run(run_controlplane_mode(settings, args))
    import shutil

    from ztunnel import workers

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as in `serve`: until the loops handle them
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    metrics_dir = enable_multiprocess_metrics()

    def extra_worker(conn: socket.socket) -> int:
        _die_with_parent()
        given = [Listener(role, sock) for role, sock in workers.receive_listeners(conn)]
        return asyncio.run(run_controlplane_mode(settings, args, listeners=given))

    freeze_before_fork()
    try:
        children, ends = workers.fork_workers(args.workers - 1, extra_worker)
        return asyncio.run(run_controlplane_mode(settings, args, children=children, offer_to=ends))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def serve(settings: ProxySettings, args: argparse.Namespace) -> int:
    """Bind the listeners once, fork `--workers - 1` more workers, run the first one here."""
    if args.xds_address:
        return serve_controlplane(settings, args)
    state = MeshState.from_config(load_mesh_config(args.mesh_config))
    handed = take_over(settings)
    listeners = bind_listeners(settings, state, handed)
    # Until a worker's loop installs its SIGHUP handler (reload), a SIGHUP must not kill it:
    # the first worker may already be ready (and signalled) while the others are starting.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # likewise the hand-over notice
    if args.workers <= 1:
        role = WorkerRole(serve_admin=True, handed=handed)
        return asyncio.run(run_worker(settings, args, listeners, role))
    import shutil

    metrics_dir = enable_multiprocess_metrics()
    children: list[int] = []
    freeze_before_fork()
    try:
        for _ in range(args.workers - 1):
            pid = os.fork()
            if pid == 0:  # child: its own event loop on the shared sockets
                _die_with_parent()
                if handed is not None:  # the first worker alone holds the predecessor's end
                    handed.conn.close()
                code = 1
                try:
                    code = asyncio.run(run_worker(settings, args, listeners, EXTRA_WORKER))
                finally:
                    os._exit(code)
            children.append(pid)
        role = WorkerRole(serve_admin=True, children=children, handed=handed)
        return asyncio.run(run_worker(settings, args, listeners, role))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def take_over(settings: ProxySettings) -> handover.Handed | None:
    """With --handover-socket: the listening sockets of the node proxy running there, if any.
    A refused or broken hand-over is fatal (the predecessor keeps serving; the supervisor
    retries): never bind beside a running proxy."""
    if not settings.handover_socket:
        return None
    from ztunnel import handover

    try:
        handed = handover.obtain(Path(settings.handover_socket))
    except HandoverError as err:
        raise ConfigError("--handover-socket", str(err)) from err
    if handed is None:
        log.info("hand-over: no node proxy at %s, binding fresh", settings.handover_socket)
    return handed


def freeze_before_fork() -> None:
    """Move everything imported so far out of the collector's reach before forking workers, so
    a worker's collections never write the GC headers of the objects it shares with the first
    worker (each write copies a page: copy-on-write). Python's `gc.freeze` docs recommend
    exactly this ("gc.freeze() right before fork()"); each worker's `tune_gc` then freezes what
    it allocated itself at start-up."""
    gc.freeze()


def tune_gc() -> None:
    """Keep the cyclic GC off the data path: everything allocated at start-up (modules, config,
    certificates) is frozen out of collection, and young-generation passes run 100x less often
    (the relay creates few reference cycles; a full pass over a big heap is a latency spike)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 100)


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if not args.access_log:
        logging.getLogger("ztunnel.access").setLevel(logging.WARNING)
    loop_kind = select_event_loop("ZTUNNEL_UVLOOP")  # uvloop unless ZTUNNEL_UVLOOP=0
    log.info("starting node proxy %s (%s event loop)", settings.node, loop_kind)
    try:
        return serve(settings, args)
    except (MeshError, OSError) as err:
        log.error("fatal: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
