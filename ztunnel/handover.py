"""Listener hand-over between two node-proxy processes (zero-drop upgrade, issue 15).

Owns the hand-over protocol (a pure encoder/decoder) and its thin I/O edge over a unix stream
socket: the running process (`HandoverServer`) passes its listening sockets to a successor
(`obtain` + `commit`) with SCM_RIGHTS, so the very same kernel socket objects keep their accept
queues (no SYN is refused or reset) and eBPF sk_assign keeps steering to them.

Flow (every message is ``MAGIC | version u8 | kind u8 | length u32 | JSON body``):
  successor -> HELLO {pid, versions}
  running   -> OFFER {sockets: [{role, host, port}...]} with one fd per entry (SCM_RIGHTS), or
               REFUSE {reason}
  successor    starts accepting on the sockets (both processes accept for a moment: fine, each
               serves what it accepted), then -> READY
  running      stops accepting, starts draining (GOAWAY, no deadline by default) -> DONE
  successor    serves the operator ports, turns ready and binds the hand-over path itself
               (bind at a temporary name, rename over the path: the path never disappears).
HTTP/3's UDP sockets go along (roles ``hbone-udp`` + one ``hbone-udp-relay``): the successor
reads them only after DONE and relays the datagrams of the QUIC connections the predecessor
still serves (`ztunnel.udp_relay`).
Version 2: the hand-over connection stays open after DONE, for the successor's lifetime
(take-back). The running process keeps its copies of the listening sockets, not accepting.
  successor -> RELEASE  when it stops on purpose (handed over to a third process, or a plain
               stop): the running process closes its copies and finishes its drain.
  EOF without RELEASE: the successor died (crash, SIGKILL, OOM). The running process takes the
               listeners back: the same kernel sockets, so the SYNs queued meanwhile are
               accepted, not refused; it turns ready again, stops its drain and binds the
               hand-over path again (a restarted successor takes over from it).
Invariants: the running process stops accepting only after READY, so a successor that dies or
goes silent before READY changes nothing (it never accepted); every message and body is bounded
(`MAX_BODY`, `MAX_SOCKETS` fds); a peer speaking another version or out of order gets REFUSE
and a log line, never a traceback. Only one hand-over at a time. Without take-back (multi-worker
proxies, no `TakeBack`) the running process closes the connection after DONE, and
a successor ignores that EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meshcore.errors import HandoverError

log = logging.getLogger("ztunnel.handover")

MAGIC = b"AMHO"
VERSION = 2  # 2: the connection outlives DONE (RELEASE / take-back)
HEADER = struct.Struct("!4sBBI")
MAX_BODY = 64 * 1024
MAX_SOCKETS = 64
READY_TIMEOUT = 60.0  # seconds a successor has from HELLO to READY
ROLES = (
    "outbound",
    "plaintext",
    "hbone",
    "admin",
    "metrics",
    "readiness",
    "hbone-udp",  # HTTP/3 (QUIC) socket, with the relay below (`ztunnel.udp_relay`)
    "hbone-udp-relay",  # unix socketpair end: unnamed (host "", port 0)
)
UNNAMED_ROLES = ("hbone-udp-relay",)


class Kind(enum.IntEnum):
    HELLO = 1
    OFFER = 2
    READY = 3
    DONE = 4
    REFUSE = 5
    RELEASE = 6


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """What one handed-over listening socket serves: its role and its bound address."""

    role: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    version: int = VERSION
    pid: int = 0
    sockets: tuple[SocketSpec, ...] = ()
    reason: str = ""


def encode(msg: Message) -> bytes:
    body: dict[str, object] = {}
    if msg.kind is Kind.HELLO:
        body = {"pid": msg.pid, "versions": [VERSION]}
    elif msg.kind is Kind.OFFER:
        body = {"sockets": [{"role": s.role, "host": s.host, "port": s.port} for s in msg.sockets]}
    elif msg.kind is Kind.REFUSE:
        body = {"reason": msg.reason}
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_BODY:
        raise HandoverError(f"hand-over {msg.kind.name} body of {len(data)} bytes over {MAX_BODY}")
    return HEADER.pack(MAGIC, msg.version, msg.kind, len(data)) + data


def _spec(item: object) -> SocketSpec:
    if not isinstance(item, dict):
        raise HandoverError("OFFER socket entry is not an object")
    role, host, port = item.get("role"), item.get("host"), item.get("port")
    if role not in ROLES or not isinstance(host, str) or not isinstance(port, int):
        raise HandoverError(f"OFFER socket entry {item!r} is not a known role/host/port")
    if role in UNNAMED_ROLES and (host, port) == ("", 0):
        return SocketSpec(role, host, port)
    if not 0 < port < 65536:
        raise HandoverError(f"OFFER port {port} out of range")
    return SocketSpec(role, host, port)


def _message(version: int, kind: Kind, body: dict[str, object]) -> Message:
    if kind is Kind.HELLO:
        pid = body.get("pid")
        return Message(kind, version, pid=pid if isinstance(pid, int) else 0)
    if kind is Kind.OFFER:
        items = body.get("sockets")
        if not isinstance(items, list) or len(items) > MAX_SOCKETS:
            raise HandoverError(f"OFFER needs a list of at most {MAX_SOCKETS} sockets")
        return Message(kind, version, sockets=tuple(_spec(i) for i in items))
    if kind is Kind.REFUSE:
        return Message(kind, version, reason=str(body.get("reason", ""))[:200])
    return Message(kind, version)


@dataclass
class Decoder:
    """Bytes in, messages out (sans I/O). Raises HandoverError on anything malformed."""

    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Message]:
        self.buffer += data
        out: list[Message] = []
        while len(self.buffer) >= HEADER.size:
            magic, version, kind, length = HEADER.unpack_from(self.buffer)
            if magic != MAGIC:
                raise HandoverError("not a hand-over peer (bad magic)")
            if version != VERSION:
                raise HandoverError(f"hand-over version {version} unsupported (we speak {VERSION})")
            if kind not in Kind._value2member_map_:
                raise HandoverError(f"unknown hand-over message kind {kind}")
            if length > MAX_BODY:
                raise HandoverError(f"hand-over body of {length} bytes over {MAX_BODY}")
            if len(self.buffer) < HEADER.size + length:
                break
            raw = bytes(self.buffer[HEADER.size : HEADER.size + length])
            del self.buffer[: HEADER.size + length]
            try:
                body = json.loads(raw)
            except ValueError as err:
                raise HandoverError(f"hand-over body is not JSON: {err}") from err
            if not isinstance(body, dict):
                raise HandoverError("hand-over body is not a JSON object")
            out.append(_message(version, Kind(kind), body))
        return out


def spec_of(role: str, sock: socket.socket) -> SocketSpec:
    if sock.family == socket.AF_UNIX:
        return SocketSpec(role, "", 0)
    host, port = sock.getsockname()[:2]
    return SocketSpec(role, str(host), int(port))


# ---- I/O edge: successor side (blocking, before the event loop runs) ------------------------


@dataclass
class Handed:
    """Sockets received from a running predecessor, and the connection to commit on."""

    conn: socket.socket
    sockets: dict[SocketSpec, socket.socket]

    def take(self, role: str, host: str, port: int) -> socket.socket | None:
        return self.sockets.pop(SocketSpec(role, host, port), None)

    def close_unused(self) -> None:
        for spec, sock in self.sockets.items():
            log.info("hand-over: %s %s:%d no longer configured, closed", *_fmt(spec))
            sock.close()
        self.sockets.clear()


def _fmt(spec: SocketSpec) -> tuple[str, str, int]:
    return spec.role, spec.host, spec.port


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A unix socket address for `path`: itself, or through /proc/self/fd/<dir fd>/<name> when
    it is longer than sun_path allows (108 bytes, unix(7)); deep hostPath/test directories."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def obtain(path: Path, timeout: float = 10.0) -> Handed | None:
    """Ask the process listening on `path` for its listening sockets. None when nobody listens
    there (first start, or a predecessor that already exited): the caller binds fresh."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        with _addressable(path) as address:
            conn.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    fds: list[int] = []
    try:
        conn.sendall(encode(Message(Kind.HELLO, pid=os.getpid())))
        decoder = Decoder()
        while True:
            data, got, _flags, _addr = socket.recv_fds(conn, MAX_BODY, MAX_SOCKETS)
            fds.extend(got)
            if not data:
                raise HandoverError("predecessor closed the hand-over connection")
            msgs = decoder.feed(data)
            if msgs:
                break
        msg = msgs[0]
        if msg.kind is Kind.REFUSE:
            raise HandoverError(f"predecessor refused the hand-over: {msg.reason}")
        if msg.kind is not Kind.OFFER or len(fds) != len(msg.sockets):
            raise HandoverError(
                f"expected OFFER with {len(msg.sockets)} fds, got {msg.kind.name}/{len(fds)}"
            )
    except (HandoverError, OSError):
        conn.close()
        for fd in fds:
            os.close(fd)
        raise
    sockets = {spec: socket.socket(fileno=fd) for spec, fd in zip(msg.sockets, fds, strict=True)}
    for sock in sockets.values():
        sock.setblocking(False)
    log.info("hand-over: received %d listening sockets from %s", len(sockets), path)
    return Handed(conn, sockets)


