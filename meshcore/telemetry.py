"""Istio's standard telemetry labels and the one workload-to-label mapping, shared by the node
proxy (TCP metrics, reporter source/destination) and the waypoint (request metrics, reporter
waypoint).

Owns: the label names of Istio's standard metrics (istio.io "Istio Standard Metrics"; the label
set and order of ztunnel's ``CommonTrafficLabels``, src/proxy/metrics.rs), the derivation of a
canonical service/revision from pod labels (as istiod does: ``service.istio.io/canonical-name``,
``app.kubernetes.io/name``, ``app``, else the workload name; ``service.istio.io/
canonical-revision``, ``app.kubernetes.io/version``, ``version``, else ``latest``), the mapping
`Workload` -> `PeerLabels`, the registry every process starts from (no ``_created`` series,
``process_*``), ``istio_build``, the xDS client metrics (``istio_xds_*``), and the text
exposition of a registry (`text_exposition`, the node proxy's /metrics).

Invariants:
- ``*_app`` / ``*_version`` are the canonical service / revision on both proxies (as ztunnel);
  no label is ever empty: an unknown value is ``unknown`` (Istio's ``DefaultedUnknown``).
- The cluster of a peer is its workload's ``clusterId``, else this process's own cluster id
  (``--cluster-id``, env ``CLUSTER_ID``, default ``Kubernetes`` as istiod).
- Label tuples are plain tuples in the order of `TCP_LABELS` / `HTTP_LABELS`, so callers cache
  metric children per tuple.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# Submodules, not the package's names: a node-proxy worker never runs prometheus_client's
# package `__init__` (`ztunnel.promlib`).
from prometheus_client.metrics import disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from meshcore.model import Service, Workload

UNKNOWN = "unknown"
DEFAULT_REVISION = "latest"
DEFAULT_CLUSTER_ID = "Kubernetes"
"""istiod's default cluster id (``CLUSTER_ID``)."""


VERSION = "0.1.0"
"""This project's version, pyproject.toml's ``version`` (tests/unit/test_telemetry.py checks
they agree, and the installed package's metadata)."""


def version() -> str:
    """This project's version (``tag`` of ``istio_build``, ``ambientctl version``), not Istio's.
    A constant, not `importlib.metadata` (with `email`, `zipfile`, `csv`...: ~0.4 MiB a
    node-proxy worker would load at its first scrape, issue 14, memory); also right in a source
    tree without an installed package."""
    return VERSION


CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)

TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
"""Labels of ``istio_tcp_*`` (ztunnel's order)."""

