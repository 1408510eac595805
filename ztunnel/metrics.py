"""Node-proxy telemetry: Istio's TCP metrics and the structured access log.

Owns: the prometheus registry of the node proxy (metric and label names as Istio's ztunnel, see
ambient-facts.md "Telemetry names"), and the one access-log line written per connection.
Invariant: the data path never touches a metric per chunk; a connection is recorded once when it
opens and once when it closes (bytes are added at close), so the hot path stays free of locks.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from meshcore.model import Workload

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "request_protocol",
    "connection_security_policy",
    "response_flags",
)

access_log = logging.getLogger("ztunnel.access")


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", LABELS, registry=r
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", LABELS, registry=r
        )
        self.failed = Counter(
            "istio_tcp_connections_failed", "TCP connections failed", LABELS, registry=r
        )
        self.received = Counter(
            "istio_tcp_received_bytes", "Bytes received from the client side", LABELS, registry=r
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent to the client side", LABELS, registry=r
        )
        self.active = Gauge(
            "ztunnel_active_connections", "Connections currently proxied", ["direction"], registry=r
        )


def _unknown(value: object) -> str:
    return value if isinstance(value, str) and value else "unknown"


@dataclass(slots=True)
class ConnectionRecord:
    """What we know about one proxied connection; filled in as the connection progresses."""

    direction: str  # "outbound" | "inbound"
    reporter: str  # "source" | "destination"
    src_addr: str
    dst_addr: str
    source: Workload | None = None
    source_principal: str | None = None
    destination: Workload | None = None
    destination_principal: str | None = None
    destination_service: str | None = None
    destination_service_name: str | None = None
    destination_service_namespace: str | None = None
    hbone_addr: str | None = None
    mtls: bool = False
    response_flags: str = "-"
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    bytes_sent: int = 0
    bytes_recv: int = 0

    def labels(self) -> dict[str, str]:
        src, dst = self.source, self.destination
        return {
            "reporter": self.reporter,
            "source_workload": _unknown(src and (src.workload_name or src.name)),
            "source_workload_namespace": _unknown(src and src.namespace),
            "source_principal": _unknown(self.source_principal),
            "source_app": _unknown(src and src.canonical_name),
            "source_version": _unknown(src and src.canonical_revision),
            "source_canonical_service": _unknown(src and src.canonical_name),
            "destination_service": _unknown(self.destination_service),
            "destination_service_name": _unknown(self.destination_service_name),
            "destination_service_namespace": _unknown(self.destination_service_namespace),
            "destination_workload": _unknown(dst and (dst.workload_name or dst.name)),
            "destination_workload_namespace": _unknown(dst and dst.namespace),
            "destination_principal": _unknown(self.destination_principal),
            "destination_app": _unknown(dst and dst.canonical_name),
            "destination_version": _unknown(dst and dst.canonical_revision),
            "request_protocol": "tcp",
            "connection_security_policy": "mutual_tls" if self.mtls else "unknown",
            "response_flags": self.response_flags,
        }

    def log_fields(self) -> dict[str, object]:
        """Istio's access-log field names (ambient-facts.md)."""
        return {
            "src.addr": self.src_addr,
            "src.workload": self.source.name if self.source else None,
            "src.namespace": self.source.namespace if self.source else None,
            "src.identity": self.source_principal,
            "dst.addr": self.dst_addr,
            "dst.hbone_addr": self.hbone_addr,
            "dst.service": self.destination_service,
            "dst.workload": self.destination.name if self.destination else None,
            "dst.namespace": self.destination.namespace if self.destination else None,
            "dst.identity": self.destination_principal,
            "direction": self.direction,
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv,
            "duration": f"{(time.monotonic() - self.started) * 1000:.1f}ms",
            "error": self.error,
        }


class ConnectionTracker:
    """Records open/close of connections in metrics and the access log."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def opened(self, rec: ConnectionRecord) -> None:
        self.metrics.opened.labels(**rec.labels()).inc()
        self.metrics.active.labels(rec.direction).inc()

    def closed(self, rec: ConnectionRecord) -> None:
        labels = rec.labels()
        m = self.metrics
        m.closed.labels(**labels).inc()
        m.active.labels(rec.direction).dec()
        if rec.bytes_recv:
            m.received.labels(**labels).inc(rec.bytes_recv)
        if rec.bytes_sent:
            m.sent.labels(**labels).inc(rec.bytes_sent)
        self.log(rec)

    def failed(self, rec: ConnectionRecord) -> None:
        """A connection that never opened (denied, no upstream, TLS failure)."""
        self.metrics.failed.labels(**rec.labels()).inc()
        self.log(rec)

    @staticmethod
    def log(rec: ConnectionRecord) -> None:
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps(rec.log_fields(), separators=(",", ":")))
