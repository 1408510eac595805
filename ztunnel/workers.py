"""Workers of a node proxy fed by the control plane (`--workers N` with `--xds-address`).

Owns: forking the extra workers of control-plane mode and handing them the first worker's
listening sockets. Static mode binds before it forks (`ztunnel.app.serve`); here the listeners
depend on the first full state (bind capture binds each local workload's address), and that
state arrives over the control plane's gRPC stream, whose connection must not be shared with a
forked child (both would read and write the one socket). The client is our own
(`meshcore.grpcclient`: no grpcio, whose threads and event engine did not survive fork(2)). So:

1. The first worker forks the others before any control-plane connection is opened (the
   xDS/CA clients are imported lazily, `ztunnel.contexts.controlplane_context`), one SEQPACKET
   socketpair per extra worker.
2. The first worker waits for its full state, takes over from a predecessor if there is one
   (`ztunnel.handover`), binds the listeners and sends them to every extra worker: the
   hand-over's OFFER message (at most `handover.MAX_SOCKETS` per packet, SCM_RIGHTS), then
   DONE (`offer_listeners`).
3. Each extra worker receives them (`receive_listeners`), then runs like the first one: its
   own xDS stream, its own certificates, the same kernel listening sockets (one accept queue,
   as in static mode; `bind_listeners` in `ztunnel.app`).

Choice: every worker has its own xDS stream and CA client, instead of one client in the first
worker pushing state and certificates to the others. Why: the state a worker runs on is then
exactly what the control plane sent it (the same delta xDS code, ACK/NACK and on-demand
requests; per-node filtering makes a stream small), no second serialisation of `MeshState` and
of private keys between processes has to be kept true, and a worker never depends on another
worker's liveness for config (the first worker's death stops the proxy anyway, `run_worker`).
The cost: N streams per node on the control plane instead of one (N is the node's core count,
against the hundreds of node proxies it already serves), one CSR per identity per worker (each
worker holds its own key pair; the keys never leave the process), and for a few milliseconds
after a change two workers may apply different versions, which a single process also shows
between two connections (every connection sees one snapshot).

Invariants: no control-plane connection exists in the process when it forks; an extra worker
serves only the sockets the first worker bound (never binds itself); a malformed or truncated
offer is a `HandoverError` (the worker exits and the first worker, seeing it die, stops the
proxy: fail fast, the supervisor restarts it); every fd received is either used or closed.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence

from meshcore.errors import HandoverError, MeshError
from ztunnel import handover

log = logging.getLogger("ztunnel.workers")


def fork_workers(
    count: int, run: Callable[[socket.socket], int]
) -> tuple[list[int], list[socket.socket]]:
    """Fork `count` workers; each runs `run(its end of a socketpair)` and exits with its
    result. Returns the pids and, per worker, the first worker's end of its pair."""
    pids: list[int] = []
    ends: list[socket.socket] = []
    for _ in range(count):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the worker: its pair only
            for end in [*ends, ours]:
                end.close()
            code = 1
            try:
                code = run(theirs)
            except (MeshError, OSError) as err:  # main() logs the first worker's; ours here
                log.error("worker %d: fatal: %s", os.getpid(), err)
            finally:
                os._exit(code)
        theirs.close()
        pids.append(pid)
        ends.append(ours)
    return pids, ends


def offer_listeners(conn: socket.socket, listeners: Sequence[tuple[str, socket.socket]]) -> None:
    """First worker: send (role, socket) pairs to one extra worker, then DONE; closes `conn`.
    Raises HandoverError if that worker is gone (the proxy stops: fail fast)."""
    try:
        for start in range(0, len(listeners), handover.MAX_SOCKETS):
            chunk = listeners[start : start + handover.MAX_SOCKETS]
            specs = tuple(handover.spec_of(role, sock) for role, sock in chunk)
            msg = handover.encode(handover.Message(handover.Kind.OFFER, sockets=specs))
            socket.send_fds(conn, [msg], [sock.fileno() for _, sock in chunk])
        conn.sendall(handover.encode(handover.Message(handover.Kind.DONE)))
    except OSError as err:
        raise HandoverError(f"a worker exited before taking the listeners: {err}") from err
    finally:
        conn.close()


def receive_listeners(conn: socket.socket) -> list[tuple[str, socket.socket]]:
    """Extra worker (blocking, before its event loop runs): the first worker's listening
    sockets, in its order. Raises HandoverError if the offer is malformed or cut short."""
    received: list[tuple[str, socket.socket]] = []
    try:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(
                conn, handover.MAX_BODY + handover.HEADER.size, handover.MAX_SOCKETS
            )
            # Owned at once: closed below if anything is wrong.
            socks = [socket.socket(fileno=fd) for fd in fds]
            received.extend(("", s) for s in socks)
            if not data:
                raise HandoverError("first worker closed before offering its listeners")
            msgs = handover.Decoder().feed(data)
            if len(msgs) != 1:
                raise HandoverError(f"expected one message per packet, got {len(msgs)}")
            msg = msgs[0]
            if msg.kind is handover.Kind.DONE and not fds:
                break
            if msg.kind is not handover.Kind.OFFER or len(msg.sockets) != len(socks):
                raise HandoverError(
                    f"expected OFFER with {len(msg.sockets)} fds, got {msg.kind.name}/{len(socks)}"
                )
            del received[len(received) - len(socks) :]
            received.extend((spec.role, s) for spec, s in zip(msg.sockets, socks, strict=True))
    except (HandoverError, OSError):
        for _, sock in received:
            sock.close()
        raise
    finally:
        conn.close()
    for _, sock in received:
        sock.setblocking(False)
    log.info("worker %d: %d listening sockets from the first worker", os.getpid(), len(received))
    return received
