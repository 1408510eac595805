"""Delta xDS server: ``envoy.service.discovery.v3.AggregatedDiscoveryService/
DeltaAggregatedResources`` for ``istio.workload.Address`` and ``istio.security.Authorization``
(node proxies and waypoints) and ``ambient.l7.Resource`` (waypoints: `publish_set`).

Owns: the resource table (every resource serialised once, versioned by content), per-connection
state (node, what it has, pending nonces, last ACK/NACK), the push loop, and the gRPC method
handler.

Protocol (envoy xDS "incremental" variant, as Istio's ztunnel uses it):
- The client opens one stream and sends one DeltaDiscoveryRequest per type URL. A first request
  with no names, or with ``*`` subscribed and not unsubscribed, is a wildcard subscription: every
  resource of the type. ``initial_resource_versions`` (on reconnect) says what the client has:
  only resources whose version differs are sent, and names the client has that no longer exist
  are sent in ``removed_resources``.
- On-demand Address delivery (Istio's ztunnel ``XDS_ON_DEMAND``; istiod pilot/pkg/xds/workload.go
  and AdditionalPodSubscriptions): a first Address request that subscribes and unsubscribes
  ``*`` ("subscribe to nothing"), or names resources explicitly, is not wildcard. Such a node
  proxy is sent the workloads of its own node, the resources it subscribed to, and the
  workloads backing a service it holds; nothing else. A later request's
  ``resource_names_subscribe`` names a resource, or an address as ``network/IP`` (matched
  against the resources' ``aliases``: a workload's or service's addresses), and is always
  answered: the matching resources (a VIP brings its service and the workloads backing it), or
  the name in ``removed_resources`` when nothing matches (xDS: a removal of a resource that
  never existed). Everything sent to an on-demand client stays subscribed (its updates and
  removal follow). Authorization (and the waypoints' L7 type) is always wildcard, as in Istio
  (a node proxy needs every policy that may apply to its pods).
- The first response per type is sent even if empty, so a client knows it has the full state.
- After that, only changed/removed resources are sent. Each response has a fresh nonce. A
  request carrying ``response_nonce`` is an ACK, or a NACK when ``error_detail`` is set; a NACK
  is recorded (debug + metrics) and the NACKed versions are not re-sent: the client keeps the
  rest of that response applied, and a NACKed resource is sent again only when it changes.
- Authorization responses are sent before Address responses in each push, so a workload never
  names a policy the proxy has not received yet (a missing policy would be ignored: allow).

Invariants:
- A resource's version is a hash of its serialized bytes: a restarted control plane computes
  the same versions, so a reconnecting client that has them receives nothing new.
- Resources are serialised once per change and shared by every connection; responses are
  assembled from those bytes without re-encoding (protobuf length-delimited field 2), and a
  response carrying the same change to many connections is encoded once (one nonce; nonces
  strictly increase per stream, so none repeats on a stream).
- Node identity is the authenticated credential's node; a ``NODE_NAME`` in the node metadata
  that differs is refused (PERMISSION_DENIED). A stream is refused only after its first
  request was read (at most `FIRST_REQUEST_TIMEOUT` waited for), never while it is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2

from controlplane.auth import Authenticator, bearer_token
from controlplane.errors import ControlPlaneError, InvalidRequest, PermissionDenied
from controlplane.metrics import ControlPlaneMetrics
from controlplane.translator import Delta
from meshcore.model import Authorization, GatewayAddress, Service, Workload
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto.convert import ADDRESS_TYPE, AUTHORIZATION_TYPE, pack, resource_name
from meshcore.proto.l7res import L7_TYPE

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
DELTA_METHOD = "DeltaAggregatedResources"
PUSH_ORDER = (AUTHORIZATION_TYPE, ADDRESS_TYPE, L7_TYPE)
"""L7_TYPE (``ambient.l7.Resource``) is subscribed to by waypoints only (node proxies never ask
for it, so they are never sent any)."""


SHARED_RESPONSES = 64
SHARED_MAX_BYTES = 256 * 1024
"""Encoded responses kept per table version for other connections sent the same change (a
change's response; a whole initial state is encoded per connection)."""

MAX_SUBSCRIPTIONS = 100_000
"""Per connection and type: explicit subscriptions (on-demand lookups) kept at most."""
FIRST_REQUEST_TIMEOUT = 10.0
"""A stream's first request must arrive within this (a node proxy sends it at once): a peer,
authenticated or not, cannot hold a stream open by sending nothing."""
REFUSED_FIRST_REQUEST_WAIT = 1.0
"""How long a stream already refused (its credential) waits for its first request before the
refusal is sent: a stream without a valid credential is held this long at most."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def resource_version(raw: bytes) -> str:
    """A resource's version: a hash of its deterministic encoding (the same record, the same
    version; a changed one, a new version)."""
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def resource_field_bytes(
    name: str, version: str, resource: any_pb2.Any, aliases: Iterable[str] = ()
) -> bytes:
    """One ``DeltaDiscoveryResponse.resources`` entry, encoded as field 2 (tag 0x12)."""
    body: bytes = dpb.Resource(
        name=name, version=version, resource=resource, aliases=list(aliases)
    ).SerializeToString(deterministic=True)
    return b"\x12" + _varint(len(body)) + body


def encode_response(
    *,
    type_url: str,
    nonce: str,
    system_version: str,
    resources: Iterable[bytes],
    removed: Iterable[str],
) -> bytes:
    """A serialized DeltaDiscoveryResponse from pre-encoded resource fields."""
    head: bytes = dpb.DeltaDiscoveryResponse(
        type_url=type_url,
        nonce=nonce,
        system_version_info=system_version,
        removed_resources=list(removed),
    ).SerializeToString()
    return head + b"".join(resources)


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressMeta:
    """What on-demand delivery needs to know of an Address resource."""

    node: str = ""
    """A workload's node ("" for a service)."""
    aliases: tuple[str, ...] = ()
    """``network/IP`` of each of its addresses (Istio's on-demand lookup key)."""
    services: tuple[str, ...] = ()
    """Service keys a workload backs."""
    service: bool = False
    """A service (else a workload, or not an Address)."""
    waypoint: str = ""
    """Its waypoint as a resource name (``ns/hostname``) or alias (``network/IP``); "" none."""


