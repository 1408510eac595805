"""Node-proxy telemetry: Istio's TCP metrics and the structured access log.

Owns: the prometheus registry of the node proxy (metric and label names as Istio's ztunnel, see
docs/reference/ambient-facts.md "Telemetry names"), and the one access-log line written per
connection.
Beyond Istio's names, three counters of our own record hostile or overloaded peers:
`ztunnel_hbone_streams_refused_total{reason}` (streams the HTTP/2 layer answered itself; each also
gets an access-log line), `ztunnel_hbone_connection_errors_total{code}` (GOAWAY for a peer's
protocol error) and `ztunnel_accept_paused_total` (accepting paused for lack of descriptors).
Invariant: the data path never touches a metric per chunk; a connection is recorded once when it
opens and once when it closes (bytes are added at close), so the hot path stays free of locks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess

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
    "transport",  # HBONE transport: "h2" (TLS/TCP) or "h3" (QUIC/UDP); issue 16
)

access_log = logging.getLogger("ztunnel.access")


class ProxyMetrics:
    def exposition_registry(self) -> CollectorRegistry:
        """What /metrics serves: this process's registry, or, with several workers, all
        workers' values aggregated from prometheus-client's multiprocess directory."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return registry
        return self.registry

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
        # Robustness (issue 9): protocol-level refusals and connection errors, by a bounded label.
        self.hbone_refused = Counter(
            "ztunnel_hbone_streams_refused",
            "HBONE streams refused by the HTTP/2 layer, by reason",
            ["reason"],
            registry=r,
        )
        self.hbone_connection_errors = Counter(
            "ztunnel_hbone_connection_errors",
            "HBONE connections closed with GOAWAY for a peer's protocol error, by error code",
            ["code"],
            registry=r,
        )
        self.accept_paused = Counter(
            "ztunnel_accept_paused",
            "Times accepting paused because file descriptors ran short",
            registry=r,
        )
        self.active = Gauge(
            "ztunnel_active_connections",
            "Connections currently proxied",
            ["direction"],
            registry=r,
            multiprocess_mode="livesum",  # summed over live workers (multi-worker mode)
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
    transport: str | None = None
    """HBONE transport of the tunnel ("h2" / "h3"); None when no tunnel carried it."""
    mtls: bool = False
    response_flags: str = "-"
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    bytes_sent: int = 0
    bytes_recv: int = 0
    series: _Series | None = None

    def label_values(self) -> tuple[str, ...]:
        """Label values in LABELS order."""
        src, dst = self.source, self.destination
        return (
            self.reporter,
            _unknown(src and (src.workload_name or src.name)),
            _unknown(src and src.namespace),
            _unknown(self.source_principal),
            _unknown(src and src.canonical_name),
            _unknown(src and src.canonical_revision),
            _unknown(src and src.canonical_name),
            _unknown(self.destination_service),
            _unknown(self.destination_service_name),
            _unknown(self.destination_service_namespace),
            _unknown(dst and (dst.workload_name or dst.name)),
            _unknown(dst and dst.namespace),
            _unknown(self.destination_principal),
            _unknown(dst and dst.canonical_name),
            _unknown(dst and dst.canonical_revision),
            "tcp",
            "mutual_tls" if self.mtls else "unknown",
            self.response_flags,
            _unknown(self.transport),
        )

    def labels(self) -> dict[str, str]:
        return dict(zip(LABELS, self.label_values(), strict=True))

    def log_fields(self) -> dict[str, object]:
        """Istio's access-log field names (docs/reference/ambient-facts.md)."""
        return {
            "src.addr": self.src_addr,
            "src.workload": self.source.name if self.source else None,
            "src.namespace": self.source.namespace if self.source else None,
            "src.identity": self.source_principal,
            "dst.addr": self.dst_addr,
            "dst.hbone_addr": self.hbone_addr,
            "transport": self.transport,
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


@dataclass(frozen=True, slots=True)
class _Series:
    """The metric children of one label set, resolved once (prometheus `labels()` is slow)."""

    opened: Any
    closed: Any
    received: Any
    sent: Any


class ConnectionTracker:
    """Records open/close of connections in metrics and the access log."""

    MAX_CACHED_SERIES = 10_000

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics
        self._series: dict[tuple[str, ...], _Series] = {}
        self._active = {d: metrics.active.labels(d) for d in ("inbound", "outbound")}

    def _series_for(self, rec: ConnectionRecord) -> _Series:
        key = rec.label_values()
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= self.MAX_CACHED_SERIES:
                self._series.clear()  # label cardinality is bounded by the mesh; just in case
            m = self.metrics
            series = _Series(
                opened=m.opened.labels(*key),
                closed=m.closed.labels(*key),
                received=m.received.labels(*key),
                sent=m.sent.labels(*key),
            )
            self._series[key] = series
        return series

    def opened(self, rec: ConnectionRecord) -> None:
        rec.series = self._series_for(rec)
        rec.series.opened.inc()
        self._active[rec.direction].inc()

    def closed(self, rec: ConnectionRecord) -> None:
        series = rec.series or self._series_for(rec)
        series.closed.inc()
        self._active[rec.direction].dec()
        if rec.bytes_recv:
            series.received.inc(rec.bytes_recv)
        if rec.bytes_sent:
            series.sent.inc(rec.bytes_sent)
        self.log(rec)

    def failed(self, rec: ConnectionRecord) -> None:
        """A connection that never opened (denied, no upstream, TLS failure)."""
        self.metrics.failed.labels(*rec.label_values()).inc()
        self.log(rec)

    @staticmethod
    def log(rec: ConnectionRecord) -> None:
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps(rec.log_fields(), separators=(",", ":")))
