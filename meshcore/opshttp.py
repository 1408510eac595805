"""A deliberately small HTTP/1.1 server for operator endpoints (admin, metrics, readiness, debug).

Owns: one request per connection, GET/POST only, bounded header read, `connection: close`;
and the binding rule for operator endpoints (`require_loopback`): endpoints that reveal
configuration or change the process (debug, config dump, log level, quit) listen on a loopback
address only, so reaching them takes a shell in the pod/node network namespace (or a
``kubectl port-forward``); metrics and health listen on the pod/node IP for Prometheus and the
kubelet. Used by the node proxy (admin 15000 loopback; 15020/15021), the waypoint (debug 15000
loopback; metrics/health 15020) and the control plane (debug 15014 loopback; metrics
``--metrics-listen``); never on a data path.
Handlers receive (method, parsed query) and return (status, content type, body).
Listens with `meshcore.sockets.LISTEN_BACKLOG` (not asyncio's 100): a readiness probe or a
scrape must not be lost in a SYN burst.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from meshcore.errors import ConfigError
from meshcore.sockets import LISTEN_BACKLOG

Response = tuple[int, str, bytes]
Handler = Callable[[str, dict[str, list[str]]], Awaitable[Response]]
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def is_loopback(host: str) -> bool:
    """True for an IP literal in 127.0.0.0/8 or ::1, or ``localhost``; False for anything else
    (wildcards, other addresses, other host names: they cannot be known to stay local)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(host: str, flag: str, why: str) -> None:
    """Refuse (ConfigError naming `flag`) to bind `host` unless it is a loopback address."""
    if not is_loopback(host):
        raise ConfigError(flag, f"{host!r} is not a loopback address: {why}")


def json_response(obj: object, status: int = 200, indent: int = 2) -> Response:
    return status, "application/json", json.dumps(obj, indent=indent, default=str).encode() + b"\n"


async def serve_http(
    host: str, port: int, routes: dict[str, Handler], *, sock: socket.socket | None = None
) -> asyncio.Server:
    """Serve `routes` on host:port, or on the listening `sock` when given (a socket bound by the
    caller, e.g. one a node proxy hands over to its successor)."""

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

    if sock is not None:
        # start_server listens again on a given socket: pass the backlog or it becomes 100.
        return await asyncio.start_server(handle, sock=sock, backlog=LISTEN_BACKLOG)
    return await asyncio.start_server(
        handle, host, port, reuse_address=True, backlog=LISTEN_BACKLOG
    )
