"""Waypoint telemetry: Istio's HTTP metrics (reporter="waypoint") and one access-log line per
request.

Owns: the waypoint's prometheus registry with ``istio_requests_total``,
``istio_request_duration_milliseconds``, ``istio_request_bytes``, ``istio_response_bytes``
(names and millisecond buckets as Istio's standard metrics; the labels and the
workload-to-label mapping are `meshcore.telemetry`'s, shared with the node proxy),
``waypoint_mirror_requests_total{result}`` (mirror copies), and `RequestRecord`, the
per-request facts the handler fills in.

Invariants:
- A request is recorded exactly once, when it ends (success, local reply or reset); label sets
  are cached per (source, destination) workload pair and status, so recording costs one dict
  lookup, not label building.
- The four request metrics are counted in plain per-label-set integers and bucket lists
  (`_Counts`, no lock: only the event loop's thread records, and the scrape runs on that loop
  too) and rendered at scrape time by `_RequestCollector` as prometheus_client's `Counter` and
  `Histogram` would render them: same names, help, label names and order, series order, bucket
  bounds (``le``) and values (`tests/unit/test_telemetry.py` compares the exposition bytes).
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from meshcore.model import Workload
from meshcore.telemetry import (
    HTTP_LABELS,
    PeerLabels,
    ServiceLabels,
    Traffic,
    XdsCollector,
    cluster_id_from_env,
    new_registry,
    peer_labels,
)
from meshcore.tracing import Sampler, SpanRecord, Tracer, sampler_from_env, tracer_from_env

LABELS = HTTP_LABELS
"""Istio's request metric labels (`meshcore.telemetry`, the one owner)."""

# Istio's default buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
BYTES_BUCKETS = tuple(float(10**i) for i in range(0, 10))
_DURATION_BOUNDS = tuple(float(b) for b in DURATION_BUCKETS_MS)
# The ``le`` label of each bound, formatted once as prometheus_client formats it.
_DURATION_LE: tuple[str, ...] = tuple(
    floatToGoString(b)  # type: ignore[no-untyped-call]
    for b in _DURATION_BOUNDS
)
_BYTES_LE: tuple[str, ...] = tuple(
    floatToGoString(b)  # type: ignore[no-untyped-call]
    for b in BYTES_BUCKETS
)

access_log = logging.getLogger("waypoint.access")


class RequestRecord:
    """What one request did, filled in as it goes: built with its start time, every other field
    at its default. A plain class, not a dataclass: one is built per request, and compiled, its
    attribute defaults are set natively, where a dataclass runs the interpreted ``__init__`` of
    `dataclasses` (3 % of the waypoint's CPU in bench/README.md's session-5 profile)."""

    method: str = ""
    path: str = ""
    authority: str = ""
    protocol: str = "http"
    source_ip: str = ""
    source_principal: str = ""
    source: Workload | None = None
    destination: Workload | None = None
    destination_principal: str = ""
    service_host: str = ""
    service_name: str = ""
    service_namespace: str = ""
    upstream: str = ""
    """``ip:port`` of the endpoint that answered."""
    route: str = ""
    policy: str = ""
    status: int = 0
    grpc_status: str = ""
    flags: str = "-"
    attempts: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    trace_id: str = ""
    span_id: str = ""
    """This hop's span (the parent id in the forwarded ``traceparent``)."""
    parent_span_id: str = ""
    """The caller's span id from the incoming ``traceparent`` ("" = a trace started here)."""
    sampled: bool = False
    error: str = ""
    extra: dict[str, Any]

    def __init__(self, start: float) -> None:
        self.start = start
        self.extra = {}


class _Counts:
    """One label set's request counts: ``istio_requests_total`` and, per histogram, the
    observations per bucket (not cumulative; the last one is ``+Inf``) and their sum. Plain
    attributes: one is updated per request without prometheus_client's per-metric locks
    (bench/README.md, session 6: 5 % of the waypoint's CPU)."""

    def __init__(self) -> None:
        self.requests = 0
        self.duration = [0] * (len(_DURATION_BOUNDS) + 1)
        self.duration_sum = 0.0
        self.request_bytes = [0] * (len(BYTES_BUCKETS) + 1)
        self.request_bytes_sum = 0.0
        self.response_bytes = [0] * (len(BYTES_BUCKETS) + 1)
        self.response_bytes_sum = 0.0


