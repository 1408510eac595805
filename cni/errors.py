"""The cni package's exception tree: every error carries its CNI wire meaning.

Owns: `CniError` and its subclasses. `CniError.code` is the CNI error code written in the JSON
error object on stdout (CNI spec 1.0.0 "Error" section, "Well-known Error Codes"):
1 incompatible version, 2 unsupported field, 3 unknown container, 4 invalid environment
variables, 5 I/O failure, 6 decoding failure, 7 invalid network config, 11 try again later;
100+ are ours. The plugin translates an error to the wire at exactly one place
(`cni.plugin.main`); the agent sends `code` in its JSON-lines answer so the plugin can relay the
agent's meaning unchanged.
"""

from __future__ import annotations

from meshcore.errors import MeshError


class CniError(MeshError):
    """A CNI operation failed. `code` is the spec error code, `details` the long explanation."""

    code = 999

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details


class IncompatibleVersion(CniError):
    """The config's cniVersion is not one we support, or the command needs a newer one (1)."""

    code = 1


class UnsupportedField(CniError):
    """A field of the network configuration has a value we do not support (2)."""

    code = 2


class InvalidEnvironment(CniError):
    """A required CNI_* environment variable is missing or malformed (4)."""

    code = 4


class IOFailure(CniError):
    """Reading the configuration from stdin failed (5)."""

    code = 5


class DecodingFailure(CniError):
    """The configuration on stdin is not JSON / not an object (6)."""

    code = 6


class InvalidNetworkConfig(CniError):
    """The configuration decodes but does not validate (7)."""

    code = 7


class TryAgainLater(CniError):
    """A transient condition; the runtime should retry (11)."""

    code = 11


class AgentUnreachable(CniError):
    """The node agent's socket cannot be reached (100, plugin-specific)."""

    code = 100


class EnrollFailed(CniError):
    """The node agent could not enroll an ambient pod (101, plugin-specific)."""

    code = 101


class NotEnrolled(CniError):
    """CHECK: the pod should be captured but the agent does not have it enrolled (102)."""

    code = 102


class AgentProtocolError(CniError):
    """The agent's answer (or the plugin's request) is not valid JSON-lines protocol (103)."""

    code = 103


BY_CODE: dict[int, type[CniError]] = {
    cls.code: cls
    for cls in (
        IncompatibleVersion,
        UnsupportedField,
        InvalidEnvironment,
        IOFailure,
        DecodingFailure,
        InvalidNetworkConfig,
        TryAgainLater,
        AgentUnreachable,
        EnrollFailed,
        NotEnrolled,
        AgentProtocolError,
    )
}


def from_code(code: int, msg: str, details: str = "") -> CniError:
    """Rebuild an error received over the agent protocol (unknown codes keep their number)."""
    cls = BY_CODE.get(code)
    if cls is not None:
        return cls(msg, details)
    err = CniError(msg, details)
    err.code = code
    return err
