"""A `CertificateProvider` that asks the control plane's CA (IstioCertificateService).

Owns: building the CreateCertificate request (a fresh ECDSA P-256 key + CSR per certificate,
``ImpersonatedIdentity`` metadata, requested TTL), the call with the node credential, and
validating the answer before it is installed. Key, CSR and validation are `meshcore.certhelper`'s
(a helper process for the node proxy, whose workers never import `cryptography`; in-process
for the waypoint).

Invariants:
- The private key never leaves the node proxy; only the CSR is sent.
- One key per fetch window, not per attempt: while the CA cannot be reached, the retries of an
  identity's fetch send the same CSR (its key pending, in memory) instead of making a key (a
  helper process, ~0.2 s of CPU) per retry. The pending key goes as soon as the CA answered,
  whatever the answer, after `PENDING_KEY_TTL` (then a fresh one), when the identity is no
  longer managed (`forget`) and on `close`. It is lent to one fetch at a time: a concurrent
  fetch of the same identity makes its own key. A lost answer (DEADLINE_EXCEEDED, CANCELLED or
  UNAVAILABLE after the request was written) can mean two certificates for the same key and
  identity; Istio's agent resends the same CSR on its retries too (its CA connection is dialled
  with `security.CARetryInterceptor()`, security/pkg/nodeagent/caclient/providers/citadel).
- The answer is accepted only if the leaf's single URI SAN equals the identity asked for, the
  key matches, and the chain links up to a root of the returned trust bundle
  (`WorkloadCertificate.from_chain`); otherwise `CertificateError` (the manager retries with
  backoff and keeps serving the previous certificate).
- Response layout (ours, Istio-compatible): leaf first, intermediates, and as last element the
  trust bundle (one or more roots; more than one during a root rollover).
- gRPC failures become `CertificateError` carrying the gRPC status name and the server's
  message (e.g. PERMISSION_DENIED for an impersonation the control plane refused), counted by
  status name (`statuses`). The call is our own gRPC client's (`meshcore.grpcclient`), so a
  node-proxy worker never imports grpcio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from meshcore.certhelper import CertHelper
from meshcore.certs import WorkloadCertificate
from meshcore.errors import CertificateError
from meshcore.grpcclient import GrpcConnection
from meshcore.grpcwire import CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, GrpcError, code_name
from meshcore.identity import SpiffeId
from meshcore.proto import ca_pb2
from meshcore.xds import ControlPlaneEndpoint

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
PENDING_KEY_TTL = 60.0
"""Seconds a key whose CSR got no answer (the CA down or unreachable) is reused by the retries
of the same identity's fetch (the certificate manager's backoff: 0.5 s doubling, so the first
~7 retries; then a fresh key per window)."""
log = logging.getLogger("meshcore.caclient")


def build_request(
    identity: SpiffeId, csr_pem: bytes, ttl: timedelta
) -> ca_pb2.IstioCertificateRequest:
    meta = struct_pb2.Struct()
    meta.fields[IMPERSONATED_IDENTITY].string_value = identity.uri
    return ca_pb2.IstioCertificateRequest(
        csr=csr_pem.decode(), validity_duration=int(ttl.total_seconds()), metadata=meta
    )


def response_parts(identity: SpiffeId, chain: list[str]) -> tuple[list[bytes], bytes]:
    """A CreateCertificate answer's layout (see module invariants): (leaf .. intermediates,
    trust bundle)."""
    if len(chain) < 2:
        raise CertificateError(
            f"CA answer for {identity} has {len(chain)} element(s); expected leaf .. roots"
        )
    roots_pem = chain[-1].encode()
    if not roots_pem.strip():
        raise CertificateError("CA answer carries no trust bundle")
    return [p.encode() for p in chain[:-1]], roots_pem


_UNREACHED = frozenset({UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED})
"""gRPC statuses of a call that did not reach the CA (down, unreachable, too slow): the CSR is
sent again (`PENDING_KEY_TTL`). Any other status: the CA (or the control plane in front of it)
answered, its CSR was read, a retry gets a new key."""


class ControlPlaneCAProvider:
    """Fetches workload certificates from the control plane (one connection, reused while it
    lasts; dialled again by the next fetch once lost: the certificate manager's backoff paces
    the retries)."""

    def __init__(
        self,
        endpoint: ControlPlaneEndpoint,
        *,
        ttl: timedelta = timedelta(hours=24),
        timeout: float = 10.0,
        helper: CertHelper | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.ttl = ttl
        self.timeout = timeout
        self.helper = helper if helper is not None else CertHelper(in_process=True)
        self._clock = clock
        self._pending: dict[SpiffeId, tuple[float, bytes, bytes]] = {}
        """identity -> (made at, key PEM, CSR PEM) of a CSR the CA has not answered yet."""
        self._lent: set[SpiffeId] = set()
        """Identities whose pending key a fetch in flight holds."""
        self.keys_made = 0
        self.keys_reused = 0
        self._conn: GrpcConnection | None = None
        self._dialling: asyncio.Lock | None = None
        self.statuses: dict[str, int] = {}
        """Calls that ended with a gRPC status other than OK, by status name."""

    async def _connection(self, deadline: float) -> GrpcConnection:
        """The shared connection; dialled again only once it is dead or going away (never for
        being full: a call then waits for a stream slot, `GrpcConnection.unary`). The one it
        replaces is not closed here: its calls drain, then it closes itself."""
        if self._dialling is None:
            self._dialling = asyncio.Lock()
        async with self._dialling:  # concurrent fetches share one dial
            if self._conn is None or not self._conn.alive:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise GrpcError(DEADLINE_EXCEEDED, f"no connection within {self.timeout:g}s")
                self._conn = await self.endpoint.connect(left)
            return self._conn

    async def call(self, request: bytes) -> bytes:
        """One CreateCertificate call: dial (if needed), the wait for a stream slot and the
        answer all within one `timeout`. GrpcError otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                conn = await self._connection(deadline)
        except TimeoutError:
            raise GrpcError(DEADLINE_EXCEEDED, f"no connection within {self.timeout:g}s") from None
        return await conn.unary(
            CREATE_CERTIFICATE,
            request,
            metadata=self.endpoint.metadata(),
            timeout=max(deadline - loop.time(), 0.001),
        )

    async def _key(self, identity: SpiffeId) -> tuple[bytes, bytes, bool]:
        """(key PEM, CSR PEM, held) for `identity`: the pending ones, lent to this fetch
        (`held`), else fresh ones (pending until the CA answers, when no other fetch holds
        the identity's; not held: a fetch's own)."""
        now = self._clock()
        # Bounded: entries past their time go (an identity no longer fetched included).
        self._pending = {i: p for i, p in self._pending.items() if now - p[0] < PENDING_KEY_TTL}
        if identity in self._lent:  # another fetch holds the pending key: one of our own
            key_pem, csr_pem = await self.helper.csr(identity)
            self.keys_made += 1
            return key_pem, csr_pem, False
        self._lent.add(identity)
        pending = self._pending.get(identity)
        if pending is not None:
            self.keys_reused += 1
            return pending[1], pending[2], True
        try:
            key_pem, csr_pem = await self.helper.csr(identity)
        except BaseException:
            self._lent.discard(identity)
            raise
        self.keys_made += 1
        self._pending[identity] = (self._clock(), key_pem, csr_pem)
        return key_pem, csr_pem, True

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        key_pem, csr_pem, held = await self._key(identity)
        try:
            resp = await self._ask(identity, csr_pem, held)
        finally:
            if held:
                self._lent.discard(identity)
        body, roots_pem = response_parts(identity, list(resp.cert_chain))
        # from_chain (by the helper) checks SAN == identity, key match, and chain linkage.
        return await self.helper.check(identity, key_pem, body, roots_pem)

    async def _ask(
        self, identity: SpiffeId, csr_pem: bytes, held: bool
    ) -> ca_pb2.IstioCertificateResponse:
        request = build_request(identity, csr_pem, self.ttl)
        try:
            raw = await self.call(request.SerializeToString())
            resp: ca_pb2.IstioCertificateResponse = ca_pb2.IstioCertificateResponse.FromString(raw)
        except GrpcError as exc:
            name = code_name(exc.code)
            self.statuses[name] = self.statuses.get(name, 0) + 1
            if not held:
                pass  # a fetch's own key: nothing pending to keep or drop
            elif exc.code not in _UNREACHED:
                self._pending.pop(identity, None)  # the CA read this CSR: never sent again
            else:
                log.debug("CA unreachable for %s: its CSR is kept for the retry", identity)
            raise CertificateError(f"CA refused {identity}: {exc}") from None
        except DecodeError as exc:
            if held:
                self._pending.pop(identity, None)  # answered, however badly
            raise CertificateError(f"CA answer for {identity} is not a response: {exc}") from None
        except asyncio.CancelledError:
            raise
        if held:
            self._pending.pop(identity, None)  # answered: the next certificate gets a new key
        return resp

    def forget(self, identity: SpiffeId) -> None:
        """`identity` is no longer managed: its pending key (if any) goes."""
        self._pending.pop(identity, None)

    async def close(self) -> None:
        self._pending.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
