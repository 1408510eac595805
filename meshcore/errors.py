"""The meshcore exception tree. Each class carries its wire meaning.

Translation to the wire happens at exactly one boundary per protocol: the HBONE server maps
`HboneError.status` to the CONNECT response status; the HTTP/2 layer maps `H2ProtocolError.code`
to a GOAWAY/RST_STREAM error code (RFC 9113 §7); TLS peer failures close the connection before
any application data and are counted with response_flags=TLS_FAILURE.

Telemetry: `response_flag(err)` is the access-log/metric `response_flags` value of a failure
(Istio ztunnel's flags: DENY, CONNECT, TLS_FAILURE), carried by the class, so no caller keeps
its own isinstance chain.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error raised by meshcore."""

    response_flag = "CONNECT"
    """The `response_flags` telemetry value when this error fails a connection."""


class IdentityError(MeshError):
    """A SPIFFE ID or identity-bearing value is malformed."""


class CertificateError(MeshError):
    """A certificate, key or CSR is malformed, or the CA refused to sign it."""


class PeerVerificationError(MeshError):
    """The TLS peer is not who we accept (chain, trust domain, SAN). Wire: close before data."""

    response_flag = "TLS_FAILURE"


class ConfigError(MeshError):
    """Configuration is invalid. `path` names the offending field (``workloads[3].addresses``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class HandoverError(MeshError):
    """A listener hand-over message is malformed, of an unknown version or out of order
    (`ztunnel.handover`); the hand-over is refused and the running process keeps serving."""


class HboneError(MeshError):
    """A CONNECT request that is refused. `status` is the HTTP status sent in the response."""

    status = 500

    @staticmethod
    def for_status(status: int, message: str) -> HboneError:
        """The error for a CONNECT the peer refused with `status` (its class by status)."""
        cls = _BY_STATUS.get(status)
        if cls is not None:
            return cls(message)
        err = HboneError(message)
        err.status = status
        return err


class BadRequest(HboneError):
    """Not CONNECT, or a malformed/forbidden :authority (400)."""

    status = 400


class Unauthorized(HboneError):
    """Authorization denied the connection (401)."""

    status = 401
    response_flag = "DENY"


class UpstreamUnavailable(HboneError):
    """No upstream, or the upstream TCP connect failed (503)."""

    status = 503


class PeerOverLimit(HboneError):
    """The requesting peer already has as many tunnels open as it may (503)."""

    status = 503
    response_flag = "PEER_LIMIT"


_BY_STATUS: dict[int, type[HboneError]] = {
    400: BadRequest,
    401: Unauthorized,
    503: UpstreamUnavailable,
}


class StreamRefused(MeshError, ConnectionResetError):
    """The peer did not process our CONNECT stream: it was above the last stream id of the
    peer's GOAWAY, or reset with REFUSED_STREAM before any response (RFC 9113 §8.7: such a
    request may be retried safely on another connection; no tunnel byte was sent on it).
    An OSError, so a caller that does not retry sees a connection failure as before."""


class DialRetired(MeshError, ConnectionAbortedError):
    """An HBONE dial finished after the pool retired its certificate (`HbonePool.retire`): its
    connection was closed unused. Not a failure of the peer: the waiters dial again without
    counting it against their attempts (each needs a `retire` call, so this is bounded)."""


class H2ProtocolError(MeshError):
    """The peer violated HTTP/2 (RFC 9113). `code` is the §7 error code for GOAWAY/RST_STREAM.
    Our own misuse of the HTTP/2 core is the `H2UsageError` subclass."""

    def __init__(self, message: str, code: int = 0x1) -> None:
        super().__init__(message)
        self.code = code


class H2UsageError(H2ProtocolError):
    """Our own code misused the HTTP/2 core's API, not the peer: a stream opened by a server or
    past the peer's limit (REFUSED_STREAM), DATA before our HEADERS (INTERNAL_ERROR)."""


class JoseError(MeshError):
    """A JWT or JWKS is unreadable or does not verify (`meshcore.jose`, `waypoint.protocol.jwt`).
    At the waypoint: 401 with Envoy's jwt_authn wording."""


def response_flag(err: BaseException) -> str:
    """`response_flags` for a failure: the class's flag; CONNECT for OS/timeout errors."""
    return err.response_flag if isinstance(err, MeshError) else "CONNECT"
