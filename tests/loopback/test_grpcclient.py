"""Our gRPC client (`meshcore.grpcclient`) against a real grpcio server (the control plane's
stack): unary and bidirectional calls, metadata, statuses with percent-encoded messages, an
oversized message refused (and the connection still usable), a response larger than every
HTTP/2 window, deadlines, and TLS verified against the roots and the server name.

The grpcio server runs in this test's event loop on the block's first address (plaintext) and
second (TLS, a serving certificate for ``cp.test`` from a fresh mesh CA).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import grpc
import pytest
import uvloop

from controlplane.ca import serving_certificate
from meshcore.ca import MeshCA
from meshcore.caclient import CREATE_CERTIFICATE, ControlPlaneCAProvider
from meshcore.certs import utcnow
from meshcore.grpcclient import QUEUE_LIMIT, GrpcCall, GrpcConnection, connect
from meshcore.grpcwire import GrpcError
from meshcore.identity import SpiffeId
from meshcore.xds import ControlPlaneEndpoint
from tests.helpers import loopback_block, run

BLOCK = loopback_block()
PLAIN, SECURE = BLOCK.ip(1), BLOCK.ip(2)


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _big(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"x" * int(request)


async def _meta(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    value = dict(context.invocation_metadata() or ()).get("authorization", "-")
    return str(value).encode()


async def _fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "nicht für dich: 100%")
    return b""


async def _slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(5)
    return b""


async def _slow_echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(0.5)
    return request


async def _twice(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for req in requests:
        yield req
        yield req + b"!"


async def _flood(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield bytes([i % 256]) * (1024 * 1024)


def _handlers() -> grpc.GenericRpcHandler:
    unary = {
        "Echo": _echo,
        "Big": _big,
        "Meta": _meta,
        "Fail": _fail,
        "Slow": _slow,
    }
    methods = {k: grpc.unary_unary_rpc_method_handler(v) for k, v in unary.items()}
    methods["Twice"] = grpc.stream_stream_rpc_method_handler(_twice)
    methods["Flood"] = grpc.unary_stream_rpc_method_handler(_flood)
    return grpc.method_handlers_generic_handler("t.T", methods)


def _ca_handlers() -> grpc.GenericRpcHandler:
    """CreateCertificate answering after 0.5 s (the bytes echoed: the CA client's gRPC path)."""
    service, method = CREATE_CERTIFICATE.strip("/").split("/")
    return grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(_slow_echo)}
    )


@asynccontextmanager
async def grpc_server(ca: MeshCA | None = None) -> AsyncIterator[str]:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    server.add_generic_rpc_handlers((_handlers(), _ca_handlers()))
    if ca is None:
        port = server.add_insecure_port(f"{PLAIN}:0")
        address = f"{PLAIN}:{port}"
    else:
        key, chain = serving_certificate(
            ca,
            dns_names=["cp.test"],
            spiffe_id=SpiffeId.parse("spiffe://cluster.local/ns/istio-system/sa/cp"),
            now=utcnow(),
            ttl=timedelta(hours=1),
        )
        port = server.add_secure_port(f"{SECURE}:0", grpc.ssl_server_credentials([(key, chain)]))
        address = f"{SECURE}:{port}"
    await server.start()
    try:
        yield address
    finally:
        await server.stop(None)


async def plain(address: str, max_message: int = 64 * 1024 * 1024) -> GrpcConnection:
    return await connect(address, tls_roots=None, server_name="", max_message=max_message)


async def drain(call: GrpcCall) -> None:
    while await call.recv() is not None:
        pass


def test_unary_stream_metadata_and_statuses() -> None:
    async def main() -> None:
        async with grpc_server() as address:
            conn = await plain(address)
            try:
                assert await conn.unary("/t.T/Echo", b"hi", timeout=5) == b"hi"
                assert await conn.unary("/t.T/Echo", b"", timeout=5) == b""
                meta = [("authorization", "Bearer tok")]
                assert await conn.unary("/t.T/Meta", b"", metadata=meta, timeout=5) == (
                    b"Bearer tok"
                )
                with pytest.raises(GrpcError) as err:
                    await conn.unary("/t.T/Fail", b"", timeout=5)
                assert err.value.code_name == "PERMISSION_DENIED"
                assert err.value.details == "nicht für dich: 100%"
                with pytest.raises(GrpcError) as err:
                    await conn.unary("/t.T/Nope", b"", timeout=5)
                assert err.value.code_name == "UNIMPLEMENTED"
                with pytest.raises(GrpcError) as err:
                    await conn.unary("/t.T/Slow", b"", timeout=0.3)
                assert err.value.code_name == "DEADLINE_EXCEEDED"
                call = conn.start("/t.T/Twice")
                got = []
                for word in (b"a", b"b"):
                    call.send(word)
                    got += [await call.recv(), await call.recv()]
                call.done_sending()
                assert got == [b"a", b"a!", b"b", b"b!"]
                assert await call.recv() is None  # ended OK
                # One connection carried every call above.
                assert await conn.unary("/t.T/Echo", b"again", timeout=5) == b"again"
            finally:
                conn.close()

    run(main())


