"""Sockets for the proxies: listeners, and outgoing connections optionally from a non-local
(original client) address.

Owns: `IP_TRANSPARENT` (defined once), `make_listener` (a bound, listening, non-blocking TCP
socket: the unit a process creates itself and could hand over; the node proxy and the waypoint
both use it), `udp_socket` / `make_udp_listener` (the UDP sockets of HBONE over HTTP/3, client and
server), and creating the connected socket that asyncio then wraps (plain or TLS). With transparent
capture the node proxy connects from the ORIGINAL client's IP: IP_TRANSPARENT lets a socket bind
an address that is not local to the node (ip(7)); replies to it are steered back to the proxy by
the eBPF established-flow lookup on the pod's veth.
A socket bound to a chosen source address sets IP_BIND_ADDRESS_NO_PORT (ip(7)): the ephemeral
port is then picked at connect() for the full 4-tuple, instead of at bind() exclusively for the
address, so bursts from one client IP do not run out of ports (EADDRINUSE); an EADDRINUSE /
EADDRNOTAVAIL that still happens is retried with a fresh socket (`BIND_ATTEMPTS` in all).
Invariant: a socket is returned connected and non-blocking, or closed and an OSError raised;
nothing leaks on timeout or cancellation. TCP_NODELAY is the transport's to set: uvloop sets it
on every TCP transport, asyncio only on a socket whose `proto` is IPPROTO_TCP (`_set_nodelay`),
so every per-connection socket here is made with IPPROTO_TCP, never protocol 0.
Per-connection sockets are `TcpSocket`s (issue 14): the connected sockets the proxies accept
(`accept`) and open (`connect_tcp`). uvloop reads `family` and `type` of every socket it wraps
(`connect_accepted_socket`, `create_connection(sock=...)`), and `socket.socket`'s properties
convert the C integer through the enum machinery each time (~1.7 us per read); a `TcpSocket`
returns the same enum members from a table. `accept` builds one from `accept(2)`'s descriptor
directly (`socket.socket.accept` reads the listener's `family` and `type` the slow way first).
A name (the rare case: the control plane's DNS name) is resolved for both families and each
address tried in the resolver's order, the deadline shared between them.
Connecting (issue 14, per-connection cost): the socket's own non-blocking connect(2), waited for
with a writer callback; no resolver round trip for an IP address (uvloop's `sock_connect`
resolves every address in its thread pool), and no timer per connect: the timeouts of all
connects in flight on a loop share one timer (`meshcore.deadlines.DeadlineSweep`), so a connect
times out between `timeout` and `timeout + CONNECT_SWEEP` after it began.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import functools
import math
import os
import socket
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import mypyc_attr

from meshcore.deadlines import DeadlineSweep

IP_TRANSPARENT = 19  # linux/in.h; not exported by Python's socket module
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # linux/in.h
BIND_ATTEMPTS = 3
UDP_BUFFER = 4 * 1024 * 1024  # socket buffers: a window's worth of QUIC datagrams in flight
CONNECT_SWEEP = 0.05
"""Granularity of connect timeouts (seconds): one wake-up serves every deadline within it."""

_FAMILIES: Final = {int(f): f for f in socket.AddressFamily}
_KINDS: Final = {int(k): k for k in socket.SocketKind}
_C_FAMILY: Final[Any] = _socket.socket.family  # the C getters: plain integers
_C_TYPE: Final[Any] = _socket.socket.type
_C_ACCEPT: Final[Any] = _socket.socket._accept  # type: ignore[attr-defined]


@mypyc_attr(native_class=False)  # a subclass of socket.socket, which is no native class
class TcpSocket(socket.socket):
    """A `socket.socket` whose `family` and `type` are table lookups (the same enum members;
    a value the enums lack: as `socket.socket` answers)."""

    __slots__ = ()

    @property
    def family(self) -> socket.AddressFamily:
        found = _FAMILIES.get(_C_FAMILY.__get__(self))
        return found if found is not None else super().family

    @property
    def type(self) -> socket.SocketKind:
        found = _KINDS.get(_C_TYPE.__get__(self))
        return found if found is not None else super().type


def accept(listener: socket.socket) -> TcpSocket:
    """`listener.accept()`'s connection as a `TcpSocket` (blocking mode and timeout as
    `socket.socket.accept` leaves them without a default timeout). Raises what accept(2)
    raises (BlockingIOError when none is waiting)."""
    fd, _ = _C_ACCEPT(listener)
    return TcpSocket(_C_FAMILY.__get__(listener), socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)


LISTEN_BACKLOG = 4096
"""Accept queue of every listener, data path and operator endpoints alike (Envoy's default is
4096 too; the kernel caps it at net.core.somaxconn). asyncio's default is 100, and
create_server(sock=...) / start_server call listen() again with it unless told otherwise."""


def make_listener(host: str, port: int, *, transparent: bool = False) -> socket.socket:
    """A bound, listening, non-blocking TCP socket with TCP_NODELAY. `transparent`: accept
    connections for any destination address steered here (eBPF sk_assign; IP_TRANSPARENT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_socket(host: str, *, transparent: bool = False) -> socket.socket:
    """An unbound, non-blocking UDP socket for `host`'s family with `UDP_BUFFER`-sized buffers
    (best effort: the kernel caps them at net.core.[rw]mem_max). `transparent`: it may bind an
    address that is not local (IP_TRANSPARENT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, UDP_BUFFER)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def make_udp_listener(host: str, port: int) -> socket.socket:
    """A bound, non-blocking UDP socket for HBONE over HTTP/3 (QUIC) on host:port."""
    sock = udp_socket(host)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def can_bind_without_privilege(ip: str) -> bool:
    """Loopback addresses are all local on Linux, so binding one needs no IP_TRANSPARENT."""
    return ip.startswith("127.") or ip == "::1"


async def connect_tcp(
    host: str,
    port: int,
    *,
    source_ip: str | None = None,
    transparent: bool = False,
    timeout: float = 10.0,
) -> socket.socket:
    """Connect to host:port, from `source_ip` if given (transparently if `transparent`), within
    `timeout` seconds (all attempts together; TimeoutError after it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    addresses = await _numeric(loop, host, port, timeout)
    for i, address in enumerate(addresses):
        # Each address in the resolver's order gets an equal share of the time left.
        share = (deadline - loop.time()) / (len(addresses) - i)
        try:
            return await _connect_bound(
                loop, address, source_ip, transparent, min(deadline, loop.time() + share)
            )
        except OSError:
            if i == len(addresses) - 1:
                raise
    raise AssertionError("unreachable")


async def _connect_bound(
    loop: asyncio.AbstractEventLoop,
    address: tuple[str, int],
    source_ip: str | None,
    transparent: bool,
    deadline: float,
) -> socket.socket:
    for attempt in range(1, BIND_ATTEMPTS + 1):
        try:
            sock, done = start_connect(address, source_ip, transparent)
            if not done:
                try:
                    await connected(loop, sock, deadline)
                except BaseException:
                    sock.close()
                    raise
            return sock
        except OSError as err:
            if not retry_bind(err, source_ip, attempt):
                raise
    raise AssertionError("unreachable")


def retry_bind(err: OSError, source_ip: str | None, attempt: int) -> bool:
    """Whether a connect from `source_ip` that failed with `err` on attempt `attempt` is tried
    again with a fresh socket (the source port was taken: `BIND_ATTEMPTS` in all)."""
    busy = err.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
    return source_ip is not None and busy and attempt < BIND_ATTEMPTS


async def _numeric(
    loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float
) -> list[tuple[str, int]]:
    """The (ip, port)s to try: `host` itself when it is an IP address, else every address the
    resolver gives for the name, IPv6 and IPv4 (AF_UNSPEC), in its order (RFC 6724), once each
    (the chart's control-plane address is a DNS name; a dual-stack name's first address may be
    unreachable)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(
                host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
            )
        ordered = dict.fromkeys(str(info[4][0]) for info in infos)
        if not ordered:
            raise OSError(errno.EHOSTUNREACH, f"{host} resolves to no address") from None
        return [(ip, port) for ip in ordered]
    return [(host, port)]


def start_connect(
    address: tuple[str, int], source_ip: str | None, transparent: bool
) -> tuple[TcpSocket, bool]:
    """A non-blocking socket with its connect(2) to `address` (an IP address, not a name)
    started: (socket, connected already). It does not wait, so a caller without a task (the
    inbound CONNECT, `ztunnel.proxy.inbound.InboundTunnel`) uses it as is; `PendingConnect`
    waits for the rest. Raises OSError (the socket closed); `retry_bind` says whether to try
    again. The socket is born non-blocking (SOCK_NONBLOCK: no ioctl) and gets no TCP_NODELAY
    here: the transport that wraps it sets it (uvloop's TCPTransport, asyncio's socket
    transport: hence IPPROTO_TCP, which asyncio checks); setting it here too cost a syscall
    per connection (bench/README.md, session 8)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = TcpSocket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, socket.IPPROTO_TCP)
    try:
        if source_ip is not None:
            if transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        err = sock.connect_ex(address)
        if err in _PENDING:
            return sock, _connected(sock)
        if err not in (0, errno.EISCONN):
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock, True


_PENDING = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY, errno.EINTR})
"""connect(2) results that mean "in progress, wait for writability" (as asyncio's
`sock_connect`: BlockingIOError or InterruptedError; after EINTR the connect goes on)."""


