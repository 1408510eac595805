"""Node-proxy telemetry: Istio's TCP metrics and the structured access log.

Owns: the prometheus registry of the node proxy (metric names as Istio's ztunnel; labels and the
workload-to-label mapping come from `meshcore.telemetry`, shared with the waypoint), byte
accounting of live connections, and the one access-log line written per connection.
Beyond Istio's names, three counters of our own record hostile or overloaded peers:
`ztunnel_hbone_streams_refused_total{reason}` (streams the HTTP/2 layer answered itself; each also
gets an access-log line), `ztunnel_hbone_connection_errors_total{code}` (GOAWAY for a peer's
protocol error) and `ztunnel_accept_paused_total` (accepting paused for lack of descriptors);
`ztunnel_handovers_total{result}` counts listener hand-overs to a successor (done/failed, and
taken_back: the successor died after READY and this process serves again);
`ztunnel_hbone_stateless_resets_sent_total` counts the QUIC Stateless Resets the HTTP/3 listener
sent (RFC 9000 §10.3: packets for connections it has no state for, at most 100/s).
Invariants: the data path never touches a metric per chunk. The relay counts bytes in plain
integer attributes (`ztunnel.proxy.relay.TcpSide`); `ConnectionTracker` adds what moved since
the last flush to the counters once per `FLUSH_INTERVAL` for every live connection, before each
scrape, and at close, so a long-lived (pooled) connection's bytes show while it carries traffic
(Istio counts bytes as they are copied) and the totals at close are exact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Submodules only: a worker never runs prometheus_client's package `__init__` (`ztunnel.promlib`).
from prometheus_client.metrics import Counter, Gauge
from prometheus_client.registry import CollectorRegistry

from meshcore.model import Workload
from meshcore.telemetry import (
    DEFAULT_CLUSTER_ID,
    TCP_LABELS,
    ServiceLabels,
    Traffic,
    XdsCollector,
    new_registry,
    peer_labels,
    process_collectors,
)
from meshcore.tracing import Sampler, SpanRecord, Tracer

LABELS = (*TCP_LABELS, "transport")
"""Istio's TCP metric labels (`meshcore.telemetry`, the one owner), plus our HBONE `transport`:
"h2" (TLS/TCP) or "h3" (QUIC/UDP), issue 16."""

access_log = logging.getLogger("ztunnel.access")


class ProxyMetrics:
    def exposition_registry(self) -> CollectorRegistry:
        """What /metrics serves: this process's registry, or, with several workers, all
        workers' values aggregated from prometheus-client's multiprocess directory."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess  # --workers > 1 only

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            process_collectors(registry, "ztunnel")
            registry.register(self.xds)
            return registry
        return self.registry

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry("ztunnel")
        r = self.registry
        self.xds_stats: object | None = None
        """The xDS client's `ClientStats` (control-plane mode), read at scrape time."""
        self.xds = XdsCollector(lambda: self.xds_stats)
        r.register(self.xds)
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
        self.stateless_resets = Counter(
            "ztunnel_hbone_stateless_resets_sent",
            "QUIC Stateless Resets sent by the HTTP/3 HBONE listener (RFC 9000 section 10.3)",
            registry=r,
        )
        self.handovers = Counter(
            "ztunnel_handovers",
            "Listener hand-overs to a successor process, by result (done, failed, taken_back)",
            ["result"],
            registry=r,
        )
        self.config_reloads = Counter(
            "ztunnel_config_reloads",
            "Static --mesh-config reloads on SIGHUP, by result (applied, refused); summed over"
            " workers",
            ["result"],
            registry=r,
        )
        self.active = Gauge(
            "ztunnel_active_connections",
            "Connections currently proxied",
            ["direction"],
            registry=r,
            multiprocess_mode="livesum",  # summed over live workers (multi-worker mode)
        )


