"""Admin (15000, localhost), metrics (15020) and readiness (15021) HTTP endpoints.

Owns: a deliberately small HTTP/1.1 server (one request per connection, GET/POST only) and the
routes. These are operator endpoints, off the data path; nothing here may block the loop.
Routes: 15000 /config_dump, /quitquitquit (POST), /logging?level=..;
15020 /metrics and /stats/prometheus; 15021 /healthz/ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ztunnel.proxy.context import ProxyContext

Handler = Callable[[str, dict[str, list[str]]], Awaitable[tuple[int, str, bytes]]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


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


def _json(obj: object) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(obj, indent=2, default=str).encode() + b"\n"


def admin_routes(ctx: ProxyContext, shutdown: Callable[[], None]) -> dict[str, Handler]:
    async def config_dump(_m: str, _q: dict[str, list[str]]) -> tuple[int, str, bytes]:
        dump = ctx.state.to_dump()
        dump["certificates"] = ctx.certs.snapshot()
        dump["connections"] = ctx.pool.snapshot()
        dump["node"] = ctx.settings.node
        return _json(dump)

    async def quit_(method: str, _q: dict[str, list[str]]) -> tuple[int, str, bytes]:
        if method != "POST":
            return 405, "text/plain", b"use POST\n"
        asyncio.get_running_loop().call_soon(shutdown)
        return 200, "text/plain", b"draining\n"

    async def logging_(_m: str, q: dict[str, list[str]]) -> tuple[int, str, bytes]:
        level = q.get("level", [""])[0].upper()
        if level:
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                return 400, "text/plain", f"unknown level {level!r}\n".encode()
            logging.getLogger().setLevel(level)
        return 200, "text/plain", f"{logging.getLevelName(logging.getLogger().level)}\n".encode()

    return {"/config_dump": config_dump, "/quitquitquit": quit_, "/logging": logging_}


def metrics_routes(ctx: ProxyContext) -> dict[str, Handler]:
    async def metrics(_m: str, _q: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(ctx.metrics.exposition_registry())

    return {"/metrics": metrics, "/stats/prometheus": metrics}


def readiness_routes(is_ready: Callable[[], bool]) -> dict[str, Handler]:
    async def ready(_m: str, _q: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return (
            (200, "text/plain", b"ready\n") if is_ready() else (503, "text/plain", b"not ready\n")
        )

    return {"/healthz/ready": ready}
