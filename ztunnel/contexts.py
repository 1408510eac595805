"""How a node proxy gets its `ProxyContext` (state, certificates, pool, telemetry): static
(`static_context`: --mesh-config, certificates from the local CA in --ca-dir; SIGHUP re-reads
the file, `reload_static_config`) or fed by the control plane (`controlplane_context`: delta xDS
and the control plane's CA). The processes' lifecycle around it is `ztunnel.app`'s.

Invariants: a context's state is replaced in one assignment (readers see the old or the new
snapshot, never a half-applied one); a bad mesh config at reload is refused and the running one
kept; gRPC and the xDS/CA clients are imported by `controlplane_context` only (a static node
proxy's worker does not carry them: bench/README.md, Memory); `cryptography` is imported by no
worker in either mode (HBONE over TCP; --http3 loads it with aioquic): keys, CSRs, signing and
chain checks run in `meshcore.certhelper`'s short-lived helper processes.
"""

from __future__ import annotations

import argparse
import logging
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from meshcore.certhelper import CertHelper, local_provider
from meshcore.certs import CertificateManager, CertificateProvider
from meshcore.errors import ConfigError, MeshError
from meshcore.hbone.pool import HbonePool
from meshcore.proto.yamlform import load_mesh_config
from meshcore.state import MeshState
from meshcore.tracing import Tracer
from ztunnel.metrics import ConnectionTracker, ProxyMetrics
from ztunnel.proxy.context import ProxyContext, ProxySettings

if TYPE_CHECKING:
    from meshcore.xds import XdsClient

log = logging.getLogger("ztunnel")


def _tracer(settings: ProxySettings) -> Tracer | None:
    if not settings.tracing_address:
        return None
    return Tracer(
        settings.tracing_address,
        "ztunnel",
        {"k8s.node.name": settings.node, "istio.cluster_id": settings.cluster_id},
    )


def build_context(
    settings: ProxySettings, state: MeshState, provider: CertificateProvider
) -> ProxyContext:
    metrics = ProxyMetrics()
    ctx = ProxyContext(
        settings=settings,
        state=state,
        certs=CertificateManager(provider),
        metrics=metrics,
        tracker=ConnectionTracker(
            metrics, settings.cluster_id, _tracer(settings), settings.tracing_sampler
        ),
        pool=HbonePool(
            lambda ident: ctx.client_context(ident),
            trust_domain=settings.trust_domain,
            cert_for=lambda ident: ctx.certs.get(ident),
        ),
    )
    return ctx


def static_context(settings: ProxySettings, args: argparse.Namespace) -> ProxyContext:
    """No control plane: state from --mesh-config, certificates signed by the CA in --ca-dir."""
    state = MeshState.from_config(load_mesh_config(args.mesh_config))
    if args.ca_dir is None:
        raise ConfigError("--ca-dir", "static mode signs certificates locally and needs a CA dir")
    ttl = timedelta(seconds=args.cert_ttl)  # the CA read and the signing: in helper processes
    return build_context(
        settings, state, local_provider(args.ca_dir, settings.trust_domain, ttl=ttl)
    )


def reload_static_config(ctx: ProxyContext, path: Path) -> bool:
    """SIGHUP in static mode: re-read the mesh config and swap the state in one assignment.
    A bad file is reported and the running config kept (never a half-applied or empty state).
    In bind capture, listeners for newly added local workloads need a restart (transparent
    capture has none to add)."""
    try:
        state = MeshState.from_config(load_mesh_config(path))
    except (MeshError, OSError) as err:
        log.error("config reload from %s refused, keeping the running config: %s", path, err)
        ctx.metrics.config_reloads.labels("refused").inc()
        return False
    ctx.state = state
    ctx.metrics.config_reloads.labels("applied").inc()
    ctx.sync_local_identities()
    log.info(
        "config reloaded from %s: %d workloads, %d services, %d policies",
        path,
        len(state.workloads),
        len(state.services),
        len(state.policies),
    )
    return True


def controlplane_context(
    settings: ProxySettings, args: argparse.Namespace
) -> tuple[ProxyContext, XdsClient]:
    """Control-plane mode: state from delta xDS; certificates from the control plane's CA
    (--ca-address, default the xDS address) unless --ca-dir is given without --ca-address
    (local signing)."""
    from meshcore.bootstrap import Bootstrap, certificate_provider, endpoints
    from meshcore.xds import XdsClient, XdsSettings

    xds_ep, ca_ep = endpoints(Bootstrap.from_args(args))
    provider = certificate_provider(
        ca_ep,
        ttl=timedelta(seconds=args.cert_ttl),
        local_ca_dir=None if args.ca_address else args.ca_dir,
        trust_domain=settings.trust_domain,
        helper=CertHelper(),
    )
    ctx = build_context(settings, MeshState.empty(), provider)

    def on_update(state: MeshState) -> None:
        ctx.state = state  # one assignment: readers see the old or the new snapshot
        ctx.sync_local_identities()

    client = XdsClient(
        xds_ep,
        XdsSettings(node=settings.node, on_demand=args.xds_on_demand),
        on_update=on_update,
    )
    if args.xds_on_demand:
        ctx.demand = client.demand
    ctx.metrics.xds_stats = client.stats
    return ctx, client
