"""Control-plane debug and metrics HTTP endpoints (default 127.0.0.1:15014).

Routes (GET, JSON unless noted):
  /debug/connections  each connected node proxy: node, peer, per type URL: resources sent,
                      last ACK/NACK nonce and age, last NACK error, pending changes
  /debug/warnings     per object: source parse errors and translation warnings
  /debug/config       the translated records (workloads, services, policies)
  /debug/store        object counts per namespace and kind
  /metrics            Prometheus text format
  /ready              200 once the sources have synced, else 503

Served by `meshcore.opshttp`. Off the push path: handlers only read current state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from meshcore.opshttp import Handler as HttpHandler
from meshcore.opshttp import Response, serve_http
from meshcore.opshttp import json_response as _json_response
from meshcore.telemetry import CONTENT_TYPE, text_exposition

Handler = Callable[[], Response]


def json_response(obj: object, status: int = 200) -> Response:
    return _json_response(obj, status, indent=1)


def metrics_response(registry: object) -> Response:
    return 200, CONTENT_TYPE, text_exposition(registry)  # type: ignore[arg-type]


async def serve_debug(host: str, port: int, routes: dict[str, Handler]) -> asyncio.Server:
    """GET-only read endpoints over the shared operator HTTP server."""

    def adapt(handler: Handler) -> HttpHandler:
        async def run(method: str, _query: dict[str, list[str]]) -> Response:
            if method != "GET":
                return 405, "text/plain", b"method not allowed\n"
            return handler()

        return run

    return await serve_http(host, port, {path: adapt(h) for path, h in routes.items()})
