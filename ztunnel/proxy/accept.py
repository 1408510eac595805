"""Accepting on the node proxy's TCP listeners (15001 outbound, 15006 plaintext, 15008 HBONE).

Owns: the accept loop of a listening socket we created ourselves, and what happens when file
descriptors run short (issue 9): accepting PAUSES, so new connections wait in the kernel's
backlog (4096, `meshcore.sockets.LISTEN_BACKLOG`) until descriptors are free again, instead of
asyncio's create_server behaviour (accept(2) fails with EMFILE, it logs and retries after a
second, connections in between are neither served nor refused). `FD_RESERVE` descriptors are
kept free for the operator endpoints (readiness keeps answering) and the tunnels already open.
The per-peer bounds of the HBONE listeners are `meshcore.hbone.peers.PeerTable` (shared with the
HTTP/3 endpoint).
Invariants: every accepted socket is handed to `on_accept` (which owns it from then on) or
closed; the loop never spins on an error.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import resource
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from meshcore.aiostep import step_coroutine
from meshcore.sockets import accept
from ztunnel.metrics import ProxyMetrics
from ztunnel.proxy.relay import TcpSide

log = logging.getLogger("ztunnel.accept")

FD_RESERVE = 256
"""File descriptors kept free: accepting pauses when the next one would eat into them."""
ACCEPT_PAUSE = 0.1
ACCEPT_BATCH = 64
"""Connections accepted per wake-up of a listener at most."""
_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def fd_in_reserve(fd: int, reserve: int = FD_RESERVE) -> bool:
    """True when `fd`, a descriptor just created, shows fewer than `reserve` descriptors free.
    Linux hands out the lowest free descriptor (open(2), accept(2)), so the number of a fresh
    one tells how full the table is. The soft limit is read each time (one syscall, no
    descriptor): an operator may lower it at run time (prlimit)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft != resource.RLIM_INFINITY and fd >= soft - reserve


def fds_short(reserve: int = FD_RESERVE) -> bool:
    """True when fewer than `reserve` descriptors are free, probed with a fresh descriptor.
    Costs an open/close pair: only for the paused state, never per accepted connection (the
    accepted socket is itself the fresh descriptor, see `fd_in_reserve`)."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    os.close(fd)
    return fd_in_reserve(fd, reserve)


class AcceptLoop:
    """Accept on `sock` and hand each connection to `on_accept`; pause while fds are short.

    Accepting is a reader callback, not an awaited ``sock_accept``: a connection the kernel has
    handed us is always passed on in the same callback, so `close` (e.g. when a successor took
    the listener over, issue 15) can never drop one that was accepted but not yet served, as
    cancelling a task blocked in ``sock_accept`` can."""

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        on_accept: Callable[[socket.socket], None],
        metrics: ProxyMetrics,
    ) -> None:
        self.name = name
        self.sock = sock
        self.on_accept = on_accept
        self.metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._closed = False
        self._pause_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._read(True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop `start` found (no `get_running_loop` per connection)."""
        assert self._loop is not None
        return self._loop

    def close(self) -> None:
        self._closed = True
        self._read(False)
        if self._pause_task is not None:
            self._pause_task.cancel()
        self.sock.close()

    def _read(self, on: bool) -> None:
        if self._loop is None or on == self._reading or (on and self._closed):
            return
        if on:
            self._loop.add_reader(self.sock.fileno(), self._readable)
        else:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = on

    def _readable(self) -> None:
        for _ in range(ACCEPT_BATCH):  # bounded per wake-up: other work runs in between
            try:
                conn = accept(self.sock)  # a TcpSocket: uvloop reads its family/type cheaply
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in _SHORTAGE:
                    self._pause(str(err))
                else:  # e.g. ECONNABORTED: that connection is gone; the next one is not
                    log.warning("%s accept failed: %s", self.name, err)
                return
            # The accepted socket is the fresh descriptor that tells how full the table is:
            # it is served (it takes one descriptor of the reserve), the next ones wait.
            short = fd_in_reserve(conn.fileno())
            try:
                self.on_accept(conn)
            except Exception as exc:
                conn.close()
                log.warning("%s: accepted connection not served: %s", self.name, exc)
            if short:
                self._pause("file descriptors short")
                return

    def _pause(self, why: str) -> None:
        """Leave new connections in the kernel's backlog until descriptors are free again."""
        self.metrics.accept_paused.inc()
        log.warning("%s accept paused: %s", self.name, why)
        self._read(False)
        assert self._loop is not None
        self._pause_task = self._loop.create_task(self._resume_when_free())

    async def _resume_when_free(self) -> None:
        while fds_short():
            await asyncio.sleep(ACCEPT_PAUSE)
        log.info("%s accept resumed", self.name)
        self._pause_task = None
        self._read(True)


class TcpListener:
    """A plain TCP listener (outbound capture, inbound plaintext) served by protocols made by
    `factory`, accepted through `AcceptLoop`. The transport is made without a task
    (`meshcore.aiostep.step_coroutine`), then the protocol's `begin` starts its work; only work
    that must wait (e.g. a dial) runs in a task (issue 14: a task costs per new connection)."""

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        factory: Callable[[], TcpSide],
        metrics: ProxyMetrics,
    ) -> None:
        self.factory = factory
        self._loop = AcceptLoop(name, sock, self._accepted, metrics)
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._loop.start()

    def close(self) -> None:
        self._loop.close()

    def _accepted(self, conn: socket.socket) -> None:
        # No TCP_NODELAY here: the transport sets it (uvloop and asyncio, on every TCP socket).
        proto = self.factory()
        loop = self._loop.loop
        step_coroutine(
            loop.connect_accepted_socket(lambda: proto, conn),
            functools.partial(self._made, proto),
        )

    def _made(
        self,
        proto: TcpSide,
        _made: tuple[asyncio.BaseTransport, TcpSide] | None,
        err: BaseException | None,
    ) -> None:
        if err is not None:  # no transport; the loop owns `conn` (as when a task awaited it)
            log.warning("%s: accepted connection not served: %s", self._loop.name, err)
            return
        try:
            work = proto.begin()
        except Exception as exc:
            proto.abort()  # never leave the client's connection open and unread
            log.warning("%s: accepted connection not served: %s", self._loop.name, exc)
            return
        if work is not None:
            task = self._loop.loop.create_task(self._serve(proto, work))
            self._pending.add(task)  # asyncio holds tasks weakly
            task.add_done_callback(self._done)

    async def _serve(self, proto: TcpSide, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except BaseException:
            proto.abort()  # never leave the client's connection open and unread (_done logs)
            raise

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: accepted connection not served: %s", self._loop.name, task.exception())
