"""`meshcore.caclient.ControlPlaneCAProvider`'s pending key against a real gRPC server on
127.0.0.1 that plays the CA: how each failure is classified (the CA unreached, e.g. a deadline:
the CSR is sent again; the CA answered, e.g. a refusal: a new key), a pending key lent to one
fetch at a time, and dropped by `forget` and `close`."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import CertificateError
from meshcore.identity import SpiffeId
from meshcore.proto import ca_pb2
from meshcore.xds import ControlPlaneEndpoint
from tests.helpers import run

SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")


class FakeCA:
    """Answers CreateCertificate with `code` (an abort), or never (`code` None)."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.csrs: list[str] = []
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self._create,
            request_deserializer=ca_pb2.IstioCertificateRequest.FromString,
            response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "istio.v1.auth.IstioCertificateService", {"CreateCertificate": handler}
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _create(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        self.csrs.append(request.csr)
        if self.code is None:
            await asyncio.sleep(30)  # the client's deadline passes first
        else:
            await context.abort(self.code, "refused")
        return ca_pb2.IstioCertificateResponse()

    def provider(self) -> ControlPlaneCAProvider:
        endpoint = ControlPlaneEndpoint(address=f"127.0.0.1:{self.port}")
        return ControlPlaneCAProvider(endpoint, timeout=0.3)


async def _fails(provider: ControlPlaneCAProvider, code: str) -> None:
    with pytest.raises(CertificateError, match=code):
        await provider.fetch(SLEEP)


def test_a_deadline_keeps_the_csr_and_a_refusal_drops_it() -> None:
    """DEADLINE_EXCEEDED (the CA did not answer in time: maybe never read) is "not reached":
    the retry sends the same CSR; PERMISSION_DENIED (the CA answered) is: the next one gets a
    new key."""

    async def main() -> None:
        ca = FakeCA()
        await ca.server.start()
        provider = ca.provider()
        try:
            await _fails(provider, "DEADLINE_EXCEEDED")
            await _fails(provider, "DEADLINE_EXCEEDED")
            assert (provider.keys_made, provider.keys_reused) == (1, 1)
            assert ca.csrs[0] == ca.csrs[1]
            ca.code = grpc.StatusCode.PERMISSION_DENIED
            await _fails(provider, "PERMISSION_DENIED")  # still the pending CSR: then dropped
            await _fails(provider, "PERMISSION_DENIED")
            assert (provider.keys_made, provider.keys_reused) == (2, 2)
            assert ca.csrs[2] == ca.csrs[0] != ca.csrs[3]
        finally:
            await provider.close()
            await ca.server.stop(None)

    run(main(), 30)


def test_the_pending_key_is_lent_to_one_fetch_at_a_time() -> None:
    """Two fetches of one identity in flight together: the second makes its own key (before:
    both sent the same CSR, two certificates for one key if both were answered); the pending
    one stays for the retry."""

    async def main() -> None:
        ca = FakeCA()
        await ca.server.start()
        provider = ca.provider()
        try:
            await asyncio.gather(
                _fails(provider, "DEADLINE_EXCEEDED"), _fails(provider, "DEADLINE_EXCEEDED")
            )
            assert provider.keys_made == 2
            assert ca.csrs[0] != ca.csrs[1]
            await _fails(provider, "DEADLINE_EXCEEDED")
            assert provider.keys_made == 2
            assert ca.csrs[2] in ca.csrs[:2]
        finally:
            await provider.close()
            await ca.server.stop(None)

    run(main(), 30)


def test_forget_and_close_drop_the_pending_key() -> None:
    async def main() -> None:
        ca = FakeCA()
        await ca.server.start()
        provider = ca.provider()
        try:
            await _fails(provider, "DEADLINE_EXCEEDED")
            provider.forget(SLEEP)  # no longer managed (CertificateManager.remove)
            await _fails(provider, "DEADLINE_EXCEEDED")
            assert provider.keys_made == 2
            await provider.close()
            await _fails(provider, "DEADLINE_EXCEEDED")
            assert provider.keys_made == 3
            assert len(set(ca.csrs)) == 3
        finally:
            await provider.close()
            await ca.server.stop(None)

    run(main(), 30)