def test_large_response_and_oversized_message() -> None:
    """20 MiB in one message: more than the stream (4 MiB) and connection (16 MiB) windows,
    so it arrives only if we credit what we read. A message over `max_message` is refused
    (RESOURCE_EXHAUSTED) and the connection serves the next call."""

    async def main() -> None:
        async with grpc_server() as address:
            conn = await plain(address, max_message=24 * 1024 * 1024)
            try:
                size = 20 * 1024 * 1024
                assert len(await conn.unary("/t.T/Big", str(size).encode(), timeout=20)) == size
                small = await plain(address, max_message=1024 * 1024)
                with pytest.raises(GrpcError, match="larger than the limit") as err:
                    await small.unary("/t.T/Big", str(size).encode(), timeout=20)
                assert err.value.code_name == "RESOURCE_EXHAUSTED"
                assert await small.unary("/t.T/Echo", b"ok", timeout=5) == b"ok"
                small.close()
            finally:
                conn.close()

    run(main())


def test_tls_verified_against_roots_and_server_name() -> None:
    """Also on uvloop (the proxies' loop; grpcio's server needs asyncio's, so the client runs
    in a thread with its own uvloop loop)."""

    async def echo_over_tls(address: str, roots: bytes) -> bytes:
        conn = await connect(address, tls_roots=roots, server_name="cp.test")
        try:
            assert conn.alpn == "h2"
            return await conn.unary("/t.T/Echo", b"tls", timeout=5)
        finally:
            conn.close()

    async def main() -> None:
        ca, other = MeshCA.create_root(), MeshCA.create_root()
        async with grpc_server(ca) as address:
            assert await echo_over_tls(address, ca.roots_pem) == b"tls"
            on_uvloop = functools.partial(uvloop.run, echo_over_tls(address, ca.roots_pem))
            assert await asyncio.to_thread(on_uvloop) == b"tls"
            for roots, name in ((other.roots_pem, "cp.test"), (ca.roots_pem, "other.test")):
                with pytest.raises(GrpcError) as err:
                    await connect(address, tls_roots=roots, server_name=name, timeout=5)
                assert err.value.code_name == "UNAVAILABLE"
                assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)

    run(main())


def test_connection_refused_and_lost_are_unavailable() -> None:
    async def main() -> None:
        with pytest.raises(GrpcError) as err:
            await connect(f"{PLAIN}:1", tls_roots=None, server_name="")
        assert err.value.code_name == "UNAVAILABLE"
        for bad in ("no-port", f"{PLAIN}:0", f"{PLAIN}:x", ":15012", f"{PLAIN}:99999"):
            with pytest.raises(GrpcError, match="want host:port"):
                await connect(bad, tls_roots=None, server_name="")
        async with grpc_server() as address:
            conn = await plain(address)
            call = conn.start("/t.T/Twice")
            call.send(b"x")
            assert await call.recv() == b"x"
            conn.abort()
            with pytest.raises(GrpcError) as err:
                await drain(call)
            assert err.value.code_name == "UNAVAILABLE"
            assert not conn.usable

    run(main())


def test_a_server_that_outruns_the_consumer_is_held_by_flow_control() -> None:
    """64 messages of 1 MiB while the consumer reads none: credit stops once 4 MiB of them
    wait (QUEUE_LIMIT), so what the call holds stays below that plus one stream window
    (4 MiB) and a message; then every message arrives, in order, as the consumer reads."""

    async def main() -> None:
        async with grpc_server() as address:
            conn = await plain(address)
            try:
                call = conn.start("/t.T/Flood")
                call.send(b"64", end=True)
                await asyncio.sleep(1.5)
                held = sum(len(m) for m in call._messages)
                assert QUEUE_LIMIT <= held <= QUEUE_LIMIT + 4 * 1024 * 1024 + 1024 * 1024
                got = []
                while (message := await call.recv()) is not None:
                    got.append(message[0])
                assert got == [i % 256 for i in range(64)]
            finally:
                conn.close()

    run(main())


def test_ca_calls_past_the_servers_stream_limit_wait_for_a_slot() -> None:
    """150 concurrent CA calls, each answered after 0.5 s, on one connection whose server allows
    100 open streams (RFC 9113 §6.5.2's assumed minimum; grpcio advertises none): the 50 over
    the limit wait for a slot and every call succeeds (the connection was once closed for being
    full, failing every call UNAVAILABLE)."""

    async def main() -> None:
        async with grpc_server() as address:
            ca = ControlPlaneCAProvider(ControlPlaneEndpoint(address=address), timeout=10)
            try:
                answers = await asyncio.gather(
                    *(ca.call(str(i).encode()) for i in range(150)), return_exceptions=True
                )
                assert answers == [str(i).encode() for i in range(150)]
                conn = ca._conn
                assert conn is not None
                assert conn.alive
                assert not conn.calls
            finally:
                await ca.close()

    run(main())


def test_bad_tls_roots_are_unavailable_before_any_dial() -> None:
    """Roots that are not PEM (or not even ASCII) are refused naming them, before a socket is
    opened (the address has no listener: a dial would say "refused")."""

    async def main() -> None:
        for roots in (b"not a certificate", b"\xff\xfe"):
            with pytest.raises(GrpcError, match="TLS roots unusable") as err:
                await connect(f"{PLAIN}:1", tls_roots=roots, server_name="cp.test", timeout=2)
            assert err.value.code_name == "UNAVAILABLE"

    run(main())