_NO_META = AddressMeta()


def _gateway_ref(gw: GatewayAddress | None) -> str:
    if gw is None:
        return ""
    if gw.hostname is not None:
        return gw.hostname.key
    if gw.address is not None:
        return f"{gw.address.network}/{gw.address.address}"
    return ""


def address_meta(rec: Workload | Service) -> AddressMeta:
    if isinstance(rec, Workload):
        return AddressMeta(
            node=rec.node,
            aliases=tuple(f"{rec.network}/{a}" for a in rec.addresses),
            services=tuple(k for k, _ in rec.services),
            waypoint=_gateway_ref(rec.waypoint),
        )
    return AddressMeta(
        aliases=tuple(f"{na.network}/{na.address}" for na in rec.addresses),
        service=True,
        waypoint=_gateway_ref(rec.waypoint),
    )


@dataclass(slots=True)
class Entry:
    version: str
    wire: bytes
    """The encoded ``resources`` field (tag + length + Resource)."""
    meta: AddressMeta = _NO_META


class ResourceTable:
    """Current resources per type URL, each serialised once, and the Address indexes of
    on-demand delivery (by node, by alias, workloads by service)."""

    def __init__(self) -> None:
        self.types: dict[str, dict[str, Entry]] = {t: {} for t in PUSH_ORDER}
        self.version = 0
        self.by_node: dict[str, set[str]] = {}
        self.by_alias: dict[str, set[str]] = {}
        self.backing: dict[str, set[str]] = {}
        """service key -> names of the workloads backing it."""
        self.bound: dict[str, set[str]] = {}
        """waypoint reference (``ns/hostname`` or ``network/IP``) -> names bound to it."""

    def set_any(
        self, type_url: str, name: str, resource: any_pb2.Any, meta: AddressMeta = _NO_META
    ) -> None:
        raw = resource.SerializeToString(deterministic=True)
        version = resource_version(raw)
        cur = self.types[type_url].get(name)
        if cur is None or cur.version != version or cur.meta != meta:
            if cur is not None:
                self._unindex(name, cur.meta)
            self.types[type_url][name] = Entry(
                version=version,
                wire=resource_field_bytes(name, version, resource, meta.aliases),
                meta=meta,
            )
            self._index(name, meta)

    def pop(self, type_url: str, name: str) -> Entry | None:
        entry = self.types[type_url].pop(name, None)
        if entry is not None:
            self._unindex(name, entry.meta)
        return entry

    def _index(self, name: str, meta: AddressMeta) -> None:
        if meta.node:
            self.by_node.setdefault(meta.node, set()).add(name)
        for a in meta.aliases:
            self.by_alias.setdefault(a, set()).add(name)
        for k in meta.services:
            self.backing.setdefault(k, set()).add(name)
        if meta.waypoint:
            self.bound.setdefault(meta.waypoint, set()).add(name)

    def _unindex(self, name: str, meta: AddressMeta) -> None:
        for index, keys in (
            (self.by_node, (meta.node,) if meta.node else ()),
            (self.by_alias, meta.aliases),
            (self.backing, meta.services),
            (self.bound, (meta.waypoint,) if meta.waypoint else ()),
        ):
            for k in keys:
                names = index.get(k)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del index[k]

    def lookup(self, requested: Iterable[str]) -> set[str]:
        """Address resource names matching `requested` (resource names or ``network/IP``)."""
        table = self.types[ADDRESS_TYPE]
        out: set[str] = set()
        for n in requested:
            if n in table:
                out.add(n)
            out |= self.by_alias.get(n, set())
        return out

    def scope(self, roots: Iterable[str], local: Iterable[str] = ()) -> set[str]:
        """Everything a node proxy needs to decide about `roots` (Address names) and the
        workloads of its node (`local`) without further lookups, so that it never routes or
        authorizes on partial state:
        - a service comes with every workload backing it (istiod AdditionalPodSubscriptions;
          a service held with some endpoints missing would be load-balanced over the wrong
          set) and its waypoint;
        - a workload comes with its waypoint;
        - a node-local workload also brings the services it backs (inbound checks "addressed
          to a service bound to a waypoint") and, when it is itself a waypoint, the services
          and workloads bound to it (inbound CONNECTs it receives as a waypoint);
        - a waypoint reference brings the waypoint's workloads or service (and so its
          workloads): the waypoint-bypass check compares the peer with them.
        """
        table = self.types[ADDRESS_TYPE]
        out: set[str] = set()
        todo: list[str] = list(roots)
        for name in local:
            entry = table.get(name)
            if entry is None:
                continue
            todo.append(name)
            todo.extend(entry.meta.services)
            for ref in (*entry.meta.aliases, *entry.meta.services):
                todo.extend(self.bound.get(ref, ()))
        while todo:
            name = todo.pop()
            if name in out:
                continue
            entry = table.get(name)
            if entry is None:
                continue
            out.add(name)
            meta = entry.meta
            if meta.service:
                todo.extend(self.backing.get(name, ()))
            if meta.waypoint:
                todo.extend(self.lookup((meta.waypoint,)))
        return out

    def apply(self, delta: Delta) -> dict[str, set[str]]:
        """Apply a translation delta; return the touched names per type URL."""
        touched: dict[str, set[str]] = {t: set() for t in PUSH_ORDER}
        for rec in delta.upserts:
            name = resource_name(rec)
            if isinstance(rec, Authorization):
                self.set_any(AUTHORIZATION_TYPE, name, pack(rec))
                touched[AUTHORIZATION_TYPE].add(name)
            else:
                self.set_any(ADDRESS_TYPE, name, pack(rec), address_meta(rec))
                touched[ADDRESS_TYPE].add(name)
        for name in delta.removed_addresses:
            if self.pop(ADDRESS_TYPE, name) is not None:
                touched[ADDRESS_TYPE].add(name)
        for name in delta.removed_policies:
            if self.types[AUTHORIZATION_TYPE].pop(name, None) is not None:
                touched[AUTHORIZATION_TYPE].add(name)
        if any(touched.values()):
            self.version += 1
        return touched


