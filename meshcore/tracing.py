"""Spans over OTLP: the waypoint's one span per request and the node proxy's one span per
connection, exported with opentelemetry-sdk's OTLP gRPC exporter.

Owns: `SpanRecord` (a finished operation: W3C ids the data path already chose and propagated,
timing, attributes), `parse_traceparent` (W3C Trace Context §3.2, the header a peer sent), and
`Tracer`, which turns records into SDK spans and hands them to a `BatchSpanProcessor` (queue +
background export thread: the event loop never waits for the collector; a full queue drops).

Configuration is the OpenTelemetry standard: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` (``host:port`` or ``http://host:port``; plaintext gRPC), or an
explicit address from a flag. No address: no tracer, nothing exported.

Sampling (`Sampler`): which NEW traces are sampled, and whether a caller's decision is followed.
Istio's setting is a percentage of requests (``meshConfig.defaultConfig.tracing.sampling``,
default 1%); a request that carries a ``traceparent`` keeps the caller's sampled flag (Envoy's
behaviour, OpenTelemetry's ``ParentBased`` sampler). The root decision is OpenTelemetry's
``TraceIdRatioBased`` (SDK spec "TraceIdRatioBased": the trace id's low 64 bits below
``ratio * 2**64``), so every hop that sees the same trace id decides the same way. From the
environment: ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG`` (OpenTelemetry SDK
environment variables spec); an unknown sampler or a ratio outside [0, 1] is a `ConfigError`.

Invariants:
- The ids of an exported span are the ones on the wire: the span id is the parent id forwarded
  in ``traceparent`` (waypoint: to the upstream; node proxy: on the HBONE CONNECT), so the
  collector sees the chain client -> waypoint -> server exactly as the headers carried it.
- Only sampled traces (flag 01) are exported (W3C §3.2.2.5).
- Recording is one queue append; it never raises into the data path.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshcore.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

log = logging.getLogger("meshcore.tracing")

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


@dataclass(frozen=True, slots=True)
class TraceParent:
    trace_id: str
    parent_id: str
    flags: str
    """Two hex digits, as received (forwarded unchanged)."""

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 1)


def parse_traceparent(value: str | None) -> TraceParent | None:
    """A valid ``traceparent`` header (W3C Trace Context §3.2), else None."""
    if value is None:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None:
        return None
    version, trace_id, parent, flags, rest = m.groups()
    if version == "ff" or trace_id == "0" * 32 or parent == "0" * 16:
        return None
    if version == "00" and rest is not None:
        return None
    return TraceParent(trace_id, parent, flags)


@dataclass(frozen=True, slots=True)
class SpanRecord:
    name: str
    kind: str
    """"server" (waypoint, inbound node proxy) or "client" (outbound node proxy)."""
    trace_id: str
    span_id: str
    parent_id: str | None
    start_ns: int
    end_ns: int
    attributes: Mapping[str, str | int] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Sampler:
    """OpenTelemetry's ``ParentBased(TraceIdRatioBased(ratio))`` (or the bare ratio sampler
    when `parent_based` is False). Pure."""

    ratio: float = 1.0
    parent_based: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError("tracing sampling", f"ratio {self.ratio} is not within [0, 1]")

    @classmethod
    def from_percent(cls, percent: float) -> Sampler:
        """Istio's ``tracing.sampling`` (0-100, percent of requests), parent-based."""
        if not 0.0 <= percent <= 100.0:
            raise ConfigError("tracing sampling", f"{percent}% is not within [0, 100]")
        return cls(ratio=percent / 100.0)

    def sampled(self, trace_id: str, parent: TraceParent | None) -> bool:
        """The decision for a span of trace `trace_id` (32 hex digits) whose caller sent
        `parent` (None: this span starts the trace)."""
        if self.parent_based and parent is not None:
            return parent.sampled
        if self.ratio >= 1.0:
            return True
        if self.ratio <= 0.0:
            return False
        return int(trace_id[-16:], 16) < round(self.ratio * 2**64)


_SAMPLERS = {
    "always_on": (1.0, False),
    "always_off": (0.0, False),
    "traceidratio": (None, False),
    "parentbased_always_on": (1.0, True),
    "parentbased_always_off": (0.0, True),
    "parentbased_traceidratio": (None, True),
}


def sampler_from_env(environ: Mapping[str, str] | None = None) -> Sampler:
    """``OTEL_TRACES_SAMPLER`` (default ``parentbased_always_on``, the SDK's default) and, for
    the ratio samplers, ``OTEL_TRACES_SAMPLER_ARG`` (default 1.0)."""
    env = os.environ if environ is None else environ
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name not in _SAMPLERS:
        raise ConfigError(
            "OTEL_TRACES_SAMPLER", f"{name!r} is not one of {', '.join(sorted(_SAMPLERS))}"
        )
    ratio, parent_based = _SAMPLERS[name]
    if ratio is None:
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0"
        try:
            ratio = float(arg)
        except ValueError:
            raise ConfigError("OTEL_TRACES_SAMPLER_ARG", f"{arg!r} is not a number") from None
    return Sampler(ratio=ratio, parent_based=parent_based)


def endpoint_from_env() -> str | None:
    value = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return value or None


class Tracer:
    """Exports `SpanRecord`s for one process (`service_name`: ``ztunnel``, ``waypoint``)."""

    def __init__(self, endpoint: str, service_name: str, attributes: Mapping[str, str]) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        target = endpoint if "://" in endpoint else f"http://{endpoint}"
        self.resource = Resource.create({"service.name": service_name, **attributes})
        self.processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=target, insecure=True), schedule_delay_millis=500
        )

    def record(self, rec: SpanRecord) -> None:
        try:
            self.processor.on_end(self._span(rec))
        except Exception as exc:  # never into the data path
            log.debug("span dropped: %s", exc)

    def _span(self, rec: SpanRecord) -> ReadableSpan:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        flags = TraceFlags(TraceFlags.SAMPLED)
        ctx = SpanContext(int(rec.trace_id, 16), int(rec.span_id, 16), False, flags)
        parent = (
            SpanContext(int(rec.trace_id, 16), int(rec.parent_id, 16), True, flags)
            if rec.parent_id
            else None
        )
        status = Status(StatusCode.ERROR, rec.error) if rec.error else Status(StatusCode.UNSET)
        return ReadableSpan(
            name=rec.name,
            context=ctx,
            parent=parent,
            resource=self.resource,
            attributes=dict(rec.attributes),
            kind=SpanKind.SERVER if rec.kind == "server" else SpanKind.CLIENT,
            start_time=rec.start_ns,
            end_time=rec.end_ns,
            status=status,
        )

    def shutdown(self) -> None:
        self.processor.shutdown()  # type: ignore[no-untyped-call]


def tracer_from_env(service_name: str, attributes: Mapping[str, str]) -> Tracer | None:
    endpoint = endpoint_from_env()
    return Tracer(endpoint, service_name, attributes) if endpoint else None