async def commit(handed: Handed, timeout: float = 30.0) -> socket.socket | None:
    """READY to the predecessor (we accept now), then wait for DONE (it stopped accepting).
    Returns the hand-over connection, to hold open while we serve (its EOF tells the
    predecessor we died: take-back) and to `release` when we stop on purpose. None if it went
    away or timed out: then we simply own the sockets alone."""
    loop = asyncio.get_running_loop()
    conn = handed.conn
    conn.setblocking(False)
    try:
        await loop.sock_sendall(conn, encode(Message(Kind.READY)))
        decoder = Decoder()
        async with asyncio.timeout(timeout):
            while True:
                data = await loop.sock_recv(conn, 4096)
                if not data:
                    log.warning("hand-over: predecessor went away before DONE")
                    conn.close()
                    return None
                for msg in decoder.feed(data):
                    if msg.kind is Kind.DONE:
                        log.info("hand-over: predecessor stopped accepting")
                        return conn
                    raise HandoverError(f"expected DONE, got {msg.kind.name}")
    except (HandoverError, OSError, TimeoutError) as err:
        log.warning("hand-over: no DONE from predecessor (%s); serving alone", err)
        conn.close()
        return None


def release(conn: socket.socket) -> None:
    """We stop on purpose: RELEASE to the predecessor (it keeps no copies for us any more), then
    close. A predecessor already gone is fine."""
    with contextlib.suppress(OSError):
        conn.send(encode(Message(Kind.RELEASE)))  # a few bytes on a unix socket: one call
    conn.close()


