"""A deliberately small HTTP/1.1 server for operator endpoints (admin, metrics, readiness, debug).

Owns: one request per connection, GET/POST only, bounded header read, `connection: close`.
Used by the node proxy (15000/15020/15021) and the control plane (15014); never on a data path.
Handlers receive (method, parsed query) and return (status, content type, body).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

Response = tuple[int, str, bytes]
Handler = Callable[[str, dict[str, list[str]]], Awaitable[Response]]
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def json_response(obj: object, status: int = 200, indent: int = 2) -> Response:
    return status, "application/json", json.dumps(obj, indent=indent, default=str).encode() + b"\n"


async def serve_http(host: str, port: int, routes: dict[str, Handler]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            url = urlsplit(target)
            handler = routes.get(url.path)
            if handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            elif method not in ("GET", "POST"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            else:
                status, ctype, body = await handler(method, parse_qs(url.query))
            writer.write(
                f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\ncontent-type: {ctype}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ValueError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
