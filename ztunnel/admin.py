"""Admin (15000, localhost), metrics (15020) and readiness (15021) HTTP endpoints.

Owns the routes (served by `meshcore.opshttp`). These are operator endpoints, off the data path;
nothing here may block the loop. Admin (the whole config dump, certificates, quit, log level)
is served on a loopback address only (`serve_admin`, `meshcore.opshttp.require_loopback`);
metrics and readiness on the node IP.
Routes: 15000 /config_dump, /quitquitquit (POST), /logging?level=..;
15020 /metrics and /stats/prometheus; 15021 /healthz/ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshcore.opshttp import Handler, json_response, require_loopback, serve_http
from meshcore.telemetry import CONTENT_TYPE, text_exposition
from ztunnel.proxy.context import ProxyContext

__all__ = ["admin_routes", "metrics_routes", "readiness_routes", "serve_admin", "serve_http"]

ADMIN_LOOPBACK_WHY = (
    "the admin endpoint dumps the whole config and can stop the proxy (metrics: 15020)"
)


async def serve_admin(host: str, port: int, routes: dict[str, Handler]) -> asyncio.Server:
    """The admin routes, on a loopback `host` only (ConfigError otherwise)."""
    require_loopback(host, "--admin-address", ADMIN_LOOPBACK_WHY)
    return await serve_http(host, port, routes)


def admin_routes(ctx: ProxyContext, shutdown: Callable[[], None]) -> dict[str, Handler]:
    async def config_dump(_m: str, _q: dict[str, list[str]]) -> tuple[int, str, bytes]:
        dump = ctx.state.to_dump()
        dump["certificates"] = ctx.certs.snapshot()
        dump["connections"] = ctx.pool.snapshot()
        dump["node"] = ctx.settings.node
        return json_response(dump)

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
        ctx.tracker.flush()  # this worker's live bytes are exact at scrape time
        return 200, CONTENT_TYPE, text_exposition(ctx.metrics.exposition_registry())

    return {"/metrics": metrics, "/stats/prometheus": metrics}


def readiness_routes(is_ready: Callable[[], bool]) -> dict[str, Handler]:
    async def ready(_m: str, _q: dict[str, list[str]]) -> tuple[int, str, bytes]:
        return (
            (200, "text/plain", b"ready\n") if is_ready() else (503, "text/plain", b"not ready\n")
        )

    return {"/healthz/ready": ready}