@dataclass(slots=True)
class TypeState:
    """One connection's view of one type URL."""

    subscribed: bool = False
    wildcard: bool = True
    """False: on-demand (only node-local, subscribed, and what was sent; see module doc)."""
    subs: set[str] = field(default_factory=set)
    """On-demand: names and ``network/IP`` aliases the client subscribed to."""
    demanded: set[str] = field(default_factory=set)
    """Subscriptions not answered yet (each gets an answer, even "removed")."""
    initial_pending: bool = False
    known: dict[str, str] = field(default_factory=dict)
    """name -> version the client has been sent (or told us it has)."""
    dirty: set[str] = field(default_factory=set)
    dirty_since: float | None = None
    last_ack: str = ""
    last_ack_at: float | None = None
    last_nack: str = ""
    last_nack_at: float | None = None
    last_error: str = ""
    nacks: int = 0
    sent: int = 0


@dataclass(slots=True)
class ProxyConnection:
    id: int
    node: str
    peer: str
    connected_at: float
    types: dict[str, TypeState] = field(
        default_factory=lambda: {t: TypeState() for t in PUSH_ORDER}
    )
    pending: dict[str, tuple[str, float]] = field(default_factory=dict)
    """nonce -> (type URL, change time it carries)."""
    last_nonce: int = 0
    """The nonce (as a number) of the last response sent on this stream, any type."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def debug(self, now: float) -> dict[str, Any]:
        def ago(t: float | None) -> float | None:
            return None if t is None else round(now - t, 3)

        return {
            "id": self.id,
            "node": self.node,
            "peer": self.peer,
            "connected_for_s": round(now - self.connected_at, 3),
            "types": {
                t: {
                    "subscribed": s.subscribed,
                    "resources": len(s.known),
                    "responses_sent": s.sent,
                    "last_ack_nonce": s.last_ack,
                    "last_ack_s_ago": ago(s.last_ack_at),
                    "last_nack_nonce": s.last_nack,
                    "last_nack_s_ago": ago(s.last_nack_at),
                    "last_error": s.last_error,
                    "nacks": s.nacks,
                    "pending_changes": len(s.dirty),
                    "wildcard": s.wildcard,
                }
                for t, s in self.types.items()
                if s.subscribed or t != L7_TYPE  # waypoints' type only where asked for
            },
            "unacked_nonces": len(self.pending),
        }


class XdsServer:
    """The delta ADS service. Feed it with `publish`; register with `method_handlers`."""

    def __init__(
        self,
        *,
        metrics: ControlPlaneMetrics | None = None,
        authenticator: Authenticator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = ResourceTable()
        self.metrics = metrics or ControlPlaneMetrics()
        self.authenticator = authenticator
        self.clock = clock
        self.connections: dict[int, ProxyConnection] = {}
        self._set_sources: dict[str, dict[str, any_pb2.Any]] = {}
        """publish_set: the object last published per name (identical = unchanged)."""
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._shared: dict[tuple[str, tuple[str, ...], tuple[str, ...]], tuple[int, bytes]] = {}
        """Responses encoded at `_shared_version`: (type, names sent, removed) -> (nonce, bytes)."""
        self._shared_version = -1
        self._metric_children: dict[str, tuple[Any, Any]] = {}
        self._latency_children: dict[str, Any] = {}

    # ---- feeding

    def publish(self, delta: Delta, changed_at: float | None = None) -> None:
        """Apply a translation delta and schedule pushes to every connection."""
        self._notify(self.table.apply(delta), changed_at)

    def publish_raw(self, type_url: str, name: str, resource: any_pb2.Any) -> None:
        """Serve `resource` under `name` as-is (tests and debugging: e.g. a resource a client
        must NACK)."""
        self.table.set_any(type_url, name, resource)
        self._set_sources.get(type_url, {}).pop(name, None)
        self.table.version += 1
        self._notify({type_url: {name}}, None)

    def publish_set(
        self, type_url: str, resources: Mapping[str, any_pb2.Any], changed_at: float | None = None
    ) -> None:
        """Make `resources` the complete set of `type_url` (changed ones re-sent, missing ones
        removed) and schedule pushes (the waypoints' L7 type)."""
        table = self.table.types[type_url]
        seen = self._set_sources.setdefault(type_url, {})
        touched: set[str] = set()
        for name in [n for n in table if n not in resources]:
            del table[name]
            seen.pop(name, None)
            touched.add(name)
        for name, res in resources.items():
            if seen.get(name) is res:
                continue  # the very object published last time: nothing to serialise again
            before = table[name].version if name in table else None
            self.table.set_any(type_url, name, res)
            seen[name] = res
            if table[name].version != before:
                touched.add(name)
        if touched:
            self.table.version += 1
            self._notify({type_url: touched}, changed_at)

    def _notify(self, touched: dict[str, set[str]], changed_at: float | None) -> None:
        at = self.clock() if changed_at is None else changed_at
        for conn in self.connections.values():
            for type_url, names in touched.items():
                st = conn.types[type_url]
                if names and st.subscribed and not st.wildcard:
                    names = {n for n in names if self._wanted(conn, st, type_url, n)}
                if names and st.subscribed:
                    st.dirty |= names
                    if st.dirty_since is None:
                        st.dirty_since = at
                    conn.wake.set()

    def _wanted(self, conn: ProxyConnection, st: TypeState, type_url: str, name: str) -> bool:
        """Whether a change of `name` concerns an on-demand client (see module doc and
        ResourceTable.scope): it holds or asked for it, it is on its node, it claims an
        address the client asked for, it backs a service the client holds, or it is bound to
        a waypoint running on the client's node."""
        if name in st.known or name in st.subs:
            return True
        table = self.table.types[type_url]
        entry = table.get(name)
        if entry is None:
            return False
        meta = entry.meta
        if (
            (bool(meta.node) and meta.node == conn.node)
            or any(a in st.subs for a in meta.aliases)
            or any(k in st.known or k in st.subs for k in meta.services)
        ):
            return True
        for target in self.table.lookup((meta.waypoint,)) if meta.waypoint else ():
            if table[target].meta.node == conn.node or any(
                table[b].meta.node == conn.node for b in self.table.backing.get(target, ())
            ):
                return True
        return False

    # ---- debug

    def debug_connections(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [c.debug(now) for c in self.connections.values()]

    # ---- gRPC

    def method_handlers(self) -> grpc.GenericRpcHandler:
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=dpb.DeltaDiscoveryRequest.FromString,
            response_serializer=lambda b: b,  # responses are pre-encoded bytes
        )
        return grpc.method_handlers_generic_handler(ADS_SERVICE, {DELTA_METHOD: handler})

    async def _stream(
        self, requests: AsyncIterator[dpb.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            # The credential is checked at once (the token review's outcome is the one its
            # interceptor cached just before), but the refusal is sent only after the first
            # request is read, or `REFUSED_FIRST_REQUEST_WAIT`: refusing while the client still
            # sends it races its send (a grpc-core client may then report the trailers followed
            # by RST_STREAM(NO_ERROR), RFC 9113 §8.1, as INTERNAL, not the status).
            node, refusal = None, None
            if self.authenticator is not None:
                try:
                    node = self.authenticator.authenticate(
                        bearer_token(context.invocation_metadata())
                    )
                except ControlPlaneError as err:
                    refusal = err
            wait = FIRST_REQUEST_TIMEOUT if refusal is None else REFUSED_FIRST_REQUEST_WAIT
            try:
                first = await asyncio.wait_for(anext(aiter(requests), None), wait)
            except TimeoutError:
                if refusal is None:
                    refusal = InvalidRequest(f"no request within {FIRST_REQUEST_TIMEOUT:.0f}s")
                first = None
            if refusal is not None:
                raise refusal
            if first is None:
                return
            claimed = _node_name(first.node)
            if node is not None and claimed and claimed != node:
                raise PermissionDenied(
                    f"credential belongs to node {node!r}, request claims node {claimed!r}"
                )
            node = node or claimed
            if not node:
                raise InvalidRequest("no node name: set node.metadata NODE_NAME")
        except ControlPlaneError as err:
            log.warning("xDS stream refused: %s", err)
            await context.abort(err.code, str(err))
            return
        conn = ProxyConnection(
            id=next(self._ids), node=node, peer=context.peer(), connected_at=self.clock()
        )
        self.connections[conn.id] = conn
        self.metrics.connected.inc()
        log.info("node proxy %s connected (%s)", node, conn.peer)
        reader = asyncio.get_running_loop().create_task(self._read(conn, first, requests))
        try:
            await self._write_loop(conn, context, reader)
        finally:
            reader.cancel()
            del self.connections[conn.id]
            self.metrics.connected.dec()
            log.info("node proxy %s disconnected", node)

    async def _read(
        self,
        conn: ProxyConnection,
        first: dpb.DeltaDiscoveryRequest,
        requests: AsyncIterator[dpb.DeltaDiscoveryRequest],
    ) -> None:
        self._handle_request(conn, first)
        async for req in requests:
            self._handle_request(conn, req)

    def _handle_request(self, conn: ProxyConnection, req: dpb.DeltaDiscoveryRequest) -> None:
        st = conn.types.get(req.type_url)
        if st is None:
            log.warning("node %s asked for unknown type %r", conn.node, req.type_url)
            return
        now = self.clock()
        if req.response_nonce:
            sent = conn.pending.pop(req.response_nonce, None)
            if req.HasField("error_detail"):
                st.nacks += 1
                st.last_nack = req.response_nonce
                st.last_nack_at = now
                st.last_error = req.error_detail.message
                self.metrics.nacks.labels(type=_short(req.type_url)).inc()
                log.warning("node %s NACKed %s: %s", conn.node, req.response_nonce, st.last_error)
            else:
                st.last_ack = req.response_nonce
                st.last_ack_at = now
            if sent is not None:
                self._latency_metric(req.type_url).observe(now - sent[1])
            if not (req.resource_names_subscribe or req.resource_names_unsubscribe):
                return
        sub, unsub = set(req.resource_names_subscribe), set(req.resource_names_unsubscribe)
        if st.subscribed and (sub or unsub):
            # A subscription change on this stream (on-demand lookups).
            if "*" in sub and "*" not in unsub and not st.wildcard:
                st.wildcard = True
                st.initial_pending = True  # now wildcard: everything it does not have yet
            elif "*" in unsub and not type_url_wildcard_only(req.type_url):
                st.wildcard = False
            for n in unsub - {"*"}:
                st.subs.discard(n)
                st.known.pop(n, None)
            names = sub - {"*"} - unsub
            new = names - st.subs
            room = max(MAX_SUBSCRIPTIONS - len(st.subs), 0)
            if len(new) > room:
                # Bounded per connection (a peer must not grow our memory without limit): the
                # excess lookups get no answer, so that proxy refuses those connections.
                log.warning(
                    "node %s: over %d subscriptions; %d names ignored",
                    conn.node,
                    MAX_SUBSCRIPTIONS,
                    len(new) - room,
                )
                names = set(sorted(new)[:room]) | (names & st.subs)
            st.subs |= names
            st.demanded |= names
            if names or st.wildcard:
                conn.wake.set()
            return
        # A (re)subscription: the initial request of this type on this stream.
        st.subscribed = True
        st.initial_pending = True
        st.known = dict(req.initial_resource_versions)
        # xDS delta: no names, or "*", is wildcard; "*" also unsubscribed = subscribe to nothing
        # (ztunnel's on-demand initial request). Policies and L7 are always wildcard (Istio).
        st.wildcard = type_url_wildcard_only(req.type_url) or (
            (not sub or "*" in sub) and "*" not in unsub
        )
        st.subs = set() if st.wildcard else (sub - {"*"} - unsub) | set(st.known)
        if len(st.subs) > MAX_SUBSCRIPTIONS:
            log.warning(
                "node %s: more than %d subscriptions; extra ignored", conn.node, MAX_SUBSCRIPTIONS
            )
            st.subs = set(sorted(st.subs)[:MAX_SUBSCRIPTIONS])
        st.demanded = set() if st.wildcard else (sub - {"*"} - unsub) & st.subs
        conn.wake.set()

    async def _write_loop(
        self, conn: ProxyConnection, context: grpc.aio.ServicerContext, reader: asyncio.Task[None]
    ) -> None:
        # One Event per connection, also set when the reader ends: a push costs one wake-up
        # (a task + `asyncio.wait` per push was ~10 us of the control plane's time per
        # connection, x100 connections for a policy change).
        reader.add_done_callback(lambda _reader: conn.wake.set())
        while True:
            await conn.wake.wait()
            if reader.done():
                break
            conn.wake.clear()
            for type_url in PUSH_ORDER:
                response = self._build(conn, type_url)
                if response is not None:
                    await context.write(response)
        if not reader.cancelled() and reader.exception() is not None:
            log.info("xDS stream of %s ended: %s", conn.node, reader.exception())

    def _build(self, conn: ProxyConnection, type_url: str) -> bytes | None:
        st = conn.types[type_url]
        table = self.table.types[type_url]
        now = self.clock()
        force: set[str] = set()
        unanswered: list[str] = []
        if st.demanded:
            # Every subscription is answered: its resources (sent even if the client has them,
            # so its lookup completes), or the name as removed when nothing matches.
            for n in st.demanded:
                found = self.table.lookup((n,))
                if found:
                    force |= self.table.scope(found)
                else:
                    unanswered.append(n)
            if not st.wildcard:
                st.subs |= force
        if st.initial_pending:
            if st.wildcard:
                names: set[str] = set(table) | set(st.known)
            else:
                names = self.table.scope(
                    self.table.lookup(st.subs), self.table.by_node.get(conn.node, ())
                ) | set(st.known)
            changed_at = now
        elif st.dirty or force or unanswered:
            names = st.dirty
            changed_at = st.dirty_since or now
        else:
            return None
        if not st.wildcard and not st.initial_pending:
            # What a changed resource brings into scope comes along (a local pod's new
            # service, a service's new waypoint, ...; see ResourceTable.scope).
            present = [n for n in names if n in table]
            local = [n for n in present if table[n].meta.node == conn.node]
            names = names | self.table.scope(present, local)
        names = names | force
        sent: list[str] = []
        wires: list[bytes] = []
        removed: list[str] = []
        for name in names:
            entry = table.get(name)
            if entry is None:
                if st.known.pop(name, None) is not None:
                    removed.append(name)
            elif st.known.get(name) != entry.version or name in force:
                st.known[name] = entry.version
                sent.append(name)
                wires.append(entry.wire)
        removed.extend(n for n in unanswered if n not in removed)
        initial = st.initial_pending or bool(st.demanded)
        st.initial_pending = False
        st.demanded = set()
        st.dirty = set()
        st.dirty_since = None
        if not wires and not removed and not initial:
            return None
        st.sent += 1
        pushes, pushed = self._push_metrics(type_url)
        pushes.inc()
        pushed.inc(len(wires))
        number, raw = self._encode(conn, type_url, sent, wires, removed)
        conn.last_nonce = number
        conn.pending[f"{number:x}"] = (type_url, changed_at)
        return raw

    def _encode(
        self,
        conn: ProxyConnection,
        type_url: str,
        sent: list[str],
        wires: list[bytes],
        removed: list[str],
    ) -> tuple[int, bytes]:
        """(nonce, response bytes). Every connection sent the same change gets the same bytes:
        encoded once, under one nonce, per table version (a policy change goes to every
        proxy). A nonce only has to be unique per stream (xDS); each stream's nonces strictly
        increase, so none is sent twice on a stream: a stream whose last nonce is newer than
        the shared one gets its own."""
        key = (type_url, tuple(sent), tuple(removed))
        shared = self._shared.get(key) if self._shared_version == self.table.version else None
        if shared is not None and shared[0] > conn.last_nonce:
            return shared
        number = next(self._nonces)
        raw = encode_response(
            type_url=type_url,
            nonce=f"{number:x}",
            system_version=str(self.table.version),
            resources=wires,
            removed=removed,
        )
        if self._shared_version != self.table.version:
            self._shared = {}
            self._shared_version = self.table.version
        if len(self._shared) < SHARED_RESPONSES and len(raw) <= SHARED_MAX_BYTES:
            self._shared[key] = (number, raw)
        return number, raw

    def _latency_metric(self, type_url: str) -> Any:
        """The push-latency histogram child of `type_url` (cached as `_push_metrics`: one
        observation per ACK, 100 ACKs per policy change)."""
        child = self._latency_children.get(type_url)
        if child is None:
            child = self.metrics.push_latency.labels(type=_short(type_url))
            self._latency_children[type_url] = child
        return child

    def _push_metrics(self, type_url: str) -> tuple[Any, Any]:
        """The (responses, resources) counters of `type_url` (labelled children cached: a
        `labels()` lookup per push was a visible share of a 100-proxy fan-out)."""
        children = self._metric_children.get(type_url)
        if children is None:
            label = _short(type_url)
            children = (
                self.metrics.pushes.labels(type=label),
                self.metrics.push_resources.labels(type=label),
            )
            self._metric_children[type_url] = children
        return children


def type_url_wildcard_only(type_url: str) -> bool:
    """Types always delivered whole (Istio: policies are never on-demand)."""
    return type_url != ADDRESS_TYPE


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _node_name(node: dpb.Node) -> str:
    if node.HasField("metadata"):
        value = node.metadata.fields.get("NODE_NAME")
        if value is not None and value.string_value:
            return str(value.string_value)
    return str(node.id)
