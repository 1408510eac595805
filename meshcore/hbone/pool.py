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
- A dial in flight when its source is retired (`retire`: certificate rotation) is never pooled
  nor used: the connection it returns (made with the old certificate) is closed, counted
  (`stale_dials`) and logged, and its waiters dial again with the new certificate, not counting
  it against their `DIAL_ATTEMPTS` (`DialRetired`: one per `retire` call). A dial in
  flight when every connection is closed (`close_all`: drain, shutdown; certificates unchanged)
  serves the tunnels that waited for it and is never pooled: GOAWAY once each of them has its
  answer (their streams finish), counted (`drained_dials`); one none of them took is closed by
  `sweep`; one retired too (a rotation after `close_all`) is a retired dial. Either dial is no
  longer shared: a request arriving after it starts its own (pooled).
- Transport (issue 16): a key with ``transport="h3"`` dials HBONE over HTTP/3
  (`meshcore.hbone.h3aio`) first, bounded by `h3_attempt_timeout`; when that attempt fails for a
  network reason (UDP blocked, no listener) the peer address is remembered for `h3_retry_after`
  and HTTP/2 is used meanwhile. A refused peer identity never falls back: it is an error on
  either transport.
- A CONNECT `open_stream` sent is never left open without an answer waiting for it: when the
  call ends before a 200 (cancelled, e.g. by a caller's connect timeout, or failed) the stream
  is reset (RST_STREAM CONNECT_ERROR), so its late answer cannot keep it against max streams.
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
from meshcore.errors import DialRetired, HboneError, StreamRefused
from meshcore.hbone.aio import (
    HboneProtocol,
    HboneSettings,
    HboneStream,
    TunnelSink,
    connect,
)
from meshcore.hbone.aio import PoolKey as PoolKey  # re-exported: the pool's key
from meshcore.hbone.frames import ErrorCode
from meshcore.identity import SpiffeId

if TYPE_CHECKING:  # aioquic is imported by the first HTTP/3 dial only (`_dial_h3`)
    from meshcore.hbone.h3aio import H3Protocol

log = logging.getLogger("meshcore.hbone.pool")
PooledConnection: TypeAlias = "HboneProtocol | H3Protocol"
H3_ATTEMPT_TIMEOUT = 2.0
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
    h3_attempt_timeout: float = H3_ATTEMPT_TIMEOUT
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
        self.h3_attempt_timeout = limits.h3_attempt_timeout
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
        self._retired: set[asyncio.Task[PooledConnection]] = set()  # in flight, never used
        self._draining: dict[asyncio.Task[PooledConnection], PoolKey] = {}  # never pooled
        self._unpooled: dict[PooledConnection, int] = {}
        """A draining dial's connection -> tunnels opening a stream on it (GOAWAY at 0)."""
        self.connections_opened = 0
        self.streams_retried = 0  # CONNECTs the peer did not process, sent again
        self.stale_dials = 0  # dials that finished after their generation was retired: closed
        self.drained_dials = 0  # dials that finished after close_all: served, never pooled

    def start_stream(
        self,
        key: PoolKey,
        authority: str,
        headers: Sequence[tuple[str, str]],
        sink: TunnelSink,
    ) -> HboneStream | None:
        """The CONNECT sent at once on the pooled connection `open_stream` would pick, when that
        is an HTTP/2 one with room; its status arrives in the stream's `response` future (no
        task waits for it: issue 14). None: no such connection (dial or HTTP/3: `open_stream`),
        or it refused the stream before sending (`open_stream` retries elsewhere)."""
        for proto in self._conns.get(key, ()):
            if not proto.closed and proto.conn.can_open_stream(self.max_streams):
                if not isinstance(proto, HboneProtocol):
                    return None
                try:
                    return proto.start_stream(authority, headers, sink)
                except StreamRefused:
                    return None
        return None

    async def open_stream(  # noqa: PLR0913 (the CONNECT's 4 fields, then 2 keyword options)
        self,
        key: PoolKey,
        authority: str,
        headers: Sequence[tuple[str, str]],
        sink: TunnelSink,
        *,
        attempts: int = DIAL_ATTEMPTS,
        on_started: Callable[[HboneStream], None] | None = None,
    ) -> HboneStream:
        """A CONNECT stream on a pooled connection. Raises HboneError (non-200),
        PeerVerificationError, or OSError/ConnectionError (connect failures).

        `on_started`: called with each stream as soon as its CONNECT is sent, before its
        answer (HTTP/2 and HTTP/3 alike, and again for a retried one), so a caller whose
        client goes meanwhile can reset it at once (RST_STREAM; failing its `response` with
        ConnectionResetError ends this call) instead of holding it, and the peer's tunnel
        slot and upstream connect, until the answer.

        A stream the peer did not process (StreamRefused: above its GOAWAY's last stream id,
        e.g. while it hands its listeners to a successor) is retried on another connection,
        `attempts` in all (RFC 9113 §8.7; `DIAL_ATTEMPTS`, less the ones a caller of
        `start_stream` made)."""
        for attempt in range(1, attempts + 1):
            proto = await self._connection(key)
            try:
                stream = proto.start_stream(authority, headers, sink)
                try:
                    if on_started is not None:
                        on_started(stream)
                    assert stream.response is not None
                    status = await stream.response
                except BaseException:
                    # Cancelled (a caller's connect timeout) or failed: the CONNECT is sent,
                    # and a late 200 would find no one waiting and leave the stream open (our
                    # max streams; the peer's tunnel slot and upstream). RST_STREAM now (RFC
                    # 9113 §8.5); a no-op when the peer or the connection ended it already
                    # (REFUSED_STREAM, reset, connection lost). The late answer and DATA find
                    # the stream forgotten: dropped (`aio.on_response`, `on_stream_data`).
                    stream.reset(ErrorCode.CONNECT_ERROR)
                    raise
                if status != 200:
                    raise HboneError.for_status(
                        status, f"CONNECT {authority} refused with {status}"
                    )
                return stream
            except StreamRefused:
                if attempt == attempts:
                    raise
                self.streams_retried += 1
                log.debug("CONNECT %s to %s not processed; retrying", authority, key.address)
            finally:
                if proto in self._unpooled:
                    self._release(proto)
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
            except DialRetired:
                continue  # our rotation, not a failed dial: not counted (one per `retire`)
            except (OSError, TimeoutError):
                # One failed dial (e.g. EADDRINUSE after a burst) must not fail every tunnel
                # that happened to wait on it: each waiter tries again, up to DIAL_ATTEMPTS.
                failures += 1
                if failures >= DIAL_ATTEMPTS:
                    raise
                continue
            if proto.conn.can_open_stream(self.max_streams):
                if proto in self._unpooled:
                    self._unpooled[proto] += 1  # released by `open_stream` (GOAWAY at 0)
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
        proto: PooledConnection | None = None
        if key.transport == "h3" and self._cert_for is not None:
            proto = await self._dial_h3(key)
        if proto is None:
            proto = await self._dial_h2(key)
        task = asyncio.current_task()
        if task in self._draining and task not in self._retired:
            # Finished after `close_all`: the certificate is still good, the tunnels that
            # waited for it use it (`open_stream` sends GOAWAY after the last one's answer).
            self._unpooled[proto] = 0
            self.connections_opened += 1
            self.drained_dials += 1
            log.info("HBONE dial to %s:%d finished after close_all: not pooled", *key.address)
            return proto
        if task in self._retired:
            # Dialled with the certificate (context) of before `retire`: never pooled nor used.
            # A transient error for the waiters, who dial again with the new one.
            proto.close()
            self.stale_dials += 1
            log.info("HBONE dial to %s:%d finished after its pool retired it: closed", *key.address)
            raise DialRetired(f"HBONE dial to {key.address} retired while in flight")
        self.connections_opened += 1
        self._conns.setdefault(key, []).append(proto)
        return proto

    async def _dial_h3(self, key: PoolKey) -> H3Protocol | None:
        """HTTP/3, unless the address recently failed; None = use HTTP/2."""
        assert self._cert_for is not None
        loop = asyncio.get_running_loop()
        address = key.h3_address or key.address
        if loop.time() < self.h3_unreachable.get(address, 0.0):
            return None
        cert = await self._cert_for(key.source)
        from meshcore.hbone.h3aio import connect_h3  # here: aioquic loads with HTTP/3 only

        try:
            return await connect_h3(
                key,
                cert,
                self.settings,
                timeout=min(self.h3_attempt_timeout, self.connect_timeout),
                on_close=functools.partial(self._remove, key),
            )
        except (TimeoutError, OSError) as err:  # not PeerVerificationError: no fallback
            now = loop.time()
            if len(self.h3_unreachable) >= H3_UNREACHABLE_MAX:  # bounded: expired ones go
                self.h3_unreachable = {a: t for a, t in self.h3_unreachable.items() if t > now}
            if len(self.h3_unreachable) < H3_UNREACHABLE_MAX:
                self.h3_unreachable[address] = now + self.h3_retry_after
            self.h3_fallbacks += 1
            log.warning(
                "HTTP/3 to %s:%d failed (%s): HTTP/2 for %.0fs",
                *address,
                err or type(err).__name__,
                self.h3_retry_after,
            )
            return None

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
        self._retired.discard(task)
        self._draining.pop(task, None)
        if self._connecting.get(key) is task:  # not a dial started after it finished
            del self._connecting[key]

    def _retire_dials(self, source: SpiffeId | None) -> None:
        """Dials in flight (of `source`: retired, never used; or all: draining, never pooled):
        not shared any more (`_connection` starts a new one)."""
        for key, task in list(self._connecting.items()):
            if (source is None or key.source == source) and not task.done():
                if source is None:
                    self._draining[task] = key
                else:
                    self._retired.add(task)
                del self._connecting[key]
        if source is not None:  # draining, then retired: the old certificate is not used
            self._retired.update(t for t, k in self._draining.items() if k.source == source)

    def _release(self, proto: PooledConnection) -> None:
        """A tunnel is done opening its stream on a draining dial's connection: after the
        last, GOAWAY (graceful: open streams finish, then it closes)."""
        self._unpooled[proto] -= 1
        if self._unpooled[proto] <= 0:
            del self._unpooled[proto]
            proto.close()

    def _remove(self, key: PoolKey, proto: PooledConnection) -> None:
        conns = self._conns.get(key)
        if conns and proto in conns:
            conns.remove(proto)
            if not conns:
                del self._conns[key]

    def sweep(self, now: float) -> int:
        """Close connections idle for longer than `idle_timeout`; returns how many."""
        closed = 0
        for proto, users in list(self._unpooled.items()):
            if users == 0:  # a draining dial's connection no tunnel took
                del self._unpooled[proto]
                proto.close()
                closed += 1
        for conns in list(self._conns.values()):
            for proto in list(conns):
                if not proto.streams and now - proto.idle_since >= self.idle_timeout:
                    proto.close()
                    closed += 1
        return closed

    def retire(self, source: SpiffeId) -> None:
        """Stop handing out connections that present `source`'s old certificate (after a
        rotation): GOAWAY lets their streams finish while new streams get new connections.
        A dial in flight with the old certificate is closed when it finishes; its waiters
        dial again (`_dial`)."""
        self._retire_dials(source)
        for key, conns in list(self._conns.items()):
            if key.source == source:
                for proto in list(conns):
                    proto.close()
                    self._remove(key, proto)

    def close_all(self) -> None:
        """GOAWAY on every pooled connection. A dial in flight serves the tunnels waiting for it
        and is never pooled (GOAWAY after their answers, `_dial`); the pool stays usable: a
        later tunnel (one accepted before a drain) dials anew, and that dial is pooled."""
        self._retire_dials(None)
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
