"""The `waypoint` process: the L7 proxy for the services/workloads bound to it.

Owns: flags -> `WaypointSettings`, loading config, building the `WaypointContext`, the HBONE
listeners, the admin listener (``--admin``, default 0.0.0.0:15020: ``/metrics``,
``/stats/prometheus``, ``/healthz/ready``, for Prometheus and the kubelet on the pod IP), the
debug listener (``--debug-listen``, default 127.0.0.1:15000, loopback only:
``/debug/config`` and ``/debug/clusters`` reveal every route and policy; as Envoy's admin
port 15000 in Istio), SIGHUP reload (static mode), graceful drain on SIGTERM.

Config channel (static mode, as the node proxy's ``--mesh-config``):
- ``--mesh-config``: workloads/services/policies (the node proxy's file format); it names the
  waypoint's own workload (``--workload-uid``, or found by its listen address) and, through
  each Service's/Workload's ``waypoint``, which traffic the waypoint serves;
- ``--config`` (repeatable): YAML files (multi-document, ``List`` accepted) with
  VirtualService, DestinationRule, HTTPRoute and AuthorizationPolicy objects exactly as users
  write them, plus optional ``kind: WorkloadLabels`` (uid -> labels) for subsets/selectors.
A bad file on reload is refused and the running config kept (never half-applied).
Control-plane mode (``--xds-address``, `waypoint.xds`): state and L7 objects over delta xDS,
certificates from the control plane's CA with the node's credential (``--node``,
``--node-credential-file``, ``--controlplane-roots``).
Certificates: signed by the mesh CA in ``--ca-dir`` (static mode), for the waypoint's own
identity ``spiffe://<td>/ns/<namespace>/sa/<service-account>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from meshcore import bootstrap
from meshcore.address import listen_address
from meshcore.ca import MeshCA
from meshcore.certs import CertificateManager, CertificateProvider, LocalCAProvider, utcnow
from meshcore.config.objects import parse_objects
from meshcore.config.pathnorm import PathPolicy
from meshcore.config.routes import WaypointConfig
from meshcore.errors import ConfigError, MeshError
from meshcore.hbone.pool import HbonePool, PoolLimits
from meshcore.opshttp import Handler as HttpHandler
from meshcore.opshttp import Response, json_response, require_loopback, serve_http
from meshcore.proto.yamlform import load_mesh_config
from meshcore.runtime import every, select_event_loop, stop_on_signals, wait_idle
from meshcore.sockets import make_listener
from meshcore.state import MeshState
from meshcore.telemetry import CONTENT_TYPE, text_exposition
from waypoint.context import WaypointContext, WaypointSettings
from waypoint.handler import Handler
from waypoint.metrics import WaypointMetrics
from waypoint.protocol.route import CompiledConfig
from waypoint.server import WaypointServer
from waypoint.tcp import TcpProxy
from waypoint.upgrade import PROTOCOL as UPGRADE_PROTOCOL
from waypoint.upgrade import UpgradeUpstreams
from waypoint.upstream import H1Upstreams, UpstreamPool, Upstreams

log = logging.getLogger("waypoint")

DEBUG_LOOPBACK_WHY = "/debug/config reveals every route and policy (metrics stay on --admin)"


def load_l7_config(paths: Sequence[Path], domain_suffix: str = "cluster.local") -> WaypointConfig:
    """Read every YAML document of `paths`; unreadable files are a ConfigError."""
    docs: list[Any] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
        try:
            docs.extend(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"invalid YAML: {exc}") from None
    return parse_objects(docs, domain_suffix=domain_suffix)


def build_context(
    settings: WaypointSettings,
    state: MeshState,
    config: WaypointConfig,
    provider: CertificateProvider,
) -> WaypointContext:
    ctx: WaypointContext

    async def client_context(identity: Any) -> Any:
        return await ctx.client_context(identity)

    ctx = WaypointContext(
        settings=settings,
        state=state,
        config=CompiledConfig(config),
        certs=CertificateManager(provider),
        pool=HbonePool(
            client_context,
            trust_domain=settings.trust_domain,
            limits=PoolLimits(connect_timeout=settings.connect_timeout),
        ),
        metrics=WaypointMetrics(),
    )
    ctx.metrics.log_enabled = settings.access_log
    ctx.warnings.extend(config.warnings)
    return ctx


@dataclass(slots=True)
class _Admin:
    server: asyncio.Server


class Waypoint:
    """One running waypoint: `start()`, then `drain()`."""

    def __init__(
        self, ctx: WaypointContext, *, debug_listen: tuple[str, int] | None = None
    ) -> None:
        if debug_listen is not None:
            require_loopback(debug_listen[0], "--debug-listen", DEBUG_LOOPBACK_WHY)
        self.ctx = ctx
        self.debug_listen = debug_listen
        loop_time = asyncio.get_running_loop().time
        self.upstream_pool = UpstreamPool(
            ctx.pool,
            ctx.settings.identity,
            clock=loop_time,
            idle_timeout=ctx.settings.idle_timeout,
        )
        upstreams: dict[str, Upstreams] = {"http/1.1": H1Upstreams(self.upstream_pool)}
        try:
            from waypoint.http2 import H2Upstreams

            upstreams["h2"] = H2Upstreams(ctx, self.upstream_pool)
        except ImportError:  # pragma: no cover - HTTP/2 edge not present
            pass
        upstreams[UPGRADE_PROTOCOL] = UpgradeUpstreams(ctx, self.upstream_pool)
        self.handler = Handler(ctx, upstreams)
        self.server = WaypointServer(ctx, self.handler, TcpProxy(ctx, self.upstream_pool))
        self.admin: asyncio.Server | None = None
        self.debug: asyncio.Server | None = None
        self.ready = False
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def listen_addresses(self) -> list[tuple[str, int]]:
        s = self.ctx.settings
        if s.listen:
            return list(s.listen)
        me = self.ctx.me
        if me is None:
            raise ConfigError("--workload-uid", "the waypoint's workload is not in the mesh state")
        return [(str(ip), 15008) for ip in me.addresses]

    async def start(self, socks: list[socket.socket] | None = None) -> None:
        ctx = self.ctx
        ctx.certs.add(ctx.settings.identity)
        self._tasks.append(asyncio.get_running_loop().create_task(ctx.certs.run()))
        await ctx.certs.get(ctx.settings.identity)
        if socks is None:
            socks = [make_listener(h, p) for h, p in self.listen_addresses()]
        bound = socks[0].getsockname()[0]
        if bound not in ("0.0.0.0", "::"):
            self.upstream_pool.source_ip = bound
        self.server.start(socks)
        if ctx.settings.admin is not None:
            self.admin = await self._serve_admin(*ctx.settings.admin)
        if self.debug_listen is not None:
            self.debug = await self._serve_debug(*self.debug_listen)
        self._tasks.append(asyncio.get_running_loop().create_task(every(10, self._sweep)))
        self.ready = True
        log.info(
            "waypoint %s/%s ready on %s as %s",
            ctx.settings.namespace,
            ctx.settings.name,
            ", ".join(f"{h}:{p}" for h, p in (s.getsockname()[:2] for s in socks)),
            ctx.settings.identity,
        )

    def _sweep(self) -> None:
        """Housekeeping (every 10 s, `meshcore.runtime.every`): idle upstream and HBONE
        connections are released."""
        self.upstream_pool.sweep()
        self.ctx.pool.sweep(asyncio.get_running_loop().time())

    def stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def drain(self, timeout: float = 5.0) -> None:
        self.ready = False
        self.ctx.draining = True
        self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for proto in list(self.server.protocols):
            proto.close()  # GOAWAY: in-flight streams finish
        await wait_idle(lambda: bool(self.server.protocols), deadline)
        for proto in list(self.server.protocols):
            proto.abort()
        self.upstream_pool.close_all()
        self.ctx.pool.close_all()
        for task in self._tasks:
            task.cancel()
        if self.admin is not None:
            self.admin.close()
        if self.debug is not None:
            self.debug.close()

    def debug_config(self) -> dict[str, Any]:
        ctx = self.ctx
        cfg = ctx.config.config
        return {
            "waypoint": {
                "name": ctx.settings.name,
                "namespace": ctx.settings.namespace,
                "identity": str(ctx.settings.identity),
                "workload": ctx.me.uid if ctx.me is not None else None,
            },
            "served_services": [s.key for s in ctx.state.services if ctx.is_me(s.waypoint)],
            "route_tables": [
                {
                    "kind": t.kind,
                    "name": f"{t.namespace}/{t.name}",
                    "hosts": list(t.hosts),
                    "routes": len(t.routes),
                }
                for t in cfg.route_tables
            ],
            "destination_rules": [
                {
                    "name": f"{d.namespace}/{d.name}",
                    "host": d.host,
                    "subsets": [s.name for s in d.subsets],
                }
                for d in cfg.destination_rules
            ],
            "policies": [
                {"name": p.key, "kind": p.kind, "action": p.action.value, "error": p.error}
                for p in cfg.policies
            ],
            "rate_limits": [
                {
                    "name": r.key,
                    "target": f"{r.target_kind}/{r.target_name}",
                    "total": r.total,
                    "identity": r.identity,
                }
                for r in cfg.rate_limits
            ],
            "l4_routes": [
                {"name": r.source, "hosts": list(r.hosts), "sni": list(r.sni)}
                for r in cfg.l4_routes
            ],
            "warnings": list(ctx.warnings),
        }

    def debug_clusters(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        out = []
        clusters = [c for _key, (_gen, c) in sorted(self.ctx.clusters.items())]
        clusters += [c for _key, c in sorted(self.ctx.workload_clusters.items())]
        for c in clusters:
            out.append(
                {
                    "cluster": c.name,
                    "active": c.active,
                    "pending": c.pending,
                    "overflows": c.overflows,
                    "endpoints": [
                        {
                            "uid": e.uid,
                            "address": f"{e.ip}:{e.port}",
                            "active": e.active,
                            "requests": e.requests,
                            "ejected": e.ejected(now),
                            "ejections": e.ejections,
                        }
                        for e in c.endpoints.values()
                    ],
                }
            )
        return out

    async def _serve_admin(self, host: str, port: int) -> asyncio.Server:
        """Metrics and readiness (no debug) over the shared operator HTTP server."""

        async def metrics(_m: str, _q: dict[str, list[str]]) -> Response:
            return 200, CONTENT_TYPE, text_exposition(self.ctx.metrics.registry)

        async def ready(_m: str, _q: dict[str, list[str]]) -> Response:
            if self.ready:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"

        routes: dict[str, HttpHandler] = {
            "/metrics": metrics,
            "/stats/prometheus": metrics,
            "/healthz/ready": ready,
        }
        return await serve_http(host, port, routes)

    async def _serve_debug(self, host: str, port: int) -> asyncio.Server:
        """The debug views, on a loopback address only (checked in __init__)."""

        async def config(_m: str, _q: dict[str, list[str]]) -> Response:
            return json_response(self.debug_config())

        async def clusters(_m: str, _q: dict[str, list[str]]) -> Response:
            return json_response(self.debug_clusters())

        routes: dict[str, HttpHandler] = {"/debug/config": config, "/debug/clusters": clusters}
        return await serve_http(host, port, routes)

    def reload(self, mesh_config: Path | None, configs: Sequence[Path]) -> bool:
        """SIGHUP: re-read both files; keep the running config if either is bad."""
        try:
            state = MeshState.from_config(load_mesh_config(mesh_config)) if mesh_config else None
            cfg = load_l7_config(configs, self.ctx.settings.domain_suffix)
        except (MeshError, OSError) as err:
            log.error("reload refused, keeping the running config: %s", err)
            return False
        if state is not None:
            self.ctx.set_state(state)
        self.ctx.set_config(cfg)
        self.ctx.warnings[:] = list(cfg.warnings)
        log.info(
            "config reloaded: %d route tables, %d destination rules, %d policies",
            len(cfg.route_tables),
            len(cfg.destination_rules),
            len(cfg.policies),
        )
        return True


def parse_args(argv: Sequence[str] | None = None) -> tuple[WaypointSettings, argparse.Namespace]:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="waypoint", description="ambient-mesh waypoint (L7 proxy)")
    p.add_argument("--name", default=env("WAYPOINT_NAME", "waypoint"), help="Gateway name")
    p.add_argument("--namespace", default=env("POD_NAMESPACE", "default"))
    p.add_argument(
        "--service-account",
        default=env("SERVICE_ACCOUNT"),
        help="identity's service account (default: --name)",
    )
    p.add_argument("--workload-uid", default=env("WORKLOAD_UID", ""))
    p.add_argument(
        "--mesh-config",
        type=Path,
        default=env("MESH_CONFIG"),
        help="static workloads/services/policies (node proxy format)",
    )
    p.add_argument(
        "--config",
        type=Path,
        action="append",
        default=[],
        help="YAML with VirtualService/DestinationRule/HTTPRoute/"
        "AuthorizationPolicy objects (repeatable)",
    )
    bootstrap.add_certificate_arguments(
        p, ca_dir_help="mesh CA directory for local signing (static mode)"
    )
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        help="HBONE listener host:port (default: own workload IPs :15008)",
    )
    p.add_argument(
        "--admin",
        default=env("WAYPOINT_ADMIN", "0.0.0.0:15020"),
        help="metrics/readiness host:port (Prometheus, probes)",
    )
    p.add_argument(
        "--debug-listen",
        default="127.0.0.1:15000",
        help="debug views: loopback host:port ('' = off)",
    )
    p.add_argument("--trust-domain", default=env("TRUST_DOMAIN", "cluster.local"))
    p.add_argument("--domain-suffix", default="cluster.local")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "info"))
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--drain-timeout", type=float, default=5.0)
    mesh = p.add_argument_group("mesh settings (request hygiene, waypoint.protocol.hygiene)")
    mesh.add_argument(
        "--path-normalization",
        default=env("PATH_NORMALIZATION", ""),
        help="Istio meshConfig.pathNormalization: NONE, BASE (default), "
        "MERGE_SLASHES, DECODE_AND_MERGE_SLASHES; overrides the control "
        "plane's mesh setting",
    )
    mesh.add_argument(
        "--escaped-slashes-action",
        default=env("ESCAPED_SLASHES_ACTION", ""),
        help="Envoy path_with_escaped_slashes_action: KEEP_UNCHANGED "
        "(default), REJECT_REQUEST, UNESCAPE_AND_REDIRECT, "
        "UNESCAPE_AND_FORWARD; overrides the control plane's mesh "
        "setting",
    )
    mesh.add_argument(
        "--accept-http-10",
        action="store_true",
        help="serve HTTP/1.0 requests (Envoy accept_http_10, Istio PILOT_HTTP10); "
        "default: 426 Upgrade Required",
    )
    cp = p.add_argument_group("control-plane mode (instead of --mesh-config/--config/--ca-dir)")
    bootstrap.add_arguments(
        cp, xds_help="control plane host:port: Address, Authorization and L7 config over delta xDS"
    )
    cp.add_argument(
        "--node",
        default=env("NODE_NAME", ""),
        help="the node this waypoint's pod runs on (its credential's node)",
    )
    args = p.parse_args(argv)
    args.debug = listen_address(args.debug_listen, "--debug-listen") if args.debug_listen else None
    if args.debug is not None:
        try:
            require_loopback(args.debug[0], "--debug-listen", DEBUG_LOOPBACK_WHY)
        except ConfigError as err:
            p.error(str(err))
    if args.xds_address:
        if args.mesh_config is not None or args.config:
            p.error("--xds-address excludes --mesh-config/--config (config comes over xDS)")
        if not args.node:
            p.error("--node is required with --xds-address (the credential's node)")
    else:
        if args.mesh_config is None:
            p.error("--mesh-config is required (or --xds-address for control-plane mode)")
        if args.ca_dir is None:
            p.error("--ca-dir is required in static mode")
    try:
        path_policy = PathPolicy.parse(args.path_normalization, args.escaped_slashes_action)
    except ValueError as err:
        p.error(f"--path-normalization/--escaped-slashes-action: {err}")
    settings = WaypointSettings(
        name=args.name,
        namespace=args.namespace,
        service_account=args.service_account or args.name,
        workload_uid=args.workload_uid,
        trust_domain=args.trust_domain,
        domain_suffix=args.domain_suffix,
        listen=tuple(listen_address(a, "--listen") for a in args.listen),
        admin=listen_address(args.admin, "--admin") if args.admin else None,
        access_log=args.access_log,
        accept_http_10=args.accept_http_10,
        path_policy=path_policy,
        path_override=(args.path_normalization, args.escaped_slashes_action),
    )
    return settings, args


async def run_controlplane(settings: WaypointSettings, args: argparse.Namespace) -> int:
    """Control-plane mode: wait for the full state (and this waypoint's own workload unless
    --listen is given), then serve; the xDS client keeps swapping state and config."""
    from waypoint.xds import controlplane_context

    ctx, client, _store = controlplane_context(settings, args, build_context)
    loop = asyncio.get_running_loop()
    task = loop.create_task(client.run())
    try:
        while not client.synced.is_set() or (not settings.listen and ctx.me is None):
            log.info(
                "waiting for the config from %s (synced=%s, own workload %s)",
                args.xds_address,
                client.synced.is_set(),
                "found" if ctx.me is not None else "not found",
            )
            client.updated.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.updated.wait(), 5)
        wp = Waypoint(ctx, debug_listen=args.debug)
        stop_on_signals(wp.stop, loop)
        await wp.start()
        await wp.wait_stopped()
        await wp.drain(args.drain_timeout)
        return 0
    finally:
        task.cancel()


async def run(settings: WaypointSettings, args: argparse.Namespace) -> int:
    if args.xds_address:
        return await run_controlplane(settings, args)
    state = MeshState.from_config(load_mesh_config(args.mesh_config))
    config = load_l7_config(args.config, settings.domain_suffix)
    for w in config.warnings:
        log.warning("config: %s", w)
    ca = MeshCA.load_or_create(args.ca_dir, trust_domain=settings.trust_domain)
    provider = LocalCAProvider(ca, ttl=timedelta(seconds=args.cert_ttl), clock=utcnow)
    ctx = build_context(settings, state, config, provider)
    wp = Waypoint(ctx, debug_listen=args.debug)
    loop = asyncio.get_running_loop()
    stop_on_signals(wp.stop, loop)
    loop.add_signal_handler(signal.SIGHUP, lambda: wp.reload(args.mesh_config, args.config))
    await wp.start()
    await wp.wait_stopped()
    await wp.drain(args.drain_timeout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    select_event_loop("WAYPOINT_UVLOOP")  # uvloop unless WAYPOINT_UVLOOP=0
    try:
        return asyncio.run(run(settings, args))
    except ConfigError as err:
        print(f"waypoint: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
