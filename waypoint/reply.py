"""Responses the waypoint writes itself (local replies) instead of relaying an upstream's.

Owns: the wire form of a local reply (`local_reply`: an error's status, ``text/plain`` body and
``server: waypoint``; a gRPC request's error as gRPC's trailers-only 200 with ``grpc-status``,
as Envoy's local replies), and of a route's direct response (`direct_reply`).

Invariants: a HEAD request's local reply has the Content-Length of the body it would have had and no
body (RFC 9110 §9.3.2); an `Overflow` reply carries ``x-envoy-overloaded: true`` (Envoy); the
headers an error carries (`WaypointError.headers`, e.g. ``www-authenticate``) are sent with it.
Callers write a local reply only before any response head left (`Downstream.head_sent`).
"""

from __future__ import annotations

from waypoint.body import Downstream, Request
from waypoint.errors import Overflow, WaypointError

GRPC_STATUS = {401: "16", 403: "7", 404: "12", 503: "14", 504: "4", 429: "14"}
"""gRPC status per HTTP status of a local reply, as Envoy maps them (no RFC: 401
UNAUTHENTICATED 16 (a rejected JWT), 403 PERMISSION_DENIED 7, 404 UNIMPLEMENTED 12,
503/429 UNAVAILABLE 14, 504 DEADLINE_EXCEEDED 4; anything else INTERNAL 13)."""


async def local_reply(
    down: Downstream, req: Request, status: int, text: str, err: WaypointError | None
) -> None:
    """The waypoint's own answer `status` with body `text` (`err`: the error it answers, for
    its extra headers; None for an internal error)."""
    body = text.encode()
    headers: list[tuple[str, str]] = [("content-type", "text/plain"), ("server", "waypoint")]
    if isinstance(err, Overflow):
        headers.append(("x-envoy-overloaded", "true"))
    if err is not None:
        headers.extend(err.headers)
    if req.grpc:
        # gRPC clients read grpc-status (trailers-only response).
        await down.send_head(
            200,
            [
                ("content-type", "application/grpc"),
                ("grpc-status", GRPC_STATUS.get(status, "13")),
                ("grpc-message", text),
            ],
            content_length=None,
            end=True,
        )
        return
    if req.method == "HEAD":
        await down.send_head(status, headers, content_length=len(body), end=True)
        return
    await down.send_head(status, headers, content_length=len(body))
    await down.send_data(body)
    await down.send_end()


async def direct_reply(down: Downstream, status: int, text: str) -> None:
    """A route's direct response (VirtualService ``directResponse``): `status` with `text` as
    a ``text/plain`` body (none when empty)."""
    data = text.encode()
    await down.send_head(
        status, [("content-type", "text/plain")], content_length=len(data), end=not data
    )
    if data:
        await down.send_data(data)
        await down.send_end()
