"""Waypoint telemetry: Istio's HTTP metrics (reporter="waypoint") and one access-log line per
request.

Owns: the waypoint's prometheus registry with ``istio_requests_total``,
``istio_request_duration_milliseconds``, ``istio_request_bytes``, ``istio_response_bytes``
(names, labels and millisecond buckets as Istio's standard metrics), and `RequestRecord`, the
per-request facts the handler fills in.

Invariant: a request is recorded exactly once, when it ends (success, local reply or reset);
label children are cached per label tuple, so recording costs dict lookups, not registry
lookups.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

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
    "destination_canonical_service",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

# Istio's default buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
    1800000, 3600000,
)  # fmt: skip
BYTES_BUCKETS = tuple(float(10**i) for i in range(0, 10))

access_log = logging.getLogger("waypoint.access")


@dataclass(slots=True)
class RequestRecord:
    """What one request did, filled in as it goes."""

    start: float
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
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _wl(w: Workload | None) -> tuple[str, str, str, str, str]:
    if w is None:
        return ("unknown",) * 5
    name = w.workload_name or w.name
    app = w.canonical_name or name
    return name, w.namespace, app, w.canonical_revision or "unknown", app


class WaypointMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("istio_requests", "Requests", LABELS, registry=r)
        self.duration = Histogram(
            "istio_request_duration_milliseconds", "Request duration (ms)", LABELS,
            buckets=DURATION_BUCKETS_MS, registry=r,
        )  # fmt: skip
        self.request_bytes = Histogram(
            "istio_request_bytes", "Request sizes (bytes)", LABELS, buckets=BYTES_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.response_bytes = Histogram(
            "istio_response_bytes", "Response sizes (bytes)", LABELS, buckets=BYTES_BUCKETS,
            registry=r,
        )  # fmt: skip
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}
        self.log_enabled = True

    def record(self, rec: RequestRecord, end: float) -> None:
        sw, sns, sapp, sver, scs = _wl(rec.source)
        dw, dns, dapp, dver, dcs = _wl(rec.destination)
        labels = (
            "waypoint", sw, sns, rec.source_principal or "unknown", sapp, sver, scs,
            rec.service_host or "unknown", rec.service_name or "unknown",
            rec.service_namespace or "unknown", dw, dns, rec.destination_principal or "unknown",
            dapp, dver, dcs, rec.protocol, str(rec.status), rec.grpc_status or "-", rec.flags,
            "mutual_tls",
        )  # fmt: skip
        children = self._children.get(labels)
        if children is None:
            children = (
                self.requests.labels(*labels),
                self.duration.labels(*labels),
                self.request_bytes.labels(*labels),
                self.response_bytes.labels(*labels),
            )
            if len(self._children) < 10_000:  # bound the cache (label cardinality is bounded too)
                self._children[labels] = children
        duration_ms = (end - rec.start) * 1000.0
        children[0].inc()
        children[1].observe(duration_ms)
        children[2].observe(rec.request_bytes)
        children[3].observe(rec.response_bytes)
        if self.log_enabled and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                json.dumps(
                    {
                        "src.addr": rec.source_ip,
                        "src.workload": sw,
                        "src.namespace": sns,
                        "src.identity": rec.source_principal,
                        "dst.service": rec.service_host,
                        "dst.addr": rec.upstream,
                        "dst.workload": dw,
                        "dst.namespace": dns,
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
