"""Tracing users can see: the lab's proxies export spans over OTLP to a real OpenTelemetry
Collector (tests/tools/otelcol: the collector's OTLP receiver and file exporter, built from its
Go modules by scripts/build-otelcol and cached under ~/.cache), and the request chain
client -> waypoint -> server is one trace with the right parents.

The collector runs in the lab's underlay namespace on the control plane's address; every proxy
gets ``OTEL_EXPORTER_OTLP_ENDPOINT`` (node proxies inherit it, waypoint pods get it through the
lab's pod environment). If the collector cannot be built on this machine (no Go toolchain or
module proxy), the test says so and uses the minimal OTLP gRPC receiver of
tests/otlp_receiver.py in the same place instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambientctl import waypoint as wpcmd
from ambientctl.lab import system, topology
from ambientctl.lab.demo_waypoint import EXAMPLE, load, wait_app
from ambientctl.lab.lab import Lab

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
COLLECTOR = f"{topology.CONTROLPLANE_IP}:4317"
TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"

CONFIG = """
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: %(address)s
exporters:
  file:
    path: %(out)s
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
"""

# The fallback receiver, run in the underlay netns: prints each span as a JSON line.
RECEIVER = """
import json, sys, time
sys.path.insert(0, %(repo)r)
from tests.otlp_receiver import OtlpReceiver
r = OtlpReceiver(%(address)r).start()
seen = 0
while True:
    spans = r.snapshot()
    for s in spans[seen:]:
        print(json.dumps(s), flush=True)
    seen = len(spans)
    time.sleep(0.05)
"""


def build_collector() -> str | None:
    try:
        proc = subprocess.run(
            [str(REPO / "scripts" / "build-otelcol")], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        print("collector build timed out")
        return None
    if proc.returncode != 0:
        print(f"collector build failed:\n{proc.stderr[-2000:]}")
        return None
    return proc.stdout.strip().splitlines()[-1]


def collector_spans(out: Path) -> list[dict[str, Any]]:
    """Spans from the file exporter's OTLP/JSON lines (ids are hex in OTLP/JSON)."""
    spans: list[dict[str, Any]] = []
    if not out.exists():
        return spans
    for line in out.read_text().splitlines():
        if not line.strip():
            continue
        for rs in json.loads(line).get("resourceSpans", []):
            attrs = rs.get("resource", {}).get("attributes", [])
            service = next(
                (a["value"].get("stringValue") for a in attrs if a["key"] == "service.name"), ""
            )
            for ss in rs.get("scopeSpans", []):
                for s in ss.get("spans", []):
                    spans.append(
                        {
                            "service": service,
                            "name": s.get("name", ""),
                            "trace_id": s.get("traceId", ""),
                            "span_id": s.get("spanId", ""),
                            "parent_id": s.get("parentSpanId", ""),
                        }
                    )
    return spans


def log_out(path: Path) -> Any:
    return open(path, "wb")  # owned by the child process


def receiver_spans(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")]


@pytest.fixture(scope="module")
def traced_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Any]]:
    tmp = tmp_path_factory.mktemp("labtrace")
    binary = build_collector()
    print(f"OTLP receiver: {binary or 'minimal gRPC receiver (tests/otlp_receiver.py)'}")
    old = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{COLLECTOR}"
    lab = Lab("labtrace", state_root=tmp / "state", log=print)
    proc: subprocess.Popen[bytes] | None = None
    try:
        lab.up(EXAMPLE / "manifests")
        under = topology.underlay_netns(lab.name)
        out = tmp / "spans.jsonl"
        log = open(tmp / "collector.log", "wb")  # noqa: SIM115 (closed below)
        if binary:
            cfg = tmp / "otelcol.yaml"
            cfg.write_text(CONFIG % {"address": COLLECTOR, "out": out})
            argv = [binary, f"--config={cfg}"]
            proc = subprocess.Popen(
                system.nsenter(under, argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            read = collector_spans
        else:
            script = RECEIVER % {"repo": str(REPO), "address": COLLECTOR}
            proc = subprocess.Popen(
                system.nsenter(under, [sys.executable, "-c", script]),
                stdout=log_out(out),
                stderr=log,
                start_new_session=True,
            )
            read = receiver_spans
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
        yield lab, lambda: read(out)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        lab.down()
        if old is None:
            os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        else:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = old


def test_client_waypoint_server_chain_reaches_the_collector(traced_lab: tuple[Lab, Any]) -> None:
    lab, spans_of = traced_lab
    r = load(lab, 1, f"traceparent:00-{TRACE}-{CLIENT_SPAN}-01")
    assert r["status"] == {"200": 1}, r

    deadline = time.monotonic() + 30
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        spans = spans_of()
        if any(s["trace_id"] == TRACE for s in spans) and any(
            s["service"] == "ztunnel" for s in spans
        ):
            break
        time.sleep(0.2)
    mine = [s for s in spans if s["trace_id"] == TRACE]
    assert len(mine) == 1, spans
    waypoint = mine[0]
    assert waypoint["service"] == "waypoint"
    assert waypoint["parent_id"] == CLIENT_SPAN

    # The server saw the waypoint's span as its parent (reviews logs the traceparent it got).
    logs = "".join(
        (lab.paths.logs / f"pod-default-reviews-{v}.log").read_text()
        for v in ("v1", "v2")
        if (lab.paths.logs / f"pod-default-reviews-{v}.log").exists()
    )
    assert f"traceparent=00-{TRACE}-{waypoint['span_id']}-01" in logs, logs[-2000:]

    # The node proxies export one span per connection (the client pod's outbound ones here).
    assert any(s["service"] == "ztunnel" and s["name"].startswith("outbound") for s in spans)
