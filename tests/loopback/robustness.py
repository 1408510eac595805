"""A real `ztunnel` process as node B, and raw HTTP/2 attackers speaking to its HBONE port.

Used by `test_h2_robustness.py`. Addresses (disjoint from the other loopback modules):
  node-b 127.0.71.1, server pod 127.0.71.10 (sa echo), backend (in the test) on :8080,
  client pod 127.0.70.10 (sa sleep; its certificate is signed by the same CA directory).
The process runs alone, so its RSS and open descriptors (from /proc) measure the node proxy and
nothing else. Frames are built by hand with `meshcore.hbone.frames` (raw bytes), so an attack can
be anything the wire allows, not only what a well-behaved HTTP/2 library would send.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshcore.ca import MeshCA
from meshcore.certs import LocalCAProvider, WorkloadCertificate
from meshcore.hbone.aio import HboneSettings, PoolKey, connect
from meshcore.hbone.frames import (
    CLIENT_PREFACE,
    Flag,
    FrameType,
    encode_settings,
    encode_settings_ack,
    frame_header,
)
from meshcore.hbone.headers import encode as encode_headers
from meshcore.identity import SpiffeId
from meshcore.tls import client_context
from tests.helpers import Sink, echo_mesh_config, spawn_ztunnel, stop_processes

NODE, SERVER, CLIENT = "127.0.71.1", "127.0.71.10", "127.0.70.10"
HBONE = (SERVER, 15008)
BACKEND_PORT = 8080
SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
ECHO = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/echo")
AUTHORITY = f"{SERVER}:{BACKEND_PORT}"


def mesh_config() -> dict[str, Any]:
    return echo_mesh_config(CLIENT, SERVER, "127.0.72.10")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class NodeB:
    proc: subprocess.Popen[bytes]
    cert: WorkloadCertificate
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://{NODE}:15020/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def counter(self, name: str, **labels: str) -> float:
        """Sum of a counter's samples whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{NODE}:15021/healthz/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False


def start_node_b(tmp: Path, *extra: str) -> Iterator[NodeB]:
    cfg = tmp / "mesh.yaml"
    cfg.write_text(yaml.safe_dump(mesh_config()))
    log = tmp / "node-b.log"
    flags = ("--log-level", "info", "--access-log", *extra)
    proc = spawn_ztunnel("node-b", NODE, *flags, mesh_config=cfg, drain=2)
    try:
        deadline = time.monotonic() + 20
        node = None
        while node is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "node-b not ready"
            if (tmp / "ca").exists():
                with suppress(Exception):
                    ca = MeshCA.load_or_create(tmp / "ca")
                    cert = asyncio.run(LocalCAProvider(ca).fetch(SLEEP))
                    node = NodeB(proc, cert, log)
                    if not node.ready():
                        node = None
            time.sleep(0.1)
        yield node
    finally:
        stop_processes(proc)


# ---- frames ----


def headers_frame(stream_id: int, block: bytes, *, end_headers: bool = True) -> bytes:
    flags = Flag.END_HEADERS if end_headers else 0
    return frame_header(len(block), FrameType.HEADERS, flags, stream_id) + block


def connect_block(authority: str = AUTHORITY, extra: list[tuple[str, str]] | None = None) -> bytes:
    return encode_headers([(":method", "CONNECT"), (":authority", authority), *(extra or [])])


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), ftype, flags, stream_id) + payload


