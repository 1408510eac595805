"""``istio.v1.auth.IstioCertificateService/CreateCertificate``: the mesh CA over gRPC.

Owns: the signing decision (`CertificateService.decide`: authenticate the node proxy, check
impersonation, pick the TTL), the gRPC handler, and the control plane's own serving certificate.

Invariants:
- Every request is authenticated (`controlplane.auth`); there is no anonymous signing.
- Impersonation check (ambient-facts.md, "CA"): the identity asked for (metadata
  ``ImpersonatedIdentity``, else the CSR's URI SAN) must be a service account with at least one
  pod scheduled on the caller's node in the current store; anything else is PERMISSION_DENIED
  naming node and identity. The CSR's SAN must equal that identity (`MeshCA.sign_csr`), so a
  node cannot obtain a certificate for one identity by naming another.
- Response ``cert_chain``: leaf, then intermediates, then as LAST element the whole trust bundle
  (every root, more than one during a root rollover), so node proxies trust old and new roots.
- TTL = the requested ``validity_duration`` clamped to [60 s, max_ttl]; default 24 h.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
from cryptography import x509

from controlplane.auth import Authenticator, bearer_token
from controlplane.errors import ControlPlaneError, InvalidRequest, PermissionDenied
from controlplane.metrics import ControlPlaneMetrics
from meshcore.ca import MeshCA
from meshcore.certs import split_pem_chain, uri_sans, utcnow
from meshcore.errors import CertificateError, IdentityError
from meshcore.identity import SpiffeId
from meshcore.proto import ca_pb2

log = logging.getLogger(__name__)

CA_SERVICE = "istio.v1.auth.IstioCertificateService"
CA_METHOD = "CreateCertificate"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
MIN_TTL = timedelta(seconds=60)


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    node: str
    identity: SpiffeId
    ttl: timedelta


class CertificateService:
    def __init__(
        self,
        ca: MeshCA,
        *,
        authenticator: Authenticator,
        may_impersonate: Callable[[str, SpiffeId], bool],
        metrics: ControlPlaneMetrics | None = None,
        default_ttl: timedelta = timedelta(hours=24),
        max_ttl: timedelta = timedelta(days=7),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.ca = ca
        self.authenticator = authenticator
        self.may_impersonate = may_impersonate
        self.metrics = metrics or ControlPlaneMetrics()
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.clock = clock

    def decide(self, token: str | None, request: ca_pb2.IstioCertificateRequest) -> Grant:
        """Who asks, for which identity, for how long; raise ControlPlaneError to refuse."""
        node = self.authenticator.authenticate(token)
        wanted = ""
        if request.HasField("metadata"):
            value = request.metadata.fields.get(IMPERSONATED_IDENTITY)
            if value is not None:
                if value.WhichOneof("kind") != "string_value":
                    raise InvalidRequest(f"metadata {IMPERSONATED_IDENTITY} must be a string")
                wanted = value.string_value
        if not wanted:
            try:
                csr = x509.load_pem_x509_csr(request.csr.encode())
            except ValueError as exc:
                raise InvalidRequest(f"invalid CSR: {exc}") from None
            sans = uri_sans(csr)
            if len(sans) != 1:
                raise InvalidRequest(f"CSR must carry exactly one URI SAN, has {len(sans)}")
            wanted = sans[0]
        try:
            identity = SpiffeId.parse(wanted)
        except IdentityError as exc:
            raise InvalidRequest(f"{wanted!r} is not a workload identity: {exc}") from None
        if not self.may_impersonate(node, identity):
            raise PermissionDenied(
                f"node {node!r} may not obtain a certificate for {identity}: no pod of service "
                f"account {identity.namespace}/{identity.service_account} runs on node {node!r}"
            )
        ttl = self.default_ttl
        if request.validity_duration > 0:
            ttl = timedelta(seconds=request.validity_duration)
        ttl = max(MIN_TTL, min(ttl, self.max_ttl))
        return Grant(node=node, identity=identity, ttl=ttl)

    def sign(self, grant: Grant, csr_pem: str) -> list[str]:
        try:
            chain = self.ca.sign_csr(
                csr_pem.encode(), ttl=grant.ttl, now=self.clock(), identity=grant.identity
            )
        except CertificateError as exc:
            raise InvalidRequest(str(exc)) from None
        roots = {c.strip() for c in split_pem_chain(self.ca.roots_pem)}
        body = [c.decode() for c in chain if c.strip() not in roots]
        return [*body, self.ca.roots_pem.decode()]

    async def create_certificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        try:
            grant = self.decide(bearer_token(context.invocation_metadata()), request)
            chain = self.sign(grant, request.csr)
        except ControlPlaneError as err:
            self.metrics.certs.labels(outcome=err.code.name.lower()).inc()
            log.warning("CreateCertificate refused (%s): %s", context.peer(), err)
            await context.abort(err.code, str(err))
            raise AssertionError("unreachable") from None
        self.metrics.certs.labels(outcome="signed").inc()
        log.info("signed %s for node %s (ttl %s)", grant.identity, grant.node, grant.ttl)
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    def method_handlers(self) -> grpc.GenericRpcHandler:
        handler = grpc.unary_unary_rpc_method_handler(
            self.create_certificate,
            request_deserializer=ca_pb2.IstioCertificateRequest.FromString,
            response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(CA_SERVICE, {CA_METHOD: handler})


def serving_certificate(
    ca: MeshCA,
    *,
    dns_names: list[str],
    spiffe_id: SpiffeId,
    now: datetime,
    ttl: timedelta = timedelta(days=30),
) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM) of the control plane's gRPC serving certificate, signed by the mesh
    CA, with DNS SANs (what gRPC clients verify) and the control plane's SPIFFE ID."""
    return ca.issue_serving(dns_names=dns_names, identity=spiffe_id, now=now, ttl=ttl)
