"""``istio.v1.auth.IstioCertificateService/CreateCertificate``: the mesh CA over gRPC.

Owns: the signing decision (`CertificateService.decide`: authenticate the node proxy, check
impersonation, pick the TTL), the gRPC handler, and the control plane's own serving certificate.

Invariants:
- Every request is authenticated (`controlplane.auth`); there is no anonymous signing.
- Impersonation check (docs/reference/ambient-facts.md, "CA"): the identity asked for (metadata
  ``ImpersonatedIdentity``, else the CSR's URI SAN) must be a service account with at least one
  pod on the caller's node that the node proxy serves: a workload the translator publishes
  (not hostNetwork, so never the node proxy's own service account; not Succeeded/Failed; with
  an IP; `controlplane.translate.NamespaceResult.node_identities`); anything else is
  PERMISSION_DENIED naming node and identity. The CSR's SAN must equal that identity
  (`MeshCA.sign_csr`), so a node cannot obtain a certificate for one identity by naming another.
- Response ``cert_chain``: leaf, then intermediates, then as LAST element the whole trust bundle
  (every root, more than one during a root rollover), so node proxies trust old and new roots.
- TTL = the requested ``validity_duration`` (int64 seconds) clamped to [60 s, max_ttl] as an
  integer before any timedelta/datetime arithmetic; 0 = default 24 h; negative is
  INVALID_ARGUMENT.
- Every refusal has a precise gRPC status (`controlplane.errors`): UNAUTHENTICATED (no/unknown
  credential), PERMISSION_DENIED (identity not served by the caller's node), INVALID_ARGUMENT
  (CSR, metadata, duration), UNAVAILABLE (the CA's own chain expired), and INTERNAL for anything
  unexpected (message not sent to the caller). Each refusal is one log line and one count of
  ``controlplane_ca_certificates{outcome=<status>}``; never a traceback to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NoReturn

import grpc
from cryptography import x509

from controlplane.auth import Authenticator, bearer_token
from controlplane.errors import (
    ControlPlaneError,
    Internal,
    InvalidRequest,
    PermissionDenied,
    Unavailable,
)
from controlplane.metrics import ControlPlaneMetrics
from meshcore.ca import MeshCA, SigningUnavailable
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


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuancePolicy:
    """What an authenticated node may obtain: which identities and for how long."""

    may_impersonate: Callable[[str, SpiffeId], bool]
    """(node, identity) -> whether that node's proxy serves a pod of the identity."""
    default_ttl: timedelta = timedelta(hours=24)
    max_ttl: timedelta = timedelta(days=7)

    def lifetime(self, validity_duration: int) -> timedelta:
        """The granted TTL for a requested ``validity_duration`` (seconds, int64)."""
        if validity_duration < 0:
            raise InvalidRequest(f"validity_duration {validity_duration} is negative")
        if validity_duration == 0:
            return self.default_ttl
        # Clamp the integer first: timedelta(seconds=2**62) itself overflows.
        lo, hi = int(MIN_TTL.total_seconds()), int(self.max_ttl.total_seconds())
        return timedelta(seconds=max(lo, min(validity_duration, hi)))


class CertificateService:
    def __init__(
        self,
        ca: MeshCA,
        *,
        authenticator: Authenticator,
        policy: IssuancePolicy,
        metrics: ControlPlaneMetrics | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.ca = ca
        self.authenticator = authenticator
        self.policy = policy
        self.metrics = metrics or ControlPlaneMetrics()
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
        if not self.policy.may_impersonate(node, identity):
            raise PermissionDenied(
                f"node {node!r} may not obtain a certificate for {identity}: no pod of service "
                f"account {identity.namespace}/{identity.service_account} that node {node!r}'s "
                "proxy serves (running, with an IP, not hostNetwork)"
            )
        ttl = self.policy.lifetime(request.validity_duration)
        return Grant(node=node, identity=identity, ttl=ttl)

    def sign(self, grant: Grant, csr_pem: str) -> list[str]:
        try:
            chain = self.ca.sign_csr(
                csr_pem.encode(), ttl=grant.ttl, now=self.clock(), identity=grant.identity
            )
        except SigningUnavailable as exc:
            raise Unavailable(f"the CA cannot sign: {exc}") from None
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
            await self._refuse(context, err, str(err))
        except Exception as exc:  # a bug: log it, tell the caller nothing but INTERNAL
            log.error(
                "CreateCertificate failed (%s): %s: %s", context.peer(), type(exc).__name__, exc
            )
            await self._refuse(context, Internal("internal error"), "", logged=True)
        self.metrics.certs.labels(outcome="signed").inc()
        log.info("signed %s for node %s (ttl %s)", grant.identity, grant.node, grant.ttl)
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        err: ControlPlaneError,
        why: str,
        *,
        logged: bool = False,
    ) -> NoReturn:
        self.metrics.certs.labels(outcome=err.code.name.lower()).inc()
        if not logged:
            log.warning(
                "CreateCertificate refused (%s): %s: %s", context.peer(), err.code.name, why
            )
        await context.abort(err.code, str(err))
        raise AssertionError("unreachable")  # abort raises

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
