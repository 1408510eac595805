"""Per-request processing at the waypoint, for both HTTP/1.1 and HTTP/2 edges.

Owns: the order of operations for one request and their I/O:
  0. request hygiene (`waypoint.protocol.hygiene`), the same for HTTP/1.1 and HTTP/2: method,
     target, authority and fields checked (400/431, flag DPE), the path normalised per the mesh's
     pathNormalization / escaped-slashes settings (the normalised target is what policy,
     routing AND the upstream see), X-Forwarded-Client-Cert replaced by the verified peer's
     (Envoy SANITIZE_SET: a client-supplied value never reaches policy or the app)
  1. `RequestInfo` (normalised path, verified source identity, source workload + labels)
  2. L7 authorization (`waypoint.protocol.authz`): denied -> 403 ``RBAC: access denied``; the
     request (and its body) never goes upstream
  3. route selection (`waypoint.protocol.route`): none -> 404 (NR)
  4. direct response / redirect; fault injection (delay, abort)
  5. weighted destination -> cluster (service + subset + port) -> connection-pool admission
     (503 UO on overflow)
  6. tries: endpoint pick (LB, outlier ejection, avoiding hosts that failed this request),
     per-try timeout, retry conditions, jittered back-off; whole-request timeout (504 UT)
  7. mirrors (fire and forget, streaming: a `MirrorTap` copies the body as the primary reads it;
     a mirror more than `MIRROR_BUFFER` behind is dropped, never waited for), response header
     edits, streaming of the response to the client, telemetry (one record per request), trace
     context.

The protocol edges (`waypoint.http1`, `waypoint.http2`) only parse and frame; every decision is
taken by the pure functions in `waypoint.protocol` and carried out here. Errors are translated to a
response at exactly one place (`serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, TypeVar

from meshcore.backoff import Backoff
from meshcore.config.routes import NO_RETRY, Destination, HttpRoute, RetryPolicy
from meshcore.model import Service, Workload
from waypoint.authn import authenticate_request
from waypoint.body import (
    BodySource,
    Downstream,
    EmptyBody,
    MirrorBudget,
    MirrorTap,
    ReplayBody,
    Request,
)
from waypoint.context import WaypointContext
from waypoint.cors import apply_cors
from waypoint.derived import Derived, Peer
from waypoint.errors import (
    BadRequest,
    FaultAbort,
    Forbidden,
    NoHealthyUpstream,
    NoRoute,
    Overflow,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
    WaypointError,
)
from waypoint.metrics import RequestRecord
from waypoint.protocol.authz import evaluate
from waypoint.protocol.cluster import Admission, Cluster, EndpointStats, hash_cookie, hash_key
from waypoint.protocol.hygiene import (
    XFCC,
    RequestRejected,
    check_request,
    forwardable_trailers,
    normalize_target,
    xfcc_value,
)
from waypoint.protocol.route import (
    RequestInfo,
    RouteChoice,
    default_route,
    pick_destination,
    redirect_location,
    retriable,
    rewrite_target,
    select_route,
)
from waypoint.protocol.trace import trace_hop
from waypoint.ratelimit import check_rate_limit, limited_downstream
from waypoint.reply import direct_reply, local_reply
from waypoint.tunnel import Tunnel
from waypoint.upstream import UpstreamRequest, UpstreamResponse, Upstreams

log = logging.getLogger("waypoint")

MIRROR_BUFFER = 4 * 1024 * 1024
"""Bytes of request body a mirror may fall behind the primary before it is dropped (room for
the mirror's connection setup while the primary streams)."""
MIRROR_BUDGET = 64 * 1024 * 1024
"""Bytes all mirror copies of the waypoint may hold together (then copies are dropped)."""
MAX_MIRRORS = 1024
"""Mirror copies in flight per waypoint; more are skipped (counted, logged)."""
MIRROR_TIMEOUT = 30.0
T = TypeVar("T")


def _within(aw: Awaitable[T], timeout: float | None) -> Awaitable[T]:
    """`aw` bounded by `timeout` seconds (TimeoutError past it), or `aw` itself without a
    timeout (the default: no Timeout object nor coroutine per request or per try)."""
    return aw if timeout is None else _bounded(aw, timeout)


async def _bounded(aw: Awaitable[T], timeout: float) -> T:
    async with asyncio.timeout(timeout):
        return await aw


def _grpc_status(headers: Sequence[tuple[str, str]]) -> str | None:
    """The `grpc_response_status` label: gRPC's status codes are 0-16 (gRPC's doc
    statuscodes.md), so only a one- or two-digit value is a label; anything else an upstream
    sends is not one (a label per distinct value would grow the metrics without bound)."""
    value = next((v for k, v in headers if k == "grpc-status"), None)
    return value if value and len(value) <= 2 and value.isascii() and value.isdigit() else None


class _Leg(NamedTuple):
    """A request on its way upstream, as `Handler._admitted` takes it (built once per
    request)."""

    up: UpstreamRequest
    cluster: Cluster
    route: HttpRoute
    dest: Destination
    key: bytes | None
    """The consistent-hash key (one for every try), or None."""
    set_cookie: str | None
    """The hash cookie the waypoint generated, for the response, or None."""


class _Exchange(NamedTuple):
    """One request being served, as every step after `serve` reads it; built once per request
    (immutable; a NamedTuple for the reason given at `UpstreamRequest`). The `Downstream`
    travels beside it: rate limiting and CORS may wrap it on the way."""

    req: Request
    tunnel: Tunnel
    rec: RequestRecord
    """Its telemetry record, filled in as the steps go."""
    replay: ReplayBody
    """Its body, kept for retries and mirrors."""


class Handler:
    def __init__(self, ctx: WaypointContext, upstreams: dict[str, Upstreams]) -> None:
        self.ctx = ctx
        self.upstreams = upstreams
        self._waiters: dict[str, asyncio.Condition] = {}
        self.mirrors: set[asyncio.Task[None]] = set()
        self._clock: Callable[[], float] | None = None
        """The serving loop's clock (bound on first use)."""
        self.mirror_budget = MirrorBudget(MIRROR_BUDGET)
        self._derived = Derived(ctx)
        """What is derived once per state, config and settings (peers, applicable policies)."""

    def _loop_time(self) -> float:
        clock = self._clock
        if clock is None:
            clock = self._clock = asyncio.get_running_loop().time
        return clock()

    # ---- entry -----------------------------------------------------------------------------

    async def serve(self, req: Request, down: Downstream, tunnel: Tunnel) -> RequestRecord:
        ctx = self.ctx
        rec = RequestRecord(self._loop_time())
        rec.method = req.method
        rec.authority = req.authority
        rec.protocol = "grpc" if req.grpc else "http"
        rec.source_ip = tunnel.peer_ip
        uri = rec.source_principal = self._derived.peer(tunnel).uri
        replay = ReplayBody(req.body, ctx.settings.body_buffer)
        rec.path = req.target[:200]  # as received, until normalised (refusals are logged so)
        try:
            self._sanitize(req, tunnel, uri)
            await self._serve(_Exchange(req, tunnel, rec, replay), down)
        except WaypointError as err:
            rec.status = err.status
            rec.flags = err.flag
            rec.error = str(err)
            if not down.head_sent:
                with contextlib.suppress(ConnectionError):
                    await local_reply(down, req, err.status, err.body, err)
            else:
                down.reset()
        except (ConnectionError, TimeoutError) as err:
            # The client went away (or broke the stream) mid-request.
            rec.error = rec.error or f"downstream: {err or type(err).__name__}"
            rec.flags = "DC" if rec.flags == "-" else rec.flags
            if not rec.status:
                rec.status = 0
            down.reset()
        except Exception as err:  # a bug must not take the waypoint down; reset this request
            log.exception("request failed")
            rec.error = f"internal: {err}"
            rec.status = rec.status or 500
            if not down.head_sent:
                with contextlib.suppress(Exception):
                    await local_reply(down, req, 500, "internal error", None)
            else:
                down.reset()
        if replay.taps:
            replay.close_taps()  # a mirror copy the primary did not finish is dropped
        rec.request_bytes = replay.total
        ctx.metrics.record(rec, self._loop_time())
        return rec

    def refused(self, tunnel: Tunnel, *, protocol: str, status: int, error: str) -> None:
        """A request the protocol edge refused before it was a request (a codec error): one
        telemetry record and access-log line, flag DPE (Envoy's downstream protocol error)."""
        now = self._loop_time()
        rec = RequestRecord(now)
        rec.protocol = protocol
        rec.source_ip = tunnel.peer_ip
        rec.source_principal = tunnel.peer_uri
        rec.status, rec.flags, rec.error = status, "DPE", error
        svc = tunnel.service
        if svc is not None:
            rec.service_host, rec.service_name = svc.hostname, svc.name
            rec.service_namespace = svc.namespace
        log.info("refused a malformed request from %s: %d %s", tunnel.peer_ip, status, error)
        self.ctx.metrics.record(rec, now)

    # ---- the request -----------------------------------------------------------------------

    def _sanitize(self, req: Request, tunnel: Tunnel, uri: str) -> None:
        """Hygiene before anything looks at the request (raises `BadRequest`); `uri`: the
        peer's (`Peer.uri`)."""
        try:
            check_request(req.method, req.target, req.authority, req.headers)
        except RequestRejected as err:
            raise BadRequest(str(err), status=err.status) from None
        # Envoy forward_client_cert_details SANITIZE_SET (as Istio configures it): whatever the
        # client sent is dropped; the verified peer's details are set.
        headers = [(k, v) for k, v in req.headers if k != XFCC]
        if tunnel.peer_identity is not None and tunnel.peer_cert_hash:
            headers.append(
                (
                    XFCC,
                    xfcc_value(
                        by=self.ctx.settings.identity_uri,
                        cert_hash=tunnel.peer_cert_hash,
                        uri=uri,
                    ),
                )
            )
        req.headers = headers

    def _source(self, tunnel: Tunnel) -> Workload | None:
        """The source workload: the one at the peer address, only if its identity is the
        verified peer identity (an address alone proves nothing)."""
        return self._derived.peer(tunnel).source

    def _info(self, req: Request, tunnel: Tunnel, path: str, peer: Peer) -> RequestInfo:
        ident = peer.identity
        return RequestInfo(
            method=req.method,
            path=path,
            authority=req.authority,
            scheme=req.scheme,
            headers=tuple(req.headers),
            port=tunnel.target_port,
            source_principal=peer.principal,
            source_ip=tunnel.peer_ip,
            source_namespace=ident.namespace if ident is not None else None,
            source_labels=peer.labels,
            destination_ip=tunnel.target_ip,
        )

    async def _serve(self, ex: _Exchange, down: Downstream) -> None:
        ctx = self.ctx
        req = ex.req
        tunnel = ex.tunnel
        rec = ex.rec
        try:
            norm = normalize_target(req.target, ctx.settings.path_policy)
        except RequestRejected as err:
            raise BadRequest(str(err), status=err.status) from None
        path = norm.target
        rec.path = path
        if norm.redirect:
            # Envoy UNESCAPE_AND_REDIRECT: a redirect to the unescaped path, nothing forwarded.
            rec.status = 307
            await down.send_head(
                307, [("location", path), ("server", "waypoint")], content_length=0, end=True
            )
            return
        peer = self._derived.peer(tunnel)
        rec.source = peer.source
        info = self._info(req, tunnel, path, peer)
        svc = tunnel.service
        if svc is not None:
            rec.service_host, rec.service_name = svc.hostname, svc.name
            rec.service_namespace = svc.namespace

        # 2. authorization, before anything can reach the app.
        policies = self._derived.applicable(svc)
        if policies:
            info = await authenticate_request(ctx, policies, req, info)  # JWT: 401 on bad token
            decision = evaluate(policies, info)
            rec.policy = decision.policy
            if not decision.allowed:
                rec.error = decision.reason
                # Do not read the denied body into the app; drain a little for keep-alive.
                raise Forbidden(decision.reason)

        # 3. routing.
        if svc is not None:
            routes = ctx.config.routes_for(svc.hostname)
            choice = (
                select_route(routes, info)
                if routes
                else RouteChoice(route=default_route(svc.hostname, tunnel.target_port), match=None)
            )
        else:
            choice = RouteChoice(route=default_route("", tunnel.target_port), match=None)
        if choice is None:
            raise NoRoute(f"no route of {svc.hostname if svc else '?'} matches {path}")
        route = choice.route
        rec.route = f"{route.source}:{route.name}" if route.name else route.source
        down = self._rate_limit(down, svc, route, tunnel)  # 429 RL
        if route.cors is not None:
            down, answered = await apply_cors(route.cors, req, down)  # preflight: 200 here
            if answered is not None:
                rec.status = answered
                return

        # 4. local answers and faults.
        if route.direct_status is not None:
            rec.status = route.direct_status
            await direct_reply(down, route.direct_status, route.direct_body)
            return
        if route.redirect is not None:
            location = redirect_location(route.redirect, choice, info)
            rec.status = route.redirect.code
            await down.send_head(
                route.redirect.code,
                [("location", location), ("server", "waypoint")],
                content_length=0,
                end=True,
            )
            return
        fault = route.fault
        if fault is not None:
            if fault.delay is not None and ctx.rng.random() * 100 < fault.delay_percent:
                rec.flags = "DI"
                await asyncio.sleep(fault.delay)
            if fault.abort_status is not None and ctx.rng.random() * 100 < fault.abort_percent:
                raise FaultAbort(fault.abort_status)

        # 5. destination.
        dest = pick_destination(route.destinations, ctx.rng)
        await self._forward(ex, down, info, choice, dest)

    def _rate_limit(
        self, down: Downstream, svc: Service | None, route: HttpRoute, tunnel: Tunnel
    ) -> Downstream:
        """Local rate limiting (raises `RateLimited`): `down`, decorated with the
        ``x-ratelimit-*`` fields when a policy applies."""
        if not self.ctx.config.config.rate_limits:  # the common case: no call into the hook
            return down
        limits = check_rate_limit(self.ctx, svc, route, tunnel.peer_identity)
        return limited_downstream(down, limits) if limits else down

    def _cluster(self, dest: Destination, tunnel: Tunnel) -> Cluster:
        """The cluster a destination goes to: its service's (`Derived.cluster`), or without a
        host, the tunnel's target workload's."""
        if not dest.host:
            return self.ctx.workload_cluster(tunnel.workload, dest.port or tunnel.target_port)
        return self._derived.cluster(dest, tunnel.target_port)

    def _request_headers(
        self, req: Request, route: HttpRoute, dest: Destination, rec: RequestRecord
    ) -> list[tuple[str, str]]:
        # One pass: the incoming traceparent (the first) is replaced by this hop's, and
        # x-request-id is added when absent.
        headers: list[tuple[str, str]] = []
        incoming: str | None = None
        has_id = False
        for k, v in req.headers:
            if k == "traceparent":
                if incoming is None:
                    incoming = v
                continue
            if k == "x-request-id":
                has_id = True
            headers.append((k, v))
        hop = trace_hop(incoming, self.ctx.rng, self.ctx.metrics.sampler)
        rec.trace_id, rec.span_id = hop.trace_id, hop.span_id
        rec.parent_span_id, rec.sampled = hop.parent_span_id, hop.sampled
        headers.append(("traceparent", hop.traceparent))
        if not has_id:
            headers.append(("x-request-id", hop.request_id))
        if not route.request_headers.empty:
            headers = route.request_headers.apply(headers)
        if not dest.request_headers.empty:
            headers = dest.request_headers.apply(headers)
        return headers

    async def _forward(
        self,
        ex: _Exchange,
        down: Downstream,
        info: RequestInfo,
        choice: RouteChoice,
        dest: Destination,
    ) -> None:
        ctx = self.ctx
        req = ex.req
        rec = ex.rec
        route = choice.route
        cluster = self._cluster(dest, ex.tunnel)
        target = rewrite_target(choice, info.path)
        authority = (
            route.rewrite.authority
            if route.rewrite and route.rewrite.authority
            else (req.authority)
        )
        up = UpstreamRequest(
            req=req,
            target=target,
            authority=authority,
            headers=self._request_headers(req, route, dest, rec),
            replay=ex.replay,
        )
        key: bytes | None = None
        set_cookie: str | None = None
        ch = cluster.policy.hash
        if ch is not None:  # consistentHash: one key for every try
            key = hash_key(ch, up.headers, target, rec.source_ip)
            if key is None and ch.cookie and ch.cookie_ttl is not None:
                key, set_cookie = hash_cookie(ch, ctx.rng)  # Envoy generates the cookie
        if req.expect_continue:
            await down.send_continue()
        for mirror in route.mirrors:
            if ctx.rng.random() * 100 < mirror.percent:
                self._start_mirror(up, mirror.destination, ex.tunnel)

        leg = _Leg(up, cluster, route, dest, key, set_cookie)
        try:
            await _within(self._admitted(rec, down, leg), route.timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"route timeout {route.timeout}s") from None

    async def _admitted(self, rec: RequestRecord, down: Downstream, leg: _Leg) -> None:
        """5b. connection-pool admission for the whole request (not per try; waiting for a
        slot counts against the route timeout), then the tries and the response."""
        cluster = leg.cluster
        await self._admit(cluster)
        try:
            resp, ep = await self._tries(leg.up, rec, cluster, leg.route.retries, leg.key)
            try:
                if leg.set_cookie is not None:
                    resp.headers = [*resp.headers, ("set-cookie", leg.set_cookie)]
                await self._respond(resp, down, rec, leg.route, leg.dest)
            finally:
                ep.active = max(0, ep.active - 1)
        finally:
            cluster.release()
            self._wake(cluster)

    async def _admit(self, cluster: Cluster) -> None:
        adm = cluster.admit()
        if adm is Admission.GO:
            return
        if adm is Admission.OVERFLOW:
            raise Overflow(f"{cluster.name}: connection pool overflow")
        cond = self._waiters.setdefault(cluster.name, asyncio.Condition())
        try:
            async with cond:
                await cond.wait_for(cluster.can_promote)
                cluster.promote()
        except BaseException:
            cluster.abandon()
            raise

    def _wake(self, cluster: Cluster) -> None:
        cond = self._waiters.get(cluster.name)
        if cond is None:
            return

        async def notify() -> None:
            async with cond:
                cond.notify(1)

        if cluster.pending:
            asyncio.get_running_loop().create_task(notify())

    async def _tries(
        self,
        up: UpstreamRequest,
        rec: RequestRecord,
        cluster: Cluster,
        policy: RetryPolicy,
        key: bytes | None = None,
    ) -> tuple[UpstreamResponse, EndpointStats]:
        ctx = self.ctx
        req = up.req
        replay = up.replay
        upstream = self.upstreams[req.protocol]
        avoid: list[str] = []
        tried: tuple[int, ...] = ()  # locality priorities tried (retryRemoteLocalities)
        if req.has_body and not replay.replayable:
            policy = NO_RETRY
        attempt = 0
        while True:
            attempt += 1
            rec.attempts = attempt
            now = self._loop_time()
            ep = cluster.pick(now, ctx.rng, avoid, key, tried)
            if ep is None:
                raise NoHealthyUpstream(f"{cluster.name} has no endpoint")
            rec.upstream = f"{ep.ip}:{ep.port}"
            ep.active += 1
            outcome: int | None
            error: WaypointError | None = None  # set when there is no response
            resp: UpstreamResponse | None = None
            try:
                resp = await _within(
                    upstream.send(up, ep, cluster.policy.pool.connect_timeout),
                    policy.per_try_timeout,
                )
                outcome = resp.status
            except TimeoutError:
                outcome, error = -2, UpstreamTimeout("per-try timeout")
            except UpstreamConnectError as err:
                outcome, error = None, err
            except UpstreamReset as err:
                outcome, error = -1, err
            except UpstreamProtocolError as err:
                outcome, error = 502, err
            ejected = cluster.record(
                ep, outcome if outcome is None or outcome > 0 else None, self._loop_time()
            )
            if ejected:
                log.info("outlier detection ejected %s (%s)", ep.uid, cluster.name)
            grpc = _grpc_status(resp.headers) if resp is not None else None
            may_retry = (
                attempt <= policy.attempts
                and (not req.has_body or replay.replayable)
                and retriable(policy, outcome, grpc)
            )
            if resp is not None and not may_retry:
                # The answering endpoint: its active count drops when the response is done
                # (`_forward`).
                rec.destination = self._derived.workload(ep.uid)
                rec.destination_principal = str(ep.identity)
                return resp, ep
            ep.active -= 1
            if resp is not None:
                resp.finish()  # not reused: we drop the rest of this response
            if not may_retry:
                raise error if error is not None else UpstreamProtocolError("unreachable")
            avoid.append(ep.uid)
            if policy.remote_localities:
                tried = (*tried, ep.priority)
            # Envoy: fully jittered back-off, base 25 ms doubling, capped at 10x base.
            schedule = Backoff(initial=policy.backoff_base, cap=policy.backoff_base * 10, full=True)
            await asyncio.sleep(schedule.delay(attempt - 1, ctx.rng))

    async def _respond(
        self,
        resp: UpstreamResponse,
        down: Downstream,
        rec: RequestRecord,
        route: HttpRoute,
        dest: Destination,
    ) -> None:
        try:
            rec.status = resp.status
            headers = resp.headers
            if not route.response_headers.empty:
                headers = route.response_headers.apply(headers)
            if not dest.response_headers.empty:
                headers = dest.response_headers.apply(headers)
            grpc = _grpc_status(headers)
            await down.send_head(
                resp.status, headers, content_length=resp.content_length, end=False
            )
            while chunk := await resp.read():
                await down.send_data(chunk)
            rec.response_bytes = resp.body_bytes
            grpc = grpc or _grpc_status(resp.trailers)
            rec.grpc_status = grpc or ""
            await down.send_end(forwardable_trailers(resp.trailers))
        except WaypointError:
            raise
        finally:
            resp.finish()

    # ---- mirrors ---------------------------------------------------------------------------

    def _start_mirror(self, up: UpstreamRequest, dest: Destination, tunnel: Tunnel) -> None:
        """Start a copy now, streaming: the tap is registered before the primary reads a byte
        of the body. Bounded: at most `MAX_MIRRORS` copies in flight (more are skipped)."""
        counts = self.ctx.metrics.mirrors
        if len(self.mirrors) >= MAX_MIRRORS:
            counts.labels("skipped").inc()
            log.info("mirror to %s skipped: %d mirrors in flight", dest.host, len(self.mirrors))
            return
        body: BodySource = EmptyBody()
        if up.req.has_body:
            tap = up.replay.tap(MIRROR_BUFFER, self.mirror_budget)
            if tap is None:
                counts.labels("skipped").inc()
                return
            body = tap
        task = asyncio.get_running_loop().create_task(self._mirror(up, dest, tunnel, body))
        if isinstance(body, MirrorTap):
            body.on_drop = functools.partial(_cancel, task)
        self.mirrors.add(task)
        task.add_done_callback(self.mirrors.discard)

    async def _mirror(
        self, up: UpstreamRequest, dest: Destination, tunnel: Tunnel, body: BodySource
    ) -> None:
        """Fire and forget: the copy streams as the primary reads the body (`MirrorTap`: a
        mirror that falls `MIRROR_BUFFER` bytes behind is dropped, never waited for); the
        authority gets ``-shadow`` appended (Envoy); the response is dropped."""
        counts = self.ctx.metrics.mirrors
        try:
            cluster = self._cluster(dest, tunnel)
            ep = cluster.pick(self._loop_time(), self.ctx.rng)
            if ep is None:
                raise NoHealthyUpstream(f"{cluster.name} has no endpoint")
            authority = up.authority
            host, sep, p = authority.rpartition(":")
            shadow = f"{host}-shadow:{p}" if sep and p.isdigit() else f"{authority}-shadow"
            # Nothing kept of the body: a mirror is never retried.
            copy = up._replace(authority=shadow, replay=ReplayBody(body, 0))
            async with asyncio.timeout(MIRROR_TIMEOUT):
                resp = await self.upstreams[up.req.protocol].send(copy, ep, 5.0)
                try:
                    while await resp.read():
                        pass
                finally:
                    resp.finish()
            counts.labels("completed").inc()
        except asyncio.CancelledError:
            if not (isinstance(body, MirrorTap) and body.dropped):
                raise  # the waypoint is stopping
            counts.labels("dropped").inc()
            log.info("mirror to %s dropped: it fell behind the request", dest.host)
        except Exception as err:  # mirrors never affect the real request
            dropped = isinstance(body, MirrorTap) and body.dropped
            counts.labels("dropped" if dropped else "failed").inc()
            outcome = "dropped" if dropped else "failed"
            log.info("mirror to %s %s: %s", dest.host, outcome, err or type(err).__name__)
        finally:
            if isinstance(body, MirrorTap):
                body.on_drop = None  # this task is ending: nothing to cancel
                body.drop()


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