HTTP_LABELS = (
    *TCP_LABELS[:-3],
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
"""Labels of ``istio_requests_total`` and the request histograms: the TCP labels plus
``response_code`` and ``grpc_response_status``."""


PodLabels = Mapping[str, str] | Iterable[tuple[str, str]]
"""A pod's labels: a mapping or (key, value) pairs."""


def _first_label(labels: PodLabels, keys: tuple[str, ...]) -> str:
    found = labels if isinstance(labels, Mapping) else dict(labels)
    for key in keys:
        value = found.get(key, "")
        if value:
            return value
    return ""


def canonical_service(labels: PodLabels, workload_name: str) -> str:
    """The canonical service of a pod with `labels` owned by `workload_name`."""
    return _first_label(labels, CANONICAL_NAME_LABELS) or workload_name


def canonical_revision(labels: PodLabels) -> str:
    """The canonical revision of a pod with `labels`."""
    return _first_label(labels, CANONICAL_REVISION_LABELS) or DEFAULT_REVISION


def cluster_id_from_env() -> str:
    return os.environ.get("CLUSTER_ID", "") or DEFAULT_CLUSTER_ID


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """The label values describing one side (source or destination) of a connection/request."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    cluster: str = UNKNOWN


UNKNOWN_PEER = PeerLabels()


def peer_labels(w: Workload | None, cluster_id: str) -> PeerLabels:
    """`w`'s labels; a workload without canonical fields (a static config) gets the defaults
    istiod would have derived (workload name, ``latest``)."""
    if w is None:
        return UNKNOWN_PEER
    workload = w.workload_name or w.name or UNKNOWN
    service = w.canonical_name or workload
    revision = w.canonical_revision or DEFAULT_REVISION
    return PeerLabels(
        workload=workload,
        namespace=w.namespace or UNKNOWN,
        canonical_service=service,
        canonical_revision=revision,
        app=service,
        version=revision,
        cluster=w.cluster_id or cluster_id or UNKNOWN,
    )


@dataclass(frozen=True, slots=True)
class ServiceLabels:
    host: str = UNKNOWN
    name: str = UNKNOWN
    namespace: str = UNKNOWN


UNKNOWN_SERVICE = ServiceLabels()


def service_labels(svc: Service | None) -> ServiceLabels:
    if svc is None:
        return UNKNOWN_SERVICE
    return ServiceLabels(svc.hostname or UNKNOWN, svc.name or UNKNOWN, svc.namespace or UNKNOWN)


def guess_inbound_service(
    workload: Workload, target_port: int, lookup: Callable[[str], Service | None]
) -> Service | None:
    """The service a connection to `workload`:`target_port` most likely addressed, for
    telemetry only (ztunnel's ``guess_inbound_service``, src/proxy.rs): the first service the
    workload backs (in key order) whose port maps to `target_port` (the workload's own port
    mapping first, then the service's target port). None if nothing matches."""
    for key, ports in workload.services:
        svc = lookup(key)
        if svc is None:
            continue
        for port in svc.ports:
            own = next((p for p in ports if p.service_port == port.service_port), None)
            target = (own.target_port if own is not None else 0) or port.target_port
            if target == target_port:
                return svc
    return None


def _or_unknown(value: str | None) -> str:
    return value or UNKNOWN


@dataclass(frozen=True, slots=True)
class Traffic:
    """Who talked to whom: the part shared by TCP and request label sets."""

    reporter: str
    source: PeerLabels
    source_principal: str | None
    destination: PeerLabels
    destination_principal: str | None
    service: ServiceLabels
    mtls: bool

    def _peers(self) -> tuple[str, ...]:
        s, d, svc = self.source, self.destination, self.service
        return (
            self.reporter,
            s.workload,
            s.canonical_service,
            s.canonical_revision,
            s.namespace,
            _or_unknown(self.source_principal),
            s.app,
            s.version,
            s.cluster,
            svc.host,
            svc.namespace,
            svc.name,
            d.workload,
            d.canonical_service,
            d.canonical_revision,
            d.namespace,
            _or_unknown(self.destination_principal),
            d.app,
            d.version,
            d.cluster,
        )

    @property
    def security_policy(self) -> str:
        return "mutual_tls" if self.mtls else UNKNOWN

    def tcp_values(self, response_flags: str = "-") -> tuple[str, ...]:
        """Values in `TCP_LABELS` order."""
        return (*self._peers(), "tcp", response_flags, self.security_policy)

    def http_values(
        self, protocol: str, response_code: int, grpc_status: str, response_flags: str
    ) -> tuple[str, ...]:
        """Values in `HTTP_LABELS` order."""
        return (
            *self._peers(),
            protocol,
            str(response_code),
            grpc_status or "-",
            response_flags,
            self.security_policy,
        )


# ------------------------------------------------------------------------------ process metrics


class BuildCollector(Collector):
    """``istio_build{component, tag} 1`` (Istio's dashboards' "versions" panels)."""

    def __init__(self, component: str) -> None:
        self.component = component

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily(
            "istio_build", "Istio component build info", labels=["component", "tag"]
        )
        g.add_metric([self.component, version()], 1.0)
        yield g


class XdsCollector(Collector):
    """ztunnel's xDS client metrics from a live stats object: ``istio_xds_connection_
    terminations_total{reason}``, ``istio_xds_message_total{url}``,
    ``istio_xds_message_bytes_total{url}``; and ours, ``ambient_xds_grpc_status_total{code}``:
    xDS streams ended with a gRPC status other than OK (`meshcore.grpcwire` names)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        st = self.stats()
        if st is None:
            return
        term = CounterMetricFamily(
            "istio_xds_connection_terminations",
            "Total number of xDS connection terminations",
            labels=["reason"],
        )
        for reason, n in sorted(st.terminations.items()):
            term.add_metric([reason], n)
        msgs = CounterMetricFamily(
            "istio_xds_message", "Total number of xDS messages received", labels=["url"]
        )
        size = CounterMetricFamily(
            "istio_xds_message_bytes", "Total bytes of xDS messages received", labels=["url"]
        )
        for url, n in sorted(st.messages.items()):
            msgs.add_metric([url], n)
            size.add_metric([url], st.message_bytes.get(url, 0))
        status = CounterMetricFamily(
            "ambient_xds_grpc_status",
            "xDS streams ended with a gRPC status other than OK",
            labels=["code"],
        )
        for code, n in sorted(st.statuses.items()):
            status.add_metric([code], n)
        yield term
        yield msgs
        yield size
        yield status


def process_collectors(registry: CollectorRegistry, component: str) -> None:
    """``process_*`` (CPU, memory, fds, start time), ``python_info`` and ``istio_build``."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(BuildCollector(component))


def new_registry(component: str) -> CollectorRegistry:
    """A registry for one proxy process: process metrics and ``istio_build`` included, and no
    ``*_created`` series (Istio exports none; prometheus-client's switch is process-wide)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    process_collectors(registry, component)
    return registry


CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
"""The content type of `text_exposition`'s output: prometheus_client's ``CONTENT_TYPE_LATEST``
(tests/unit/test_worker_modules.py pins it)."""

# OpenMetrics type -> the text format's (prometheus_client's munging, kept as it is).
_TEXT_TYPES = {
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
    "unknown": "untyped",
}
_OM_ONLY_SUFFIXES = ("_created", "_gsum", "_gcount")
"""Samples the text format has no place for in their family: each suffix is written after the
family as a gauge of its own."""
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _legacy_name(name: str, *, metric: bool) -> str:
    """A metric or label name with every character outside the legacy set (`_METRIC_NAME`,
    `_LABEL_NAME`: no ``:`` in a label name, no digit first) replaced by ``_``."""
    if (_METRIC_NAME if metric else _LABEL_NAME).fullmatch(name) or not name:
        return name
    out = []
    for i, ch in enumerate(name):
        ok = ch == "_" or "a" <= ch <= "z" or "A" <= ch <= "Z" or (metric and ch == ":")
        out.append(ch if ok or ("0" <= ch <= "9" and i > 0) else "_")
    return "".join(out)


def _escaped(text: str) -> str:
    """A HELP text: backslash and line feed escaped."""
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _sample_line(sample: Any) -> str:
    name = _legacy_name(sample.name, metric=True)
    if sample.labels:
        pairs = []
        for key, value in sorted(sample.labels.items()):
            quoted = _escaped(value).replace('"', r"\"")  # a label value escapes '"' too
            pairs.append(f'{_legacy_name(key, metric=False)}="{quoted}"')
        name += "{" + ",".join(pairs) + "}"
    stamp = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
    value = floatToGoString(sample.value)  # type: ignore[no-untyped-call]
    return f"{name} {value}{stamp}\n"


def text_exposition(registry: Collector) -> bytes:
    """Prometheus's text format (prometheus.io "Exposition formats", text-based format) of what
    `registry` collects: byte for byte what prometheus_client's (>= 0.22) ``generate_latest``
    writes (tests/unit/test_worker_modules.py compares them), without its ``exposition`` module
    and the HTTP server and client modules that one imports (`ztunnel.promlib`). One
    deliberate difference, safer: a metric or label name ending in a line feed. The library
    checks names with ``re.match(...$)``, which passes a trailing ``\\n``, and writes it raw
    (a broken line a scraper splits); here it is replaced by ``_`` like every other character
    outside the legacy set. A collector that raises: its metric is appended to the exception's
    args, as the library does. Counters are named
    with ``_total``, an info metric with ``_info``; the OpenMetrics-only samples
    (``_created``, ``_gsum``, ``_gcount``) follow their family as gauges."""
    out: list[str] = []
    for metric in registry.collect():
        try:
            _family(metric, out)
        except Exception as e:  # as generate_latest: say which metric, re-raise
            e.args = (*(e.args or ("",)), metric)
            raise
    return "".join(out).encode("utf-8")


def _family(metric: Any, out: list[str]) -> None:
    """Append one family's lines to `out` (`text_exposition`)."""
    name, kind = metric.name, metric.type
    if kind == "counter":
        name += "_total"
    elif kind == "info":
        name += "_info"
    help_text = _escaped(metric.documentation)
    out.append(f"# HELP {_legacy_name(name, metric=True)} {help_text}\n")
    out.append(f"# TYPE {_legacy_name(name, metric=True)} {_TEXT_TYPES.get(kind, kind)}\n")
    trailing: dict[str, list[str]] = {}
    for sample in metric.samples:
        suffix = next((x for x in _OM_ONLY_SUFFIXES if sample.name == metric.name + x), "")
        if suffix:
            trailing.setdefault(suffix, []).append(_sample_line(sample))
        else:
            out.append(_sample_line(sample))
    for suffix, lines in sorted(trailing.items()):
        gauge = _legacy_name(metric.name + suffix, metric=True)
        out += [f"# HELP {gauge} {help_text}\n", f"# TYPE {gauge} gauge\n", *lines]
