"""`meshcore.hbone.pool` against a real HBONE server on 127.0.0.1 (real certificates, TLS, HTTP/2):
a dial still in flight when the pool retires its certificate (`retire`, a rotation) is never
used: its waiting tunnel dials again with the new context; one in flight when the pool closes
every connection (`close_all`, drain and shutdown) serves its waiting tunnel and is never
pooled. Runs compiled and pure (tests/unit/test_native.py)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from datetime import timedelta

from meshcore.ca import MeshCA
from meshcore.certs import WorkloadCertificate
from meshcore.hbone.aio import HboneHooks, HboneProtocol, HboneSettings, HboneStream, accept_tls
from meshcore.hbone.pool import HbonePool, PoolKey
from meshcore.hbone.streams import Role
from meshcore.identity import SpiffeId
from meshcore.tls import client_context, server_context
from tests.helpers import Sink, run
from tests.unit.certfixtures import real_now, sid

ALICE, BOB = sid("apps", "alice"), sid("apps", "bob")


def identities() -> tuple[WorkloadCertificate, ssl.SSLContext, ssl.SSLContext]:
    """ALICE's certificate (a server's), and client contexts of two certificates of BOB."""
    ca = MeshCA.create_root(now=real_now() - timedelta(days=1))
    now = real_now() - timedelta(minutes=1)
    alice = ca.issue(ALICE, now=now)
    return alice, client_context(ca.issue(BOB, now=now)), client_context(ca.issue(BOB, now=now))


def _client_cert(stream: HboneStream) -> bytes:
    transport = stream._proto.transport
    assert transport is not None
    der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert isinstance(der, bytes)
    return der


async def _dial_while(
    retire: Callable[[HbonePool], None],
    check: Callable[[HboneStream], None] = lambda s: None,
    failures: int = 0,
) -> tuple[HbonePool, list[bytes], bytes]:
    """One tunnel whose dial is in flight (its context fetched, TLS not done) when `retire`
    runs and the client's context changes to a new certificate; `check` sees its stream;
    the first `failures` dials fail (a transient OSError).
    Returns the pool, the client certificate of each connection the server accepted, in
    order, and the one its tunnel had."""
    alice, old, new = identities()
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    settings = HboneSettings(trust_domain="cluster.local")
    certs: list[bytes] = []
    tunnels: list[bytes] = []

    def on_request(stream: HboneStream) -> None:
        tunnels.append(_client_cert(stream))
        stream.respond(200)

    async def handshake(sock: socket.socket) -> None:
        proto = HboneProtocol(Role.SERVER, settings, HboneHooks(on_request=on_request))
        await accept_tls(sock, server_context(alice), proto)
        assert proto.transport is not None
        certs.append(proto.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))

    async def serve() -> None:
        while True:
            sock, _ = await loop.sock_accept(listener)
            handshakes.append(loop.create_task(handshake(sock)))

    handshakes: list[asyncio.Task[None]] = []
    current = [old]
    handed = asyncio.Event()

    failed = [0]

    async def context_for(source: SpiffeId) -> ssl.SSLContext:
        if failed[0] < failures:
            failed[0] += 1
            raise ConnectionRefusedError("a transient failure")
        handed.set()
        return current[0]

    server = loop.create_task(serve())
    pool = HbonePool(context_for, trust_domain="cluster.local")
    key = PoolKey(source=BOB, expected=(ALICE,), address=listener.getsockname())
    try:
        tunnel = loop.create_task(pool.open_stream(key, "10.0.0.1:80", [], Sink()))
        await handed.wait()  # the dial has the old context; its TLS handshake is not done
        current[0] = new
        retire(pool)
        stream = await asyncio.wait_for(tunnel, 10)
        await asyncio.gather(*handshakes)
        check(stream)
        stream.reset()
        return pool, certs, tunnels[0]
    finally:
        pool.close_all()
        server.cancel()
        listener.close()


def test_a_dial_in_flight_when_its_certificate_is_retired_is_not_used() -> None:
    """The connection made with the old certificate is closed, not pooled (before: pooled, and
    every later tunnel of the identity went out with the old certificate); the tunnel that
    waited for it opens on a new dial, with the new certificate."""

    async def main() -> None:
        pool, certs, tunnel_cert = await _dial_while(lambda p: p.retire(BOB))
        assert len(certs) == 2
        assert tunnel_cert == certs[1] != certs[0]
        (pooled,) = pool.snapshot()
        assert pooled["streams"] == 0
        assert pool.connections_opened == 1
        assert pool.stale_dials == 1

    run(main(), 30)


def test_a_retired_dial_does_not_count_against_the_tunnels_attempts() -> None:
    """Two transient failures, then a dial retired by our own rotation: the tunnel dials again
    and opens (before: the retired dial was its third failure of DIAL_ATTEMPTS, and it failed)."""

    async def main() -> None:
        pool, certs, tunnel_cert = await _dial_while(lambda p: p.retire(BOB), failures=2)
        assert len(certs) == 2
        assert tunnel_cert == certs[1] != certs[0]
        assert pool.stale_dials == 1

    run(main(), 30)


def test_a_dial_in_flight_at_close_all_serves_its_tunnel_and_is_not_pooled() -> None:
    """close_all changes no certificate: the waiting tunnel opens on the dial it waited for
    (one connection, not two), which is never pooled and says GOAWAY once the tunnel has its
    answer, the tunnel's stream still open (before: closed, its tunnel dialled again and that
    dial was pooled after close_all)."""
    seen: list[tuple[bool, bool]] = []

    def check(stream: HboneStream) -> None:
        seen.append((stream._proto.conn.goaway_sent, stream._proto.closed))

    async def main() -> None:
        pool, certs, tunnel_cert = await _dial_while(lambda p: p.close_all(), check)
        assert certs == [tunnel_cert]
        assert seen == [(True, False)]  # GOAWAY sent; the connection lives for its stream
        assert pool.snapshot() == []
        assert pool.connections_opened == pool.drained_dials == 1
        assert getattr(pool, "stale_dials", 0) == 0
        assert not pool._unpooled

    run(main(), 30)


def test_retiring_another_identity_keeps_the_dial() -> None:
    async def main() -> None:
        pool, certs, tunnel_cert = await _dial_while(lambda p: p.retire(ALICE))
        assert certs == [tunnel_cert]
        assert pool.connections_opened == 1
        assert getattr(pool, "stale_dials", 0) == 0

    run(main(), 30)


def test_a_draining_dial_retired_afterwards_is_not_used() -> None:
    """close_all, then a rotation, while the dial is in flight: its old certificate is not
    used, the tunnel dials again with the new one."""

    def both(pool: HbonePool) -> None:
        pool.close_all()
        pool.retire(BOB)

    async def main() -> None:
        pool, certs, tunnel_cert = await _dial_while(both)
        assert len(certs) == 2
        assert tunnel_cert == certs[1] != certs[0]
        assert pool.stale_dials == 1

    run(main(), 30)
