"""Outgoing TCP sockets for the proxies, optionally from a non-local (original client) address.

Owns: creating the connected socket that asyncio then wraps (plain or TLS). With transparent
capture the node proxy connects from the ORIGINAL client's IP: IP_TRANSPARENT lets a socket bind
an address that is not local to the node (ip(7)); replies to it are steered back to the proxy by
the eBPF established-flow lookup on the pod's veth.
Invariant: a socket is returned connected, non-blocking and with TCP_NODELAY, or closed and an
OSError raised; nothing leaks on timeout or cancellation.
"""

from __future__ import annotations

import asyncio
import socket

IP_TRANSPARENT = 19  # linux/in.h; not exported by Python's socket module


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
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None:
            if transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((source_ip, 0))
        async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
