"""CORS hook: after route selection, answer an allowed preflight or decorate the response.

Owns: `apply_cors` and `CorsDownstream` (a `Downstream` that adds the CORS response headers to
whatever response goes out: upstream, local reply or error), with the decisions of
`waypoint.protocol.cors`.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshcore.config.routes import CorsPolicy
from waypoint.body import Downstream, Request
from waypoint.protocol.cors import (
    allowed_origin,
    is_preflight,
    preflight_headers,
    response_headers,
)

_CORS_NAMES = ("access-control-allow-origin", "access-control-allow-credentials",
               "access-control-expose-headers")  # fmt: skip


class CorsDownstream:
    """Delegates to `inner`, adding `extra` to the response head (replacing the app's own)."""

    def __init__(self, inner: Downstream, extra: list[tuple[str, str]]) -> None:
        self.inner = inner
        self.extra = extra

    @property
    def head_sent(self) -> bool:
        return self.inner.head_sent

    @head_sent.setter
    def head_sent(self, value: bool) -> None:
        self.inner.head_sent = value

    async def send_head(
        self, status: int, headers: Sequence[tuple[str, str]], *, content_length: int | None,
        end: bool = False,
    ) -> None:  # fmt: skip
        kept = [(k, v) for k, v in headers if k not in _CORS_NAMES]
        await self.inner.send_head(status, kept + self.extra, content_length=content_length,
                                   end=end)  # fmt: skip

    async def send_data(self, data: bytes) -> None:
        await self.inner.send_data(data)

    async def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> None:
        await self.inner.send_end(trailers)

    async def send_continue(self) -> None:
        await self.inner.send_continue()

    def reset(self) -> None:
        self.inner.reset()


async def apply_cors(
    policy: CorsPolicy | None, req: Request, down: Downstream
) -> tuple[Downstream, int | None]:
    """(the downstream to use, the status if the waypoint answered a preflight itself)."""
    if policy is None:
        return down, None
    origin = allowed_origin(policy, req.headers)
    if is_preflight(req.method, req.headers):
        if origin is not None:
            await down.send_head(200, [*preflight_headers(policy, origin), ("server", "waypoint")],
                                 content_length=0, end=True)  # fmt: skip
            return down, 200
        if not policy.forward_unmatched_preflights:
            await down.send_head(200, [("server", "waypoint")], content_length=0, end=True)
            return down, 200
        return down, None
    if origin is None:
        return down, None
    return CorsDownstream(down, response_headers(policy, origin)), None
