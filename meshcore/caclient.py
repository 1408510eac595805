"""A `CertificateProvider` that asks the control plane's CA (IstioCertificateService).

Owns: building the CreateCertificate request (fresh ECDSA P-256 key + CSR per fetch,
``ImpersonatedIdentity`` metadata, requested TTL), the call with the node credential, and
validating the answer before it is installed. Key, CSR and validation are `meshcore.certhelper`'s
(a helper process for the node proxy, whose workers never import `cryptography`; in-process
for the waypoint).

Invariants:
- The private key never leaves the node proxy; only the CSR is sent.
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
from datetime import timedelta

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from meshcore.certhelper import CertHelper
from meshcore.certs import WorkloadCertificate
from meshcore.errors import CertificateError
from meshcore.grpcclient import GrpcConnection
from meshcore.grpcwire import DEADLINE_EXCEEDED, GrpcError, code_name
from meshcore.identity import SpiffeId
from meshcore.proto import ca_pb2
from meshcore.xds import ControlPlaneEndpoint

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"


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
    ) -> None:
        self.endpoint = endpoint
        self.ttl = ttl
        self.timeout = timeout
        self.helper = helper if helper is not None else CertHelper(in_process=True)
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

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        key_pem, csr_pem = await self.helper.csr(identity)
        request = build_request(identity, csr_pem, self.ttl)
        try:
            raw = await self.call(request.SerializeToString())
            resp = ca_pb2.IstioCertificateResponse.FromString(raw)
        except GrpcError as exc:
            name = code_name(exc.code)
            self.statuses[name] = self.statuses.get(name, 0) + 1
            raise CertificateError(f"CA refused {identity}: {exc}") from None
        except DecodeError as exc:
            raise CertificateError(f"CA answer for {identity} is not a response: {exc}") from None
        except asyncio.CancelledError:
            raise
        body, roots_pem = response_parts(identity, list(resp.cert_chain))
        # from_chain (by the helper) checks SAN == identity, key match, and chain linkage.
        return await self.helper.check(identity, key_pem, body, roots_pem)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