def _connected(sock: socket.socket) -> bool:
    """Whether a non-blocking connect already finished: on loopback the kernel runs the whole
    handshake inside connect(2), so waiting for writability would only cost a loop iteration.
    Raises the connect's error if it failed."""
    try:
        sock.getpeername()
    except OSError:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err)) from None
        return False
    return True


async def connected(loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float) -> None:
    """Wait until the connect in progress on `sock` finished (or `deadline` passed:
    TimeoutError); raises its error if it failed."""
    fut: asyncio.Future[None] = loop.create_future()
    pending = PendingConnect(loop, sock, deadline, functools.partial(_settle, fut))
    try:
        await fut
    finally:
        pending.cancel()


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


@mypyc_attr(native_class=False)  # DeadlineSweep's keys; fields set once
class PendingConnect:
    """A connect in progress on `sock`, reported once to `on_done`: None (connected), the
    connect's OSError, or TimeoutError once `deadline` passed (the loop's shared sweep, not a
    timer per connect). The writer callback and the deadline are dropped before `on_done`
    runs, and by `cancel` (then `on_done` is never called), so nothing refers to the socket's
    descriptor afterwards: the caller may close it at once. The socket stays the caller's."""

    __slots__ = ("_fd", "_loop", "_on_done", "_sock", "_timers", "_token")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        deadline: float,
        on_done: Callable[[BaseException | None], None],
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._on_done: Callable[[BaseException | None], None] | None = on_done
        loop.add_writer(self._fd, self._writable)
        self._timers = _connect_timers(loop)
        self._token = self._timers.add(self, deadline)

    def _writable(self) -> None:
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._report(OSError(err, os.strerror(err)) if err else None)

    def timed_out(self) -> None:
        self._report(TimeoutError())

    def cancel(self) -> None:
        """No report: the caller gave up (idempotent)."""
        if self._on_done is not None:
            self._on_done = None
            self._loop.remove_writer(self._fd)
            self._timers.sweep.discard(self._token)

    def _report(self, err: BaseException | None) -> None:
        on_done = self._on_done
        if on_done is not None:
            self.cancel()
            on_done(err)