# ---- I/O edge: running side -----------------------------------------------------------------


def bind_path(path: Path) -> socket.socket:
    """A listening unix socket at `path`, replacing any previous one atomically (bind at a
    temporary name, rename over the path), so a successor always finds somebody there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _addressable(tmp) as address:
        sock.bind(address)
    os.chmod(tmp, 0o600)
    sock.listen(4)
    os.replace(tmp, path)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True, slots=True)
class TakeBack:
    """What the running process does once it handed over (version 2): `successor_died` when
    the hand-over connection ends without RELEASE (resume accepting on the kept copies),
    `released` on RELEASE (drop them)."""

    successor_died: Callable[[], None]
    released: Callable[[], None]


class HandoverServer:
    """The running process's side: one successor at a time gets our listening sockets.

    `offer()` returns the sockets to pass; `stop_accepting()` is called once on READY (it must
    stop accepting synchronously). After DONE the listening hand-over socket is closed (the
    successor now owns the path). With `take_back` (version 2) the hand-over connection is
    watched: RELEASE -> `take_back.released()` (the caller drops the copies it kept); EOF, an
    error or anything else -> `take_back.successor_died()` (the caller resumes accepting on its
    copies, then `start()`s this server again: the path is bound again for the next
    successor). Without it the
    connection is closed after DONE."""

    def __init__(
        self,
        path: Path,
        offer: Callable[[], Iterable[tuple[str, socket.socket]]],
        stop_accepting: Callable[[], None],
        *,
        on_result: Callable[[str], None] = lambda _result: None,
        take_back: TakeBack | None = None,
    ) -> None:
        self.path = path
        self.offer = offer
        self.stop_accepting = stop_accepting
        self.ready_timeout = READY_TIMEOUT
        self.on_result = on_result
        """Called with "done", "failed" or "taken_back" (a counter)."""
        self.take_back = take_back
        self.sock: socket.socket | None = None
        self.handed_over = False
        self.failed = 0
        self._ino = -1
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._bind()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def _bind(self) -> None:
        self.sock = bind_path(self.path)
        self._ino = os.stat(self.path).st_ino  # the path's inode (fstat of a socket is sockfs's)
        log.info("hand-over: listening on %s", self.path)

    def close(self, *, unlink: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._close_listening(unlink=unlink)

    def _close_listening(self, *, unlink: bool) -> None:
        if self.sock is not None:
            if unlink:
                # Only if the path is still ours (a successor may have renamed its own over it).
                with contextlib.suppress(OSError):
                    if os.stat(self.path).st_ino == self._ino:
                        self.path.unlink()
            self.sock.close()
            self.sock = None

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            assert self.sock is not None
            conn, _ = await loop.sock_accept(self.sock)
            try:
                await self._one(conn)
            except (HandoverError, OSError, TimeoutError) as err:
                if not self.handed_over:
                    self.failed += 1
                    self.on_result("failed")
                    log.warning("hand-over failed, keep serving: %s", err)
                    conn.close()
                    continue
                log.warning("hand-over: successor lost after READY: %s", err)
            # Handed over: the successor binds the path (renames its socket over it).
            self._close_listening(unlink=False)
            if self.take_back is None:
                conn.close()
                return
            if not await self._watch(conn):
                self.take_back.released()
                return
            self.handed_over = False
            self._task = None
            self.on_result("taken_back")
            self.take_back.successor_died()  # the caller resumes, then start()s us again
            return

    async def _watch(self, conn: socket.socket) -> bool:
        """True when the successor died (EOF or an error without RELEASE), False on RELEASE."""
        loop = asyncio.get_running_loop()
        decoder = Decoder()
        try:
            while data := await loop.sock_recv(conn, 4096):
                for msg in decoder.feed(data):
                    if msg.kind is Kind.RELEASE:
                        log.info("hand-over: successor released our copies")
                        return False
                    raise HandoverError(f"expected RELEASE, got {msg.kind.name}")
            log.warning("hand-over: successor died (no RELEASE): taking the listeners back")
        except (HandoverError, OSError) as err:
            log.warning(
                "hand-over: successor connection broken (%s): taking the listeners back", err
            )
        finally:
            conn.close()
        return True

    async def _one(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        decoder = Decoder()
        stage = Kind.HELLO
        async with asyncio.timeout(self.ready_timeout):
            while True:
                data = await loop.sock_recv(conn, 4096)
                if not data:
                    raise HandoverError(f"successor went away before {stage.name}")
                try:
                    msgs = decoder.feed(data)
                    expect: Kind | None = stage
                    for msg in msgs:  # HELLO, then READY, nothing after
                        if msg.kind is not expect:
                            want = expect.name if expect else "nothing"
                            raise HandoverError(f"expected {want}, got {msg.kind.name}")
                        expect = Kind.READY if expect is Kind.HELLO else None
                except HandoverError as err:
                    with contextlib.suppress(OSError):
                        await loop.sock_sendall(conn, encode(Message(Kind.REFUSE, reason=str(err))))
                    raise
                for msg in msgs:
                    if stage is Kind.HELLO:
                        offered = list(self.offer())
                        specs = tuple(spec_of(role, sock) for role, sock in offered)
                        payload = encode(Message(Kind.OFFER, sockets=specs))
                        # Small message on an empty unix socket buffer: sent in one call.
                        conn.settimeout(5.0)
                        socket.send_fds(conn, [payload], [s.fileno() for _, s in offered])
                        conn.setblocking(False)
                        log.info("hand-over: offered %d sockets to pid %d", len(specs), msg.pid)
                        stage = Kind.READY
                    else:
                        self.stop_accepting()
                        self.handed_over = True
                        self.on_result("done")
                        await loop.sock_sendall(conn, encode(Message(Kind.DONE)))
                        log.info("hand-over: done; this process only serves what it has")
                        return