class ConnectionRecord:
    """What we know about one proxied connection; filled in as the connection progresses.

    A plain class with an explicit constructor, not a dataclass: one is built per connection
    and side, and mypyc leaves a dataclass the stdlib-generated, interpreted ``__init__``
    (~1 us for this one against ~0.6 us native; bench/README.md "Per new connection,
    session 6")."""

    __slots__ = (
        "bytes_recv",
        "bytes_sent",
        "destination",
        "destination_principal",
        "destination_service",
        "destination_service_name",
        "destination_service_namespace",
        "direction",
        "dst_addr",
        "error",
        "flushed_recv",
        "flushed_sent",
        "hbone_addr",
        "meter",
        "mtls",
        "parent_span_id",
        "reporter",
        "response_flags",
        "sampled",
        "series",
        "source",
        "source_principal",
        "span_id",
        "src_addr",
        "started",
        "trace_id",
        "transport",
    )

    def __init__(self, *, direction: str, reporter: str, src_addr: str, dst_addr: str) -> None:
        """The rest is filled in by the proxy as the connection progresses (four arguments, so
        constructing one is a native call in the compiled build)."""
        self.direction = direction  # "outbound" | "inbound"
        self.reporter = reporter  # "source" | "destination"
        self.src_addr = src_addr
        self.dst_addr = dst_addr
        self.source: Workload | None = None
        self.source_principal: str | None = None
        self.destination: Workload | None = None
        self.destination_principal: str | None = None
        self.destination_service: str | None = None
        self.destination_service_name: str | None = None
        self.destination_service_namespace: str | None = None
        self.hbone_addr: str | None = None
        self.transport: str | None = None
        """HBONE transport of the tunnel ("h2" / "h3"); None when no tunnel carried it."""
        self.mtls = False
        self.response_flags = "-"
        self.error: str | None = None
        self.started = time.monotonic()
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.series: _Series | None = None
        self.meter: Callable[[], tuple[int, int]] | None = None
        """(bytes received from, bytes sent to) the client side so far, read at flush time."""
        self.flushed_recv = 0
        self.flushed_sent = 0
        self.trace_id = ""
        """W3C trace of this connection ("" = none): started here (outbound, sent on the HBONE
        CONNECT) or continued from the CONNECT's ``traceparent`` (inbound)."""
        self.span_id = ""
        self.parent_span_id = ""
        self.sampled = False

    def __repr__(self) -> str:
        return (
            f"ConnectionRecord(direction={self.direction!r}, src_addr={self.src_addr!r}, "
            f"dst_addr={self.dst_addr!r}, response_flags={self.response_flags!r}, "
            f"error={self.error!r})"
        )

    def label_values(self, cluster_id: str = DEFAULT_CLUSTER_ID) -> tuple[str, ...]:
        """Label values in LABELS order (`cluster_id`: this proxy's cluster, for peers whose
        workload names none)."""
        return (
            *Traffic(
                reporter=self.reporter,
                source=peer_labels(self.source, cluster_id),
                source_principal=self.source_principal,
                destination=peer_labels(self.destination, cluster_id),
                destination_principal=self.destination_principal,
                service=ServiceLabels(
                    self.destination_service or "unknown",
                    self.destination_service_name or "unknown",
                    self.destination_service_namespace or "unknown",
                ),
                mtls=self.mtls,
            ).tcp_values(self.response_flags),
            self.transport or "unknown",
        )

    def labels(self, cluster_id: str = DEFAULT_CLUSTER_ID) -> dict[str, str]:
        return dict(zip(LABELS, self.label_values(cluster_id), strict=True))

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
    """Records open/close of connections in metrics and the access log, and moves the bytes of
    live connections into the counters in batches (see the module invariant)."""

    MAX_CACHED_SERIES = 10_000
    FLUSH_INTERVAL = 1.0
    """Seconds between two byte flushes of the live connections."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        tracer: Tracer | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.metrics = metrics
        self.cluster_id = cluster_id
        self.tracer = tracer
        """One span per connection over OTLP (None: tracing off)."""
        self.sampler = sampler or Sampler()
        """Which connections' spans are exported (`meshcore.tracing.Sampler`)."""
        self._series: dict[tuple[object, ...], tuple[Workload | None, Workload | None, _Series]]
        self._series = {}
        self._active = {d: metrics.active.labels(d) for d in ("inbound", "outbound")}
        self._live: dict[int, ConnectionRecord] = {}
        self._timer: asyncio.TimerHandle | None = None

    def _series_for(self, rec: ConnectionRecord) -> _Series:
        """The children of `rec`'s label set, resolved once per (source, destination, ...):
        looked up by the workloads' identity, not by their label values, which cost two
        `peer_labels` and a `Traffic` per connection to build (issue 14). A cache entry holds
        its workloads, so their ids are not reused while it exists."""
        key = (
            rec.reporter,
            id(rec.source),
            id(rec.destination),
            rec.source_principal,
            rec.destination_principal,
            rec.destination_service,
            rec.destination_service_name,
            rec.destination_service_namespace,
            rec.mtls,
            rec.response_flags,
            rec.transport,
        )
        cached = self._series.get(key)
        if cached is not None:
            return cached[2]
        if len(self._series) >= self.MAX_CACHED_SERIES:
            self._series.clear()  # label cardinality is bounded by the mesh; just in case
        labels = rec.label_values(self.cluster_id)
        m = self.metrics
        series = _Series(
            opened=m.opened.labels(*labels),
            closed=m.closed.labels(*labels),
            received=m.received.labels(*labels),
            sent=m.sent.labels(*labels),
        )
        self._series[key] = (rec.source, rec.destination, series)
        return series

    def opened(
        self, rec: ConnectionRecord, meter: Callable[[], tuple[int, int]] | None = None
    ) -> None:
        """`meter`: reads (received from, sent to) the client side so far."""
        rec.series = self._series_for(rec)
        rec.series.opened.inc()
        self._active[rec.direction].inc()
        if meter is not None:
            rec.meter = meter
            self._live[id(rec)] = rec
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()
        if self._live:
            self._arm()

    def flush(self) -> None:
        """Add the bytes every live connection moved since the last flush."""
        for rec in self._live.values():
            if rec.meter is not None:
                self._add_bytes(rec, *rec.meter())

    @staticmethod
    def _add_bytes(rec: ConnectionRecord, received: int, sent: int) -> None:
        series = rec.series
        if series is None:
            return
        if received > rec.flushed_recv:
            series.received.inc(received - rec.flushed_recv)
            rec.flushed_recv = received
        if sent > rec.flushed_sent:
            series.sent.inc(sent - rec.flushed_sent)
            rec.flushed_sent = sent

    def closed(self, rec: ConnectionRecord) -> None:
        self._live.pop(id(rec), None)
        rec.meter = None  # it refers to the connection, which refers to `rec`: no cycle left
        if rec.series is None:
            rec.series = self._series_for(rec)
        rec.series.closed.inc()
        self._active[rec.direction].dec()
        self._add_bytes(rec, rec.bytes_recv, rec.bytes_sent)
        self.log(rec)
        self._span(rec)

    def failed(self, rec: ConnectionRecord) -> None:
        """A connection that never opened (denied, no upstream, TLS failure)."""
        self.metrics.failed.labels(*rec.label_values(self.cluster_id)).inc()
        self.log(rec)
        self._span(rec)

    def _span(self, rec: ConnectionRecord) -> None:
        if self.tracer is None or not (rec.sampled and rec.trace_id and rec.span_id):
            return
        end_ns = time.time_ns()
        start_ns = end_ns - int((time.monotonic() - rec.started) * 1e9)
        self.tracer.record(
            SpanRecord(
                name=f"{rec.direction} {rec.hbone_addr or rec.dst_addr}",
                kind="client" if rec.direction == "outbound" else "server",
                trace_id=rec.trace_id,
                span_id=rec.span_id,
                parent_id=rec.parent_span_id or None,
                start_ns=start_ns,
                end_ns=end_ns,
                attributes={
                    "src.addr": rec.src_addr,
                    "dst.addr": rec.dst_addr,
                    "src.identity": rec.source_principal or "unknown",
                    "dst.identity": rec.destination_principal or "unknown",
                    "dst.service": rec.destination_service or "unknown",
                    "bytes_sent": rec.bytes_sent,
                    "bytes_recv": rec.bytes_recv,
                    "response_flags": rec.response_flags,
                },
                error=rec.error,
            )
        )

    @staticmethod
    def log(rec: ConnectionRecord) -> None:
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps(rec.log_fields(), separators=(",", ":")))