class _ConnectTimers:
    """The I/O edge of one loop's `DeadlineSweep` of connects: one timer handle, armed for the
    sweep's next wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sweep: DeadlineSweep[PendingConnect] = DeadlineSweep(CONNECT_SWEEP)
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def add(self, pending: PendingConnect, deadline: float) -> int:
        token = self.sweep.add(pending, deadline)
        self._arm()
        return token

    def _arm(self) -> bool:
        """Arm the handle for the sweep's next wake-up; whether a handle is armed."""
        when = self.sweep.get_timer()
        if when is None or when >= self._armed_at:
            return self._handle is not None
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self.loop.call_at(when, self._fire)
        self._armed_at = when
        return True

    def _fire(self) -> None:
        # The loop's timers have ~1 ms resolution: a timer may run just before its time, which
        # was chosen at or after the deadlines it is for.
        now = max(self.loop.time(), self._armed_at)
        self._handle, self._armed_at = None, math.inf
        for pending in self.sweep.handle_timer(now):
            pending.timed_out()
        # `_arm`'s answer, not a second read of `_handle`: mypy (and so mypyc, which checks the
        # narrowed type at run time) still takes `_handle` for the None assigned above.
        if not self._arm():
            _timers.pop(id(self.loop), None)  # nothing in flight: forget this loop


_timers: dict[int, _ConnectTimers] = {}
"""Per running loop (by id; an entry keeps its loop alive, so the id is not reused meanwhile)."""


def _connect_timers(loop: asyncio.AbstractEventLoop) -> _ConnectTimers:
    timers = _timers.get(id(loop))
    if timers is None:
        timers = _timers[id(loop)] = _ConnectTimers(loop)
    return timers
