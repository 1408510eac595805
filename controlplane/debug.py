"""Control-plane debug and metrics HTTP endpoints (default 127.0.0.1:15014).

Routes (GET, JSON unless noted):
  /debug/connections  each connected node proxy: node, peer, per type URL: resources sent,
                      last ACK/NACK nonce and age, last NACK error, pending changes
  /debug/warnings     per object: source parse errors and translation warnings
  /debug/config       the translated records (workloads, services, policies)
  /debug/store        object counts per namespace and kind
  /metrics            Prometheus text format
  /ready              200 once the sources have synced, else 503

Owns a deliberately small HTTP/1.1 server (one request per connection). Off the push path:
handlers only read current state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

Response = tuple[int, str, bytes]
Handler = Callable[[], Response]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def json_response(obj: object, status: int = 200) -> Response:
    return status, "application/json", json.dumps(obj, indent=1, default=str).encode() + b"\n"


def metrics_response(registry: object) -> Response:
    return 200, CONTENT_TYPE_LATEST, generate_latest(registry)  # type: ignore[arg-type]


async def serve_debug(host: str, port: int, routes: dict[str, Handler]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            handler = routes.get(urlsplit(target).path)
            if handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            elif method != "GET":
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            else:
                status, ctype, body = handler()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\ncontent-type: {ctype}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
