"""Delta xDS server: ``envoy.service.discovery.v3.AggregatedDiscoveryService/
DeltaAggregatedResources`` for ``istio.workload.Address`` and ``istio.security.Authorization``
(node proxies and waypoints) and ``ambient.l7.Resource`` (waypoints: `publish_set`).

Owns: the resource table (every resource serialised once, versioned by content), per-connection
state (node, what it has, pending nonces, last ACK/NACK), the push loop, and the gRPC method
handler.

Protocol (envoy xDS "incremental" variant, as Istio's ztunnel uses it):
- The client opens one stream and sends one DeltaDiscoveryRequest per type URL (wildcard
  subscription; explicit names are treated as wildcard: every node proxy gets every resource,
  which is "at least what it needs"). ``initial_resource_versions`` (on reconnect) says what the
  client has: only resources whose version differs are sent, and names the client has that no
  longer exist are sent in ``removed_resources``.
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
  assembled from those bytes without re-encoding (protobuf length-delimited field 2).
- Node identity is the authenticated credential's node; a ``NODE_NAME`` in the node metadata
  that differs is refused (PERMISSION_DENIED).
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
from controlplane.translate import Delta
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto.convert import ADDRESS_TYPE, AUTHORIZATION_TYPE, pack, resource_name
from meshcore.proto.l7res import L7_TYPE

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
DELTA_METHOD = "DeltaAggregatedResources"
PUSH_ORDER = (AUTHORIZATION_TYPE, ADDRESS_TYPE, L7_TYPE)
"""L7_TYPE (``ambient.l7.Resource``) is subscribed to by waypoints only (node proxies never ask
for it, so they are never sent any)."""


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


def resource_field_bytes(name: str, version: str, resource: any_pb2.Any) -> bytes:
    """One ``DeltaDiscoveryResponse.resources`` entry, encoded as field 2 (tag 0x12)."""
    body: bytes = dpb.Resource(name=name, version=version, resource=resource).SerializeToString(
        deterministic=True
    )
    return b"\x12" + _varint(len(body)) + body


def encode_response(
    *, type_url: str, nonce: str, system_version: str, resources: Iterable[bytes],
    removed: Iterable[str],
) -> bytes:  # fmt: skip
    """A serialized DeltaDiscoveryResponse from pre-encoded resource fields."""
    head: bytes = dpb.DeltaDiscoveryResponse(
        type_url=type_url, nonce=nonce, system_version_info=system_version,
        removed_resources=list(removed),
    ).SerializeToString()  # fmt: skip
    return head + b"".join(resources)


@dataclass(slots=True)
class Entry:
    version: str
    wire: bytes
    """The encoded ``resources`` field (tag + length + Resource)."""


class ResourceTable:
    """Current resources per type URL, each serialised once."""

    def __init__(self) -> None:
        self.types: dict[str, dict[str, Entry]] = {t: {} for t in PUSH_ORDER}
        self.version = 0

    def set_any(self, type_url: str, name: str, resource: any_pb2.Any) -> None:
        raw = resource.SerializeToString(deterministic=True)
        version = hashlib.blake2b(raw, digest_size=8).hexdigest()
        cur = self.types[type_url].get(name)
        if cur is None or cur.version != version:
            self.types[type_url][name] = Entry(
                version=version, wire=resource_field_bytes(name, version, resource)
            )

    def apply(self, delta: Delta) -> dict[str, set[str]]:
        """Apply a translation delta; return the touched names per type URL."""
        touched: dict[str, set[str]] = {t: set() for t in PUSH_ORDER}
        for rec in delta.upserts:
            type_url = ADDRESS_TYPE if not hasattr(rec, "rules") else AUTHORIZATION_TYPE
            name = resource_name(rec)
            self.set_any(type_url, name, pack(rec))
            touched[type_url].add(name)
        for name in delta.removed_addresses:
            if self.types[ADDRESS_TYPE].pop(name, None) is not None:
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
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)

    # ---- feeding

    def publish(self, delta: Delta, changed_at: float | None = None) -> None:
        """Apply a translation delta and schedule pushes to every connection."""
        self._notify(self.table.apply(delta), changed_at)

    def publish_raw(self, type_url: str, name: str, resource: any_pb2.Any) -> None:
        """Serve `resource` under `name` as-is (tests and debugging: e.g. a resource a client
        must NACK)."""
        self.table.set_any(type_url, name, resource)
        self.table.version += 1
        self._notify({type_url: {name}}, None)

    def publish_set(
        self, type_url: str, resources: Mapping[str, any_pb2.Any], changed_at: float | None = None
    ) -> None:
        """Make `resources` the complete set of `type_url` (changed ones re-sent, missing ones
        removed) and schedule pushes (the waypoints' L7 type)."""
        table = self.table.types[type_url]
        before = {n: e.version for n, e in table.items()}
        for name in [n for n in table if n not in resources]:
            del table[name]
        for name, res in resources.items():
            self.table.set_any(type_url, name, res)
        touched = {n for n in set(before) | set(table)
                   if before.get(n) != (table[n].version if n in table else None)}  # fmt: skip
        if touched:
            self.table.version += 1
            self._notify({type_url: touched}, changed_at)

    def _notify(self, touched: dict[str, set[str]], changed_at: float | None) -> None:
        at = self.clock() if changed_at is None else changed_at
        for conn in self.connections.values():
            for type_url, names in touched.items():
                st = conn.types[type_url]
                if names and st.subscribed:
                    st.dirty |= names
                    if st.dirty_since is None:
                        st.dirty_since = at
                    conn.wake.set()

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
            node = None
            if self.authenticator is not None:
                node = self.authenticator.authenticate(bearer_token(context.invocation_metadata()))
            first = await anext(aiter(requests), None)
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
                self.metrics.push_latency.labels(type=_short(req.type_url)).observe(now - sent[1])
            return
        # A (re)subscription: the initial request of this type on this stream.
        st.subscribed = True
        st.initial_pending = True
        st.known = dict(req.initial_resource_versions)
        conn.wake.set()

    async def _write_loop(
        self, conn: ProxyConnection, context: grpc.aio.ServicerContext, reader: asyncio.Task[None]
    ) -> None:
        while not reader.done():
            waiter = asyncio.ensure_future(conn.wake.wait())
            try:
                await asyncio.wait((waiter, reader), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
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
        if st.initial_pending:
            names: Iterable[str] = set(table) | set(st.known)
            changed_at = now
        elif st.dirty:
            names = st.dirty
            changed_at = st.dirty_since or now
        else:
            return None
        wires: list[bytes] = []
        removed: list[str] = []
        for name in names:
            entry = table.get(name)
            if entry is None:
                if st.known.pop(name, None) is not None:
                    removed.append(name)
            elif st.known.get(name) != entry.version:
                st.known[name] = entry.version
                wires.append(entry.wire)
        initial = st.initial_pending
        st.initial_pending = False
        st.dirty = set()
        st.dirty_since = None
        if not wires and not removed and not initial:
            return None
        nonce = f"{next(self._nonces):x}"
        conn.pending[nonce] = (type_url, changed_at)
        st.sent += 1
        label = _short(type_url)
        self.metrics.pushes.labels(type=label).inc()
        self.metrics.push_resources.labels(type=label).inc(len(wires))
        return encode_response(
            type_url=type_url,
            nonce=nonce,
            system_version=str(self.table.version),
            resources=wires,
            removed=removed,
        )


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _node_name(node: dpb.Node) -> str:
    if node.HasField("metadata"):
        value = node.metadata.fields.get("NODE_NAME")
        if value is not None and value.string_value:
            return str(value.string_value)
    return str(node.id)
