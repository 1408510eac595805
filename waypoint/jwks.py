"""The waypoint's JWKS cache for RequestAuthentication ``jwksUri`` (the I/O edge of JWT).

Owns: `JwksCache` (per-URI keys, fetched once by one task, refreshed every `refresh` seconds,
kept on a failed refresh), `jwks_location` (OpenID Connect Discovery: the ``jwks_uri`` of an
issuer's OpenID Provider Configuration) and `http_get` (the bounded fetch).

Discovery (a rule without ``jwks``/``jwksUri``, `meshcore.config.requestauthn`): the entry's URI
is the issuer's configuration URL; each fetch (first and every refresh) reads the configuration,
then the JWKS its ``jwks_uri`` names, both bounded and within the rule's one timeout. The
configuration's ``issuer`` must equal the rule's (OpenID Connect Discovery 1.0 §4.3) and
``jwks_uri`` must be http(s); otherwise the fetch failed (closed, as above).

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
import json
import logging
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

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


def jwks_location(document: bytes, issuer: str) -> str:
    """The ``jwks_uri`` of an OpenID Provider Configuration document (OpenID Connect Discovery
    1.0 §3, §4.3). Raises `JoseError` if it is not JSON, its ``issuer`` differs or the URI is
    not http(s)."""
    try:
        doc = json.loads(document)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JoseError(f"OpenID configuration is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise JoseError("OpenID configuration is not a JSON object")
    if doc.get("issuer") != issuer:
        raise JoseError(f"OpenID configuration names issuer {doc.get('issuer')!r}, not {issuer!r}")
    uri = doc.get("jwks_uri")
    parts = urlsplit(uri) if isinstance(uri, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise JoseError(f"OpenID configuration: jwks_uri {uri!r} is not an http(s) URL")
    return str(uri)


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
    _entries: dict[tuple[str, str | None], _Entry] = field(default_factory=dict)

    def _due(self, e: _Entry, now: float) -> bool:
        if e.failed is not None and now - e.failed < self.retry:
            return False
        return e.keys is None or now - e.fetched >= self.refresh

    async def _load(self, uri: str, timeout: float, issuer: str | None) -> tuple[Jwk, ...]:
        if issuer is not None:
            uri = jwks_location(await self.fetch(uri, timeout), issuer)
        return parse_jwks(await self.fetch(uri, timeout))

    async def _run(self, uri: str, e: _Entry, timeout: float, issuer: str | None) -> None:
        self.fetches += 1
        try:
            keys = await asyncio.wait_for(self._load(uri, timeout, issuer), timeout)
        except (OSError, TimeoutError, ValueError, JoseError) as exc:
            self.failures += 1
            e.failed = self.clock()
            log.warning(
                "JWKS %s: fetch failed (%s); its tokens are rejected%s",
                uri,
                exc or type(exc).__name__,
                " (keeping the last keys)" if e.keys else "",
            )
            return
        e.keys, e.fetched, e.failed = keys, self.clock(), None

    async def get(
        self, uri: str, timeout: float, *, issuer: str | None = None
    ) -> tuple[Jwk, ...] | None:
        """The keys of `uri` (None: never fetched successfully: fail closed). With `issuer`,
        `uri` is that issuer's OpenID Provider Configuration (discovery)."""
        e = self._entries.setdefault((uri, issuer), _Entry())
        if self._due(e, self.clock()) and (e.task is None or e.task.done()):
            e.task = asyncio.create_task(self._run(uri, e, timeout, issuer))
        if e.keys is None and e.task is not None and not e.task.done():
            # First fetch: wait for it (bounded by the rule's timeout). A refresh does not
            # make requests wait: the current keys stay in use meanwhile.
            await asyncio.shield(e.task)
        return e.keys
