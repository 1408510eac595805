"""Istio's standard labels on both proxies, and one workload-to-label mapping for both.

Label names are written out from istio.io "Istio Standard Metrics" (request and TCP metrics) and
ztunnel's ``CommonTrafficLabels`` (src/proxy/metrics.rs), not imported from the code under test.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import ztunnel.metrics
from meshcore.model import Port, Service, Workload
from meshcore.telemetry import (
    PeerLabels,
    canonical_revision,
    canonical_service,
    guess_inbound_service,
    peer_labels,
)
from waypoint.metrics import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    LABELS,
    RequestRecord,
    WaypointMetrics,
)
from ztunnel.metrics import ConnectionRecord, ConnectionTracker, ProxyMetrics

PEER: tuple[str, ...] = ("workload", "canonical_service", "canonical_revision")
PEER += ("workload_namespace", "principal", "app", "version", "cluster")
ISTIO_HTTP_LABELS = {
    "reporter",
    *(f"source_{x}" for x in PEER),
    *(f"destination_{x}" for x in PEER),
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
}

LABELLED = Workload(
    uid="Kubernetes//Pod/default/reviews-v2-abc",
    name="reviews-v2-abc",
    namespace="default",
    workload_name="reviews-v2",
    canonical_name="reviews",
    canonical_revision="v2",
    cluster_id="east",
)
BARE = Workload(uid="c1", name="sleep-7d9", namespace="default", workload_name="sleep")
"""A static-config workload without canonical fields."""


def request_labels(metrics: WaypointMetrics) -> dict[str, str]:
    text = generate_latest(metrics.registry).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "istio_requests_total":
                return dict(s.labels)
    raise AssertionError("no istio_requests_total series")


def waypoint_labels(source: Workload, destination: Workload, cluster: str) -> dict[str, str]:
    m = WaypointMetrics(cluster_id=cluster)
    m.log_enabled = False
    rec = RequestRecord(time.monotonic())
    rec.status, rec.source, rec.destination = 200, source, destination
    m.record(rec, time.monotonic())
    return request_labels(m)


def test_waypoint_request_series_carry_every_istio_standard_label() -> None:
    labels = waypoint_labels(BARE, LABELLED, "west")
    assert set(labels) == ISTIO_HTTP_LABELS
    assert labels["destination_canonical_revision"] == "v2"
    assert labels["destination_cluster"] == "east"  # the workload's own cluster id
    assert labels["source_cluster"] == "west"  # else this proxy's (settings)
    assert labels["source_canonical_revision"] == "latest"
    assert labels["source_canonical_service"] == "sleep"


@pytest.mark.parametrize("workload", [LABELLED, BARE], ids=["labelled", "bare"])
def test_node_proxy_and_waypoint_map_a_workload_to_the_same_labels(workload: Workload) -> None:
    http = waypoint_labels(workload, workload, "Kubernetes")
    rec = ConnectionRecord(direction="outbound", reporter="source", src_addr="", dst_addr="")
    rec.source = rec.destination = workload
    tcp = rec.labels("Kubernetes")
    for side in ("source", "destination"):
        for key in PEER:
            if key == "principal":
                continue
            name = f"{side}_{key}"
            assert tcp[name] == http[name], name


def test_waypoint_label_cache_follows_a_replaced_workload() -> None:
    """Label sets are cached per workload pair (by identity): a workload replaced by a config
    change (a new object, same uid) gets its new labels, and each status its own series."""
    m = WaypointMetrics(cluster_id="west")
    m.log_enabled = False
    v3 = dataclasses.replace(LABELLED, canonical_revision="v3")
    for dest, status in ((LABELLED, 200), (LABELLED, 200), (v3, 200), (v3, 503)):
        rec = RequestRecord(time.monotonic())
        rec.status, rec.source, rec.destination = status, BARE, dest
        m.record(rec, time.monotonic())
    text = generate_latest(m.registry).decode()
    counts = {
        (s.labels["destination_canonical_revision"], s.labels["response_code"]): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "istio_requests_total"
    }
    assert counts == {("v2", "200"): 2.0, ("v3", "200"): 1.0, ("v3", "503"): 1.0}


def _request_lines(text: str) -> list[str]:
    names = ("istio_requests", "istio_request_duration", "istio_request_bytes", "istio_response_")
    return [x for x in text.splitlines() if any(n in x for n in names)]


def test_waypoint_request_metrics_render_as_prometheus_client_would() -> None:
    """Session 6: the request metrics are counted without prometheus_client's per-metric
    objects and rendered at scrape time; the exposition must be byte for byte what its
    `Counter` / `Histogram` (the previous implementation) give for the same requests: names,
    help, types, label order, series order, bucket bounds, cumulative counts, sums."""
    ref = CollectorRegistry()
    requests = Counter("istio_requests", "Requests", LABELS, registry=ref)
    duration = Histogram(
        "istio_request_duration_milliseconds",
        "Request duration (ms)",
        LABELS,
        buckets=DURATION_BUCKETS_MS,
        registry=ref,
    )
    sizes = [
        Histogram(name, doc, LABELS, buckets=BYTES_BUCKETS, registry=ref)
        for name, doc in (
            ("istio_request_bytes", "Request sizes (bytes)"),
            ("istio_response_bytes", "Response sizes (bytes)"),
        )
    ]
    m = WaypointMetrics(cluster_id="west")
    m.log_enabled = False
    cases = [  # (status, duration s, request bytes, response bytes): bounds, between, past all
        (200, 0.0005, 0, 1),
        (200, 0.005, 10, 1024),
        (503, 0.0123, 1, 10**10),
        (200, 4000.0, 99, 100),
        (404, 0.0, 10**9, 10**9 + 1),
        (200, 0.0249, 5, 0),
    ]
    for status, seconds, sent, received in cases:
        rec = RequestRecord(100.0)
        rec.status, rec.source, rec.destination = status, BARE, LABELLED
        rec.request_bytes, rec.response_bytes = sent, received
        m.record(rec, 100.0 + seconds)
        labels = request_labels_of(m, status)
        requests.labels(*labels).inc()
        duration.labels(*labels).observe(((100.0 + seconds) - 100.0) * 1000.0)
        sizes[0].labels(*labels).observe(sent)
        sizes[1].labels(*labels).observe(received)
    ours = _request_lines(generate_latest(m.registry).decode())
    assert len(ours) > 100
    assert ours == _request_lines(generate_latest(ref).decode())


def request_labels_of(metrics: WaypointMetrics, status: int) -> tuple[str, ...]:
    """The label values (in `LABELS` order) of `metrics`' istio_requests_total series for
    `status`."""
    text = generate_latest(metrics.registry).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "istio_requests_total" and s.labels["response_code"] == str(status):
                return tuple(s.labels[n] for n in LABELS)
    raise AssertionError(f"no series for {status}")


def opened_series(metrics: ProxyMetrics) -> dict[str, float]:
    """destination_canonical_revision -> istio_tcp_connections_opened_total."""
    text = generate_latest(metrics.registry).decode()
    return {
        s.labels["destination_canonical_revision"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "istio_tcp_connections_opened_total"
    }


def test_node_proxy_resolves_a_pairs_series_once_and_follows_a_replaced_workload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 14: the metric children of a (source, destination) pair are resolved once, not per
    connection; a workload replaced by a config update (a new object) gets its own labels."""
    metrics = ProxyMetrics()
    tracker = ConnectionTracker(metrics)
    mapped: list[Workload | None] = []

    def counting(workload: Workload | None, cluster_id: str) -> PeerLabels:
        mapped.append(workload)
        return peer_labels(workload, cluster_id)

    monkeypatch.setattr(ztunnel.metrics, "peer_labels", counting)

    def connection(destination: Workload) -> None:
        rec = ConnectionRecord(
            direction="inbound",
            reporter="destination",
            src_addr="10.0.0.1:5000",
            dst_addr="10.0.0.2:8080",
        )
        rec.source, rec.destination, rec.mtls = BARE, destination, True
        tracker.opened(rec)
        tracker.closed(rec)

    for _ in range(3):
        connection(LABELLED)
    assert mapped == [BARE, LABELLED]  # once per pair, not per connection
    assert opened_series(metrics) == {"v2": 3.0}
    connection(dataclasses.replace(LABELLED, canonical_revision="v3"))
    assert len(mapped) == 4
    assert opened_series(metrics) == {"v2": 3.0, "v3": 1.0}


