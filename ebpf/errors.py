"""Errors of the capture layer (`ebpf/`), under meshcore's `MeshError`.

Every class carries `errno` when the kernel gave one (a pyroute2 `NetlinkError.code`, a negative
libbpf return, an `OSError.errno`), so callers can tell "already there" from "not permitted"
without parsing messages. Nothing here is raised for "already in the wanted state": install,
enroll and their inverses are idempotent and treat EEXIST/ENOENT on the way as success.
"""

from __future__ import annotations

import os

from meshcore.errors import MeshError


class CaptureError(MeshError):
    """A capture operation failed. `errno` is the kernel's error number, if any."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        text = message if errno is None else f"{message}: [errno {errno}] {os.strerror(errno)}"
        super().__init__(text)
        self.message = message
        self.errno = errno


class NamespaceError(CaptureError):
    """The node's network namespace cannot be entered (missing, or setns refused)."""


class BpfFsError(CaptureError):
    """The bpffs pin directory is unusable (not on a bpffs, cannot mount or create it)."""


class BpfLoadError(CaptureError):
    """Compiling, verifying, loading or pinning the programs failed (bcc/libbpf)."""


class NotInstalledError(CaptureError):
    """A pinned program or map is missing: `NodeCapture.install()` has not run on this node."""


class MapError(CaptureError):
    """A pinned map could not be read or written, or holds a record of the wrong layout."""


class InterfaceNotFoundError(CaptureError):
    """A named interface does not exist in the node's network namespace (errno ENODEV)."""


class AttachError(CaptureError):
    """A tc qdisc or filter could not be added or removed."""


class RoutingError(CaptureError):
    """The fwmark policy-routing rule or the local route could not be added or removed."""


class NftError(CaptureError):
    """The nftables notrack table could not be added or removed."""