def rst(stream_id: int, code: int = 0x8) -> bytes:
    return frame(FrameType.RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


@dataclass
class Seen:
    """What the server sent back to a raw attacker."""

    goaway: int | None = None
    goaway_last: int | None = None
    goaway_debug: bytes = b""
    statuses: dict[int, str] = field(default_factory=dict)
    resets: dict[int, int] = field(default_factory=dict)
    closed: bool = False
    frames: int = 0
    error: str = ""


class Raw:
    """A raw TLS connection to node B's HBONE port, with the client pod's certificate."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.seen = Seen()
        self._buf = b""
        # Read all along, as a real peer does: a write failing after the server's GOAWAY
        # must not hide what the server said before it closed.
        self._reader_task = asyncio.get_running_loop().create_task(self._read_all())

    @classmethod
    async def open(
        cls, cert: WorkloadCertificate, *, settings_ack: bool = True, source: str | None = None
    ) -> Raw:
        return await cls.open_to(HBONE, cert, settings_ack=settings_ack, source=source)

    @classmethod
    async def open_to(
        cls,
        addr: tuple[str, int],
        cert: WorkloadCertificate,
        *,
        settings_ack: bool = True,
        source: str | None = None,
    ) -> Raw:
        ctx = client_context(cert)
        local = (source, 0) if source else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*addr, ssl=ctx, server_hostname="", local_addr=local), 10
        )
        raw = cls(reader, writer)
        hello = CLIENT_PREFACE + encode_settings({})
        if settings_ack:
            hello += encode_settings_ack()  # acknowledge the server's (it is sent first)
        writer.write(hello)
        return raw

    async def send(self, data: bytes) -> bool:
        """Write; False once the server has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError, RuntimeError):
            return False
        return True

    async def _read_all(self) -> None:
        while True:
            try:
                chunk = await self.reader.read(1 << 16)
            except (ConnectionError, ssl.SSLError) as err:  # an abort after the GOAWAY: closed
                self.seen.error = repr(err)
                break
            if not chunk:
                break
            self._parse(chunk)
        self.seen.closed = True

    async def read_until_closed(self, timeout: float) -> Seen:
        """What the server sent, once it closed the connection (or after `timeout`)."""
        with suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader_task), timeout)
        return self.seen

    def _parse(self, chunk: bytes) -> None:
        from meshcore.hbone.headers import decode_simple

        self._buf += chunk
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                return
            ftype, sid = self._buf[3], int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
            payload, self._buf = self._buf[9 : 9 + length], self._buf[9 + length :]
            self.seen.frames += 1
            if ftype == FrameType.GOAWAY:
                self.seen.goaway = int.from_bytes(payload[4:8], "big")
                self.seen.goaway_last = int.from_bytes(payload[:4], "big")
                self.seen.goaway_debug = payload[8:]
            elif ftype == FrameType.RST_STREAM:
                self.seen.resets[sid] = int.from_bytes(payload, "big")
            elif ftype == FrameType.HEADERS:
                block = decode_simple(payload) or []
                self.seen.statuses[sid] = dict(block).get(":status", "?")

    def abort(self) -> None:
        self.writer.transport.abort()
        self._reader_task.cancel()


async def legit_tunnel(cert: WorkloadCertificate, size: int = 64 * 1024) -> None:
    """A well-behaved client: its own HBONE connection, one tunnel, hash-checked echo."""
    data = hashlib.shake_256(os.urandom(8)).digest(size)
    key = PoolKey(source=cert.identity, expected=(ECHO,), address=HBONE)
    proto = await connect(
        key, client_context(cert), HboneSettings(trust_domain="cluster.local"), timeout=10
    )
    try:
        sink = Sink()
        stream = await asyncio.wait_for(proto.open_stream(AUTHORITY, [], sink), 10)
        stream.write(data)
        stream.write_eof()
        await asyncio.wait_for(sink.eof.wait(), 10)
        assert sink.reset_code is None, f"tunnel reset ({sink.reset_code})"
        assert hashlib.sha256(bytes(sink.data)).digest() == hashlib.sha256(data).digest()
    finally:
        proto.abort()


@dataclass
class Backend:
    accepted: int = 0
    server: asyncio.Server | None = None


async def start_echo_backend() -> Backend:
    backend = Backend()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend.accepted += 1
        with suppress(ConnectionError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
        writer.close()

    backend.server = await asyncio.start_server(echo, SERVER, BACKEND_PORT, backlog=4096)
    return backend
