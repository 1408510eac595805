"""Spans over OTLP from the waypoint (one per request) and the node proxies (one per
connection), with W3C traceparent propagated, received by a real gRPC OTLP receiver
(opentelemetry-proto's generated TraceService, tests/otlp_receiver.py).

The lab test (tests/root/test_lab_tracing.py) repeats the request chain with the real
OpenTelemetry Collector.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshcore.tracing import Sampler, Tracer
from tests.loopback.harness import call_service, running_mesh
from tests.loopback.test_waypoint_harness import PORT, REVIEWS_VIP, run, waypoint_mesh
from tests.otlp_receiver import OtlpReceiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


async def wait_spans(
    receiver: OtlpReceiver, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = receiver.snapshot()
        if pred(spans):
            return spans
        await asyncio.sleep(0.05)
    raise AssertionError(f"spans never arrived: {receiver.snapshot()}")


def test_waypoint_span_per_request_continues_the_callers_trace(tmp_path: Path) -> None:
    receiver = OtlpReceiver().start()

    async def main() -> None:
        async with waypoint_mesh(tmp_path) as mesh:
            tracer = Tracer(receiver.address, "waypoint", {})
            mesh.waypoint.ctx.metrics.tracer = tracer
            headers = {"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01", "baggage": "k=v"}
            url = f"http://{REVIEWS_VIP}:{PORT}/a?q=1"
            async with mesh.session() as s, s.get(url, headers=headers) as r:
                assert r.status == 200
            spans = await wait_spans(receiver, lambda sp: any(x["trace_id"] == TRACE for x in sp))
            (span,) = [x for x in spans if x["trace_id"] == TRACE]
            assert span["service"] == "waypoint"
            assert span["parent_id"] == CLIENT_SPAN  # the client's span is the parent
            assert span["attributes"]["http.status_code"] == 200
            assert span["attributes"]["http.method"] == "GET"
            # The server got the waypoint's span as its parent, and the baggage unchanged.
            got = [r for b in mesh.backends.pods.values() for r in b.requests]
            assert len(got) == 1
            assert got[0]["headers"]["traceparent"] == f"00-{TRACE}-{span['span_id']}-01"
            assert got[0]["headers"]["baggage"] == "k=v"

            # An unsampled trace is propagated but not exported.
            unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
            headers = {"traceparent": f"00-{unsampled}-{CLIENT_SPAN}-00"}
            url = f"http://{REVIEWS_VIP}:{PORT}/b"
            async with mesh.session() as s, s.get(url, headers=headers) as r:
                assert r.status == 200
            tracer.processor.force_flush()
            await asyncio.sleep(0.2)
            assert not [x for x in receiver.snapshot() if x["trace_id"] == unsampled]
            tracer.shutdown()

    try:
        run(main())
    finally:
        receiver.stop()


def test_node_proxy_span_per_connection_with_the_destination_as_child(tmp_path: Path) -> None:
    receiver = OtlpReceiver().start()

    async def main() -> None:
        async with running_mesh(tmp_path) as mesh:
            tracers = []
            for node in (mesh.node_a, mesh.node_b):
                tracer = Tracer(
                    receiver.address, "ztunnel", {"k8s.node.name": node.ctx.settings.node}
                )
                node.ctx.tracker.tracer = tracer
                tracers.append(tracer)
            (_got, n), _ = await call_service(5, 100, 300)
            assert n == 300

            def chain(spans: list[dict[str, Any]]) -> bool:
                return len(spans) >= 2

            spans = await wait_spans(receiver, chain)
            out = [s for s in spans if s["name"].startswith("outbound")]
            inb = [s for s in spans if s["name"].startswith("inbound")]
            assert len(out) == 1, spans
            assert len(inb) == 1, spans
            assert out[0]["parent_id"] == ""  # the connection starts the trace at the source
            assert inb[0]["trace_id"] == out[0]["trace_id"]
            assert inb[0]["parent_id"] == out[0]["span_id"]  # via the CONNECT's traceparent
            assert inb[0]["attributes"]["src.identity"].endswith("/sa/sleep")
            # From the client's side: 8 header + 100 bytes up, 300 down.
            assert out[0]["attributes"]["bytes_recv"] == 108
            assert out[0]["attributes"]["bytes_sent"] == 300
            for tracer in tracers:
                tracer.shutdown()

    try:
        run(main())
    finally:
        receiver.stop()


def test_node_proxy_sampling_ratio_and_parent_based(tmp_path: Path) -> None:
    """Istio's ``tracing.sampling``: the source node proxy samples new traces by ratio (0: no
    span at all, 100%: every connection), and the destination follows the CONNECT's sampled
    flag whatever its own ratio (parent-based), so a trace is exported whole or not at all."""
    receiver = OtlpReceiver().start()

    async def main() -> None:
        async with running_mesh(tmp_path) as mesh:
            src, dst = mesh.node_a.ctx.tracker, mesh.node_b.ctx.tracker
            tracers = [Tracer(receiver.address, "ztunnel", {}) for _ in range(2)]
            src.tracer, dst.tracer = tracers

            async def connections(n: int) -> list[dict[str, Any]]:
                before = len(receiver.snapshot())
                for i in range(n):
                    (_got, size), _ = await call_service(i, 10, 20)
                    assert size == 20
                for t in tracers:
                    t.processor.force_flush()
                await asyncio.sleep(0.3)
                return receiver.snapshot()[before:]

            # Ratio 0 at the source, 1 at the destination: nothing (the CONNECT says unsampled).
            src.sampler, dst.sampler = Sampler(ratio=0.0), Sampler(ratio=1.0)
            assert await connections(5) == []
            # Ratio 1 at the source, 0 at the destination: every connection, both spans.
            src.sampler, dst.sampler = Sampler(ratio=1.0), Sampler(ratio=0.0)
            await connections(5)
            spans = await wait_spans(receiver, lambda sp: len(sp) >= 10)
            assert sum(s["name"].startswith("outbound") for s in spans) == 5
            assert sum(s["name"].startswith("inbound") for s in spans) == 5
            # A ratio between: the decision is per trace, and the destination agrees with it.
            src.sampler = dst.sampler = Sampler.from_percent(50)
            got = await connections(40)
            out = {s["trace_id"] for s in got if s["name"].startswith("outbound")}
            inb = {s["trace_id"] for s in got if s["name"].startswith("inbound")}
            assert 5 <= len(out) <= 35, len(out)  # ~20 of 40 (binomial, p < 1e-5 outside)
            assert inb == out
            for t in tracers:
                t.shutdown()

    try:
        run(main())
    finally:
        receiver.stop()


def test_waypoint_sampling_ratio_and_parent_based(tmp_path: Path) -> None:
    """The waypoint: a request without a traceparent starts a trace sampled by ratio (the
    forwarded flag says so: 00 at ratio 0, 01 at 1); a caller's flag is kept either way."""
    receiver = OtlpReceiver().start()

    async def main() -> None:
        async with waypoint_mesh(tmp_path) as mesh:
            metrics = mesh.waypoint.ctx.metrics
            tracer = Tracer(receiver.address, "waypoint", {})
            metrics.tracer = tracer

            def seen() -> list[str]:
                pods = mesh.backends.pods.values()
                return [str(r["headers"]["traceparent"]) for b in pods for r in b.requests]

            async def request(traceparent: str | None) -> str:
                """The traceparent the server got."""
                before = seen()
                headers = {"traceparent": traceparent} if traceparent else {}
                url = f"http://{REVIEWS_VIP}:{PORT}/s"
                async with mesh.session() as s, s.get(url, headers=headers) as r:
                    assert r.status == 200
                (new,) = [t for t in seen() if t not in before]
                return new

            async def exported() -> list[dict[str, Any]]:
                tracer.processor.force_flush()
                await asyncio.sleep(0.2)
                return receiver.snapshot()

            metrics.sampler = Sampler(ratio=0.0)
            forwarded = [await request(None) for _ in range(5)]
            assert all(f.endswith("-00") for f in forwarded), forwarded
            assert await exported() == []
            # Parent-based: the caller sampled it, so the waypoint exports it at ratio 0.
            sampled = await request(f"00-{TRACE}-{CLIENT_SPAN}-01")
            assert sampled.endswith("-01")
            spans = await wait_spans(receiver, lambda sp: len(sp) == 1)
            assert spans[0]["trace_id"] == TRACE
            metrics.sampler = Sampler(ratio=1.0)
            forwarded = [await request(None) for _ in range(5)]
            assert all(f.endswith("-01") for f in forwarded), forwarded
            # ... and a caller's "not sampled" is kept at ratio 1.
            unsampled = "6bf92f3577b34da6a3ce929d0e0e4736"
            assert (await request(f"00-{unsampled}-{CLIENT_SPAN}-00")).endswith("-00")
            spans = await wait_spans(receiver, lambda sp: len(sp) >= 6)
            assert len(await exported()) == 6
            assert unsampled not in {s["trace_id"] for s in spans}
            tracer.shutdown()

    try:
        run(main())
    finally:
        receiver.stop()