def test_no_created_series_on_either_proxy() -> None:
    m = WaypointMetrics()
    m.log_enabled = False
    rec = RequestRecord(time.monotonic())
    rec.status = 200
    m.record(rec, time.monotonic())
    text = generate_latest(m.registry).decode()
    assert "_created" not in text
    assert 'istio_build{component="waypoint"' in text
    assert "process_cpu_seconds_total" in text
    assert "_created" not in generate_latest(ProxyMetrics().registry).decode()


@pytest.mark.parametrize(
    ("labels", "service", "revision"),
    [
        ({"service.istio.io/canonical-name": "a", "app": "b", "version": "v1"}, "a", "v1"),
        ({"app.kubernetes.io/name": "n", "app": "b", "app.kubernetes.io/version": "3"}, "n", "3"),
        ({"app": "b", "version": "v9", "service.istio.io/canonical-revision": "r"}, "b", "r"),
        ({}, "owner", "latest"),
    ],
)
def test_canonical_service_and_revision_as_istiod(
    labels: dict[str, str], service: str, revision: str
) -> None:
    assert canonical_service(labels, "owner") == service
    assert canonical_revision(labels) == revision


def test_inbound_service_guessed_by_target_port() -> None:
    a = Service(
        name="a",
        namespace="ns",
        hostname="a.ns.svc.cluster.local",
        ports=(Port(service_port=80, target_port=8080),),
    )
    b = Service(
        name="b",
        namespace="ns",
        hostname="b.ns.svc.cluster.local",
        ports=(Port(service_port=90, target_port=0),),
    )
    services = {a.key: a, b.key: b}
    own = (Port(service_port=90, target_port=9090),)
    w = Workload(uid="w", name="w", namespace="ns", services=((a.key, ()), (b.key, own)))
    assert guess_inbound_service(w, 8080, services.get) is a
    assert guess_inbound_service(w, 9090, services.get) is b  # the workload's own mapping
    assert guess_inbound_service(w, 7070, services.get) is None


def test_version_is_pyprojects_and_the_installed_packages() -> None:
    """`VERSION` (no `importlib.metadata` in a node-proxy worker) agrees with pyproject.toml and
    with the installed package's metadata."""
    import tomllib
    from importlib import metadata
    from pathlib import Path

    from meshcore.telemetry import VERSION, version

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert version() == VERSION == declared == metadata.version("ambient-mesh")
