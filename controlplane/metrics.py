"""Control-plane Prometheus metrics (own registry, so tests can run several control planes).

Owns the metric names: pushes, push latency (change -> ACK), connected proxies, NACKs,
certificate signings/refusals, config warnings, store objects.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ControlPlaneMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pushes = Counter(
            "controlplane_xds_pushes", "delta xDS responses sent", ["type"], registry=r
        )
        self.push_resources = Counter(
            "controlplane_xds_pushed_resources",
            "resources sent in delta responses",
            ["type"],
            registry=r,
        )
        self.push_latency = Histogram(
            "controlplane_xds_push_latency_seconds",
            "time from a config change to the node proxy's ACK of the response carrying it",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.nacks = Counter("controlplane_xds_nacks", "NACKs received", ["type"], registry=r)
        self.connected = Gauge(
            "controlplane_xds_connected_proxies",
            "node proxies with an open xDS stream",
            registry=r,
        )
        self.certs = Counter(
            "controlplane_ca_certificates", "CreateCertificate outcomes", ["outcome"], registry=r
        )
        self.warnings = Gauge("controlplane_config_warnings", "objects with a warning", registry=r)
        self.objects = Gauge("controlplane_store_objects", "objects in the store", registry=r)
        self.translate_seconds = Histogram(
            "controlplane_translate_seconds",
            "time to translate one store update",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
