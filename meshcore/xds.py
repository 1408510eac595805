"""The node proxy's delta xDS client: keeps a `MeshState` in sync with the control plane.

Owns: `ControlPlaneEndpoint` (address, node credential, TLS trust for the control plane; shared
with `meshcore.caclient`), `apply_response` (pure: state + one DeltaDiscoveryResponse -> new
state + per-resource errors), and `XdsClient` (stream, ACK/NACK, reconnect).

Invariants:
- Per-resource application: each resource of a response is decoded and validated on its own
  (`meshcore.proto.convert.unpack`, the model's strict parsers). Bad ones are left out and the
  response is NACKed naming them (error_detail INVALID_ARGUMENT, message ``name: error; ...``);
  the good ones are applied. Removals are always applied.
- The new `MeshState` is built completely, then published with one call of `on_update`
  (the proxy swaps `ProxyContext.state` by one assignment): readers never see half a response.
- While the control plane is unreachable the last good state stays in force (nothing is
  cleared on disconnect). Reconnects back off exponentially (0.5 s x2, jitter +-20%, capped
  at `XdsSettings.backoff_cap`); the attempt counter resets once a stream delivered a response.
- On reconnect the client sends ``initial_resource_versions`` (what it has), so the control
  plane sends only what changed meanwhile plus removals: a restarted control plane that
  computes the same content sends nothing new.
- `synced` is set once the first response of every type URL has been applied (full state).
- On-demand (``XdsSettings(on_demand=True)``, Istio ztunnel's ``XDS_ON_DEMAND``): the Address
  type is subscribed to "nothing" (``*`` subscribed and unsubscribed in the first request), so the
  control plane sends this node's workloads and what is asked for; `demand` asks for one
  resource or ``network/IP`` and returns once the response answering it has been applied to
  the published state (never before: a caller that looks the address up next sees it, or
  knows it does not exist). Authorization stays wildcard (every policy, always).
- Extra type URLs (`extra_types`, e.g. the waypoint's ``ambient.l7.Resource``) are subscribed to
  on the same stream and applied by their handler, with the same ACK/NACK and version rules.
- The stream is a call of our own gRPC client (`meshcore.grpcclient`, one connection per
  stream; no grpcio in a proxy): a response message over `ControlPlaneEndpoint.max_message`
  ends the stream RESOURCE_EXHAUSTED, and a stream ended with a gRPC status other than OK is
  counted by status (`ClientStats.statuses`) and logged with it. Limits that changed with the
  move off grpcio's client: the largest response message is 64 MiB (was 256 MiB), and the
  keepalive is the HTTP/2 core's, a PING after 10 s without input and the connection dead when
  it is not answered within 20 s (grpcio's channel options were 10 s and 5 s).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import struct_pb2

from meshcore.backoff import Backoff, Retry
from meshcore.bootstrap import DEFAULT_SERVER_NAME
from meshcore.errors import ConfigError
from meshcore.grpcclient import GrpcCall, GrpcConnection
from meshcore.grpcclient import connect as grpc_connect
from meshcore.grpcwire import DEFAULT_MAX_MESSAGE, GrpcError, code_name
from meshcore.model import Authorization, Service, Workload
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto.convert import ADDRESS_TYPE, AUTHORIZATION_TYPE, TYPE_URLS, unpack
from meshcore.state import MeshState

log = logging.getLogger(__name__)

DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
_INVALID_ARGUMENT = 3  # google.rpc.Code


def read_token_file(path: Path) -> str:
    """A node credential file: the token on its first line."""
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the node credential: {exc}") from None
    if not lines or not lines[0].strip():
        raise ConfigError(str(path), "node credential file is empty")
    return lines[0].strip()


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPlaneEndpoint:
    """How to reach and authenticate to the control plane (xDS and CA share it)."""

    address: str
    """host:port (15012)."""
    token: str | None = None
    """Node credential sent as ``authorization: Bearer <token>``."""
    tls_roots: bytes | None = None
    """PEM roots that sign the control plane's serving certificate; None = plaintext (lab,
    loopback only)."""
    server_name: str = DEFAULT_SERVER_NAME
    """DNS name expected in the control plane's certificate."""
    token_file: Path | None = None
    """Re-read for every call when set (projected service-account tokens rotate on disk)."""

    max_message: int = DEFAULT_MAX_MESSAGE
    """Largest response message accepted (`meshcore.grpcwire`); larger: RESOURCE_EXHAUSTED."""

    async def connect(self, timeout: float = 10.0) -> GrpcConnection:
        """One HTTP/2 connection for gRPC calls (`meshcore.grpcclient`): TLS verified against
        `tls_roots` for `server_name`, or plaintext without roots. GrpcError(UNAVAILABLE)."""
        return await grpc_connect(
            self.address,
            tls_roots=self.tls_roots,
            server_name=self.server_name,
            timeout=timeout,
            max_message=self.max_message,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Credentials for one call (an xDS stream or a CSR). A token file is read each time,
        so a token the kubelet rotates on disk is picked up without a restart."""
        token = read_token_file(self.token_file) if self.token_file is not None else self.token
        return (("authorization", f"Bearer {token}"),) if token else ()


# ------------------------------------------------------------------------------ pure apply


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    """Result of applying one response."""

    state: MeshState
    versions: dict[str, str]
    """name -> version of the resources applied (for initial_resource_versions)."""
    removed: tuple[str, ...]
    errors: tuple[tuple[str, str], ...]
    """(resource name, message) of resources NACKed."""


def apply_response(state: MeshState, resp: dpb.DeltaDiscoveryResponse) -> Applied:
    """Decode every resource of `resp` on its own and apply the good ones and all removals."""
    upserts: list[Workload | Service | Authorization] = []
    versions: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    for res in resp.resources:
        try:
            record = unpack(resp.type_url, res.name, res.resource)
        except ConfigError as exc:
            errors.append((res.name, str(exc)))
            continue
        if (resp.type_url == AUTHORIZATION_TYPE) != isinstance(record, Authorization):
            errors.append((res.name, "record kind does not match the type URL"))
            continue
        upserts.append(record)
        versions[res.name] = res.version
    removed = tuple(resp.removed_resources)
    if resp.type_url == AUTHORIZATION_TYPE:
        new = state.with_updates(upserts, policy_removals=removed)
    else:
        new = state.with_updates(upserts, removed)
    return Applied(state=new, versions=versions, removed=removed, errors=tuple(errors))


def nack_message(errors: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{name}: {msg}" for name, msg in errors)


# ------------------------------------------------------------------------------ client

ExtraHandler = Callable[[dpb.DeltaDiscoveryResponse], Sequence[tuple[str, str]]]
"""Applies one response of an extra type URL; returns (resource name, error) of the resources
it rejected (NACKed by name, the rest applied)."""


@dataclass(slots=True)
class ClientStats:
    connects: int = 0
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    last_error: str = ""
    last_nack: str = ""
    last_update: float | None = None
    connected: bool = False
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    terminations: dict[str, int] = field(default_factory=dict)
    """Ended streams by reason (ztunnel's ``istio_xds_connection_terminations``: Complete,
    ConnectionError, Error)."""
    messages: dict[str, int] = field(default_factory=dict)
    """Responses received per type URL (``istio_xds_message``)."""
    message_bytes: dict[str, int] = field(default_factory=dict)
    """Encoded bytes of those responses per type URL (``istio_xds_message_bytes``)."""
    statuses: dict[str, int] = field(default_factory=dict)
    """Streams ended with a gRPC status other than OK, by status name (the server's, or the
    one `meshcore.grpcwire` synthesized: UNAVAILABLE for a lost connection)."""

    def count_status(self, code: int) -> None:
        name = code_name(code)
        self.statuses[name] = self.statuses.get(name, 0) + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class XdsSettings:
    """Who an `XdsClient` is and how it subscribes: fixed for the process."""

    node: str
    node_kind: str = "ztunnel"
    """Node id prefix: ``<node_kind>~<node>`` (ztunnel, waypoint)."""
    on_demand: bool = False
    """Addresses on demand (Istio ztunnel's ``XDS_ON_DEMAND``, see the module docstring)."""
    build_state: bool = True
    """Build and publish the `MeshState` (False: only count, e.g. a benchmark's fleet)."""
    backoff_cap: float = 10.0
    """Seconds between reconnect attempts at most."""
    clock: Callable[[], float] = time.monotonic
    rng: random.Random | None = None
    """The reconnect jitter's source (None: a fresh one per client)."""


class XdsClient:
    """Delta ADS client for one node proxy. `run()` forever; cancel to stop."""

    def __init__(
        self,
        endpoint: ControlPlaneEndpoint,
        settings: XdsSettings,
        *,
        on_update: Callable[[MeshState], None] | None = None,
        extra_types: Mapping[str, ExtraHandler] | None = None,
        state: MeshState | None = None,
    ) -> None:
        """`on_update` gets each new `MeshState`; `extra_types` are further type URLs and who
        applies their responses; `state` is where to start from (default: empty)."""
        self.endpoint = endpoint
        self.node = settings.node
        self.on_update = on_update
        self.state = state if state is not None else MeshState.empty()
        self.backoff_cap = settings.backoff_cap
        self.build_state = settings.build_state
        self.rng = settings.rng or random.Random()
        self.clock = settings.clock
        self.extra_types: dict[str, ExtraHandler] = dict(extra_types or {})
        """Further type URLs (e.g. the waypoint's L7 type) and who applies their responses."""
        self.type_urls: tuple[str, ...] = (*TYPE_URLS, *self.extra_types)
        self.node_kind = settings.node_kind
        """Node id prefix: ``<node_kind>~<node>`` (ztunnel, waypoint)."""
        self.stats = ClientStats(versions={t: {} for t in self.type_urls})
        self.synced = asyncio.Event()
        self.updated = asyncio.Event()
        """Set after every applied response (tests/bench clear and wait on it)."""
        self.on_response: Callable[[dpb.DeltaDiscoveryResponse], None] | None = None
        self.on_demand = settings.on_demand
        self._demands: dict[str, asyncio.Future[None]] = {}
        """Address names / ``network/IP`` asked for and not answered yet."""
        self._outbox: asyncio.Queue[dpb.DeltaDiscoveryRequest | None] | None = None

    async def demand(self, name: str, timeout: float = 5.0) -> bool:
        """Ask for the Address resource `name` (a uid, ``ns/hostname`` or ``network/IP``) and
        wait until the control plane's answer is applied (True), or `timeout` (False). Without
        on-demand every resource is already here: returns True at once."""
        if not self.on_demand:
            return True
        fut = self._demands.get(name)
        if fut is None:
            fut = self._demands[name] = asyncio.get_running_loop().create_future()
            if self._outbox is not None:  # else sent with the next stream's first request
                self._outbox.put_nowait(
                    dpb.DeltaDiscoveryRequest(
                        type_url=ADDRESS_TYPE, resource_names_subscribe=[name]
                    )
                )
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return False
        return True

    def _answer_demands(self, resp: dpb.DeltaDiscoveryResponse) -> None:
        if not self._demands or resp.type_url != ADDRESS_TYPE:
            return
        names = set(resp.removed_resources)
        for res in resp.resources:
            names.add(res.name)
            names.update(res.aliases)
        for n in names & set(self._demands):
            fut = self._demands.pop(n)
            if not fut.done():
                fut.set_result(None)

    def _node_pb(self) -> dpb.Node:
        meta = struct_pb2.Struct()
        meta.fields["NODE_NAME"].string_value = self.node
        return dpb.Node(id=f"{self.node_kind}~{self.node}", metadata=meta)

    async def run(self) -> None:
        retry = Retry(Backoff(initial=0.5, cap=self.backoff_cap), rng=self.rng)
        while True:
            delivered = False
            reason = "Complete"
            try:
                delivered = await self._session()
                self.stats.last_error = "stream closed by the control plane"
            except asyncio.CancelledError:
                raise
            except GrpcError as exc:
                reason = "ConnectionError"
                self.stats.last_error = str(exc)
                self.stats.count_status(exc.code)
            except Exception as exc:
                reason = "Error"
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self.stats.connected = False
            terms = self.stats.terminations
            terms[reason] = terms.get(reason, 0) + 1
            if delivered:
                retry.reset()
            delay = retry.next_delay()
            log.warning(
                "xDS stream to %s ended (%s); keeping the last config, retry in %.1fs",
                self.endpoint.address,
                self.stats.last_error,
                delay,
            )
            await retry.wait(delay)

    async def _session(self) -> bool:
        """One stream; returns whether it delivered at least one response."""
        outbox: asyncio.Queue[dpb.DeltaDiscoveryRequest | None] = asyncio.Queue()
        node = self._node_pb()
        for type_url in self.type_urls:
            on_demand = self.on_demand and type_url == ADDRESS_TYPE
            outbox.put_nowait(
                dpb.DeltaDiscoveryRequest(
                    node=node,
                    type_url=type_url,
                    # on-demand: "*" subscribed and unsubscribed = nothing but node-local
                    # (ztunnel xds/client.rs), plus the lookups still waiting for an answer.
                    resource_names_subscribe=["*", *self._demands] if on_demand else ["*"],
                    resource_names_unsubscribe=["*"] if on_demand else [],
                    initial_resource_versions=self.stats.versions[type_url],
                )
            )
        self._outbox = outbox

        delivered = False
        seen_types: set[str] = set()
        metadata = self.endpoint.metadata()
        conn = await self.endpoint.connect()
        sender: asyncio.Task[None] | None = None
        call: GrpcCall | None = None
        try:
            call = conn.start(DELTA_METHOD, metadata=metadata)
            self.stats.connects += 1

            async def send_requests(call: GrpcCall) -> None:
                while (req := await outbox.get()) is not None:
                    call.send(req.SerializeToString())

            sender = asyncio.get_running_loop().create_task(send_requests(call))
            async for raw in call:
                resp = dpb.DeltaDiscoveryResponse.FromString(raw)
                self.stats.connected = True
                delivered = True
                outbox.put_nowait(self._handle(resp))
                seen_types.add(resp.type_url)
                if seen_types >= set(self.type_urls):
                    self.synced.set()
        finally:
            self._outbox = None
            outbox.put_nowait(None)
            if sender is not None:
                sender.cancel()
            if call is not None:
                call.cancel()  # RST_STREAM(CANCEL) before the GOAWAY: the server ends the RPC
            conn.close()
        return delivered

    def _handle_extra(
        self, resp: dpb.DeltaDiscoveryResponse, handler: ExtraHandler
    ) -> dpb.DeltaDiscoveryRequest:
        """A response of an extra type: `handler` applies it and names the bad resources."""
        errors = list(handler(resp))
        bad = {name for name, _ in errors}
        versions = self.stats.versions[resp.type_url]
        for name in resp.removed_resources:
            versions.pop(name, None)
        for res in resp.resources:
            if res.name not in bad:
                versions[res.name] = res.version
        self.stats.last_update = self.clock()
        if self.on_response is not None:
            self.on_response(resp)
        self.updated.set()
        return _nack_or_ack(self, resp, errors)

    def _handle(self, resp: dpb.DeltaDiscoveryResponse) -> dpb.DeltaDiscoveryRequest:
        self.stats.responses += 1
        st, url = self.stats, resp.type_url
        st.messages[url] = st.messages.get(url, 0) + 1
        st.message_bytes[url] = st.message_bytes.get(url, 0) + resp.ByteSize()
        extra = self.extra_types.get(resp.type_url)
        if extra is not None:
            return self._handle_extra(resp, extra)
        if resp.type_url not in TYPE_URLS:
            self.stats.nacks += 1
            return dpb.DeltaDiscoveryRequest(
                type_url=resp.type_url,
                response_nonce=resp.nonce,
                error_detail=dpb.Status(
                    code=_INVALID_ARGUMENT, message=f"unknown type {resp.type_url}"
                ),
            )
        if self.build_state:
            applied = apply_response(self.state, resp)
        else:
            applied = _decode_only(self.state, resp)
        versions = self.stats.versions[resp.type_url]
        for name in applied.removed:
            versions.pop(name, None)
        versions.update(applied.versions)
        self.state = applied.state
        self.stats.last_update = self.clock()
        if self.on_update is not None and self.build_state:
            self.on_update(applied.state)
        self._answer_demands(resp)  # after the state is published
        if self.on_response is not None:
            self.on_response(resp)
        self.updated.set()
        if applied.errors:
            self.stats.nacks += 1
            self.stats.last_nack = nack_message(applied.errors)
            log.warning("NACK %s: %s", resp.nonce, self.stats.last_nack)
            return dpb.DeltaDiscoveryRequest(
                type_url=resp.type_url,
                response_nonce=resp.nonce,
                error_detail=dpb.Status(code=_INVALID_ARGUMENT, message=self.stats.last_nack),
            )
        self.stats.acks += 1
        return dpb.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)


def _nack_or_ack(
    self: XdsClient, resp: dpb.DeltaDiscoveryResponse, errors: Sequence[tuple[str, str]]
) -> dpb.DeltaDiscoveryRequest:
    if errors:
        self.stats.nacks += 1
        self.stats.last_nack = nack_message(errors)
        log.warning("NACK %s: %s", resp.nonce, self.stats.last_nack)
        return dpb.DeltaDiscoveryRequest(
            type_url=resp.type_url,
            response_nonce=resp.nonce,
            error_detail=dpb.Status(code=_INVALID_ARGUMENT, message=self.stats.last_nack),
        )
    self.stats.acks += 1
    return dpb.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)


def _decode_only(state: MeshState, resp: dpb.DeltaDiscoveryResponse) -> Applied:
    """Decode and validate every resource but do not rebuild the state (benchmark clients)."""
    versions: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    for res in resp.resources:
        try:
            unpack(resp.type_url, res.name, res.resource)
        except ConfigError as exc:
            errors.append((res.name, str(exc)))
            continue
        versions[res.name] = res.version
    return Applied(
        state=state, versions=versions, removed=tuple(resp.removed_resources), errors=tuple(errors)
    )
