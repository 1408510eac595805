"""The `ztunnel` command line: flags and their environment variables, read into `ProxySettings`.

Owns: `parse_args` (argv + environment -> `ProxySettings` and the raw namespace the process
still reads) and the ``host:port`` flag syntax.

Invariants: pure apart from reading ``os.environ`` for flag defaults; a bad value is a
`ConfigError` naming the flag, or argparse's usage error; nothing is bound or opened here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from meshcore import bootstrap
from meshcore.address import listen_address
from meshcore.errors import ConfigError
from meshcore.opshttp import is_loopback
from meshcore.telemetry import DEFAULT_CLUSTER_ID
from meshcore.tracing import Sampler, endpoint_from_env, sampler_from_env
from ztunnel.admin import ADMIN_LOOPBACK_WHY
from ztunnel.proxy.context import ProxySettings


def terminal_columns() -> int:
    """The width `shutil.get_terminal_size` gives argparse: ``COLUMNS`` when a positive number,
    else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's default formatter at argparse's default width: given the width, it does not
    import `shutil` (with `bz2` and `lzma`) for every parser built, which would make a worker
    carry them (bench/README.md, "Session 8: fewer modules per worker")."""
    return argparse.HelpFormatter(prog, width=terminal_columns() - 2)


def parse_args(argv: Sequence[str] | None = None) -> tuple[ProxySettings, argparse.Namespace]:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="ztunnel", description="ambient-mesh node proxy", formatter_class=help_formatter
    )
    p.add_argument("--node", default=env("NODE_NAME"), help="node name (env NODE_NAME)")
    p.add_argument("--node-ip", default=env("NODE_IP", "0.0.0.0"), help="address of this proxy")
    p.add_argument(
        "--mesh-config",
        type=Path,
        default=env("MESH_CONFIG"),
        help="static YAML of workloads/services/policies (no control plane)",
    )
    bootstrap.add_certificate_arguments(
        p, ca_dir_help="mesh CA directory for local signing (static mode)"
    )
    # Control-plane mode (issue 4): config over delta xDS, certificates from the control plane's
    # CA. Replaces --mesh-config / --ca-dir when given.
    bootstrap.add_arguments(
        p, xds_help="control plane host:port (15012) for delta xDS; replaces --mesh-config"
    )
    p.add_argument(
        "--xds-on-demand",
        action="store_true",
        default=env("XDS_ON_DEMAND", "") in ("1", "true", "True"),
        help="on-demand Address delivery (Istio XDS_ON_DEMAND): hold this node's workloads "
        "and what its pods connect to, looked up on first use, instead of the whole mesh",
    )
    p.add_argument("--trust-domain", default=env("TRUST_DOMAIN", "cluster.local"))
    p.add_argument(
        "--tracing-address",
        default=endpoint_from_env(),
        help="OTLP gRPC collector host:port for one span per connection "
        "(env OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT; default off)",
    )
    p.add_argument(
        "--tracing-sampling",
        type=float,
        default=None,
        metavar="PERCENT",
        help="percent of new connections traced, 0-100 (Istio's tracing.sampling); default "
        "env OTEL_TRACES_SAMPLER[_ARG], else all; a CONNECT's traceparent keeps its flag",
    )
    p.add_argument(
        "--cluster-id",
        default=env("CLUSTER_ID", DEFAULT_CLUSTER_ID),
        help="this cluster's id for telemetry (env CLUSTER_ID, as istiod)",
    )
    p.add_argument(
        "--admin-address",
        default=env("ADMIN_ADDRESS"),
        help="admin endpoint address (default 127.0.0.1; a loopback --node-ip on test hosts)",
    )
    p.add_argument("--capture", choices=("bind", "transparent"), default=env("CAPTURE", "bind"))
    p.add_argument(
        "--outbound-listen",
        action="append",
        default=[],
        help="bind mode: extra outbound listener host:port (e.g. a service VIP)",
    )
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument(
        "--tunnels-per-peer",
        type=int,
        default=int(env("TUNNELS_PER_PEER", "16384")),
        help="inbound tunnels one peer IP may have open at once (env TUNNELS_PER_PEER)",
    )
    p.add_argument(
        "--handover-socket",
        default=env("HANDOVER_SOCKET"),
        help="unix socket path: take the listeners from the proxy running there, then offer "
        "them to the next one (zero-drop upgrade; env HANDOVER_SOCKET)",
    )
    p.add_argument(
        "--ready-file",
        default=env("READY_FILE"),
        help="file created once ready (after the hand-over), removed at start and on drain "
        "(exec probes)",
    )
    p.add_argument(
        "--handover-drain-timeout",
        type=float,
        default=float(env("HANDOVER_DRAIN_TIMEOUT", "0")),
        help="after a hand-over, cap in seconds on serving existing connections (0: none)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(env("WORKERS", "1")),
        help="worker processes sharing the listeners (env WORKERS)",
    )
    p.add_argument(
        "--http3",
        action=argparse.BooleanOptionalAction,
        default=env("HTTP3", "") in ("1", "true"),
        help="also serve HBONE over HTTP/3 on the HBONE port over UDP (env HTTP3)",
    )
    p.add_argument(
        "--http3-peer",
        action="append",
        default=[p for p in env("HTTP3_PEERS", "").split(",") if p],
        help="node whose proxy is reached over HTTP/3 first ('*' = all; env HTTP3_PEERS)",
    )
    p.add_argument("--log-level", default=env("LOG_LEVEL", "info"))
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    for name, default in (
        ("admin", 15000),
        ("metrics", 15020),
        ("readiness", 15021),
        ("hbone", 15008),
        ("outbound", 15001),
        ("inbound-plaintext", 15006),
    ):
        p.add_argument(f"--{name}-port", type=int, default=default)
    args = p.parse_args(argv)
    if not args.node:
        p.error("--node (or NODE_NAME) is required")
    if args.admin_address and not is_loopback(args.admin_address):
        p.error(
            f"--admin-address {args.admin_address!r} is not a loopback address: "
            f"{ADMIN_LOOPBACK_WHY}"
        )
    if args.mesh_config is None and not args.xds_address:
        p.error("--mesh-config or --xds-address is required")
    try:
        sampler = (
            sampler_from_env()
            if args.tracing_sampling is None
            else Sampler.from_percent(args.tracing_sampling)
        )
    except ConfigError as err:
        p.error(str(err))
    settings = ProxySettings(
        node=args.node,
        node_ip=args.node_ip,
        trust_domain=args.trust_domain,
        capture=args.capture,
        outbound_listen=tuple(listen_address(a, "--outbound-listen") for a in args.outbound_listen),
        outbound_port=args.outbound_port,
        inbound_plaintext_port=args.inbound_plaintext_port,
        hbone_port=args.hbone_port,
        admin_port=args.admin_port,
        admin_address=args.admin_address,
        metrics_port=args.metrics_port,
        readiness_port=args.readiness_port,
        drain_timeout=args.drain_timeout,
        tunnels_per_peer=args.tunnels_per_peer,
        http3=args.http3,
        http3_peers=tuple(args.http3_peer),
        cluster_id=args.cluster_id,
        tracing_address=args.tracing_address or None,
        tracing_sampler=sampler,
        handover_socket=args.handover_socket,
        handover_drain_timeout=args.handover_drain_timeout,
        ready_file=args.ready_file,
    )
    return settings, args
