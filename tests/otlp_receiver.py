"""A minimal OTLP/gRPC trace receiver for tests: opentelemetry-proto's generated TraceService,
collecting every exported span as a flat dict (ids in hex, as on the W3C wire).

Used where the real OpenTelemetry Collector (tests/tools/otelcol, built from its Go module) is
not needed or not available; the lab tracing test prefers the real collector.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc


class _Service(pb_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self.sink = sink

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {}
                    for a in s.attributes:
                        v = a.value
                        attrs[a.key] = v.int_value if v.HasField("int_value") else v.string_value
                    self.sink.add(
                        {
                            "service": resource.get("service.name", ""),
                            "name": s.name,
                            "kind": s.kind,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex(),
                            "attributes": attrs,
                        }
                    )
        return pb.ExportTraceServiceResponse()


class OtlpReceiver:
    """`start()` on `address` (host:port, port 0 = any); `spans` grows as exports arrive."""

    def __init__(self, address: str = "127.0.0.1:0") -> None:
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        register = pb_grpc.add_TraceServiceServicer_to_server
        register(_Service(self), self._server)  # type: ignore[no-untyped-call]
        host = address.rpartition(":")[0]
        self.port = self._server.add_insecure_port(address)
        self.address = f"{host}:{self.port}"

    def add(self, span: dict[str, Any]) -> None:
        with self._lock:
            self.spans.append(span)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.spans)

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
