"""The `ambient-controlplane` process: config sources -> store -> translation -> xDS + CA.

Owns: flag parsing into `ControlPlaneSettings`, the `ControlPlane` object (used as is by tests
and the benchmark), the translate-and-publish loop, and serving gRPC (xDS + CA on one port,
15012), debug HTTP (loopback 15014) and metrics/readiness HTTP (``--metrics-listen``).

Invariants:
- One port for xDS and CA, TLS with a serving certificate from the mesh CA (DNS SANs
  ``ambient-controlplane.<ns>.svc`` etc.); ``--plaintext`` serves without TLS and is refused on
  anything but a loopback address (lab only).
- Node authentication is mandatory (`check_node_auth`, run before anything listens): without
  ``--node-credentials`` or ``--token-review-account`` any caller could claim any node name and
  read the whole xDS state, so the control plane refuses to start, unless
  ``--insecure-no-node-auth`` is given AND ``--listen`` is a loopback address (tests,
  benchmarks). Even then the CA signs nothing (no caller is authenticated).
- The debug listener (``/debug/config`` shows every workload and policy) binds loopback only
  (`meshcore.opshttp.require_loopback`); ``--metrics-listen`` (pod IP, for Prometheus) serves
  only ``/metrics`` and ``/ready``.
- gRPC is served only after every configured source has done its first full read (bounded by
  ``--sync-timeout``), so the first full state a node proxy receives is complete.
- Mesh-wide waypoint settings (``--path-normalization``, ``--escaped-slashes-action``) are
  served to waypoints as the ``MeshSettings`` L7 resource (`meshcore.proto.l7res`) when set.
- Translation runs on the latest store snapshot, coalescing bursts of changes: the loop wakes
  on any change and translates whatever the store holds then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from controlplane.auth import (
    Authenticator,
    CertificatePrincipals,
    NodeCredentials,
    ServiceAccountTokenReview,
    TokenReviewSettings,
    auth_interceptors,
    restrict_waypoints,
)
from controlplane.ca import CertificateService, IssuancePolicy, serving_certificate
from controlplane.debug import json_response, metrics_response, serve_debug
from controlplane.l7 import (
    FindingsCache,
    NamespaceCache,
    gateway_findings,
    l7_findings,
    l7_resources,
    merge_findings,
    peer_authentication_findings,
    reserved_name_findings,
    unimplemented_findings,
)
from controlplane.metrics import ControlPlaneMetrics
from controlplane.sources.files import ManifestDirectory
from controlplane.status import StatusWriter
from controlplane.store import ConfigStore
from controlplane.translate import TranslateOptions
from controlplane.translator import Translator
from controlplane.waypoints import WaypointController, WaypointSettings
from controlplane.xds import XdsServer
from meshcore import bootstrap
from meshcore.address import listen_address
from meshcore.ca import MeshCA
from meshcore.certs import utcnow
from meshcore.config.findings import Finding
from meshcore.config.pathnorm import PathPolicy
from meshcore.errors import ConfigError, MeshError
from meshcore.identity import SpiffeId
from meshcore.kubeapi import KubeApi
from meshcore.opshttp import is_loopback, require_loopback
from meshcore.proto.l7res import L7_TYPE, L7Resource, MeshSettings, pack_l7
from meshcore.runtime import stop_on_signals
from meshcore.telemetry import version

log = logging.getLogger("controlplane")


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPlaneSettings:
    listen: str = "0.0.0.0:15012"
    """xDS + CA gRPC address."""
    debug_listen: str | None = "127.0.0.1:15014"
    """Debug + metrics + readiness; a loopback address only (`check_listeners`)."""
    metrics_listen: str | None = None
    """Metrics + readiness only (no debug), e.g. the pod IP for Prometheus; None = off."""
    manifest_dir: Path | None = None
    kubernetes: bool = False
    kubeconfig: Path | None = None
    ca_dir: Path | None = None
    additional_roots: Path | None = None
    """PEM file of extra trusted roots (root rollover)."""
    node_credentials: Path | None = None
    token_review_accounts: tuple[str, ...] = ()
    """In-cluster auth: node proxy service accounts (system:serviceaccount:<ns>:<sa>)."""
    token_audiences: tuple[str, ...] = ()
    plaintext: bool = False
    insecure_no_node_auth: bool = False
    """Serve xDS to unauthenticated callers; allowed on a loopback ``listen`` only."""
    options: TranslateOptions = field(default_factory=TranslateOptions)
    namespace: str = "istio-system"
    """Where the control plane runs (its serving certificate's DNS names)."""
    poll_interval: float = 0.2
    sync_timeout: float = 30.0
    cert_ttl: float = 24 * 3600
    waypoints: WaypointSettings | None = None
    """In-cluster waypoint controller (with --kubernetes, not with --manifest-dir); None = off."""
    waypoint_interval: float = 10.0
    mesh: MeshSettings = field(default_factory=MeshSettings)
    """Mesh-wide waypoint settings (Istio meshConfig ``pathNormalization``, Envoy's escaped-
    slashes action), served to every waypoint as the ``MeshSettings`` L7 resource when set."""


NO_NODE_AUTH = (
    "no node authentication: any caller could claim any node name and read every workload, "
    "service and policy over xDS; give --node-credentials (lab) or --token-review-account "
    "(in cluster), or --insecure-no-node-auth with a loopback --listen (tests only)"
)


def _host(address: str, flag: str = "--listen") -> str:
    return listen_address(address, flag)[0]


def check_node_auth(s: ControlPlaneSettings) -> None:
    """Refuse settings that would serve the mesh's state to unauthenticated callers."""
    if s.node_credentials is not None or s.token_review_accounts:
        return
    if not s.insecure_no_node_auth:
        raise ConfigError("--node-credentials/--token-review-account", NO_NODE_AUTH)
    if not is_loopback(_host(s.listen)):
        raise ConfigError(
            "--insecure-no-node-auth",
            f"--listen {s.listen} is not a loopback address; {NO_NODE_AUTH}",
        )


def check_listeners(s: ControlPlaneSettings) -> None:
    """Plaintext gRPC and the debug endpoints on loopback only (see module doc)."""
    if s.plaintext:
        require_loopback(_host(s.listen), "--plaintext", "plaintext serving is for a local lab")
    if s.debug_listen:
        require_loopback(
            _host(s.debug_listen, "--debug-listen"),
            "--debug-listen",
            "/debug/config shows every workload and policy; use --metrics-listen for Prometheus",
        )


class ControlPlane:
    """Sources, store, translator, xDS and CA, wired together. `start()` then `stop()`."""

    def __init__(self, settings: ControlPlaneSettings, *, ca: MeshCA | None = None) -> None:
        check_node_auth(settings)  # before anything is created or bound
        check_listeners(settings)
        self.settings = settings
        self.metrics = ControlPlaneMetrics()
        self.store = ConfigStore()
        self.translator = Translator(settings.options)
        self.authenticator: Authenticator = (
            NodeCredentials.load(settings.node_credentials)
            if settings.node_credentials is not None
            else ServiceAccountTokenReview(
                TokenReviewSettings(
                    accounts=settings.token_review_accounts,
                    audiences=settings.token_audiences,
                    waypoints=settings.waypoints is not None,
                ),
                kubeconfig=settings.kubeconfig,
            )
        )
        self.xds = XdsServer(
            metrics=self.metrics,
            authenticator=self.authenticator
            if settings.node_credentials or settings.token_review_accounts
            else None,
        )
        if ca is None:
            if settings.ca_dir is None:
                raise ConfigError("--ca-dir", "the control plane needs a CA directory")
            ca = MeshCA.load_or_create(settings.ca_dir, trust_domain=settings.options.trust_domain)
        if settings.additional_roots is not None:
            ca.add_trusted_root(settings.additional_roots.read_bytes())
        self.ca = ca
        self.ca_service = CertificateService(
            ca,
            # Waypoints' tokens (TokenReview) get certificates for their own identity only.
            authenticator=CertificatePrincipals(self.authenticator)
            if isinstance(self.authenticator, ServiceAccountTokenReview)
            else self.authenticator,
            policy=IssuancePolicy(
                may_impersonate=restrict_waypoints(self.translator.may_impersonate),
                default_ttl=timedelta(seconds=settings.cert_ttl),
            ),
            metrics=self.metrics,
        )
        self.files = (
            ManifestDirectory(
                settings.manifest_dir, self.store, poll_interval=settings.poll_interval
            )
            if settings.manifest_dir is not None
            else None
        )
        self.kube: Any = None
        self.waypoints: WaypointController | None = None
        self.server: grpc.aio.Server | None = None
        self.debug_server: asyncio.Server | None = None
        self.metrics_server: asyncio.Server | None = None
        self.metrics_port = 0
        self.port = 0
        self.debug_port = 0
        self.ready = False
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.translations = 0
        self._l7_parsed: dict[str, L7Resource] | None = None
        self._l7_findings: dict[str, list[Finding]] = {}
        self._l7_ns_cache: NamespaceCache = {}
        self._l7_packed: dict[str, tuple[L7Resource, Any]] = {}
        self._l7_findings_cache: FindingsCache = {}
        self.findings: dict[str, list[Finding]] = {}
        """``Kind ns/name`` -> field findings of the L7 objects (as waypoints parse them)."""
        self.status_writer: StatusWriter | None = None
        self._status_wake = asyncio.Event()
        self.store.subscribe(lambda _snap: self._dirty.set())

    # ---- translation

    def translate_now(self) -> None:
        """Translate the current snapshot and publish the delta (also used by the loop)."""
        t0 = time.monotonic()
        delta = self.translator.update(self.store.snapshot)
        if delta:
            self.xds.publish(delta, changed_at=t0)
        # Waypoints' L7 objects after the Address/Authorization records they refer to.
        l7 = l7_resources(self.store.snapshot, self.settings.options, self._l7_ns_cache)
        if self.settings.mesh != MeshSettings():
            mesh = self.settings.mesh.resource()
            l7 = {**l7, mesh.key: mesh}
        if l7 != self._l7_parsed:  # re-packed and re-parsed only when one changed (memoised)
            packed = {}
            for k, r in l7.items():  # pack only what changed; unchanged = the same Any object
                prev = self._l7_packed.get(k)
                packed[k] = prev[1] if prev is not None and prev[0] == r else pack_l7(r)
            self._l7_packed = {k: (l7[k], packed[k]) for k in l7}
            self.xds.publish_set(L7_TYPE, packed, changed_at=t0)
            self._l7_parsed = l7
            self._l7_findings = l7_findings(l7, self._l7_findings_cache)
        snapshot = self.store.snapshot
        findings = merge_findings(
            self._l7_findings,
            gateway_findings(snapshot),
            peer_authentication_findings(snapshot),
            unimplemented_findings(snapshot),
            reserved_name_findings(snapshot),
        )
        if findings != self.findings and self.waypoints is not None:
            self.waypoints.kick()  # it writes waypoint Gateways' conditions from the findings
        self.findings = findings
        self._status_wake.set()
        self.translations += 1
        self.metrics.translate_seconds.observe(time.monotonic() - t0)
        self.metrics.objects.set(self.store.snapshot.count())
        self.metrics.warnings.set(len(self.warnings()))

    async def _translate_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                self.translate_now()
            except Exception:
                log.exception("translation failed; keeping the previous config")

    def warnings(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for ref, msg in self.store.source_warnings().items():
            out.setdefault(ref, []).append(msg)
        for w in self.translator.warnings():
            if w.message.startswith("[AMB02"):
                continue  # a policy's field finding: in self.findings too
            out.setdefault(w.ref, []).append(w.message)
        for ref, findings in self.findings.items():
            out.setdefault(ref, []).extend(f"[{f.code}] {f.render()}" for f in findings)
        return out

    # ---- lifecycle

    async def start(self) -> None:
        s = self.settings
        host = _host(s.listen)
        if not (s.node_credentials or s.token_review_accounts):
            log.warning("--insecure-no-node-auth: xDS is served to anyone on %s", s.listen)
        loop = asyncio.get_running_loop()
        if self.files is not None:
            self.files.scan()
            self._tasks.append(loop.create_task(self.files.run()))
        if s.kubernetes:
            from controlplane.sources.kube import KubernetesSource

            self.kube = KubernetesSource(self.store, kube=KubeApi(kubeconfig=s.kubeconfig))
            self._tasks.append(loop.create_task(self.kube.run()))
            try:
                await asyncio.wait_for(self.kube.synced.wait(), s.sync_timeout)
            except TimeoutError:
                log.warning("Kubernetes not synced after %.0fs; serving anyway", s.sync_timeout)
        if s.kubernetes and s.manifest_dir is None and s.waypoints is not None:
            # The control plane's TLS roots go to the waypoints (plaintext: none).
            wp = s.waypoints
            if not s.plaintext and not wp.roots_pem:
                wp = replace(wp, roots_pem=self.ca.roots_pem.decode())
            self.waypoints = WaypointController(
                wp,
                domain_suffix=s.options.domain_suffix,
                kube=KubeApi(kubeconfig=s.kubeconfig),
                interval=s.waypoint_interval,
                findings=lambda: self.findings,
            )
            controller = self.waypoints
            self.store.subscribe(lambda _snap: controller.kick())
            self._tasks.append(loop.create_task(controller.run()))
        if s.kubernetes and s.manifest_dir is None:
            # Findings go into the objects' status (validationMessages / route conditions).
            self.status_writer = StatusWriter(
                KubeApi(kubeconfig=s.kubeconfig), gateways=self.waypoints is None
            )
            self._tasks.append(
                loop.create_task(
                    self.status_writer.run(
                        lambda: (self.store.snapshot, self.findings),
                        self._status_wake,
                        lambda: utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
                    )
                )
            )
        self.translate_now()
        self._dirty.clear()
        # The initial config (objects, records, serialised resources) lives as long as it is
        # unchanged: keep it out of the cyclic GC's scans. A full collection over it costs
        # ~100 ms at 10,000 pods, a stall of every push in flight (issue 14 bench). Objects
        # freed later are still freed by reference counting.
        gc.collect()
        gc.freeze()
        self._tasks.append(loop.create_task(self._translate_loop()))

        server = grpc.aio.server(
            interceptors=auth_interceptors(self.authenticator),
            options=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ],
        )
        server.add_generic_rpc_handlers(
            (self.xds.method_handlers(), self.ca_service.method_handlers())
        )
        if s.plaintext:
            self.port = server.add_insecure_port(s.listen)
        else:
            dns = [
                f"ambient-controlplane.{s.namespace}.svc",
                f"ambient-controlplane.{s.namespace}.svc.{s.options.domain_suffix}",
            ]
            key, chain = serving_certificate(
                self.ca,
                dns_names=dns,
                spiffe_id=SpiffeId(
                    trust_domain=s.options.trust_domain,
                    namespace=s.namespace,
                    service_account="ambient-controlplane",
                ),
                now=utcnow(),
            )
            creds = grpc.ssl_server_credentials([(key, chain)])
            self.port = server.add_secure_port(s.listen, creds)
        if self.port == 0:
            raise ConfigError("--listen", f"cannot listen on {s.listen}")
        await server.start()
        self.server = server
        if s.debug_listen:
            dhost, dport = listen_address(s.debug_listen, "--debug-listen")
            self.debug_server = await serve_debug(dhost, dport, self._routes())
            self.debug_port = self.debug_server.sockets[0].getsockname()[1]
        if s.metrics_listen:
            mhost, mport = listen_address(s.metrics_listen, "--metrics-listen")
            routes = self._routes()
            public = {p: routes[p] for p in ("/metrics", "/ready")}
            self.metrics_server = await serve_debug(mhost, mport, public)
            self.metrics_port = self.metrics_server.sockets[0].getsockname()[1]
        self.ready = True
        log.info(
            "control plane serving xDS+CA on %s:%d (%s), %d objects, %d records",
            host,
            self.port,
            "plaintext" if s.plaintext else "TLS",
            self.store.snapshot.count(),
            len(self.translator.records()),
        )

    def _routes(self) -> dict[str, Any]:
        def store_counts() -> Any:
            return {
                ns: {
                    "pods": len(o.pods),
                    "services": len(o.services),
                    "authorization_policies": len(o.authorization_policies),
                    "peer_authentications": len(o.peer_authentications),
                    "other": len(o.stored) + len(o.slices) + len(o.service_accounts),
                }
                for ns, o in sorted(self.store.snapshot.namespaces.items())
            }

        return {
            "/debug/connections": lambda: json_response(self.xds.debug_connections()),
            "/debug/warnings": lambda: json_response(self.warnings()),
            "/debug/config": lambda: json_response(
                sorted((r.to_dict() for r in self.translator.records()), key=str)
            ),
            "/debug/store": lambda: json_response(store_counts()),
            "/version": lambda: json_response({"component": "controlplane", "version": version()}),
            "/metrics": lambda: metrics_response(self.metrics.registry),
            "/ready": lambda: (
                (200, "text/plain", b"ready\n")
                if self.ready
                else (503, "text/plain", b"not ready\n")
            ),
        }

    async def stop(self, grace: float = 0.0) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.server is not None:
            await self.server.stop(grace)
        if self.debug_server is not None:
            self.debug_server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if isinstance(self.authenticator, ServiceAccountTokenReview):
            await self.authenticator.close()


def parse_args(argv: Sequence[str] | None = None) -> ControlPlaneSettings:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="ambient-controlplane", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default=env("LISTEN", "0.0.0.0:15012"), help="xDS + CA address")
    p.add_argument(
        "--debug-listen",
        default="127.0.0.1:15014",
        help="debug/metrics/readiness, loopback only; '' = off",
    )
    p.add_argument(
        "--metrics-listen",
        default=env("METRICS_LISTEN", ""),
        help="/metrics and /ready only (e.g. $(POD_IP):15014); '' = off",
    )
    p.add_argument("--manifest-dir", type=Path, default=env("MANIFEST_DIR"))
    p.add_argument("--kubernetes", action="store_true", help="watch the Kubernetes API")
    p.add_argument("--kubeconfig", type=Path, default=env("KUBECONFIG"))
    bootstrap.add_certificate_arguments(
        p, ca_dir_help="the mesh CA's directory (created on first use)", required=True
    )
    p.add_argument("--additional-roots", type=Path, help="extra trusted roots (rollover)")
    p.add_argument("--node-credentials", type=Path, help="YAML {node: token} (lab)")
    p.add_argument(
        "--token-review-account",
        action="append",
        default=[],
        help="TokenReview auth: a node proxy service account (system:serviceaccount:<ns>:<sa>)",
    )
    p.add_argument("--token-audience", action="append", default=[], help="TokenReview audience")
    p.add_argument("--plaintext", action="store_true", help="no TLS (loopback lab only)")
    p.add_argument(
        "--insecure-no-node-auth",
        action="store_true",
        help="serve xDS without node authentication (loopback --listen only; tests)",
    )
    p.add_argument("--trust-domain", default=env("TRUST_DOMAIN", "cluster.local"))
    p.add_argument("--cluster-id", default=env("CLUSTER_ID", "Kubernetes"))
    p.add_argument("--domain-suffix", default="cluster.local")
    p.add_argument("--root-namespace", default="istio-system")
    p.add_argument("--namespace", default=env("POD_NAMESPACE", "istio-system"))
    p.add_argument("--network", default="")
    p.add_argument("--poll-interval", type=float, default=0.2)
    p.add_argument("--log-level", default=env("LOG_LEVEL", "info"))
    mesh = p.add_argument_group("mesh settings served to waypoints (they override with flags)")
    mesh.add_argument(
        "--path-normalization",
        default=env("PATH_NORMALIZATION", ""),
        help="Istio meshConfig.pathNormalization.normalization: NONE, BASE "
        "(default), MERGE_SLASHES, DECODE_AND_MERGE_SLASHES",
    )
    mesh.add_argument(
        "--escaped-slashes-action",
        default=env("ESCAPED_SLASHES_ACTION", ""),
        help="Envoy path_with_escaped_slashes_action: KEEP_UNCHANGED "
        "(default), REJECT_REQUEST, UNESCAPE_AND_REDIRECT, "
        "UNESCAPE_AND_FORWARD",
    )
    wp = p.add_argument_group("in-cluster waypoints (with --kubernetes, without --manifest-dir)")
    wp.add_argument(
        "--waypoint-image",
        default=env("WAYPOINT_IMAGE"),
        help="waypoint Deployments' image; unset = no waypoint controller",
    )
    wp.add_argument("--waypoint-image-pull-policy", default="IfNotPresent")
    wp.add_argument(
        "--waypoint-xds-address",
        default=env("WAYPOINT_XDS_ADDRESS"),
        help="control plane address for waypoints "
        "(default ambient-controlplane.<namespace>.svc:15012)",
    )
    wp.add_argument(
        "--waypoint-token-audience",
        default=None,
        help="audience of the waypoints' projected token (default: first --token-audience)",
    )
    wp.add_argument(
        "--waypoint-arg",
        action="append",
        default=[],
        help="extra argument for the waypoint command (repeatable)",
    )
    wp.add_argument("--waypoint-resync", type=float, default=10.0)
    wp.add_argument(
        "--tracing-address",
        default=env("TRACING_ADDRESS", ""),
        help="OTLP gRPC collector host:port for the waypoints' spans (their "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; default off)",
    )
    wp.add_argument(
        "--tracing-sampling",
        type=float,
        default=1.0,
        metavar="PERCENT",
        help="percent of new traces the waypoints sample, 0-100 "
        "(Istio's tracing.sampling; default 1)",
    )
    args = p.parse_args(argv)
    if args.manifest_dir is None and not args.kubernetes:
        p.error("give --manifest-dir and/or --kubernetes")
    try:
        PathPolicy.parse(args.path_normalization, args.escaped_slashes_action)
    except ValueError as err:
        p.error(f"--path-normalization/--escaped-slashes-action: {err}")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    waypoints = None
    if not 0 <= args.tracing_sampling <= 100:
        p.error(f"--tracing-sampling {args.tracing_sampling}: not within 0-100 (percent)")
    if args.waypoint_image:
        server_name = f"ambient-controlplane.{args.namespace}.svc"
        audience = args.waypoint_token_audience or (
            args.token_audience[0] if args.token_audience else "ambient-controlplane"
        )
        waypoints = WaypointSettings(
            image=args.waypoint_image,
            image_pull_policy=args.waypoint_image_pull_policy,
            xds_address=args.waypoint_xds_address or f"{server_name}:15012",
            controlplane_server_name=server_name,
            token_audience=audience,
            trust_domain=args.trust_domain,
            extra_args=tuple(args.waypoint_arg),
            cluster_id=args.cluster_id,
            tracing_address=args.tracing_address,
            tracing_sampling=args.tracing_sampling,
        )
    return ControlPlaneSettings(
        mesh=MeshSettings(
            path_normalization=args.path_normalization.upper(),
            escaped_slashes_action=args.escaped_slashes_action.upper(),
        ),
        waypoints=waypoints,
        waypoint_interval=args.waypoint_resync,
        listen=args.listen,
        debug_listen=args.debug_listen or None,
        metrics_listen=args.metrics_listen or None,
        insecure_no_node_auth=args.insecure_no_node_auth,
        manifest_dir=args.manifest_dir,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        ca_dir=args.ca_dir,
        additional_roots=args.additional_roots,
        node_credentials=args.node_credentials,
        token_review_accounts=tuple(args.token_review_account),
        token_audiences=tuple(args.token_audience),
        plaintext=args.plaintext,
        namespace=args.namespace,
        poll_interval=args.poll_interval,
        cert_ttl=args.cert_ttl,
        options=TranslateOptions(
            cluster_id=args.cluster_id,
            trust_domain=args.trust_domain,
            domain_suffix=args.domain_suffix,
            root_namespace=args.root_namespace,
            network=args.network,
        ),
    )


async def run(settings: ControlPlaneSettings) -> None:
    cp = ControlPlane(settings)
    stop = asyncio.Event()
    stop_on_signals(stop.set)
    await cp.start()
    await stop.wait()
    log.info("stopping")
    await cp.stop(grace=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        asyncio.run(run(settings))
    except (MeshError, OSError) as err:
        log.error("fatal: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
