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
Invariant: a socket is returned connected, non-blocking and with TCP_NODELAY, or closed and an
OSError raised; nothing leaks on timeout or cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket

IP_TRANSPARENT = 19  # linux/in.h; not exported by Python's socket module
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # linux/in.h
BIND_ATTEMPTS = 3
UDP_BUFFER = 4 * 1024 * 1024  # socket buffers: a window's worth of QUIC datagrams in flight
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
    """Connect to host:port, from `source_ip` if given (transparently if `transparent`)."""
    async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                return await _connect_once(host, port, source_ip, transparent)
            except OSError as err:
                busy = err.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
                if source_ip is None or not busy or attempt == BIND_ATTEMPTS:
                    raise
    raise AssertionError("unreachable")


async def _connect_once(
    host: str, port: int, source_ip: str | None, transparent: bool
) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None:
            if transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
