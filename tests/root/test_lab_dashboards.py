"""Istio's dashboards against a running lab, evaluated by a real Prometheus (Debian's).

The lab is examples/lab-waypoint with its waypoint applied (client -> reviews through the
waypoint). Prometheus runs in node-1's network namespace and finds its targets the Kubernetes
way: each target carries the ``__meta_kubernetes_pod_*`` labels kubernetes_sd would give it
(file_sd here, there is no API server), and the scrape config's relabeling is Prometheus's
``kubernetes-pods`` job (keep ``prometheus.io/scrape=true``, address from the pod IP and
``prometheus.io/port``, ``namespace`` and ``pod`` labels). The node proxies are scraped as the
DaemonSet's host-network pods (``ztunnel-<node>`` on the node IP), the waypoint on its pod IP.

Every PromQL expression of tests/root/data/istio_dashboard_queries.yaml (copied from Istio's
published dashboards, source named there) must return series for the traffic generated here,
except those marked ``expect: none`` with the reason.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambientctl import waypoint as wpcmd
from ambientctl.lab import system
from ambientctl.lab.demo_waypoint import EXAMPLE, WAYPOINT_POD, load, wait_app
from ambientctl.lab.lab import Lab

pytestmark = pytest.mark.timeout(300)

QUERIES = Path(__file__).with_name("data") / "istio_dashboard_queries.yaml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
API = "http://127.0.0.1:9090"

# Prometheus's example `kubernetes-pods` job (documentation/examples/prometheus-kubernetes.yml),
# with file_sd standing in for kubernetes_sd.
CONFIG = """
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: kubernetes-pods
    file_sd_configs: [{files: ["%(targets)s"], refresh_interval: 1s}]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        action: replace
        target_label: __metrics_path__
        regex: (.+)
      - source_labels:
          - __meta_kubernetes_pod_ip
          - __meta_kubernetes_pod_annotation_prometheus_io_port
        action: replace
        regex: ([^;]+);(\\d+)
        replacement: $1:$2
        target_label: __address__
      - action: labelmap
        regex: __meta_kubernetes_pod_label_(.+)
      - source_labels: [__meta_kubernetes_namespace]
        action: replace
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        action: replace
        target_label: pod
"""


def k8s_target(namespace: str, pod: str, ip: str, app: str) -> dict[str, Any]:
    """A file_sd entry shaped like a kubernetes_sd pod target (annotations of Istio's pods)."""
    return {
        "targets": [f"{ip}:15020"],
        "labels": {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_label_app": app,
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_annotation_prometheus_io_port": "15020",
            "__meta_kubernetes_pod_annotation_prometheus_io_path": "/stats/prometheus",
        },
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("labdash")
    lab = Lab("labdash", state_root=tmp / "state", log=print)
    try:
        lab.up(EXAMPLE / "manifests")
        assert wait_app(lab), "the reviews pods never answered"
        args = argparse.Namespace(
            wp_command="apply",
            name="waypoint",
            namespace="default",
            waypoint_for="service",
            enroll_namespace=True,
            service_account=None,
            dir=None,
            lab=None,
        )
        assert wpcmd.run(args, out=print, lab=lab) == 0
        yield lab
    finally:
        lab.down()


def query(netns: str, expr: str) -> list[dict[str, Any]]:
    url = f"{API}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    status, body = system.http_get(netns, url)
    assert status == 200, (expr, body)
    doc = json.loads(body)
    assert doc["status"] == "success", (expr, doc)
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


@pytest.fixture(scope="module")
def prometheus(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("prom")
    st = lab.state or lab.load()
    targets = [
        k8s_target("istio-system", f"ztunnel-{n.plan.name}", n.plan.ip, "ztunnel") for n in st.nodes
    ]
    wp = lab.pod(WAYPOINT_POD)
    targets.append(k8s_target(wp.namespace, wp.name, wp.ip, "waypoint"))
    (tmp / "targets.json").write_text(json.dumps(targets))
    (tmp / "prometheus.yml").write_text(CONFIG % {"targets": tmp / "targets.json"})
    netns = st.nodes[0].plan.netns
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    argv = [
        PROMETHEUS,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        "--web.listen-address=127.0.0.1:9090",
    ]
    proc = subprocess.Popen(
        system.nsenter(netns, argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:

        def all_up() -> bool:
            try:
                up = query(netns, "up")
            except Exception:
                return False
            return len(up) == len(targets) and all(r["value"][1] == "1" for r in up)

        system.wait_for(all_up, timeout=60, what="prometheus scraping every target", interval=0.5)
        yield netns
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    return expr


def test_istio_dashboard_queries_return_series(lab: Lab, prometheus: str) -> None:
    r = load(lab, 200)
    assert r["errors"] == 0, r
    assert r["status"] == {"200": 200}, r
    data = yaml.safe_load(QUERIES.read_text())
    variables: dict[str, str] = data["variables"]
    cases = [(d["file"], q) for d in data["dashboards"] for q in d["queries"]]
    time.sleep(3)  # a few 1 s scrapes after the traffic: rate() needs two samples per series
    missing: list[str] = []
    for file, q in cases:
        expr = substitute(q["expr"], variables)
        result: list[dict[str, Any]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            result = query(prometheus, expr)
            if result or q["expect"] == "none":
                break
            time.sleep(0.5)
        if q["expect"] == "series" and not result:
            missing.append(f"{Path(file).name}: {q['panel']}: {expr}")
        if q["expect"] == "none":
            assert not result, (q["panel"], "now returns data: update the expectation", result)
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)

    # The labels the dashboards group by come from Istio's standard labels, not "unknown".
    by = "source_canonical_revision, destination_canonical_service, destination_cluster"
    rows = query(prometheus, f'sum by ({by}) (istio_requests_total{{reporter="waypoint"}})')
    assert rows
    assert all(
        r["metric"]["destination_canonical_service"] == "reviews"
        and r["metric"]["destination_cluster"] == "Kubernetes"
        and r["metric"]["source_canonical_revision"] != "unknown"
        for r in rows
    ), rows

    # istio_build, the xDS client's and process series from every proxy (node proxies on their
    # node IP, the waypoint on its pod IP), as Istio's ztunnel dashboard and alerts read them.
    for expr in (
        'istio_build{component=~"ztunnel|waypoint"}',
        "sum by (app, url) (istio_xds_message_total)",
        "process_resident_memory_bytes",
    ):
        apps = [r["metric"].get("app") for r in query(prometheus, expr)]
        assert sorted(set(apps)) == ["waypoint", "ztunnel"], (expr, apps)
        assert apps.count("ztunnel") >= 2, (expr, apps)  # both nodes
