"""The ambientctl exception tree: one root, `CtlError`, each carrying the process exit status.

The CLI maps an error to its message on stderr and `exit_code` at exactly one place
(`ambientctl.main.main`).
"""

from __future__ import annotations

from meshcore.errors import MeshError


class CtlError(MeshError):
    """A CLI command failed; `exit_code` is the process exit status."""

    exit_code = 1


class ManifestError(CtlError):
    """A lab manifest is invalid; the message names the document and field."""

    exit_code = 2


class LabStateError(CtlError):
    """No such lab, a lab already exists, or the lab's state file is unreadable."""

    exit_code = 3


class LabCommandError(CtlError):
    """A command the lab runs (ip, nsenter, a CNI plugin, a node process) failed."""

    exit_code = 4
