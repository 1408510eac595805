"""The spike behind docs/upgrade.md: can established connections move to a new process?

Measures (1) whether kTLS exists (TCP_ULP "tls"), (2) the cost of passing connected TCP sockets
with SCM_RIGHTS, (3) the cost of one mTLS handshake with mesh certificates (the price of a
re-handshake after GOAWAY). Run: .venv/bin/python bench/upgrade_spike.py
"""

from __future__ import annotations

import asyncio
import errno
import socket
import tempfile
import time
from pathlib import Path

from meshcore.ca import MeshCA
from meshcore.certs import LocalCAProvider
from meshcore.identity import SpiffeId
from meshcore.tls import client_context, server_context

TCP_ULP = 31  # linux/tcp.h


def ktls() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with socket.create_connection(listener.getsockname()) as conn:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
            print("kTLS: available")
        except OSError as err:
            print(f"kTLS: unavailable ({errno.errorcode[err.errno or 0]})")
    ulps = Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().strip()
    print(f"tcp_available_ulp: {ulps!r}")
    listener.close()


def scm_rights(n: int = 1000) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    conns = [socket.create_connection(listener.getsockname()) for _ in range(n)]
    a, b = socket.socketpair(socket.AF_UNIX)
    got: list[int] = []
    start = time.perf_counter()
    for i in range(0, n, 64):
        socket.send_fds(a, [b"x"], [c.fileno() for c in conns[i : i + 64]])
        got += socket.recv_fds(b, 16, 64)[1]
    took = time.perf_counter() - start
    print(f"SCM_RIGHTS: {len(got)} TCP sockets in {took * 1e3:.1f} ms")


async def handshakes(n: int = 300) -> None:
    ca = MeshCA.load_or_create(Path(tempfile.mkdtemp()))
    provider = LocalCAProvider(ca)
    server = await provider.fetch(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo"))
    client = await provider.fetch(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep"))
    cctx = client_context(client)
    cctx.check_hostname = False

    async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(server))
    port = srv.sockets[0].getsockname()[1]
    start = time.perf_counter()
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname="x")
        writer.close()
    took = time.perf_counter() - start
    print(f"mTLS handshake: {n} in {took:.2f} s = {took / n * 1e3:.2f} ms each")
    srv.close()


if __name__ == "__main__":
    ktls()
    scm_rights()
    asyncio.run(handshakes())
