"""Entering a node's network namespace for the duration of a block, per THREAD.

`entered(name)` switches only the calling thread with setns(2) (CLONE_NEWNET is per thread) and
switches back on exit. Netlink sockets created inside the block stay bound to that namespace for
their whole life, which is how every pyroute2/nftables socket of `NodeCapture` reaches the node
netns without `ip netns exec` (which remounts /sys and would hide bpffs).

Invariants: the thread always returns to the namespace it came from, or the process is told
loudly (a thread stranded in another netns would silently misconfigure everything after it).
`None` means "the current namespace" and does nothing.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ebpf.errors import NamespaceError

CLONE_NEWNET = 0x40000000  # linux/sched.h
NETNS_RUN_DIR = Path("/var/run/netns")  # where `ip netns add` / pyroute2 bind-mount named netns

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def netns_path(netns: str) -> Path:
    """A name is looked up under /var/run/netns; a value containing '/' is used as a path."""
    return Path(netns) if "/" in netns else NETNS_RUN_DIR / netns


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"setns({what})", errno=err)


@contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Run the block with the calling thread inside `netns` (None: stay where we are)."""
    if netns is None:
        yield
        return
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceError(f"network namespace {netns!r} ({path})", errno=exc.errno) from exc
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(target)
        raise NamespaceError("cannot open this thread's netns", errno=exc.errno) from exc
    try:
        _setns(target, str(path))
        try:
            yield
        finally:
            try:
                _setns(home, "back to the original netns")
            except NamespaceError as exc:  # pragma: no cover - needs a kernel refusing setns
                raise NamespaceError(
                    "thread could not return to its network namespace", errno=errno_mod.EPERM
                ) from exc
    finally:
        os.close(target)
        os.close(home)
