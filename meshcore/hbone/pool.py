"""HBONE connection pool: reuse mTLS connections for many CONNECT streams.

Owns: the set of client `HboneProtocol`s, keyed like Istio's pool by (source identity, expected
destination identities, destination address, source IP): `PoolKey` (defined beside `connect`,
which dials one, in `meshcore.hbone.aio`).

Invariants (in the spirit of ztunnel's pool.rs):
- A connection carries at most `max_streams` concurrent streams (capped again by the peer's
  MAX_CONCURRENT_STREAMS); when every pooled connection of a key is full a new one is opened.
- Concurrent requests for a key with no usable connection share ONE in-flight connect, so a burst
  does not open a burst of TLS handshakes. A finished connect is never waited on again: a request
  that finds every connection full dials anew (each pass of its loop yields to the event loop). A
  shared connect that fails with a transient error (OSError, timeout) does not fail its waiters:
  each retries (`DIAL_ATTEMPTS` in all), sharing the next connect again; verification failures
  are not retried.
- A connection that has carried no stream for `idle_timeout` is closed by `sweep(now)`; a closed
  or GOAWAY'd connection is never handed out again.
- The key includes the source identity, so one workload's certificate is never used for another's
  traffic.
- Transport (issue 16): a key with ``transport="h3"`` dials HBONE over HTTP/3
  (`meshcore.hbone.h3aio`) first. HTTP/3 gets a head start (`h3_head_start`); when it has not
  settled by then, HTTP/2 is dialled beside it and the first connection up serves the request,
  as Chromium races its QUIC job against TCP (and RFC 8305 §5 staggers its attempts). A slow
  HTTP/3 handshake (a loaded machine) is not a failure: the attempt runs on in the background,
  bounded by `connect_timeout`, and when it completes the HTTP/3 connection takes the key's new
  streams (its HTTP/2 fallbacks get GOAWAY; their streams finish). Only an attempt that fails
  (UDP blocked, no listener, the whole `connect_timeout` without an answer) remembers the peer
  address as HTTP/3-broken for `h3_retry_after`, as Chromium marks an alternative service
  broken only when its job fails. One HTTP/3 attempt per key at a time. A refused peer
  identity never falls back: it is an error on either transport.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from meshcore.certs import WorkloadCertificate
from meshcore.errors import PeerVerificationError, StreamRefused
from meshcore.hbone.aio import (
    HboneProtocol,
    HboneSettings,
    HboneStream,
    TunnelSink,
    connect,
)
from meshcore.hbone.aio import PoolKey as PoolKey  # re-exported: the pool's key
from meshcore.identity import SpiffeId

if TYPE_CHECKING:  # aioquic is imported by the first HTTP/3 dial only (`_dial_h3`)
    from meshcore.hbone.h3aio import H3Protocol

log = logging.getLogger("meshcore.hbone.pool")
PooledConnection: TypeAlias = "HboneProtocol | H3Protocol"
H3_HEAD_START = 2.0
"""Seconds HTTP/3 runs alone before HTTP/2 is dialled beside it. A QUIC handshake takes
milliseconds on an idle node but seconds on a loaded one (2.9 s measured at load 12): past the
head start HTTP/2 serves the request while HTTP/3 goes on (RFC 8305 §5 staggers its attempts
the same way, with a shorter default delay for a single RTT's handshake)."""
H3_RETRY_AFTER = 300.0
H3_UNREACHABLE_MAX = 4096  # peers remembered as HTTP/3-unreachable (beyond: not remembered)

IDLE_TIMEOUT = 300.0  # Istio: idle connections are released after 5 minutes
MAX_STREAMS_PER_CONNECTION = 100
DIAL_ATTEMPTS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolLimits:
    """A pool's bounds and timeouts, fixed when the pool is built."""

    max_streams: int = MAX_STREAMS_PER_CONNECTION
    idle_timeout: float = IDLE_TIMEOUT
    connect_timeout: float = 10.0
    h3_head_start: float = H3_HEAD_START
    h3_retry_after: float = H3_RETRY_AFTER


DEFAULT_LIMITS = PoolLimits()


class HbonePool:
    def __init__(
        self,
        context_for: Callable[[SpiffeId], Awaitable[ssl.SSLContext]],
        *,
        trust_domain: str,
        cert_for: Callable[[SpiffeId], Awaitable[WorkloadCertificate]] | None = None,
        limits: PoolLimits = DEFAULT_LIMITS,
    ) -> None:
        """`cert_for`: the certificate of an identity, for HTTP/3 (without: HTTP/2 only)."""
        self._context_for = context_for
        self._cert_for = cert_for
        self.h3_head_start = limits.h3_head_start
        self.h3_retry_after = limits.h3_retry_after
        self.h3_unreachable: dict[tuple[str, int], float] = {}  # address -> retry HTTP/3 at
        self.h3_fallbacks = 0
        self.trust_domain = trust_domain
        self.settings = HboneSettings(trust_domain=trust_domain)
        """Shared by every connection the pool dials."""
        self.max_streams = limits.max_streams
        self.idle_timeout = limits.idle_timeout
        self.connect_timeout = limits.connect_timeout
        self._conns: dict[PoolKey, list[PooledConnection]] = {}
        self._connecting: dict[PoolKey, asyncio.Task[PooledConnection]] = {}
        self._h3_attempts: dict[PoolKey, asyncio.Task[H3Protocol | None]] = {}
        self._h3_trying: set[tuple[str, int]] = set()
        """Addresses an attempt is dialling: one QUIC attempt per peer address, not per key
        (a key is also its source identity and IP), so a blocked UDP path delays one dial."""
        self.connections_opened = 0
        self.streams_retried = 0  # CONNECTs the peer did not process, sent again

    async def open_stream(
        self,
        key: PoolKey,
        authority: str,
        headers: Sequence[tuple[str, str]],
        sink: TunnelSink,
    ) -> HboneStream:
        """A CONNECT stream on a pooled connection. Raises HboneError (non-200),
        PeerVerificationError, or OSError/ConnectionError (connect failures).

        A stream the peer did not process (StreamRefused: above its GOAWAY's last stream id,
        e.g. while it hands its listeners to a successor) is retried on another connection,
        `DIAL_ATTEMPTS` in all (RFC 9113 §8.7)."""
        for attempt in range(1, DIAL_ATTEMPTS + 1):
            proto = await self._connection(key)
            try:
                return await proto.open_stream(authority, headers, sink)
            except StreamRefused:
                if attempt == DIAL_ATTEMPTS:
                    raise
                self.streams_retried += 1
                log.debug("CONNECT %s to %s not processed; retrying", authority, key.address)
        raise AssertionError("unreachable")

    async def _connection(self, key: PoolKey) -> PooledConnection:
        failures = 0
        while True:
            for proto in self._conns.get(key, ()):
                if not proto.closed and proto.conn.can_open_stream(self.max_streams):
                    return proto
            task = self._connecting.get(key)
            if task is None or task.done():
                # A finished dial is never awaited again: awaiting a done task does not yield,
                # so a caller that found its connection full would loop here without end, and
                # the event loop with it. It is done but still here between its last step and
                # `_dialed` (a callback, run one loop iteration later).
                task = asyncio.get_running_loop().create_task(self._dial(key))
                self._connecting[key] = task
                task.add_done_callback(functools.partial(self._dialed, key))
            try:
                proto = await asyncio.shield(task)
            except (OSError, TimeoutError):
                # One failed dial (e.g. EADDRINUSE after a burst) must not fail every tunnel
                # that happened to wait on it: each waiter tries again, up to DIAL_ATTEMPTS.
                failures += 1
                if failures >= DIAL_ATTEMPTS:
                    raise
                continue
            if proto.conn.can_open_stream(self.max_streams):
                return proto
            if proto.conn.open_streams == 0:
                # Not filled by others: a peer that takes no stream on a new connection
                # (MAX_CONCURRENT_STREAMS 0, GOAWAY at once) gets DIAL_ATTEMPTS dials per
                # tunnel, not one per pass of this loop (thousands a second, each pooled).
                proto.close()
                failures += 1
                if failures >= DIAL_ATTEMPTS:
                    raise ConnectionRefusedError(
                        f"HBONE peer {key.address} takes no stream on a new connection"
                    )
            # Filled up by others meanwhile: loop, and dial again if still full.

    async def _dial(self, key: PoolKey) -> PooledConnection:
        if key.transport == "h3" and self._cert_for is not None:
            return await self._dial_h3_first(key)
        return self._add(key, await self._dial_h2(key))

    def _add(self, key: PoolKey, proto: PooledConnection) -> PooledConnection:
        """Pool a new connection. An HTTP/3 one retires the key's HTTP/2 fallbacks (GOAWAY:
        their streams finish, new ones take HTTP/3)."""
        self.connections_opened += 1
        conns = self._conns.setdefault(key, [])
        if not isinstance(proto, HboneProtocol):
            for old in [c for c in conns if isinstance(c, HboneProtocol)]:
                old.close()
                conns.remove(old)
        conns.append(proto)
        return proto

    async def _dial_h3_first(self, key: PoolKey) -> PooledConnection:
        """HTTP/3 with a head start, then raced against HTTP/2 (module doc)."""
        loop = asyncio.get_running_loop()
        address = key.h3_address or key.address
        if loop.time() < self.h3_unreachable.get(address, 0.0) or address in self._h3_trying:
            return self._add(key, await self._dial_h2(key))  # broken, or already being tried
        h3 = loop.create_task(self._attempt_h3(key, address))
        self._h3_attempts[key] = h3
        self._h3_trying.add(address)
        h3.add_done_callback(functools.partial(self._h3_settled, key))
        await asyncio.wait((h3,), timeout=self.h3_head_start)
        h2: asyncio.Task[HboneProtocol] | None = None
        if not h3.done():
            h2 = loop.create_task(self._dial_h2(key))
            try:
                await asyncio.wait((h3, h2), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError as err:
                h2.cancel()
                raise err
            failed = h2.exception() if h2.done() and not h2.cancelled() else None
            if isinstance(failed, PeerVerificationError):
                h3.cancel()  # a refused identity is an error on either transport: no waiting
                raise failed
            if h2.done() and not h2.cancelled() and failed is None:
                if not h3.done():  # HTTP/3 runs on and takes over when it completes
                    return self._add(key, h2.result())
            elif not h3.done():  # HTTP/2 failed: HTTP/3 is all there is
                await asyncio.wait((h3,))
        refused = None if h3.cancelled() else h3.exception()
        proto = None if h3.cancelled() or refused is not None else h3.result()
        if h2 is not None and (proto is not None or refused is not None):
            h2.cancel()  # HTTP/3 settled it; one that came up at the same time is dropped
            if h2.done() and not h2.cancelled() and h2.exception() is None:
                h2.result().close()
        if refused is not None:
            raise refused  # PeerVerificationError: never a fallback
        if proto is not None:
            return proto
        if h2 is None:
            return self._add(key, await self._dial_h2(key))
        return self._add(key, await h2)

    async def _attempt_h3(self, key: PoolKey, address: tuple[str, int]) -> H3Protocol | None:
        """One HTTP/3 dial, bounded by `connect_timeout`; pooled when it succeeds. None: it
        failed for a network reason and `address` is remembered as HTTP/3-broken."""
        assert self._cert_for is not None
        cert = await self._cert_for(key.source)
        from meshcore.hbone.h3aio import connect_h3  # here: aioquic loads with HTTP/3 only

        try:
            proto = await connect_h3(
                key,
                cert,
                self.settings,
                timeout=self.connect_timeout,
                on_close=functools.partial(self._remove, key),
            )
        except (TimeoutError, OSError) as err:  # not PeerVerificationError: no fallback
            now = asyncio.get_running_loop().time()
            if len(self.h3_unreachable) >= H3_UNREACHABLE_MAX:  # bounded: expired ones go
                self.h3_unreachable = {a: t for a, t in self.h3_unreachable.items() if t > now}
            if len(self.h3_unreachable) < H3_UNREACHABLE_MAX:
                self.h3_unreachable[address] = now + self.h3_retry_after
            self.h3_fallbacks += 1
            log.warning(
                "HTTP/3 to %s:%d failed (%s): HTTP/2 for %.0fs",
                *address,
                str(err) or type(err).__name__,
                self.h3_retry_after,
            )
            return None
        self._add(key, proto)
        return proto

    def _h3_settled(self, key: PoolKey, task: asyncio.Task[H3Protocol | None]) -> None:
        if self._h3_attempts.get(key) is task:
            del self._h3_attempts[key]
            self._h3_trying.discard(key.h3_address or key.address)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here too: an attempt that lost the race has no caller left to raise
            # it to (its HTTP/2 connection verified the peer on its own).
            log.warning("HTTP/3 to %s:%d refused: %s", *key.address, task.exception())

    async def _dial_h2(self, key: PoolKey) -> HboneProtocol:
        ctx = await self._context_for(key.source)
        return await connect(
            key,
            ctx,
            self.settings,
            timeout=self.connect_timeout,
            on_close=functools.partial(self._remove, key),
        )

    def _dialed(self, key: PoolKey, task: asyncio.Task[PooledConnection]) -> None:
        if self._connecting.get(key) is task:  # not a dial started after it finished
            del self._connecting[key]

    def _remove(self, key: PoolKey, proto: PooledConnection) -> None:
        conns = self._conns.get(key)
        if conns and proto in conns:
            conns.remove(proto)
            if not conns:
                del self._conns[key]

    def sweep(self, now: float) -> int:
        """Close connections idle for longer than `idle_timeout`; returns how many."""
        closed = 0
        for conns in list(self._conns.values()):
            for proto in list(conns):
                if not proto.streams and now - proto.idle_since >= self.idle_timeout:
                    proto.close()
                    closed += 1
        return closed

    def retire(self, source: SpiffeId) -> None:
        """Stop handing out connections that present `source`'s old certificate (after a
        rotation): GOAWAY lets their streams finish while new streams get new connections."""
        for key, conns in list(self._conns.items()):
            if key.source == source:
                for proto in list(conns):
                    proto.close()
                    self._remove(key, proto)
        for key, attempt in list(self._h3_attempts.items()):
            if key.source == source:
                attempt.cancel()  # it dialled with the old certificate: not pooled

    def close_all(self) -> None:
        for attempt in list(self._h3_attempts.values()):
            attempt.cancel()
        for conns in list(self._conns.values()):
            for proto in list(conns):
                proto.close()

    def snapshot(self) -> list[dict[str, object]]:
        """For /config_dump and `ztunnel-config connections`."""
        return [
            {
                "source": str(key.source),
                "destination": f"{key.address[0]}:{key.address[1]}",
                "peer": str(proto.peer_identity) if proto.peer_identity else None,
                "streams": len(proto.streams),
                "transport": "h2" if isinstance(proto, HboneProtocol) else "h3",
            }
            for key, conns in self._conns.items()
            for proto in conns
        ]
