"""The delta xDS stream refuses an unauthenticated node proxy only after reading its first
request, over real gRPC on loopback.

Why: refused while the client was still sending that request (the handler refused at once,
before reading), a grpc-core client sometimes reported INTERNAL instead of UNAUTHENTICATED (the
server's trailers, then RST_STREAM(NO_ERROR) racing the client's pending send; seen once in
tests/cluster/test_cp_tokenreview_app.py under load). A node proxy (ztunnel) sends its first
request at once, so reading it first changes nothing for it; a peer that sends nothing is
refused after `REFUSED_FIRST_REQUEST_WAIT` (one with a valid credential after
`FIRST_REQUEST_TIMEOUT`), so waiting costs a bounded time. The credential itself is checked at
once (the token review's cached outcome is fresh only briefly).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from controlplane import xds
from controlplane.errors import Unauthenticated
from controlplane.xds import XdsServer
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto.convert import ADDRESS_TYPE
from meshcore.xds import DELTA_METHOD
from tests.helpers import loopback_block, run

pytestmark = pytest.mark.timeout(60)
CP_IP = loopback_block().ip(1)


class TokenOnly:
    """An authenticator: any bearer token is node-a's, none is refused. `times`: when it was
    asked (the token review's outcome is cached only briefly: it is asked at once)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def authenticate(self, token: str | None) -> str:
        self.times.append(time.monotonic())
        if token is None:
            raise Unauthenticated("no credential")
        return "node-a"


async def stream_status(
    port: int,
    delay: float | None,
    *,
    token: str | None = None,
    node: str = "node-a",
    ip: str = CP_IP,
) -> tuple[grpc.StatusCode, bool, float]:
    """Open a delta xDS stream with `token` (None: no credential) claiming `node`; send the
    first request after `delay` seconds (None: never) and keep the client's side open, as a
    node proxy does. The status (OK: served), whether the request was sent before it arrived,
    and when it did."""
    sent = False
    async with grpc.aio.insecure_channel(f"{ip}:{port}") as channel:
        call = channel.stream_stream(
            DELTA_METHOD,
            request_serializer=dpb.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=dpb.DeltaDiscoveryResponse.FromString,
        )

        async def requests() -> AsyncIterator[dpb.DeltaDiscoveryRequest]:
            nonlocal sent
            if delay is not None:
                await asyncio.sleep(delay)
                sent = True
                yield dpb.DeltaDiscoveryRequest(node=dpb.Node(id=node), type_url=ADDRESS_TYPE)
            await asyncio.sleep(10)

        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        start = time.monotonic()
        stream = call(requests(), metadata=metadata)
        try:
            async for _ in stream:
                return grpc.StatusCode.OK, sent, time.monotonic() - start
        except grpc.aio.AioRpcError as err:
            return err.code(), sent, time.monotonic() - start
        finally:
            stream.cancel()
    return grpc.StatusCode.UNKNOWN, sent, 0.0


async def _refusals() -> None:
    server = grpc.aio.server()
    auth = TokenOnly()
    server.add_generic_rpc_handlers((XdsServer(authenticator=auth).method_handlers(),))
    port = server.add_insecure_port(f"{CP_IP}:0")
    await server.start()
    try:
        # The refusal waits for the first request (within REFUSED_FIRST_REQUEST_WAIT); the
        # credential was checked at once, before the request was sent.
        start = time.monotonic()
        code, sent, _ = await stream_status(port, 0.3)
        assert (code, sent) == (grpc.StatusCode.UNAUTHENTICATED, True)
        assert auth.times[0] - start < 0.3
        # A peer that sends nothing is refused once the short wait is over, not after
        # FIRST_REQUEST_TIMEOUT: an unauthenticated stream is held briefly.
        code, sent, took = await stream_status(port, None)
        assert (code, sent) == (grpc.StatusCode.UNAUTHENTICATED, False)
        assert 0.5 <= took < 5.0
    finally:
        await server.stop(None)


def test_refused_after_the_first_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xds, "FIRST_REQUEST_TIMEOUT", 30.0)
    monkeypatch.setattr(xds, "REFUSED_FIRST_REQUEST_WAIT", 0.5, raising=False)
    run(_refusals())
