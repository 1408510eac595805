"""The waypoint's JWKS cache for RequestAuthentication ``jwksUri`` (the I/O edge of JWT).

Owns: `JwksCache` (per-URI keys, fetched once by one task, refreshed every `refresh` seconds,
kept on a failed refresh) and `http_get` (the bounded fetch).

Failure is closed and bounded: a URI that cannot be fetched (timeout, not 200, too large, no
usable key) yields None, so tokens of that issuer are rejected (401), as Istio does when istiod
cannot resolve a JWKS. A failed fetch is not retried for `retry` seconds, so hostile traffic
cannot turn every request into a fetch; concurrent requests share one fetch. Requests without
a token never wait for a fetch (`waypoint.protocol.jwt.keys_needed`).

Invariants: at most one fetch in flight per URI; a response body is read up to
`meshcore.jose.MAX_JWKS_BYTES` + 1 bytes, never more; the clock is injected.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from meshcore.errors import JoseError
from meshcore.jose import MAX_JWKS_BYTES, Jwk, parse_jwks

log = logging.getLogger("waypoint.jwks")

REFRESH = 20 * 60.0
"""Istio's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL default (20 min)."""
RETRY = 10.0

Fetch = Callable[[str, float], Awaitable[bytes]]


def _get_blocking(uri: str, timeout: float) -> bytes:
    # No proxies from the environment: the JWKS comes from where the policy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(uri, headers={"accept": "application/json"})
    with opener.open(req, timeout=timeout) as resp:
        if resp.status != 200:
            raise JoseError(f"JWKS fetch: HTTP {resp.status}")
        data: bytes = resp.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise JoseError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    return data


async def http_get(uri: str, timeout: float) -> bytes:
    """GET `uri` (http/https, system trust store) with a whole-fetch timeout."""
    async with asyncio.timeout(timeout):
        return await asyncio.to_thread(_get_blocking, uri, timeout)


@dataclass(slots=True)
class _Entry:
    keys: tuple[Jwk, ...] | None = None
    fetched: float = 0.0
    failed: float | None = None
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class JwksCache:
    fetch: Fetch = http_get
    clock: Callable[[], float] = field(default=lambda: asyncio.get_running_loop().time())
    refresh: float = REFRESH
    retry: float = RETRY
    fetches: int = 0
    failures: int = 0
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def _due(self, e: _Entry, now: float) -> bool:
        if e.failed is not None and now - e.failed < self.retry:
            return False
        return e.keys is None or now - e.fetched >= self.refresh

    async def _run(self, uri: str, e: _Entry, timeout: float) -> None:
        self.fetches += 1
        try:
            data = await asyncio.wait_for(self.fetch(uri, timeout), timeout)
            keys = parse_jwks(data)
        except (OSError, TimeoutError, ValueError, JoseError) as exc:
            self.failures += 1
            e.failed = self.clock()
            log.warning("JWKS %s: fetch failed (%s); its tokens are rejected%s", uri,
                        exc or type(exc).__name__,
                        " (keeping the last keys)" if e.keys else "")  # fmt: skip
            return
        e.keys, e.fetched, e.failed = keys, self.clock(), None

    async def get(self, uri: str, timeout: float) -> tuple[Jwk, ...] | None:
        """The keys of `uri` (None: never fetched successfully: fail closed)."""
        e = self._entries.setdefault(uri, _Entry())
        if self._due(e, self.clock()) and (e.task is None or e.task.done()):
            e.task = asyncio.create_task(self._run(uri, e, timeout))
        if e.keys is None and e.task is not None and not e.task.done():
            # First fetch: wait for it (bounded by the rule's timeout). A refresh does not
            # make requests wait: the current keys stay in use meanwhile.
            await asyncio.shield(e.task)
        return e.keys