def _buckets(les: tuple[str, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs as prometheus_client's `Histogram` exports them."""
    out: list[tuple[str, float]] = []
    total = 0
    for le, n in zip(les, counts, strict=False):
        total += n
        out.append((le, float(total)))
    out.append(("+Inf", float(total + counts[-1])))
    return out


class _RequestCollector(Collector):
    """``istio_requests_total`` and the three request histograms, rendered at scrape time from
    the `_Counts` of each label set (in the order the label sets were first recorded, as
    prometheus_client's label children)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, ...], _Counts] = {}

    def collect(self) -> Iterator[Any]:
        series = list(self.series.items())
        requests = CounterMetricFamily("istio_requests", "Requests", labels=LABELS)
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds", "Request duration (ms)", labels=LABELS
        )
        req = HistogramMetricFamily("istio_request_bytes", "Request sizes (bytes)", labels=LABELS)
        resp = HistogramMetricFamily(
            "istio_response_bytes", "Response sizes (bytes)", labels=LABELS
        )
        for labels, c in series:
            requests.add_metric(labels, float(c.requests))
            duration.add_metric(labels, _buckets(_DURATION_LE, c.duration), c.duration_sum)
            req.add_metric(labels, _buckets(_BYTES_LE, c.request_bytes), c.request_bytes_sum)
            resp.add_metric(labels, _buckets(_BYTES_LE, c.response_bytes), c.response_bytes_sum)
        yield requests
        yield duration
        yield req
        yield resp


@dataclass(frozen=True, slots=True)
class _Series:
    """One cached label set of `WaypointMetrics.record`: the workloads it was computed for
    (held, so their ids stay theirs while cached), their labels and their counts."""

    source: Workload | None
    dest: Workload | None
    src: PeerLabels
    dst: PeerLabels
    counts: _Counts


def _span_name(rec: RequestRecord) -> str:
    return f"{rec.authority or rec.service_host or 'unknown'}{rec.path.split('?', 1)[0] or '/'}"


class WaypointMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, cluster_id: str | None = None
    ) -> None:
        self.registry = registry or new_registry("waypoint")
        self.cluster_id = cluster_id or cluster_id_from_env()
        """This cluster's id (env ``CLUSTER_ID`` as Istio's proxies, default ``Kubernetes``)."""
        r = self.registry
        self.xds_stats: object | None = None
        """The xDS client's `ClientStats` (control-plane mode), read at scrape time."""
        r.register(XdsCollector(lambda: self.xds_stats))
        self.tracer: Tracer | None = tracer_from_env(
            "waypoint", {"istio.cluster_id": self.cluster_id}
        )
        """One span per request over OTLP (``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``)."""
        self.sampler: Sampler = sampler_from_env()
        """Which requests' spans are sampled (``OTEL_TRACES_SAMPLER[_ARG]``; parent-based)."""
        self._requests = _RequestCollector()
        r.register(self._requests)
        self.mirrors = Counter(
            "waypoint_mirror_requests",
            "Mirror copies by result: completed, failed, dropped (fell behind the request), "
            "skipped (too many in flight)",
            ["result"],
            registry=r,
        )
        self._series_cache: dict[tuple[object, ...], _Series] = {}
        self.log_enabled = True

    def _series(self, rec: RequestRecord) -> _Series:
        """The counts (and peer labels) of `rec`'s label set, cached per (source,
        destination) workload pair (by identity: a workload is immutable, a changed one is a
        new object) and the record's other label inputs."""
        key = (
            id(rec.source),
            id(rec.destination),
            rec.source_principal,
            rec.destination_principal,
            rec.service_host,
            rec.service_name,
            rec.service_namespace,
            rec.protocol,
            rec.status,
            rec.grpc_status,
            rec.flags,
        )
        series = self._series_cache.get(key)
        if series is not None and series.source is rec.source and series.dest is rec.destination:
            return series
        src = peer_labels(rec.source, self.cluster_id)
        dst = peer_labels(rec.destination, self.cluster_id)
        labels = Traffic(
            reporter="waypoint",
            source=src,
            source_principal=rec.source_principal,
            destination=dst,
            destination_principal=rec.destination_principal,
            service=ServiceLabels(
                rec.service_host or "unknown",
                rec.service_name or "unknown",
                rec.service_namespace or "unknown",
            ),
            mtls=True,
        ).http_values(rec.protocol, rec.status, rec.grpc_status, rec.flags)
        counts = self._requests.series.get(labels)
        if counts is None:
            # Kept as long as the process (as prometheus_client's label children): the label
            # cardinality is bounded by the mesh's workloads, statuses and flags.
            counts = self._requests.series[labels] = _Counts()
        series = _Series(rec.source, rec.destination, src, dst, counts)
        if len(self._series_cache) >= 10_000:
            self._series_cache.clear()  # bounded: workloads replaced by config changes age out
        self._series_cache[key] = series
        return series

    def record(self, rec: RequestRecord, end: float) -> None:
        series = self._series(rec)
        src, dst, c = series.src, series.dst, series.counts
        duration_ms = (end - rec.start) * 1000.0
        if self.tracer is not None and rec.sampled and rec.trace_id and rec.span_id:
            self._span(self.tracer, rec, duration_ms, dst.canonical_service)
        # A bucket counts the observations <= its bound (prometheus_client's `Histogram`).
        c.requests += 1
        c.duration[bisect_left(_DURATION_BOUNDS, duration_ms)] += 1
        c.duration_sum += duration_ms
        c.request_bytes[bisect_left(BYTES_BUCKETS, rec.request_bytes)] += 1
        c.request_bytes_sum += rec.request_bytes
        c.response_bytes[bisect_left(BYTES_BUCKETS, rec.response_bytes)] += 1
        c.response_bytes_sum += rec.response_bytes
        if self.log_enabled and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                json.dumps(
                    {
                        "src.addr": rec.source_ip,
                        "src.workload": src.workload,
                        "src.namespace": src.namespace,
                        "src.identity": rec.source_principal,
                        "dst.service": rec.service_host,
                        "dst.addr": rec.upstream,
                        "dst.workload": dst.workload,
                        "dst.namespace": dst.namespace,
                        "dst.identity": rec.destination_principal,
                        "method": rec.method,
                        "path": rec.path,
                        "authority": rec.authority,
                        "protocol": rec.protocol,
                        "response_code": rec.status,
                        "grpc_status": rec.grpc_status,
                        "response_flags": rec.flags,
                        "route": rec.route,
                        "policy": rec.policy,
                        "attempts": rec.attempts,
                        "bytes_recv": rec.request_bytes,
                        "bytes_sent": rec.response_bytes,
                        "duration": round(duration_ms, 3),
                        "trace_id": rec.trace_id,
                        "span_id": rec.span_id,
                        "error": rec.error,
                    },
                    separators=(",", ":"),
                )
            )

    @staticmethod
    def _span(tracer: Tracer, rec: RequestRecord, duration_ms: float, dst_service: str) -> None:
        end_ns = time.time_ns()
        tracer.record(
            SpanRecord(
                name=_span_name(rec),
                kind="server",
                trace_id=rec.trace_id,
                span_id=rec.span_id,
                parent_id=rec.parent_span_id or None,
                start_ns=end_ns - int(duration_ms * 1e6),
                end_ns=end_ns,
                attributes={
                    "http.method": rec.method,
                    "http.url": rec.path,
                    "http.status_code": rec.status,
                    "upstream_cluster": rec.service_host or "unknown",
                    "upstream_address": rec.upstream or "unknown",
                    "istio.canonical_service": dst_service,
                    "response_flags": rec.flags,
                    "peer.identity": rec.source_principal or "unknown",
                },
                error=rec.error or (f"HTTP {rec.status}" if rec.status >= 500 else None),
            )
        )
