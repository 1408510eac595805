"""`meshcore.hbone.aio.connect` cancelled while it dials, on asyncio and uvloop: the socket has
one owner (ours until the loop's transport takes it, then the transport's, closed by the loop),
so nothing is leaked and no descriptor number is closed twice (under another connection that
had been given the number meanwhile). Runs compiled and pure (tests/unit/test_native.py).

The cancel test passes on the code before the one-owner change too, with uvloop 0.23 (which
detaches the socket itself); it failed there with uvloop 0.22.1 (EBADF, a number closed twice):
it guards the `uvloop>=0.23` pin in pyproject.toml and the dial's ownership together. The
connect awaited inline instead of in `asyncio.wait_for`'s task is tested by
`test_a_cancelled_connect_never_returns_a_connection` (fails with wait_for, Python 3.11)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest

from meshcore.errors import PeerVerificationError
from meshcore.hbone.aio import HboneSettings, PoolKey, connect
from tests.helpers import run
from tests.unit.test_hbone_pool import ALICE, BOB, identities

ROUNDS = 60


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_connects_cancelled_while_dialling_leak_nothing_and_close_once(loop: str) -> None:
    """A peer that takes the TCP connection and never answers the ClientHello. Each connect is
    cancelled at another point: once its ClientHello arrived (the TLS stage), or after 0 to 5
    turns of the loop (the TCP transport's set-up included); then a socket pair is opened,
    which gets a descriptor number just freed. Each connect ends with CancelledError (before,
    on uvloop 0.22: OSError EBADF, the number closed twice), every pair still works after the
    loop has finished closing the cancelled transports, and the descriptors are back to where
    they were. A guard of the uvloop>=0.23 pin (see the module docstring)."""
    _alice, context, _new = identities()
    settings = HboneSettings(trust_domain="cluster.local")

    async def main() -> None:
        ev = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0), backlog=ROUNDS + 8)
        listener.setblocking(False)
        key = PoolKey(source=BOB, expected=(ALICE,), address=listener.getsockname())
        accepted: list[socket.socket] = []

        async def cancelled(turns: int) -> None:
            dial = ev.create_task(connect(key, context, settings, timeout=10.0))
            if turns < 0:
                peer, _ = await ev.sock_accept(listener)
                accepted.append(peer)
                assert await ev.sock_recv(peer, 1)  # the ClientHello: the TLS stage
            for _ in range(turns):
                await asyncio.sleep(0)
            dial.cancel()
            with pytest.raises(asyncio.CancelledError):
                await dial

        await cancelled(-1)  # uvloop opens /dev/null once, on its first such close
        await asyncio.sleep(0.05)
        accepted.pop().close()
        before = _fds()
        pairs: list[tuple[socket.socket, socket.socket]] = []
        for i in range(ROUNDS):
            await cancelled(-1 if i % 2 else (i // 2) % 6)
            pairs.append(socket.socketpair())
        for _ in range(20):  # the loop's deferred closes
            await asyncio.sleep(0.01)
        for a, b in pairs:
            os.fstat(a.fileno())
            a.sendall(b"x")
            assert b.recv(1) == b"x"
            a.close()
            b.close()
        while True:  # connections the kernel completed but nobody accepted yet
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                break
        for peer in accepted:
            peer.close()
        listener.close()
        await asyncio.sleep(0.05)
        assert _fds() == before - 1  # the listener

    run(main(), 60, loop=loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_transport_that_cannot_be_built_leaves_no_descriptor(loop: str) -> None:
    """The loop ran our protocol factory, then its TLS transport's constructor raised (here:
    the context refuses to make the TLS object): the socket was never the loop's, so the dial
    closes it (before: open until the error and its traceback, which reference it, were
    collected). uvloop makes the TLS object later, in its built transport, which it closes: no
    descriptor either."""
    import ssl

    class Refusing(ssl.SSLContext):
        def wrap_bio(self, *args: object, **kwargs: object) -> ssl.SSLObject:
            raise ValueError("no TLS object today")

    settings = HboneSettings(trust_domain="cluster.local")
    context = Refusing(ssl.PROTOCOL_TLS_CLIENT)

    async def main() -> None:
        ev = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        key = PoolKey(source=BOB, expected=(ALICE,), address=listener.getsockname())
        errors = []
        for _ in range(2):  # the first: uvloop opens /dev/null once, on its first such close
            before = _fds()
            with pytest.raises(ValueError, match="no TLS object today") as err:
                await connect(key, context, settings, timeout=10.0)
            errors.append(err)
            await asyncio.sleep(0.05)
            peer, _ = await ev.sock_accept(listener)
            peer.close()
        assert _fds() == before  # `err` still holds the dial's frame, and its socket
        listener.close()

    run(main(), 30, loop=loop)


def test_a_cancelled_connect_never_returns_a_connection() -> None:
    """A peer that completes the handshake; each connect is cancelled after another number of
    loop turns, so one cancel lands in the turn where the TLS handshake finished. A connect
    still running when cancelled ends with CancelledError and leaves no connection behind
    (Python 3.11's wait_for returned the inner task's result and swallowed the cancel when the
    two met in one turn: a connection handed to a cancelled caller, who never closes it)."""
    from meshcore.hbone.aio import HboneHooks, HboneProtocol, accept_tls
    from meshcore.hbone.streams import Role
    from meshcore.tls import server_context

    alice, context, _new = identities()
    settings = HboneSettings(trust_domain="cluster.local")

    async def main() -> list[str]:
        ev = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        listener.setblocking(False)
        key = PoolKey(source=BOB, expected=(ALICE,), address=listener.getsockname())
        servers: list[asyncio.Task[None]] = []

        async def handshake(sock: socket.socket) -> None:
            proto = HboneProtocol(Role.SERVER, settings, HboneHooks())
            with contextlib.suppress(OSError, asyncio.CancelledError, PeerVerificationError):
                await accept_tls(sock, server_context(alice), proto)

        async def serve() -> None:
            while True:
                sock, _ = await ev.sock_accept(listener)
                servers.append(ev.create_task(handshake(sock)))

        server = ev.create_task(serve())
        outcomes = []
        try:
            for turns in range(60):
                dial = ev.create_task(connect(key, context, settings, timeout=10.0))
                for _ in range(turns):
                    await asyncio.sleep(0)
                if dial.done():
                    dial.result().abort()
                    outcomes.append("done")
                    continue
                dial.cancel()
                try:
                    proto = await dial
                except asyncio.CancelledError:
                    outcomes.append("cancelled")
                else:
                    proto.abort()
                    outcomes.append("returned after cancel")
        finally:
            server.cancel()
            for task in servers:
                task.cancel()
            listener.close()
        return outcomes

    outcomes = run(main(), 60)
    assert "returned after cancel" not in outcomes, outcomes
    assert "cancelled" in outcomes
